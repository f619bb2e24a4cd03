"""The master's key chain as a school meets it in packs, through `harmonicctl exchange`
(issue 6, item 5): a chain with a gap, a link not signed by the previous root, a
fork of a link held, another master's link, a link without its self-signature, a
chain past its size limit, a pack or a relay's release signed by a retired key.

Each: exit 1, one line naming the pack and why, and the school's state.db rows
(its trust_chain and releases among them), objects and deployed files unchanged."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from harmonicd.core import keys, trust
from harmonicd.core.pack import PackWriter
from tests.bad_input.helpers import (
    MASTER_ID,
    SCHOOL_ID,
    Synced,
    assert_unchanged,
    exchange,
    genuine_packs_for_school,
    header_for,
    inbox,
    pack_file_name,
    public_key,
    refusal,
    sign_release,
    signing_key,
    snapshot,
    sync_once,
    write_pack,
)
from tests.bad_input.test_trust import _tree
from tests.conftest import Server


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def rotate(m: Server, tmp: Path, *, new_root: bool = False, root: Path | None = None) -> Path | None:
    """`trust rotate` on the master; returns the root key file in use afterwards."""
    args = []
    if root is not None:
        args += ["--root-key", str(root)]
    if new_root or root is None:
        n = len(list(tmp.glob("root-*.key")))
        fresh = tmp / f"root-{n}.key"
        m.ctl("trust", "new-key", "--out", str(fresh))
        args += ["--new-root-key", str(fresh)]
        m.ctl("trust", "rotate", *args)
        return fresh
    m.ctl("trust", "rotate", *args)
    return root


def links(server: Server) -> list[trust.Link]:
    with server.store(lock=False) as st:
        return list(st.trust_chain().links)


def chain_pack(s: Server, stick: Path, key: keys.SigningKey, chain: list[list[bytes]], tag: str,
               releases: list[tuple[bytes, bytes]] | None = None,
               objects: list[tuple[int, bytes]] | None = None) -> Path:
    """A pack "from the master" to the school, signed by key, carrying chain in extra."""
    hdr = header_for(_Named(MASTER_ID), key, SCHOOL_ID, public_key(s), releases or [],
                     extra={"chain": chain})
    return write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, tag), key, hdr, objects or [])


def refused(s: Server, stick: Path, pack: Path, reason: str, before: object) -> str:
    p = exchange(s, stick)
    line = refusal(p, pack, reason)
    assert_unchanged(s, before)  # type: ignore[arg-type]
    return line


def test_a_gap_in_the_chain(synced: Synced) -> None:
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    r = rotate(m, tmp)
    r = rotate(m, tmp, root=r)
    rotate(m, tmp, root=r)
    ln = links(m)
    pack = chain_pack(s, stick, signing_key(m), [ln[0].wire(), ln[2].wire()], "gap")
    before = snapshot(s)
    refused(s, stick, pack, r"key chain .* refused: link 2 missing", before)


def test_a_link_not_signed_by_the_previous_root(synced: Synced) -> None:
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    rotate(m, tmp)
    body, _prev, own = links(m)[0].wire()
    stranger = keys.SigningKey.generate()
    forged = [body, stranger.sign(keys.TAG_CHAIN, body), own]
    pack = chain_pack(s, stick, signing_key(m), [forged], "wrongsig")
    before = snapshot(s)
    refused(s, stick, pack, r"link 1 is not signed by the previous root key", before)


def test_a_link_without_its_self_signature(synced: Synced) -> None:
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    rotate(m, tmp)
    body, prev, _own = links(m)[0].wire()
    pack = chain_pack(s, stick, signing_key(m), [[body, prev, b""]], "noself")
    before = snapshot(s)
    refused(s, stick, pack, r"link 1 has no self-signature", before)


def test_a_link_for_another_master(synced: Synced) -> None:
    """Signed by the very anchor the school pins, but naming another master id."""
    m, s, stick = synced.master, synced.school, synced.stick
    anchor = signing_key(m)
    root, signing = keys.SigningKey.generate(), keys.SigningKey.generate()
    link = trust.sign(trust.make_record("master-2", 1, root.public, signing.public, 1), anchor, root)
    pack = chain_pack(s, stick, signing, [link.wire()], "othermaster")
    before = snapshot(s)
    refused(s, stick, pack, r"link 1 is for master 'master-2', not 'master-1'", before)


def test_a_fork_of_a_link_held(synced: Synced) -> None:
    """Whoever kept a copy of the master's first key (the anchor: the root before the
    first rotation) makes another link 1 after the school has followed the real one."""
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    anchor = signing_key(m)
    rotate(m, tmp)
    sync_once(m, s, stick)
    assert [lk.body for lk in links(s)] == [lk.body for lk in links(m)]
    root, signing = keys.SigningKey.generate(), keys.SigningKey.generate()
    other = trust.sign(trust.make_record(MASTER_ID, 1, root.public, signing.public, 2), anchor, root)
    pack = chain_pack(s, stick, signing, [other.wire()], "fork")
    before = snapshot(s)
    refused(s, stick, pack, r"link 1 differs from the link 1 this server holds", before)


def test_a_pack_signed_by_a_retired_key(synced: Synced) -> None:
    """A genuine answer the master wrote before its rotation (an old stick), read
    after the school has followed the rotation: refused as a rollback."""
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    old = genuine_packs_for_school(m, tmp / "before-rotation")
    rotate(m, tmp)
    sync_once(m, s, stick)
    assert len(links(s)) == 1
    pack = inbox(s, stick) / old[0].name
    pack.write_bytes(old[0].read_bytes())
    before = snapshot(s)
    refused(s, stick, pack, r"signed by the master's retired signing key of version 0; this server trusts "
                            r"version 1 \(a rollback", before)


def test_a_new_release_signed_by_a_retired_key(synced: Synced) -> None:
    """The leaked old signing key signs a new release and a pack claiming the new
    chain: the pack's own signature already names a retired key."""
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    leaked = signing_key(m)
    rotate(m, tmp)
    sync_once(m, s, stick)
    root, objs = _tree({"index.html": b"<h1>signed with a leaked old key</h1>"})
    pack = chain_pack(s, stick, leaked, [lk.wire() for lk in links(m)], "leaked",
                      [sign_release(leaked, root, seq=2)], objs)
    before = snapshot(s)
    refused(s, stick, pack, r"retired signing key of version 0", before)


def test_a_relay_serving_a_release_signed_by_a_retired_key(synced: Synced) -> None:
    """A relay that has not followed the rotation serves the master's release as the
    old key signed it: the school, which trusts the new key only, refuses it."""
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    old_key = signing_key(m)
    rotate(m, tmp)
    sync_once(m, s, stick)
    relay = keys.SigningKey.generate()
    root, objs = _tree({"index.html": b"<h1>release two, signed before the rotation</h1>"})
    rel = sign_release(old_key, root, seq=2)
    pack = inbox(s, stick) / pack_file_name("relay-1", "oldchain")
    write_pack(pack, relay, header_for(_Named("relay-1"), relay, SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    refused(s, stick, pack, r"master-1/content release 2 .* is signed by the master's retired signing key of "
                            r"version 0", before)


def test_a_relay_cannot_forge_a_chain(synced: Synced) -> None:
    """A relay passes the chain on; one it made up itself follows from nothing."""
    _m, s, stick = synced.master, synced.school, synced.stick
    relay = keys.SigningKey.generate()
    root, signing = keys.SigningKey.generate(), keys.SigningKey.generate()
    link = trust.sign(trust.make_record(MASTER_ID, 1, root.public, signing.public, 2), relay, root)
    hdr = header_for(_Named("relay-1"), relay, SCHOOL_ID, public_key(s), [], extra={"chain": [link.wire()]})
    pack = write_pack(inbox(s, stick) / pack_file_name("relay-1", "forgedchain"), relay, hdr, [])
    before = snapshot(s)
    refused(s, stick, pack, r"link 1 is not signed by the previous root key", before)


@pytest.mark.parametrize("n", [trust.MAX_RECORDS + 1, 5000])
def test_an_oversize_chain(synced: Synced, n: int) -> None:
    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    rotate(m, tmp)
    one = links(m)[0].wire()
    pack = chain_pack(s, stick, signing_key(m), [one] * n, f"oversize{n}")
    before = snapshot(s)
    refused(s, stick, pack, rf"the key chain has {n} links \(limit 256\)", before)


@pytest.mark.parametrize("chain", [b"not a list", [[b"x", b"y"]], [["body", b"", b""]], {"a": 1}],
                         ids=["bytes", "short-link", "text-body", "map"])
def test_a_malformed_chain(synced: Synced, chain: object) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    hdr = header_for(_Named(MASTER_ID), signing_key(m), SCHOOL_ID, public_key(s), [], extra={"chain": chain})
    buf = io.BytesIO()
    w = PackWriter(buf, signing_key(m), hdr)
    w.close(last=True)
    pack = inbox(s, stick) / pack_file_name(MASTER_ID, "malformed")
    pack.write_bytes(buf.getvalue())
    before = snapshot(s)
    refused(s, stick, pack, r"key chain .* refused", before)



def test_a_real_relay_serves_only_once_it_has_followed(synced: Synced) -> None:
    """school-2 relays for school-1 (services/relay.py, from its replica). Before it
    has followed the master's rotation, the release it serves (signed by the old key)
    is refused by school-1, which has followed; once the relay has exchanged with the
    master (which sends that release again, signed by the new key), school-1 takes it."""
    from harmonicd.core.pack import PackReader
    from harmonicd.services import relay
    from harmonicd.services.exchange import Outgoing, write_packs
    from tests.conftest import make_school

    m, s, stick, tmp = synced.master, synced.school, synced.stick, synced.tmp
    r = make_school(tmp, m, keys.format_key(public_key(m)), "school-2")
    stick2 = tmp / "stick-2"
    stick2.mkdir()
    (synced.content / "new.txt").write_bytes(b"two\n")
    m.ctl("publish", "content", str(synced.content))
    sync_once(m, r, stick2)  # the relay holds release 2, signed by the key of version 0
    rotate(m, tmp)
    # school-1 follows the rotation from a pack of the master carrying nothing else.
    with m.store() as st:
        chain_only = write_packs(st, Outgoing(SCHOOL_ID, public_key(s), [], [], set(), set(), [], {}),
                                 str(inbox(s, stick))).files
    assert exchange(s, stick).returncode == 0, chain_only
    assert len(links(s)) == 1

    def relayed(tag: str) -> Path:
        """The relay's answer to school-1's request, put where school-1 looks."""
        req = sorted((stick / "HARMONIC" / "to-master").glob("school-1-*.hpk"))[-1]
        with open(req, "rb") as f:
            h = PackReader(f, str(req), lambda hh: hh.sender_key).header
        out = tmp / f"relay-out-{tag}"
        out.mkdir()
        with r.store() as st:
            files = write_packs(st, relay.for_downstream(st, h), str(out)).files
        pack = inbox(s, stick) / Path(files[0]).name
        pack.write_bytes(Path(files[0]).read_bytes())
        return pack

    pack = relayed("stale")
    before = snapshot(s)
    refused(s, stick, pack, r"master-1/content release 2 .* signed by the master's retired signing key of "
                            r"version 0", before)
    pack.unlink()
    sync_once(m, r, stick2)  # the relay follows: the chain, and release 2 signed again
    assert len(links(r)) == 1
    relayed("followed")
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert "received master-1/content release 2" in p.stdout
    assert (s.deploy / "content" / "new.txt").read_bytes() == b"two\n"

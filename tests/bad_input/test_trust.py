"""Packs from keys this server does not trust, equivocation and rollback
(RELIABILITY.md C7, H1), through `harmonicctl exchange`."""

from __future__ import annotations

import shutil
from pathlib import Path

from harmonicd.core import keys
from harmonicd.core.objects import BLOB, T_BLOB, TREE, Entry, encode_tree, object_id
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
from tests.conftest import write_tree


def _tree(files: dict[str, bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    objs: list[tuple[int, bytes]] = [(BLOB, d) for d in files.values()]
    tree = encode_tree([Entry(n, T_BLOB, 0, object_id(BLOB, d), len(d)) for n, d in files.items()])
    objs.append((TREE, tree))
    return object_id(TREE, tree), objs


def test_pack_signed_by_an_unknown_key(synced: Synced) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    stranger = keys.SigningKey.generate()
    root, objs = _tree({"index.html": b"<h1>not from the master</h1>"})
    rel = sign_release(stranger, root, seq=2)
    box = inbox(s, stick)
    skey = public_key(s)
    # The header names the stranger's key.
    own = write_pack(box / pack_file_name(MASTER_ID, "stranger"), stranger,
                     header_for(m, stranger, SCHOOL_ID, skey, [rel]), objs)
    # The header names the master's key, the footer is signed by the stranger.
    forged = write_pack(box / pack_file_name(MASTER_ID, "forged"), stranger,
                        header_for(m, signing_key(m), SCHOOL_ID, skey, [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, own, r"not trust")
    refusal(p, forged, r"signature does not verify")
    assert_unchanged(s, before)


def test_release_signed_by_another_key_in_a_pack_signed_by_the_master(synced: Synced) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    root, objs = _tree({"index.html": b"<h1>swapped</h1>"})
    rel = sign_release(keys.SigningKey.generate(), root, seq=2)
    f = write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, "relsig"), signing_key(m),
                   header_for(m, signing_key(m), SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"signature does not verify")
    assert_unchanged(s, before)


def test_release_owned_by_someone_else(synced: Synced) -> None:
    """A pack signed by the master carrying a release that claims another owner."""
    m, s, stick = synced.master, synced.school, synced.stick
    root, objs = _tree({"x": b"x"})
    rel = sign_release(signing_key(m), root, seq=2, owner="master-2")
    f = write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, "owner"), signing_key(m),
                   header_for(m, signing_key(m), SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"not signed by the master")
    assert_unchanged(s, before)


def test_master_refuses_unknown_and_impostor_schools(synced: Synced, tmp_path: Path) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    stranger = keys.SigningKey.generate()
    mkey = public_key(m)
    box = inbox(m, stick)
    root, objs = _tree({"day.json": b'{"logins": 999}'})

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

    cases = {}
    # Claims to be school-1, signed by another key.
    rel = sign_release(stranger, root, seq=5, collection="stats", owner=SCHOOL_ID)
    cases["impostor"] = (write_pack(box / pack_file_name(SCHOOL_ID, "impostor"), stranger,
                                    header_for(Fake(SCHOOL_ID), stranger, MASTER_ID, mkey, [rel]), objs),
                         r"signed by another key")
    # A school the master never enrolled.
    rel = sign_release(stranger, root, seq=1, collection="stats", owner="school-9")
    cases["unknown"] = (write_pack(box / pack_file_name("school-9", "unknown"), stranger,
                                   header_for(Fake("school-9"), stranger, MASTER_ID, mkey, [rel]), objs),
                        r"not an enrolled school")
    # A sender id that is not an id at all.
    cases["badid"] = (write_pack(box / pack_file_name("x", "badid"), stranger,
                                 header_for(Fake("../../etc"), stranger, MASTER_ID, mkey, []), objs),
                      r"invalid sender id")
    # school-1's real key, but a release of another school's collection.
    skey = signing_key(s)
    rel = sign_release(skey, root, seq=1, collection="stats", owner="school-2")
    cases["other"] = (write_pack(box / pack_file_name(SCHOOL_ID, "other"), skey,
                                 header_for(Fake(SCHOOL_ID), skey, MASTER_ID, mkey, [rel]), objs),
                      r"does not own")
    before = snapshot(m)
    p = exchange(m, stick)
    for f, why in cases.values():
        refusal(p, f, why)
    assert_unchanged(m, before)
    assert not (stick / "HARMONIC" / f"to-{SCHOOL_ID}").exists() or not list(
        (stick / "HARMONIC" / f"to-{SCHOOL_ID}").glob("*.hpk")), "the master answered a refused pack"


def test_equivocation_same_seq_other_content(synced: Synced) -> None:
    """Release 1 is held; a different release 1, signed by the master's real key."""
    m, s, stick = synced.master, synced.school, synced.stick
    root, objs = _tree({"index.html": b"<h1>another release one</h1>"})
    rel = sign_release(signing_key(m), root, seq=1)
    f = write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, "equivocation"), signing_key(m),
                   header_for(m, signing_key(m), SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"differs from the release 1 already held")
    assert_unchanged(s, before)


def test_equivocation_at_the_master(synced: Synced) -> None:
    """school-1's stats release 1 is held by the master; a different one with the same number."""
    m, s, stick = synced.master, synced.school, synced.stick
    write_tree(s.source("stats"), {"day.json": b'{"logins": 1}'})
    sync_once(m, s, stick)
    with m.store(lock=False) as st:
        held = st.db.collection(f"{SCHOOL_ID}/stats")
        assert held is not None
        seq = held.seq
    assert seq >= 1
    root, objs = _tree({"day.json": b'{"logins": 1000}'})
    skey = signing_key(s)
    rel = sign_release(skey, root, seq=seq, collection="stats", owner=SCHOOL_ID)

    class Me:
        name = SCHOOL_ID

    f = write_pack(inbox(m, stick) / pack_file_name(SCHOOL_ID, "equivocation"), skey,
                   header_for(Me(), skey, MASTER_ID, public_key(m), [rel]), objs)
    before = snapshot(m)
    p = exchange(m, stick)
    refusal(p, f, r"differs from the release")
    assert_unchanged(m, before)


def test_old_release_from_an_old_stick(synced: Synced) -> None:
    """Release 2 is held; a pack of release 1 (never imported: a second stick) comes
    back. Exit 0, a warning naming it, nothing changed."""
    m, s, stick = synced.master, synced.school, synced.stick
    old = genuine_packs_for_school(m, synced.tmp / "old-stick")  # release 1, as a second stick got it
    (synced.content / "index.html").write_bytes(b"<h1>two</h1>")
    assert m.ctl("publish", "content", str(synced.content)).stdout.strip() == "2"
    sync_once(m, s, stick)
    with s.store(lock=False) as st:
        coll = st.db.collection("content")
        assert coll is not None
        assert coll.seq == 2
    box = inbox(s, stick)
    back = box / old[0].name
    shutil.copy(old[0], back)
    before = snapshot(s)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if back.name in ln]
    assert len(lines) == 1, p.stderr
    assert "older than release 2" in lines[0]
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>"
    # Nothing changed but the receipt of that pack (so the next visit skips it
    # quietly) and the time of the last contact with the master.
    after = snapshot(s)
    added = [r for r in after.rows["packs"] if r not in before.rows["packs"]]
    assert [(r[0], r[2]) for r in added] == [(_pack_id(old[0]), "in")]
    after.rows["packs"] = before.rows["packs"]
    assert [r[:5] for r in after.rows["peers"]] == [r[:5] for r in before.rows["peers"]]  # id, key, role, ...
    after.rows["peers"] = before.rows["peers"]
    assert after.rows == before.rows
    assert after.trusted["objects"] == before.trusted["objects"]
    assert after.trusted["deploy"] == before.trusted["deploy"]
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert back.name not in p.stderr


def _pack_id(path: Path) -> bytes:
    import io

    from harmonicd.core.pack import PackReader

    with open(path, "rb") as f:
        return PackReader(io.BytesIO(f.read()), str(path), lambda h: h.sender_key).header.pack_id


def test_same_pack_again_is_skipped_quietly(synced: Synced) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    [pk] = genuine_packs_for_school(m, synced.tmp / "again")
    shutil.copy(pk, inbox(s, stick) / pk.name)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    shutil.copy(pk, inbox(s, stick) / pk.name)
    before = snapshot(s)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert "refused" not in p.stderr
    assert_unchanged(s, before)


def test_pack_for_another_server_is_left_alone(synced: Synced) -> None:
    """A pack whose recipient key is not ours (another school's, or a flipped bit in
    that field) is not ours to judge: left on the stick, nothing changed."""
    m, s, stick = synced.master, synced.school, synced.stick
    root, objs = _tree({"index.html": b"<h1>for someone else</h1>"})
    rel = sign_release(signing_key(m), root, seq=2)
    other = keys.SigningKey.generate().public
    f = write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, "elsewhere"), signing_key(m),
                   header_for(m, signing_key(m), "school-2", other, [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert f.exists()
    assert_unchanged(s, before)

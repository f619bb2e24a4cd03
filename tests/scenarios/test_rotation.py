"""Key rotation end to end (issue 6, item 5): real servers, real commands, real daemons.

- a school offline through three rotations (the first moves the root off the
  master, the second replaces the signing key only, the third the root too)
  catches up by stick; its request, addressed to the key it knew, is answered;
- a school online follows the same rotations made while the master's daemon
  runs (the daemon signs with the new key from its next job), and GET /v1/trust
  serves the chain;
- a crash of `trust rotate` between its durable steps never leaves the master
  signing packs a school refuses;
- after a leaked signing key signed a release the school took, a rotation puts
  the master's own release back and the leaked key's packs are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harmonicd.core import keys
from harmonicd.peer import client
from tests.bad_input.helpers import (
    MASTER_ID,
    SCHOOL_ID,
    exchange,
    header_for,
    inbox,
    pack_file_name,
    public_key,
    sign_release,
    signing_key,
    sync_once,
    write_pack,
)
from tests.bad_input.test_trust import _tree
from tests.conftest import HARMONICCTL, Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, start_daemon
from tests.daemon.test_online import free_port, no_auto_sync

__all__ = ["start_daemon"]


def show(server: Server) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(server.ctl("trust", "show", "--json").stdout)
    return out


def three_rotations(m: Server, tmp: Path, publish: Callable[[int], None]) -> None:
    """v1: the root leaves the master (new root key), v2: signing key only (same root),
    v3: root rotation (the old root hands over to a new one); a release after each."""
    r1, r2 = tmp / "root-1.key", tmp / "root-2.key"
    m.ctl("trust", "new-key", "--out", str(r1))
    m.ctl("trust", "rotate", "--new-root-key", str(r1))
    publish(2)
    m.ctl("trust", "rotate", "--root-key", str(r1))
    publish(3)
    m.ctl("trust", "new-key", "--out", str(r2))
    m.ctl("trust", "rotate", "--root-key", str(r1), "--new-root-key", str(r2))
    publish(4)
    t = show(m)
    assert t["version"] == 3
    assert t["root"] == keys.format_key(keys.SigningKey(bytes.fromhex(r2.read_text())).public)
    assert t["links"][1]["root"] == t["links"][0]["root"]  # v2 kept the root


def held_signatures_verify(s: Server) -> None:
    """Every release of the master the school holds verifies against the key it trusts now."""
    with s.store(lock=False) as st:
        key = st.master_key()
        rows = [r for c in st.db.collections() if c.mode == "replica" for r in st.db.releases(c.name)]
    assert rows
    for r in rows:
        assert keys.verify(key, keys.TAG_RELEASE, r.body, r.sig), f"{r.name} release {r.seq} has an old signature"


def test_offline_school_follows_three_rotations_by_stick(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    m, s, stick = pair
    anchor = public_key(m)
    content = tmp_path / "content"

    def publish(n: int) -> None:
        write_tree(content, {"index.html": f"<h1>release {n}</h1>".encode()})
        assert m.ctl("publish", "content", str(content)).stdout.strip() == str(n)

    publish(1)
    sync_once(m, s, stick)
    three_rotations(m, tmp_path, publish)
    assert public_key(m) == anchor, "`harmonicctl key` on the master prints the anchor, through rotations"
    assert show(s)["version"] == 0
    write_tree(s.source("stats"), {"day.json": b'{"offline": true}'})
    # The school still addresses the key it knows (the anchor); the master answers.
    s.ctl("exchange", str(stick))
    req = next((stick / "HARMONIC" / "to-master").glob("school-1-*.hpk"))
    with open(req, "rb") as f:
        from harmonicd.core.pack import PackReader

        assert PackReader(f, str(req), lambda h: h.sender_key).header.recipient_key == anchor
    m.ctl("exchange", str(stick))
    out = s.ctl("exchange", str(stick)).stdout
    assert "received master-1/content release 4" in out, out
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>release 4</h1>"
    assert (m.deploy / "school-1" / "stats" / "day.json").read_bytes() == b'{"offline": true}'
    ts, tm = show(s), show(m)
    assert ts == tm
    assert ts["version"] == 3
    with s.store(lock=False) as st:
        assert len(st.db.chain_links()) == 3
    held_signatures_verify(s)
    # Once more: nothing new, the chain is not sent back as new links.
    sync_once(m, s, stick)
    assert show(s) == tm
    s.ctl("verify")


def test_online_school_follows_rotations_of_a_running_master(tmp_path: Path,
                                                             start_daemon: Callable[..., DaemonProc]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", url)
    no_auto_sync(s)
    content = tmp_path / "content"

    def publish(n: int) -> None:
        write_tree(content, {"index.html": f"<h1>release {n}</h1>".encode(), "big.bin": os.urandom(200_000)})
        assert m.ctl("publish", "content", str(content)).stdout.strip() == str(n)

    def sync() -> str:
        p = s.ctl("sync", "--wait", check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    publish(1)
    md = start_daemon(m)
    start_daemon(s)
    assert "content release 1" in sync()
    # Rotated while the master's daemon runs, release 1 signed again: the school,
    # addressing the old key, gets the chain and the new signature in its answer.
    r1 = tmp_path / "root-1.key"
    m.ctl("trust", "new-key", "--out", str(r1))
    m.ctl("trust", "rotate", "--new-root-key", str(r1))
    sync()
    assert show(s)["version"] == 1
    held_signatures_verify(s)
    # Served over HTTP, with a short cache time, and followed from the anchor.
    with urllib.request.urlopen(f"{url}/v1/trust", timeout=10) as resp:
        assert resp.headers["Cache-Control"] == "public, max-age=60"
        body = json.loads(resp.read())
    assert body["version"] == 1
    assert body["signing"] == show(m)["signing"]
    state = client.fetch_trust(url, keys.parse_key(key))
    assert state.version == 1
    assert keys.format_key(state.signing) == show(m)["signing"]
    # Two more rotations and releases; the school follows at its next sync.
    r2 = tmp_path / "root-2.key"
    publish(2)
    m.ctl("trust", "rotate", "--root-key", str(r1))
    publish(3)
    m.ctl("trust", "new-key", "--out", str(r2))
    m.ctl("trust", "rotate", "--root-key", str(r1), "--new-root-key", str(r2))
    out = sync()
    assert "content release 3" in out, out
    assert tree_digest(s.deploy / "content") == tree_digest(content)
    assert show(s) == show(m)
    assert show(s)["version"] == 3
    held_signatures_verify(s)
    # The daemon was never restarted: it signed with each new key from its next job on.
    assert md.proc.poll() is None
    assert "nothing new" in sync()


@pytest.mark.parametrize("point", ["rotate-key-staged", "rotate-committed"])
def test_a_crash_in_rotate_leaves_a_master_that_signs_verifiable_packs(
        pair: tuple[Server, Server, Path], tmp_path: Path, point: str) -> None:
    m, s, stick = pair
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>one</h1>"})
    m.ctl("publish", "content", str(content))
    sync_once(m, s, stick)
    before_key = (m.state / "key").read_text()
    root = tmp_path / "root.key"
    m.ctl("trust", "new-key", "--out", str(root))
    p = subprocess.run([*HARMONICCTL, "--config", str(m.config), "trust", "rotate", "--new-root-key", str(root)],
                       env={**os.environ, "HARMONICD_CRASH_AT": point}, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == -9, p.stderr
    assert (m.state / "key.next").exists()
    committed = point == "rotate-committed"
    # Whatever the next command is, it finds STATE/key as the chain says.
    assert show(m)["version"] == (1 if committed else 0)
    write_tree(content, {"index.html": b"<h1>two</h1>"})
    m.ctl("publish", "content", str(content))
    assert not (m.state / "key.next").exists()
    assert ((m.state / "key").read_text() != before_key) == committed
    sync_once(m, s, stick)
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>"
    assert show(s) == show(m)
    held_signatures_verify(s)
    # The rotation can be done (again) afterwards.
    if not committed:
        m.ctl("trust", "rotate", "--new-root-key", str(root))
    else:
        m.ctl("trust", "rotate", "--root-key", str(root))
    sync_once(m, s, stick)
    assert show(s) == show(m)


def test_a_leaked_signing_key_is_rotated_away(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """The master's signing key leaked and signed a release with a huge number,
    which the school took (it was the master's key then). After `trust rotate`,
    the school's next sync puts the master's own release back (the higher number
    no longer counts: a retired key signed it) and the leaked key's packs are
    refused from then on."""
    m, s, stick = pair
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>the master's</h1>"})
    m.ctl("publish", "content", str(content))
    sync_once(m, s, stick)
    leaked = signing_key(m)

    class Master:
        name = MASTER_ID

    root, objs = _tree({"index.html": b"<h1>pwned</h1>"})
    forged = sign_release(leaked, root, seq=1 << 40)

    def forged_pack(tag: str) -> Path:
        return write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, tag), leaked,
                          header_for(Master(), leaked, SCHOOL_ID, public_key(s), [forged]), objs)

    forged_pack("leak")
    assert exchange(s, stick).returncode == 0
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>pwned</h1>"
    new_root = tmp_path / "root.key"
    m.ctl("trust", "new-key", "--out", str(new_root))
    m.ctl("trust", "rotate", "--new-root-key", str(new_root))
    sync_once(m, s, stick)
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>the master's</h1>"
    with s.store(lock=False) as st:
        coll = st.db.collection("content")
        assert coll is not None
        assert coll.seq == 1
        assert [r.seq for r in st.db.releases("content")] == [1]
    held_signatures_verify(s)
    pack = forged_pack("replayed")
    p = exchange(s, stick)
    assert p.returncode == 1
    assert pack.name in p.stderr
    assert "retired signing key of version 0" in p.stderr
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>the master's</h1>"


def test_rotate_refusals(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    m, s, _stick = pair
    root = tmp_path / "root.key"
    other = tmp_path / "other.key"
    print(m.ctl("trust", "new-key", "--out", str(root)).stdout)
    m.ctl("trust", "new-key", "--out", str(other))
    assert (root.stat().st_mode & 0o777) == 0o600
    p = m.ctl("trust", "new-key", "--out", str(root), check=False)
    assert p.returncode == 2
    assert "never overwritten" in p.stderr
    p = m.ctl("trust", "rotate", check=False)
    assert p.returncode == 2
    assert "--new-root-key" in p.stderr
    assert show(m)["version"] == 0
    m.ctl("trust", "rotate", "--new-root-key", str(root))
    for args, why in [((), "--root-key FILE is needed"), (("--root-key", str(other)), "not the current root key"),
                      (("--root-key", str(tmp_path / "nothing")), "cannot read")]:
        p = m.ctl("trust", "rotate", *args, check=False)
        assert p.returncode == 2, p.stderr
        assert why in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert show(m)["version"] == 1
    p = s.ctl("trust", "rotate", "--new-root-key", str(other), check=False)
    assert p.returncode == 2
    assert "for the master" in p.stderr
    # new-key needs no configuration at all.
    p = subprocess.run([*HARMONICCTL, "--config", str(tmp_path / "none.toml"), "trust", "new-key", "--out",
                        str(tmp_path / "free.key")], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert keys.parse_key(p.stdout)

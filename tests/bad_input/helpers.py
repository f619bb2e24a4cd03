"""Helpers for bad-input tests: real servers, hostile packs put where the
receiver looks, and the check that nothing trusted changed."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonicd.core import keys, release
from harmonicd.core.codec import pack_msg
from harmonicd.core.objects import BLOB, T_BLOB, T_DIR, TREE, ObjectId, object_id
from harmonicd.core.pack import Header, PackWriter, new_pack_id
from tests.conftest import HARMONICCTL, Server, trusted_state, write_tree

MASTER_ID = "master-1"
SCHOOL_ID = "school-1"


def signing_key(server: Server) -> keys.SigningKey:
    """The server's own key, as the trusted sender of a hostile-but-signed pack would hold it."""
    return keys.SigningKey(bytes.fromhex((server.state / "key").read_text().strip()))


def public_key(server: Server) -> bytes:
    return keys.parse_key(server.ctl("key").stdout)


def inbox(server: Server, stick: Path, *, empty: bool = True) -> Path:
    """Where `exchange` looks for packs addressed to this server; with empty,
    genuine packs left there by earlier visits are taken away first."""
    folder = "to-master" if server.name == MASTER_ID else f"to-{server.name}"
    p = stick / "HARMONIC" / folder
    p.mkdir(parents=True, exist_ok=True)
    if empty:
        for f in p.iterdir():
            if f.is_file() and f.name.endswith(".hpk"):
                f.unlink()
    return p


def pack_file_name(sender: str, tag: str) -> str:
    """A pack-like file name (``<sender>-<time>-<id>-v001.hpk``) carrying a tag for the test."""
    return f"{sender}-20261127T000000-{tag}-v001.hpk"


# --------------------------------------------------------------------------- the state that must not change


def _db_rows(server: Server, *, ignore_export: bool) -> dict[str, list[tuple[Any, ...]]]:
    with server.store(lock=False) as st:
        conn = st.db.conn
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out: dict[str, list[tuple[Any, ...]]] = {}
        for t in tables:
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')]
            rows = conn.execute(f'SELECT * FROM "{t}"').fetchall()
            if ignore_export and t == "packs":
                rows = [r for r in rows if r[cols.index("direction")] != "out"]
            if ignore_export and t == "collections" and "scanned_ns" in cols:
                i = cols.index("scanned_ns")
                rows = [tuple(None if j == i else v for j, v in enumerate(r)) for r in rows]
            out[t] = sorted(rows, key=repr)
    return out


@dataclass
class Snapshot:
    trusted: dict[str, str]
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)


def snapshot(server: Server) -> Snapshot:
    """trusted_state(server), and the database rows that an import could change.

    A school's `exchange` always *exports* too (RELIABILITY's "export what it
    should send"): it writes a request pack for the master and records it
    (a `packs` row with direction 'out', and the `scanned_ns` of its own
    collections). That bookkeeping is not trusted content, so for a school the
    rows are compared with it left out; everything else (objects, deployed
    folders, releases, collections, peers, pack receipts) must be equal."""
    return Snapshot(trusted_state(server), _db_rows(server, ignore_export=server.name != MASTER_ID))


def assert_unchanged(server: Server, before: Snapshot) -> None:
    after = snapshot(server)
    assert after.trusted["objects"] == before.trusted["objects"], "object files changed"
    assert after.trusted["deploy"] == before.trusted["deploy"], "deployed folders changed"
    for t in sorted(set(before.rows) | set(after.rows)):
        old, new = before.rows.get(t) or [], after.rows.get(t) or []
        assert new == old, (f"table {t} changed: removed {[r for r in old if r not in new]}, "
                            f"added {[r for r in new if r not in old]}")
    if server.name == MASTER_ID:
        assert after.trusted == before.trusted, "the master's trusted state changed"


# --------------------------------------------------------------------------- running and reading the result


def exchange(server: Server, stick: Path, *, timeout: float = 120, mem_bytes: int | None = None
             ) -> subprocess.CompletedProcess[str]:
    """`harmonicctl exchange STICK`, optionally with RLIMIT_AS set (proves bounded memory)."""
    if mem_bytes is None:
        return server.ctl("exchange", str(stick), check=False, timeout=timeout)

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    env = {k: v for k, v in os.environ.items() if k != "HARMONICD_CRASH_AT"}
    return subprocess.run([*HARMONICCTL, "--config", str(server.config), "exchange", str(stick)],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False,
                          preexec_fn=limit)


def refusal(p: subprocess.CompletedProcess[str], pack: Path, reason: str) -> str:
    """Exit code 1, and exactly one line of stderr that names the pack file and
    matches ``reason`` (a regular expression). Returns that line."""
    assert p.returncode == 1, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if pack.name in ln]
    assert len(lines) == 1, f"expected one line naming {pack.name}:\n{p.stderr}"
    assert re.search(reason, lines[0], re.IGNORECASE), f"{reason!r} not in {lines[0]!r}"
    return lines[0]


def refused_all(p: subprocess.CompletedProcess[str], packs: list[Path], reason: str) -> None:
    for pk in packs:
        refusal(p, pk, reason)


# --------------------------------------------------------------------------- setting up


@dataclass
class Synced:
    master: Server
    school: Server
    stick: Path
    content: Path
    tmp: Path


CONTENT = {
    "index.html": b"<h1>Welcome</h1>\n",
    "docs/readme.txt": b"read me\n" * 50,
    "img/photo.bin": bytes(range(256)) * 1200,  # 300 KiB: a file by recipe
}


def sync_once(m: Server, s: Server, stick: Path) -> None:
    """The school's request goes up, the master answers, the school takes it."""
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))


def make_synced(m: Server, s: Server, stick: Path, tmp: Path) -> Synced:
    content = tmp / "content"
    write_tree(content, CONTENT)
    assert m.ctl("publish", "content", str(content)).stdout.strip() == "1"
    sync_once(m, s, stick)
    assert (s.deploy / "content" / "index.html").read_bytes() == CONTENT["index.html"]
    return Synced(m, s, stick, content, tmp)


def genuine_packs_for_school(m: Server, folder: Path) -> list[Path]:
    """What the master would write for the school now, made in-process by the real code,
    into a folder of its own (so nothing imports it yet)."""
    from harmonicd.services.exchange import for_school, write_packs

    folder.mkdir(parents=True, exist_ok=True)
    with m.store() as st:
        res = write_packs(st, for_school(st, SCHOOL_ID), str(folder))
    return [Path(p) for p in res.files]


# --------------------------------------------------------------------------- crafting hostile packs


def header_for(sender: Server, sender_key: keys.SigningKey, recipient: str | None, recipient_key: bytes | None,
               releases: list[tuple[bytes, bytes]] | None = None, **kw: Any) -> Header:
    fields: dict[str, Any] = dict(pack_id=new_pack_id(), sender=sender.name, sender_key=sender_key.public,
                                  recipient=recipient, recipient_key=recipient_key, created=int(time.time()),
                                  volume=1, releases=releases or [], plan={"objects": 0, "bytes": 0})
    fields.update(kw)
    return Header(**fields)


def write_pack(path: Path, key: keys.SigningKey, hdr: Header, objects: list[tuple[int, bytes]]) -> Path:
    """A well-formed pack of the given objects (kind, payload), signed by key."""
    buf = io.BytesIO()
    w = PackWriter(buf, key, hdr)
    for kind, payload in objects:
        w.add(kind, object_id(kind, payload), payload)
    w.close(last=True)
    path.write_bytes(buf.getvalue())
    return path


def sign_release(key: keys.SigningKey, root: ObjectId, *, seq: int, collection: str = "content",
                 owner: str = MASTER_ID, size: int = 0, files: int = 0) -> tuple[bytes, bytes]:
    sr = release.sign(release.Release(collection=collection, owner=owner, seq=seq, root=root,
                                      created=int(time.time()), size=size, files=files), key)
    return sr.body, sr.signature


def raw_tree(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A tree encoded by hand: no name checks, no sorting (entries as given)."""
    return pack_msg([[name, typ, 0, oid, size] for name, typ, oid, size in entries])


def hostile_tree(names: list[str], *, nest: str | None = None) -> tuple[ObjectId, list[tuple[int, bytes]]]:
    """A tree whose entries carry the given names (sorted by bytes, as a real tree is),
    each a small file; with nest, put them one folder down. Returns (root, objects)."""
    blob = b"pwned\n"
    bid = object_id(BLOB, blob)
    ordered = sorted(names, key=lambda n: n.encode("utf-8", "surrogatepass"))
    tree = raw_tree([(n, T_BLOB, bid, len(blob)) for n in ordered])
    objs: list[tuple[int, bytes]] = [(BLOB, blob), (TREE, tree)]
    root = object_id(TREE, tree)
    if nest is not None:
        top = raw_tree([(nest, T_DIR, root, len(blob) * len(names))])
        objs.append((TREE, top))
        root = object_id(TREE, top)
    return root, objs

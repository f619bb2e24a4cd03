"""A generated tree through the whole round trip with the real commands, then a
change set down and statistics up, acknowledged, pruned and archived."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

from harmonicd import __version__
from harmonicd.core.objects import BLOB, object_id
from tests.conftest import Server, tree_digest, write_tree
from tests.crash.helpers import KiB, change_set, coll, gen_tree, status


def _check_shape(st: dict[str, Any], sid: str, role: str) -> None:
    """The fields INTERFACE.md promises, with their types, without a daemon."""
    assert st["id"] == sid
    assert st["role"] == role
    assert st["version"] == __version__
    assert st["daemon"] is False
    assert st["activity"] is None
    assert st["upstream"] is None  # a master, or a school without an upstream URL
    for c in st["collections"]:
        for k in ("name", "owner", "seq", "root", "path", "pending_bytes"):
            assert k in c, f"status collection lacks {k}: {c}"
        assert isinstance(c["seq"], int)
        assert isinstance(c["pending_bytes"], int)
        assert c["root"] is None or (isinstance(c["root"], str) and len(c["root"]) == 64)
    if role == "master":
        assert isinstance(st["schools"], list)
        for row in st["schools"]:
            for k in ("id", "last_seen", "how", "holds", "waiting_bytes"):
                assert k in row, f"status school row lacks {k}: {row}"


def _held(row: dict[str, Any], collection: str) -> int | None:
    for k, v in row["holds"].items():
        if k == collection or k.endswith("/" + collection):
            return int(v)
    return None


def _has_object(server: Server, oid: bytes) -> bool:
    with server.store(lock=False) as st:
        return st.objects.has(oid)


def test_generated_tree_round_trip(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=7)
    assert sum(1 for p in src.rglob("*") if p.is_file()) >= 300
    assert sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) > 4 << 20

    # Fresh servers: the school lists its three collections with seq 0, root null.
    st = status(s)
    _check_shape(st, "school-1", "node")
    assert {c["name"] for c in st["collections"]} >= {"content", "stats", "backup"}
    for name in ("content", "stats", "backup"):
        assert coll(st, name)["seq"] == 0
        assert coll(st, name)["root"] is None
    assert coll(st, "stats")["owner"] == "school-1"
    assert coll(st, "stats")["path"] == str(s.source("stats"))
    _check_shape(status(m), "master-1", "master")

    assert m.ctl("publish", "content", str(src)).stdout.strip() == "1"
    assert m.ctl("publish", "content", str(src)).stdout.strip() == "1"  # unchanged: no new release
    master_root = coll(status(m), "content")["root"]

    rng = random.Random(3)
    raw = rng.randbytes(12 * KiB)  # one blob (below the chunking threshold)
    stats = s.source("stats")
    write_tree(stats, {"2026-11-27.json": b'{"logins": 12}', "raw/day1.bin": raw})

    # Trip 1, up: the school's request and statistics.
    s.ctl("exchange", str(stick))
    c = coll(status(s), "stats")
    assert c["seq"] == 1
    assert c["acked_seq"] == 0
    assert c["pending_bytes"] > 0
    assert tree_digest(s.deploy / "content") == "absent"

    # The master takes the statistics and answers with the content and an ack.
    m.ctl("exchange", str(stick))
    assert tree_digest(m.deploy / "school-1" / "stats") == tree_digest(stats)
    st = status(m)
    _check_shape(st, "master-1", "master")
    assert coll(st, "school-1/stats")["seq"] == 1
    assert coll(st, "school-1/stats")["owner"] == "school-1"
    row = next(r for r in st["schools"] if r["id"] == "school-1")
    assert row["how"] == "stick"
    assert row["last_seen"]
    assert row["waiting_bytes"] > 0  # the school does not hold content yet

    # Trip 1, down.
    out = s.ctl("exchange", str(stick)).stdout
    assert "received master-1/content release 1" in out
    dep = s.deploy / "content"
    assert tree_digest(dep) == tree_digest(src)
    assert os.stat(dep / "bin" / "run.sh").st_mode & stat.S_IXUSR
    assert (dep / "empty.txt").stat().st_size == 0
    assert (dep / "void" / "nothing").is_dir()
    assert not any((dep / "void" / "nothing").iterdir())
    st = status(s)
    _check_shape(st, "school-1", "node")
    c = coll(st, "content")
    assert (c["seq"], c["root"], c["owner"], c["pending_bytes"]) == (1, master_root, "master-1", 0)
    assert c["path"] == str(dep)
    c = coll(st, "stats")
    assert c["acked_seq"] == 1
    assert c["pending_bytes"] == 0
    s.ctl("verify")
    m.ctl("verify")

    # Trip 2: a change set down; new statistics up while the school prunes its folder.
    change_set(src, seed=11)
    assert m.ctl("publish", "content", str(src)).stdout.strip() == "2"
    (stats / "raw" / "day1.bin").unlink()
    (stats / "2026-11-27.json").unlink()
    write_tree(stats, {"2026-11-28.json": b'{"logins": 30}'})

    s.ctl("exchange", str(stick))
    c = coll(status(s), "stats")
    assert c["seq"] == 2
    assert c["acked_seq"] == 1
    assert c["pending_bytes"] > 0
    # Not yet acknowledged: release 1 is still what the master confirmed, so its
    # data stays (acknowledged before forgotten).
    assert _has_object(s, object_id(BLOB, raw))
    m.ctl("exchange", str(stick))
    out = s.ctl("exchange", str(stick)).stdout
    assert "received master-1/content release 2" in out
    assert "confirmed stats release 2" in out
    assert tree_digest(dep) == tree_digest(src)

    # The master's archive keeps what the school deleted from its folder.
    arch = m.deploy / "school-1" / "stats"
    assert (arch / "2026-11-27.json").read_bytes() == b'{"logins": 12}'
    assert (arch / "raw" / "day1.bin").read_bytes() == raw
    assert (arch / "2026-11-28.json").read_bytes() == b'{"logins": 30}'
    # The school, acknowledged, forgets: status shows nothing pending, the data is pruned.
    st = status(s)
    c = coll(st, "stats")
    assert (c["seq"], c["acked_seq"], c["pending_bytes"]) == (2, 2, 0)
    assert coll(st, "content")["seq"] == 2
    assert not _has_object(s, object_id(BLOB, raw))
    assert _has_object(m, object_id(BLOB, raw))
    s.ctl("verify")
    m.ctl("verify")

    # The master learns from the school's next request that it is up to date.
    m.ctl("exchange", str(stick))
    st = status(m)
    row = next(r for r in st["schools"] if r["id"] == "school-1")
    assert _held(row, "content") == 2, row
    assert row["waiting_bytes"] == 0, row
    assert coll(st, "school-1/stats")["seq"] == 2
    assert tree_digest(arch / "raw") != "absent"
    # Nothing new for the school: its next visit is quiet and changes nothing deployed.
    before = tree_digest(dep)
    p = s.ctl("exchange", str(stick))
    assert p.stderr == ""
    assert "received" not in p.stdout
    assert tree_digest(dep) == before


def test_archive_survives_school_pruning_over_several_trips(pair: tuple[Server, Server, Path]) -> None:
    """Each day's file is written, carried up, acknowledged and deleted by the school;
    the master's archive ends with every day."""
    m, s, stick = pair
    stats = s.source("stats")
    days = [f"2026-12-{d:02d}.json" for d in range(1, 5)]
    for day in days:
        for p in stats.iterdir():
            p.unlink()
        (stats / day).write_bytes(day.encode() * 10)
        s.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        s.ctl("exchange", str(stick))
        assert coll(status(s), "stats")["pending_bytes"] == 0
    arch = m.deploy / "school-1" / "stats"
    assert sorted(os.listdir(arch)) == days
    for day in days:
        assert (arch / day).read_bytes() == day.encode() * 10
    m.ctl("verify")
    s.ctl("verify")

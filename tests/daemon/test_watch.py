"""Watched source folders on a school server: what the daemon publishes by itself.

A file written slowly is published once, whole; a change made while the
daemon was stopped is published at the next start; the periodic rescan finds
what the watcher could not see; over the pending quota nothing is published
by itself (status and log say why) while an explicit publish still works;
added, removed and renamed files are published after the quiet period.
Release contents are read back from the store in-process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harmonicd.core.objects import BLOB, T_BLOB, T_RECIPE
from tests.conftest import Server, make_master, make_school, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_lifecycle import EventReader, set_option

QUIET = 1.0


def _school(tmp: Path, **publish: str) -> Server:
    m, key = make_master(tmp)
    s = make_school(tmp, m, key)
    set_option(s.config, "publish", "quiet_seconds", str(QUIET))
    for k, v in publish.items():
        set_option(s.config, "publish", k, v)
    return s


def releases(server: Server, name: str) -> dict[int, dict[str, bytes]]:
    """Every stored release of an owned collection: seq -> {path: content} of its files."""
    out: dict[int, dict[str, bytes]] = {}
    with server.store(lock=False) as st:
        for row in st.db.releases(name):
            files: dict[str, bytes] = {}
            for path, e in st.walk(row.root):
                if e.type == T_BLOB:
                    files[path] = st.objects.get_kind(e.id, BLOB)
                elif e.type == T_RECIPE:
                    files[path] = b"".join(st.objects.get_kind(c, BLOB) for c, _n in st.recipe(e.id))
            out[row.seq] = files
    return out


def seq_of(st: dict[str, Any], name: str) -> int:
    return int(next(c["seq"] for c in st["collections"] if c["name"] == name))


def published(d: DaemonProc, name: str, seq: int) -> Callable[[], float]:
    """A wait_for condition: the collection reached seq (returns when it was seen)."""
    def cond() -> float:
        now = seq_of(d.status(), name)
        assert now <= seq, f"{name} went past release {seq} (to {now})"
        return time.monotonic() if now == seq else 0.0
    return cond


def folder_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_slow_writer_published_once_and_whole(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    s = _school(tmp_path)
    src = s.source("stats")
    base = int(s.ctl("publish", "stats", str(src)).stdout)
    d = start_daemon(s)
    rng = random.Random(5)
    chunks = [rng.randbytes(3000) for _ in range(10)]
    target = src / "2026-11-27.log"
    with open(target, "wb") as f:
        for c in chunks:  # about 4 s of writing, a chunk every 0.4 s (well within the quiet period)
            f.write(c)
            f.flush()
            time.sleep(0.4)
    closed = time.monotonic()
    final = b"".join(chunks)
    seen = wait_for(published(d, "stats", base + 1), 60, what="the finished file published")
    assert seen - closed >= QUIET - 0.2, "published before the folder was quiet"
    # Three more quiet periods: nothing else is published (a partial file would make release base + 2).
    time.sleep(3 * QUIET)
    assert seq_of(d.status(), "stats") == base + 1
    rels = releases(s, "stats")
    assert rels[base + 1] == {"2026-11-27.log": final}
    for seq, files in rels.items():
        assert files.get("2026-11-27.log", final) == final, f"release {seq} holds a partial file"
    assert d.stop() == 0


def test_change_while_stopped_published_at_start(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    s = _school(tmp_path)
    stats, backup = s.source("stats"), s.source("backup")
    write_tree(backup, {"old.txt": b"old", "keep.txt": b"keep"})
    base_stats = int(s.ctl("publish", "stats", str(stats)).stdout)
    base_backup = int(s.ctl("publish", "backup", str(backup)).stdout)
    d = start_daemon(s)
    assert d.stop() == 0
    # While no daemon runs: a new statistics file, a backup file removed and one added.
    write_tree(stats, {"day.json": b'{"day": 2}'})
    (backup / "old.txt").unlink()
    write_tree(backup, {"new/one.txt": b"one"})
    d = start_daemon(s)
    wait_for(published(d, "stats", base_stats + 1), 60, what="stats published at start")
    wait_for(published(d, "backup", base_backup + 1), 60, what="backup published at start")
    assert releases(s, "stats")[base_stats + 1] == {"day.json": b'{"day": 2}'}
    assert releases(s, "backup")[base_backup + 1] == {"keep.txt": b"keep", "new/one.txt": b"one"}
    assert d.stop() == 0


def test_rescan_finds_what_the_watcher_missed(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    rescan = 10.0  # the smallest allowed
    s = _school(tmp_path, rescan_seconds=str(rescan))
    late = tmp_path / "late-backup"  # does not exist yet: nothing to watch at start
    set_option(s.config, "collections.backup", "path", json.dumps(str(late)))
    before = time.monotonic()
    d = start_daemon(s)
    assert d.status()["watching"] == ["stats"]
    base = seq_of(d.status(), "backup")
    ev = EventReader(d.socket, recent=True)
    ev.wait(lambda e: e.get("event") == "done" and e.get("detail") == "backup", 60,
            what="the start's publish round (the folder is not there yet)")
    ev.close()
    write_tree(late, {"a.txt": b"made after the start", "deep/b.bin": bytes(range(256)) * 64})
    seen = wait_for(published(d, "backup", base + 1), rescan + 60, what="the rescan to publish the late folder")
    # Only the rescan (after rescan_seconds) could have found it.
    assert seen - before >= rescan, f"published {seen - before:.1f} s after the start: not by the rescan"
    assert releases(s, "backup")[base + 1] == folder_files(late)
    assert d.status()["watching"] == ["backup", "stats"]  # and it is watched from now on
    (late / "c.txt").write_bytes(b"seen by the watcher")
    seen2 = wait_for(published(d, "backup", base + 2), 60, what="the watcher to publish a change")
    assert seen2 - seen < rescan, "the change waited for the next rescan: the new folder is not watched"
    assert releases(s, "backup")[base + 2] == folder_files(late)
    assert d.stop() == 0


def test_pending_quota_holds_back_automatic_publishing(tmp_path: Path,
                                                        start_daemon: Callable[..., DaemonProc]) -> None:
    s = _school(tmp_path, pending_quota='"1 KiB"')
    src = s.source("stats")
    write_tree(src, {"a.bin": random.Random(1).randbytes(4096)})
    base = int(s.ctl("publish", "stats", str(src)).stdout)  # 4 KiB the master has not acknowledged
    d = start_daemon(s)
    assert d.status()["pending_quota"]["exceeded"]
    ev = EventReader(d.socket, recent=True)

    def stats_round(e: dict[str, Any]) -> bool:
        return e.get("event") == "done" and e.get("kind") == "publish" and e.get("detail") == "stats"

    # The round every start makes, then the one the new file causes.
    _t, first = ev.wait(stats_round, 60, what="the start's publish round")
    assert "over quota" in first["summary"], first
    after = ev.count()
    write_tree(src, {"b.json": b'{"new": true}'})
    _t, held = ev.wait(stats_round, 60, what="the watcher's publish round", start=after)
    ev.close()
    assert "over quota" in held["summary"], held
    st = json.loads(s.ctl("status", "--json").stdout)
    assert seq_of(st, "stats") == base, "published although over the pending quota"
    q = st["pending_quota"]
    assert q["limit_bytes"] == 1024
    assert q["used_bytes"] >= 4096
    assert "pending_quota" in q["exceeded"]
    assert q["exceeded"] in st["warnings"]
    assert "warning:   upward data waiting" in s.ctl("status").stdout
    assert any(" WARNING " in line and "publish.pending_quota" in line for line in d.output().splitlines())
    # Nothing is dropped: the folder keeps the file, and an explicit publish still works.
    seq = int(s.ctl("publish", "stats", str(src)).stdout)
    assert seq == base + 1
    assert set(releases(s, "stats")[seq]) == {"a.bin", "b.json"}
    assert d.stop() == 0


def test_backup_adds_removes_renames(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    s = _school(tmp_path)
    src = s.source("backup")
    base = int(s.ctl("publish", "backup", str(src)).stdout)
    d = start_daemon(s)
    rng = random.Random(9)
    write_tree(src, {"a.txt": b"alpha", "sub/b.txt": b"beta", "c.bin": rng.randbytes(300_000)})
    changed = time.monotonic()
    seen = wait_for(published(d, "backup", base + 1), 60, what="the added files published")
    assert seen - changed >= QUIET - 0.2, "published before the quiet period"
    assert releases(s, "backup")[base + 1] == folder_files(src)

    os.rename(src / "a.txt", src / "sub" / "a-renamed.txt")
    os.rename(src / "sub", src / "moved")
    (src / "c.bin").unlink()
    (src / "d.txt").write_bytes(b"delta")
    changed = time.monotonic()
    seen = wait_for(published(d, "backup", base + 2), 60, what="the renames and removal published")
    assert seen - changed >= QUIET - 0.2, "published before the quiet period"
    assert releases(s, "backup")[base + 2] == {"d.txt": b"delta", "moved/a-renamed.txt": b"alpha",
                                               "moved/b.txt": b"beta"}
    assert d.stop() == 0


def test_source_folder_removed_and_made_anew_is_watched_again(tmp_path: Path,
                                                              start_daemon: Callable[..., DaemonProc]) -> None:
    """A program that replaces its folder (rm -r, mkdir) must not leave the watcher on the
    old one until a restart: changes in the new folder are published after the quiet
    period, not only by the periodic rescan (ten minutes by default)."""
    s = _school(tmp_path)
    src = s.source("stats")
    write_tree(src, {"old.json": b"old"})
    base = int(s.ctl("publish", "stats", str(src)).stdout)
    d = start_daemon(s)
    assert d.status()["watching"] == ["backup", "stats"]
    shutil.rmtree(src)
    write_tree(src, {"first.json": b"1"})
    wait_for(published(d, "stats", base + 1), 60, what="the new folder published")
    assert releases(s, "stats")[base + 1] == {"first.json": b"1"}
    assert d.status()["watching"] == ["backup", "stats"]
    (src / "second.json").write_bytes(b"2")
    wait_for(published(d, "stats", base + 2), 30, what="a change in the new folder published by the watcher")
    assert releases(s, "stats")[base + 2] == {"first.json": b"1", "second.json": b"2"}

    # Replaced by a rename: the watch followed the old folder away.
    os.rename(src, tmp_path / "stats-old")
    write_tree(src, {"third.json": b"3"})
    (tmp_path / "stats-old" / "noise.json").write_bytes(b"the old folder changes too")
    wait_for(published(d, "stats", base + 3), 60, what="the renamed-in folder published")
    assert releases(s, "stats")[base + 3] == {"third.json": b"3"}
    (src / "fourth.json").write_bytes(b"4")
    wait_for(published(d, "stats", base + 4), 30, what="a change in the renamed-in folder published")
    assert releases(s, "stats")[base + 4] == {"third.json": b"3", "fourth.json": b"4"}
    assert d.stop() == 0

"""Disk full of the school's own disk during an import (RELIABILITY.md E1): the
state folder is a small tmpfs; the exchange fails with a clear "disk full" line
that says how much is needed, the trusted state is unchanged, the old content
is still served, no temporary files are left, and once space is freed the next
exchange finishes the job."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import tree_digest, trusted_state
from tests.crash.helpers import MiB, Mounts, World, incoming_batches, need_root, run


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _inodes_used(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def _world_on_tmpfs(tmp_path: Path, mounts: Mounts) -> tuple[World, Path]:
    need_root()
    base = tmp_path / "w"
    base.mkdir()
    mnt = base / "school-1"
    mounts.mount("-t", "tmpfs", "-o", "size=96m,mode=0750", "tmpfs", str(mnt))
    # Release 2 brings 8 MiB more than release 1.
    w = World(base, files=150, big=2, grow=8 * MiB)
    return w, mnt


def _leftovers(w: World) -> list[str]:
    """Temporary files an aborted import or deployment must not leave behind."""
    out = [f"objects/segments/{b}" for b in incoming_batches(w.s)]
    trees = w.s.deploy / ".trees"
    if trees.is_dir():
        out += [str(p) for p in trees.rglob("*.tmp")]
    out += [str(p) for p in w.s.deploy.glob("*.tmp-link")]
    return out


def _integrity(w: World) -> str:
    con = sqlite3.connect(w.s.state / "state.db")
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["bytes", "inodes"])
def test_disk_full_during_import(tmp_path: Path, mounts: Mounts, kind: str) -> None:
    w, mnt = _world_on_tmpfs(tmp_path, mounts)
    before = trusted_state(w.s)
    # Objects go into a few segment files, so running out of inodes hits the
    # deployment (one inode per file), after the objects are stored.
    limit = f"size={_used(mnt) + 2 * MiB}" if kind == "bytes" else f"nr_inodes={_inodes_used(mnt) + 40}"
    run("mount", "-o", f"remount,{limit}", str(mnt))

    r = w.s.ctl("exchange", str(w.stick), check=False)
    assert r.returncode == 1, f"exchange on a full disk exited {r.returncode}: {r.stdout}{r.stderr}"
    err = r.stderr.strip().splitlines()
    assert err, "no message on stderr"
    assert "disk full" in err[-1], r.stderr
    assert re.search(r"\d+(\.\d+)? (KiB|MiB|GiB) needed", err[-1]), f"does not say how much is needed: {err[-1]}"
    if kind == "inodes":
        assert "inodes" in err[-1], f"does not say that files, not bytes, ran out: {err[-1]}"
    assert "Traceback" not in r.stderr
    if kind == "bytes":
        assert trusted_state(w.s) == before, "a refused import changed the trusted state"
    else:
        # The release is stored and waits for room to be deployed (as when bytes
        # run out while deploying); the served content is the old one, whole.
        assert "is deployed once there is room" in err[-1], err[-1]
    assert tree_digest(w.s.deploy / "content") == w.old
    assert not _leftovers(w), _leftovers(w)
    assert _integrity(w) == "ok"

    # Space is freed (the admin grows the disk): the next exchange does the job.
    run("mount", "-o", "remount,size=256m,nr_inodes=100000", str(mnt))
    w.s.ctl("exchange", str(w.stick))
    assert tree_digest(w.s.deploy / "content") == w.new
    w.s.ctl("verify")


@pytest.mark.root
def test_disk_full_while_deploying(tmp_path: Path, mounts: Mounts) -> None:
    """Enough space for the objects, not for the deployed copy as well: the old
    content stays served, nothing half-written is left, and freeing space is enough
    for the new release to appear (the database already holds it)."""
    w, mnt = _world_on_tmpfs(tmp_path, mounts)
    # A dry run tells how much the objects of release 2 take.
    objects = w.s.state / "objects"
    du0 = sum(p.stat().st_blocks for p in objects.rglob("*") if p.is_file()) * 512
    w.s.ctl("exchange", str(w.stick))
    du1 = sum(p.stat().st_blocks for p in objects.rglob("*") if p.is_file()) * 512
    w.reset()
    run("mount", "-o", f"remount,size={_used(mnt) + (du1 - du0) + 3 * MiB}", str(mnt))

    r = w.s.ctl("exchange", str(w.stick), check=False)
    assert r.returncode == 1, f"exchange exited {r.returncode}: {r.stdout}{r.stderr}"
    assert "disk full" in r.stderr
    assert re.search(r"\d+(\.\d+)? (KiB|MiB|GiB) needed", r.stderr), f"does not say how much is needed: {r.stderr}"
    assert "Traceback" not in r.stderr
    assert tree_digest(w.s.deploy / "content") == w.old, "the served content changed"
    assert not _leftovers(w), _leftovers(w)
    assert _integrity(w) == "ok"

    run("mount", "-o", "remount,size=256m", str(mnt))
    w.s.ctl("exchange", str(w.stick))
    assert tree_digest(w.s.deploy / "content") == w.new
    w.s.ctl("verify")

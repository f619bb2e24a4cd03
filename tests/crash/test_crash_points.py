"""SIGKILL at every named crash point (store/faults.py) on the import and publish
paths: afterwards verify passes, the deployed content is the old or the new
release, and the next plain exchange completes and deploys the new release."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harmonicd.store.faults import POINTS
from tests.conftest import tree_digest
from tests.crash.helpers import (
    World,
    assert_old_or_new,
    assert_recovers,
    assert_stick_clean,
    coll,
    gen_tree,
    incoming_batches,
    status,
)

MAX_HITS = 6  # a point reached more often than this is sampled at 1..MAX_HITS


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("crash") / "w", files=120, big=2)


def _crash_exchange(w: World, spec: str) -> int:
    w.reset()
    p = w.s.ctl("exchange", str(w.stick), check=False, env={"HARMONICD_CRASH_AT": spec})
    assert p.returncode in (0, -9), f"exchange with HARMONICD_CRASH_AT={spec} exited {p.returncode}: {p.stderr}"
    return p.returncode


@pytest.mark.parametrize("point", POINTS)
def test_school_import_crash_point(world: World, point: str) -> None:
    w = world
    hits = 0
    seen = {"old": 0, "new": 0}
    for n in range(1, MAX_HITS + 1):
        rc = _crash_exchange(w, f"{point}:{n}")
        if rc == 0:
            break
        hits += 1
        assert_stick_clean(w.stick)
        seen[assert_recovers(w.s, w.stick, w.old, w.new)] += 1
    if hits == 0:
        pytest.skip(f"{point} is not reached by a school's importing exchange")
    # A crash before the database commit leaves the old release, after it the new.
    if point in ("batch-staged", "batch-indexing"):
        assert seen["old"] >= 1
    if point in ("deploy-switched", "pack-imported"):
        assert seen["new"] == hits


@pytest.mark.parametrize("point", ["batch-staged", "batch-indexing", "batch-committed"])
def test_master_publish_crash_point(world: World, point: str, tmp_path: Path) -> None:
    """A publish killed between durable steps publishes nothing; the next publish works."""
    w = world
    m = w.m
    before = coll(status(m), "content")
    src = tmp_path / "content"
    gen_tree(src, seed=70 + POINTS.index(point), files=40, big=1)  # objects new to the master
    p = m.ctl("publish", "content", str(src), check=False, env={"HARMONICD_CRASH_AT": point})
    assert p.returncode == -9, f"publish was not killed at {point}: {p.returncode} {p.stderr}"
    after = coll(status(m), "content")
    assert (after["seq"], after["root"]) == (before["seq"], before["root"])
    m.ctl("verify")
    assert not incoming_batches(m)
    seq = int(m.ctl("publish", "content", str(src)).stdout)
    assert seq == before["seq"] + 1
    m.ctl("verify")
    # Put the master back on the world's source, so later tests see the same release.
    assert int(m.ctl("publish", "content", str(w.src)).stdout) == seq + 1


class MasterWorld:
    """The world above, one step on: the school's request and statistics (day2) wait
    on the stick for the master. ``reset`` puts the master's state and the stick back."""

    def __init__(self, w: World, base: Path) -> None:
        w.reset()
        self.w = w
        w.s.ctl("exchange", str(w.stick))
        self.arch = w.m.deploy / "school-1" / "stats"
        self.old = tree_digest(self.arch)
        self.snap = base / "master-snap"
        shutil.copytree(w.m.state, self.snap / "master", symlinks=True)
        shutil.copytree(w.stick, self.snap / "stick", symlinks=True)
        w.m.ctl("exchange", str(w.stick))  # a dry run tells what the new archive is
        self.new = tree_digest(self.arch)
        assert self.new != self.old
        self.reset()

    def reset(self) -> None:
        for name, p in (("master", self.w.m.state), ("stick", self.w.stick)):
            shutil.rmtree(p)
            shutil.copytree(self.snap / name, p, symlinks=True)


@pytest.fixture(scope="module")
def master_world(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterWorld]:
    mw = MasterWorld(world, tmp_path_factory.mktemp("master"))
    yield mw
    mw.reset()  # the master as the other tests of this module expect it
    world.reset()


@pytest.mark.parametrize("point", POINTS)
def test_master_import_crash_point(master_world: MasterWorld, point: str) -> None:
    """The master killed while taking a school's statistics: its archive is the old or
    the new one, verify passes, and the next exchange takes the same pack or
    answers it, with the archive complete."""
    mw = master_world
    m, stick = mw.w.m, mw.w.stick
    hits = 0
    for n in range(1, MAX_HITS + 1):
        mw.reset()
        r = m.ctl("exchange", str(stick), check=False, env={"HARMONICD_CRASH_AT": f"{point}:{n}"})
        if r.returncode == 0:
            break
        assert r.returncode == -9, f"master exchange at {point}:{n} exited {r.returncode}: {r.stderr}"
        hits += 1
        assert tree_digest(mw.arch) in (mw.old, mw.new), f"{point}:{n}: the archive is a mix"
        assert_stick_clean(stick)
        v = m.ctl("verify", check=False)
        assert v.returncode == 0, f"verify after a crash at {point}:{n}: {v.stderr}"
        assert not incoming_batches(m)
        m.ctl("exchange", str(stick))
        assert tree_digest(mw.arch) == mw.new, f"{point}:{n}"
        # A .part left by the crash is no pack; the master removes it when it
        # next writes to that folder.
        assert_stick_clean(stick)
        m.ctl("verify")
    if hits == 0:
        pytest.skip(f"{point} is not reached by the master's importing exchange")


def test_crash_mid_volume_series(tmp_path: Path) -> None:
    """A release in several volumes, killed after some are committed: what was
    committed stays, the release goes live only when all are in."""
    w = World(tmp_path / "w", files=60, big=2, master_volume="256KiB")
    vols = sorted((w.stick / "HARMONIC" / "to-school-1").glob("*.hpk"))
    assert len(vols) >= 3
    for n in (1, 2, len(vols) - 1):
        w.reset()
        r = w.s.ctl("exchange", str(w.stick), check=False, env={"HARMONICD_CRASH_AT": f"db-committed:{n}"})
        assert r.returncode == -9
        assert_old_or_new(w.s, w.old, w.new)
        left = sorted((w.stick / "HARMONIC" / "to-school-1").glob("*.hpk"))
        # Volumes before the crash were applied and removed; the rest wait on the stick.
        assert len(left) == len(vols) - n + 1
        assert_recovers(w.s, w.stick, w.old, w.new)

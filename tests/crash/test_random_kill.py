"""SIGKILL at random moments while a school imports a bigger pack (seeded)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.conftest import make_master, make_school, tree_digest
from tests.crash.helpers import (
    World,
    assert_recovers,
    assert_stick_clean,
    coll,
    ctl_popen,
    gen_tree,
    incoming_batches,
    kill_after,
    status,
)

RUNS = 20


@pytest.mark.long
def test_random_sigkill_during_import(tmp_path: Path) -> None:
    w = World(tmp_path / "w", files=500, big=10, school_volume=None, master_volume="2MiB")
    # How long an undisturbed import takes (the fastest of three: the first runs
    # with a cold cache), to spread the kills over it.
    took = float("inf")
    for _ in range(3):
        w.reset()
        t0 = time.monotonic()
        p = ctl_popen(w.s, "exchange", str(w.stick))
        _out, err = p.communicate(timeout=300)
        took = min(took, time.monotonic() - t0)
        assert p.returncode == 0, err
    rng = random.Random(20261127)
    outcomes = {"old": 0, "new": 0, "finished": 0}
    for i in range(RUNS):
        w.reset()
        delay = rng.uniform(0.05, took * 0.95)
        p = ctl_popen(w.s, "exchange", str(w.stick))
        rc = kill_after(p, delay)
        if rc == 0:
            outcomes["finished"] += 1
        else:
            assert rc == -9, f"run {i}: exchange exited {rc} (not killed): {p.stderr}"
        assert_stick_clean(w.stick)
        which = assert_recovers(w.s, w.stick, w.old, w.new)
        if rc != 0:
            outcomes[which] += 1
    # The spread must have hit the import, not only the start or the end.
    assert outcomes["old"] + outcomes["new"] >= RUNS // 2, outcomes


@pytest.mark.long
def test_random_sigkill_during_publish(tmp_path: Path) -> None:
    """A master publish killed at random: nothing or the whole release is published,
    verify passes, and the next publish and round trip give the school that tree."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    stick = tmp_path / "stick"
    stick.mkdir()
    rng = random.Random(7)
    for i in range(10):
        src = tmp_path / f"content{i}"
        gen_tree(src, seed=100 + i, files=300, big=6)
        before = coll(status(m), "content")
        t0 = time.monotonic()
        rc = kill_after(ctl_popen(m, "publish", "content", str(src)), rng.uniform(0.05, 1.5))
        assert rc in (0, -9), f"publish exited {rc}"
        after = coll(status(m), "content")
        assert after["seq"] in (before["seq"], before["seq"] + 1)
        m.ctl("verify")
        assert not incoming_batches(m)
        seq = int(m.ctl("publish", "content", str(src)).stdout)
        assert seq == before["seq"] + 1, f"run {i} ({time.monotonic() - t0:.2f} s): seq {seq}"
        s.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        s.ctl("exchange", str(stick))
        assert tree_digest(s.deploy / "content") == tree_digest(src)
    s.ctl("verify")

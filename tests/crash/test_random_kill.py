"""SIGKILL at random moments while a school imports a bigger pack (seeded)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.crash.helpers import World, assert_recovers, assert_stick_clean, ctl_popen, kill_after

RUNS = 20


@pytest.mark.long
def test_random_sigkill_during_import(tmp_path: Path) -> None:
    w = World(tmp_path / "w", files=500, big=10, school_volume=None, master_volume="2MiB")
    # How long an undisturbed import takes, to spread the kills over it.
    w.reset()
    t0 = time.monotonic()
    p = ctl_popen(w.s, "exchange", str(w.stick))
    _out, err = p.communicate(timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == 0, err
    rng = random.Random(20261127)
    outcomes = {"old": 0, "new": 0, "finished": 0}
    for i in range(RUNS):
        w.reset()
        delay = rng.uniform(0.05, took * 1.05)
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

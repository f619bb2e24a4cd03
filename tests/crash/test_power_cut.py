"""Power cut (RELIABILITY.md §3.5.2): a server's state folder on ext4 on a loop
device with direct I/O; the command is killed (or simply ends) and the image is
copied at once, so whatever was not yet on the "disk" is lost, as in a power cut.
The copy is checked with e2fsck (journal replay only, else the sample is not
valid) and mounted where the state folder was; then the invariants must hold."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import (
    Mounts,
    PowerCut,
    World,
    assert_recovers,
    coll,
    ctl_popen,
    gen_tree,
    kill_after,
    need_root,
    pack_header,
    packs_in,
    status,
)

# Crash points (and random kills, None) to cut the power at; each is one sample.
# "end": the exchange finishes, and the power goes right after (it removed the
# pack from the stick, so what it applied must be on the disk by then).
SAMPLES: list[str | None] = ["db-committed", "deploy-tree-written", "batch-committed", "deploy-switched",
                             "pack-imported", "batch-indexing", "batch-staged", "batch-committed:2",
                             "pack-part-written", "end", "end", *[None] * 8]


def _power_cut_or_skip(pc: PowerCut, tmp_path: Path) -> None:
    if not pc.loses_unflushed_data(tmp_path / "probe"):
        pytest.skip("copying the loop image did not lose unflushed data here; not a power-cut simulation")


@pytest.mark.long
@pytest.mark.root
def test_power_cut_during_import(tmp_path: Path, mounts: Mounts) -> None:
    """The school cut off while importing: the copy holds the old or the new
    release, passes verify, and the next exchange finishes the job."""
    need_root()
    base = tmp_path / "w"
    base.mkdir()
    pc = PowerCut(mounts, tmp_path, base / "school-1")  # the school's state folder
    w = World(base, files=250, big=4)
    pc.freeze()
    _power_cut_or_skip(pc, tmp_path)
    # How long an undisturbed import takes, for the random cuts.
    pc.start()
    t0 = time.monotonic()
    w.s.ctl("exchange", str(w.stick))
    took = time.monotonic() - t0

    rng = random.Random(3)
    outcomes: list[str] = []
    for i, point in enumerate(SAMPLES):
        pc.start()
        w.reset_stick()
        if point == "end":
            rc = w.s.ctl("exchange", str(w.stick), check=False).returncode
        elif point is not None:
            rc = w.s.ctl("exchange", str(w.stick), check=False, env={"HARMONICD_CRASH_AT": point}).returncode
        else:
            rc = kill_after(ctl_popen(w.s, "exchange", str(w.stick)), rng.uniform(0.1, took))
        assert rc in (-9, 0), f"sample {i} ({point}): exchange exited {rc}"
        if not pc.cut():
            outcomes.append(f"{point}: invalid sample ({pc.note[:200]})")
            continue
        if point == "end" or not packs_in(w.stick, "to-school-1"):
            # The pack is gone from the stick: what it brought must have survived.
            assert tree_digest(w.s.deploy / "content") == w.new, f"{point}: the release was lost"
        which = assert_recovers(w.s, w.stick, w.old, w.new)
        outcomes.append(f"{point}: {which}")
        assert tree_digest(w.s.deploy / "content") == w.new
    pc.done()
    assert sum("invalid" not in o for o in outcomes) >= len(SAMPLES) // 2, outcomes


@pytest.mark.long
@pytest.mark.root
def test_power_cut_at_master_never_loses_what_it_acknowledged(tmp_path: Path, mounts: Mounts) -> None:
    """The master takes a school's statistics and writes its acknowledgement to the
    stick; the power goes at once (or during the exchange). Whatever answer reached
    the stick, the master's copy holds every release that answer acknowledges."""
    need_root()
    pc = PowerCut(mounts, tmp_path, tmp_path / "master-1")  # the master's state folder
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    stick = tmp_path / "stick"
    stick.mkdir()
    rng = random.Random(11)
    write_tree(s.source("stats"), {f"day{i}.bin": rng.randbytes(200_000) for i in range(8)})
    s.ctl("exchange", str(stick))
    up = {p.name: p.read_bytes() for p in packs_in(stick, "to-master")}
    pc.freeze()
    _power_cut_or_skip(pc, tmp_path)
    samples: list[str | None] = ["pack-part-written", "pack-imported", "db-committed", "deploy-switched",
                                 None, None, None, None, "end", "end"]
    checked = 0
    for point in samples:
        pc.start()
        for p in stick.rglob("*.hpk"):
            p.unlink()
        for name, data in up.items():
            (stick / "HARMONIC" / "to-master" / name).write_bytes(data)
        if point == "end":
            rc = m.ctl("exchange", str(stick), check=False).returncode
        elif point is None:
            rc = kill_after(ctl_popen(m, "exchange", str(stick)), rng.uniform(0.05, 0.8))
        else:
            rc = m.ctl("exchange", str(stick), check=False, env={"HARMONICD_CRASH_AT": point}).returncode
        assert rc in (0, -9)
        if not pc.cut():
            continue
        acked = {}
        for p in packs_in(stick, "to-school-1"):
            for a in pack_header(p).acks:
                acked[a["collection"]] = max(acked.get(a["collection"], 0), a["seq"])
        v = m.ctl("verify", check=False)
        assert v.returncode == 0, f"{point}: verify on the copy failed: {v.stderr}"
        st = status(m)
        for name, seq in acked.items():
            held = coll(st, f"school-1/{name}")["seq"]
            assert held >= seq, f"{point}: the stick acknowledges {name} {seq}, the master holds {held}"
            checked += 1
        if acked.get("stats"):
            assert tree_digest(m.deploy / "school-1" / "stats") == tree_digest(s.source("stats"))
    # A publish that has printed its seq is on the disk.
    src = tmp_path / "content"
    for i in range(3):
        pc.start()
        before = coll(status(m), "content")["seq"]
        gen_tree(src, seed=60 + i, files=120, big=2)
        seq = int(m.ctl("publish", "content", str(src)).stdout)
        assert pc.cut(), pc.note
        st = coll(status(m), "content")
        assert st["seq"] == seq == before + 1, "a publish that returned was lost in the power cut"
        m.ctl("verify")
    pc.done()
    assert checked, "no sample left an acknowledgement on the stick"


@pytest.mark.long
@pytest.mark.root
def test_power_cut_after_school_sent_a_release(tmp_path: Path, mounts: Mounts) -> None:
    """The school publishes its statistics and writes them to the stick; the power
    goes right after. The stick reaches the master. The school must not later sign
    a different release under the same number (the master would refuse it for ever)."""
    need_root()
    m, key = make_master(tmp_path)
    pc = PowerCut(mounts, tmp_path, tmp_path / "school-1")  # the school's state folder
    s = make_school(tmp_path, m, key)
    stick = tmp_path / "stick"
    stick.mkdir()
    write_tree(s.source("stats"), {"day1.json": b"1"})
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    write_tree(s.source("stats"), {"day2.json": b"2" * 50_000})
    pc.freeze()
    _power_cut_or_skip(pc, tmp_path)
    mstate = tmp_path / "master-snapshot"
    shutil.copytree(m.state, mstate, symlinks=True)
    for sample in range(4):
        pc.start()
        shutil.rmtree(m.state)
        shutil.copytree(mstate, m.state, symlinks=True)
        shutil.rmtree(stick)
        stick.mkdir()
        s.ctl("exchange", str(stick))  # publishes stats release 2 and writes it out
        assert pc.cut(), pc.note
        # The stick goes to the master and back, and the school writes on.
        m.ctl("exchange", str(stick))
        write_tree(s.source("stats"), {f"day3-{sample}.json": b"3"})
        s.ctl("exchange", str(stick))
        r = m.ctl("exchange", str(stick), check=False)
        assert r.returncode == 0, f"sample {sample}: the master refused the school's pack: {r.stderr}"
        s.ctl("exchange", str(stick))
        arch = m.deploy / "school-1" / "stats"
        assert (arch / "day2.json").read_bytes() == b"2" * 50_000
        assert (arch / f"day3-{sample}.json").read_bytes() == b"3"
        c = coll(status(s), "stats")
        assert c["acked_seq"] == c["seq"], c
        s.ctl("verify")
    pc.done()

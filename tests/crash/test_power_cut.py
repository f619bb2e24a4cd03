"""Power cut (RELIABILITY.md §3.5.2): the school's state folder on ext4 on a loop
device with direct I/O; the importing exchange is killed and the image copied at
once, so whatever was not yet on the "disk" is lost, as in a power cut. The copy
is checked with e2fsck (journal replay only, else the sample is not valid), mounted
where the state folder was, and must hold the old or the new release, pass verify,
and finish the job at the next exchange."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from tests.conftest import tree_digest
from tests.crash.helpers import (
    Mounts,
    World,
    assert_recovers,
    coll,
    ctl_popen,
    kill_after,
    need_root,
    run,
    status,
)

# What e2fsck may say after a crash of a journalled file system: journal replay,
# orphan cleanup and the lazily kept free counts. Anything else is a sample no
# real power cut would give (the copy is not an atomic snapshot).
_BENIGN = re.compile(
    r"^(\s*$|e2fsck \d|.*: recovering journal|Pass \d|Free (blocks|inodes) count wrong|Fix\? yes|"
    r".*FILE SYSTEM WAS MODIFIED|.*: \d+/\d+ files \(|Clearing orphaned inode|Setting free (inodes|blocks) count|"
    r".*: clean,|Truncating orphaned inode|.*orphan)")

# Crash points (and random kills, None) to cut the power at; each is one sample.
SAMPLES: list[str | None] = ["db-committed", "deploy-tree-written", "batch-committed", "deploy-switched",
                             "pack-imported", "batch-renaming", "batch-staged", "batch-committed:2",
                             *[None] * 8]


def _fsck_is_replay_only(image: Path) -> tuple[bool, str]:
    r = run("e2fsck", "-fy", str(image), check=False)
    out = r.stdout + r.stderr
    if r.returncode not in (0, 1):
        return False, out
    odd = [line for line in out.splitlines() if not _BENIGN.match(line)]
    return not odd, "\n".join(odd)


@pytest.mark.long
@pytest.mark.root
def test_power_cut_during_import(tmp_path: Path, mounts: Mounts) -> None:
    need_root()
    base = tmp_path / "w"
    base.mkdir()
    image = tmp_path / "school.img"
    mounts.make_ext4(image, "160M")
    mnt = base / "school-1"  # the school's state folder is the mounted file system
    mounts.mount_image(image, mnt)
    w = World(base, files=250, big=4)
    mounts.umount(str(mnt))
    mounts.detach(mounts.loops[-1])
    pristine = tmp_path / "pristine.img"
    run("cp", "--sparse=always", str(image), str(pristine))
    work, copy = tmp_path / "work.img", tmp_path / "copy.img"
    # How long an undisturbed import takes, for the random cuts.
    run("cp", "--sparse=always", str(pristine), str(work))
    dev = mounts.mount_image(work, mnt)
    # The simulation loses what was not flushed: a file written without fsync
    # just before the copy is not in the copy.
    (mnt / "canary").write_bytes(b"x" * 100_000)
    run("cp", "--sparse=always", str(work), str(copy))
    dev2 = mounts.attach(copy)
    run("e2fsck", "-fy", dev2, check=False)
    canary = tmp_path / "canary-check"
    mounts.mount(dev2, str(canary))
    lost = not (canary / "canary").exists() or (canary / "canary").stat().st_size == 0
    mounts.umount(str(canary))
    mounts.detach(dev2)
    if not lost:
        pytest.skip("copying the loop image did not lose unflushed data here; not a power-cut simulation")
    (mnt / "canary").unlink()
    p = ctl_popen(w.s, "exchange", str(w.stick))
    t0 = time.monotonic()
    _o, err = p.communicate(timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == 0, err
    mounts.umount(str(mnt))
    mounts.detach(dev)

    rng = random.Random(3)
    valid = 0
    outcomes: list[str] = []
    for i, point in enumerate(SAMPLES):
        run("cp", "--sparse=always", str(pristine), str(work))
        w.reset_stick()
        dev = mounts.mount_image(work, mnt)
        if point is not None:
            r = w.s.ctl("exchange", str(w.stick), check=False, env={"HARMONICD_CRASH_AT": point})
            rc = r.returncode
        else:
            rc = kill_after(ctl_popen(w.s, "exchange", str(w.stick)), rng.uniform(0.1, took))
        # The power goes: copy what reached the disk, now.
        run("cp", "--sparse=always", str(work), str(copy))
        mounts.umount(str(mnt))
        mounts.detach(dev)
        assert rc in (-9, 0), f"sample {i} ({point}): exchange exited {rc}"
        ok, odd = _fsck_is_replay_only(copy)
        if not ok:
            outcomes.append(f"{point}: invalid sample ({odd[:200]})")
            continue
        valid += 1
        dev = mounts.mount_image(copy, mnt)
        before = coll(status(w.s), "content")
        which = assert_recovers(w.s, w.stick, w.old, w.new)
        outcomes.append(f"{point}: {which} (seq {before['seq']})")
        assert tree_digest(w.s.deploy / "content") == w.new
        mounts.umount(str(mnt))
        mounts.detach(dev)
    assert valid >= len(SAMPLES) // 2, outcomes

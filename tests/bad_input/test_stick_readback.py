"""Sticks that do not keep what they are given (RELIABILITY.md B6) and
write-protected sticks (B3), on real file systems.

A fake-capacity or failing stick is simulated below the file system: the stick
is an ext4 image on a loop device, and between the write (flushed by syncfs)
and the read-back, bytes of the written pack are changed in the image itself,
as a stick that lost them would return them. The page cache still holds the
good bytes; only a read that goes past it, as the visit's read-back does, sees
the damage."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harmonicd.errors import StickUnreliable
from harmonicd.services.stick import prepare, visit
from harmonicd.store import faults
from tests.bad_input.helpers import assert_unchanged, make_synced, snapshot
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import packs_in, part_files

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting stick images needs root"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("filefrag") is None,
                       reason="needs e2fsprogs (mkfs.ext4, filefrag)"),
]


@contextmanager
def ext4_stick(tmp: Path, size: str = "32M") -> Iterator[tuple[Path, Path]]:
    """An ext4 image mounted through a loop device: (mount point, image file)."""
    image = tmp / "stick.img"
    mnt = tmp / "stick"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    p = subprocess.run(["mount", "-o", "loop,nosuid,nodev,noexec", str(image), str(mnt)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {p.stderr.strip()}")
    try:
        yield mnt, image
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def image_offset(path: Path) -> int:
    """Where the file's first byte lies in the file system image (its first extent)."""
    out = subprocess.run(["filefrag", "-v", "-b1", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*0:\s+0\.\.\s*\d+:\s+(\d+)\.\.", out, re.MULTILINE)
    assert m, out
    return int(m.group(1))


def lose_bytes(image: Path, pack: Path, at: int, n: int = 64) -> None:
    """Change n bytes of pack at offset `at`, in the image under the file system."""
    where = image_offset(pack) + at
    with open(image, "r+b") as f:
        f.seek(where)
        old = f.read(n)
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())


def _school_with_stats(tmp_path: Path) -> tuple[Server, Server]:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    write_tree(s.source("stats"), {"day.bin": os.urandom(300 << 10)})
    return m, s


def test_read_back_catches_a_stick_that_lost_data(tmp_path: Path) -> None:
    m, s = _school_with_stats(tmp_path)
    with ext4_stick(tmp_path) as (stick, image):
        prepare(str(stick))
        seen_in_cache: list[bool] = []

        def damage(arg: object) -> None:
            assert isinstance(arg, list)
            [pack] = [Path(p) for p in arg]
            good = pack.read_bytes()
            lose_bytes(image, pack, at=len(good) // 2)
            # Through the page cache the file still looks whole: a read-back
            # that did not go past the cache would pass it.
            seen_in_cache.append(pack.read_bytes() == good)

        with s.store() as st:
            visit(st, str(stick), None, consent=False, free_margin=0)  # publishes stats release 1
        for p in packs_in(stick, "to-master"):
            p.unlink()
        before = snapshot(s)
        with faults.hooked("stick-synced", damage), s.store() as st, pytest.raises(StickUnreliable) as err:
            visit(st, str(stick), None, consent=False, free_margin=0)
        assert seen_in_cache == [True]
        msg = str(err.value)
        assert "the stick did not keep what was written" in msg
        assert "fake capacity or failing stick; use another" in msg
        assert not packs_in(stick, "to-master"), "the bad file is removed"
        assert not part_files(stick)
        assert_unchanged(s, before)
        # Nothing was marked done: the statistics still wait for the master's
        # confirmation, and the next visit with a good stick carries them.
        p = s.ctl("exchange", str(stick))
        assert "read back 1 pack file(s)" in p.stdout
        assert "stats releases 1..1 not yet confirmed by the master" in p.stdout
        m.ctl("exchange", str(stick))
        s.ctl("exchange", str(stick))
        assert tree_digest(m.deploy / "school-1" / "stats") == tree_digest(s.source("stats"))


def test_read_back_of_a_good_stick_says_so(tmp_path: Path) -> None:
    _m, s = _school_with_stats(tmp_path)
    with ext4_stick(tmp_path) as (stick, _image):
        p = s.ctl("exchange", str(stick))  # typed by a person: consent, the stick gets HARMONIC/
        assert len(packs_in(stick, "to-master")) == 1
        assert re.search(r"read back 1 pack file\(s\) \([0-9.]+ KiB\) from .*: as written", p.stdout), p.stdout
        receipt = (stick / "HARMONIC" / "RECEIPT-school-1.txt").read_text()
        assert "read back from the stick and checked: 1 pack file(s)" in receipt


def test_read_only_stick_imports_and_says_write_protected(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    with ext4_stick(tmp_path) as (stick, _image):
        synced = make_synced(m, s, stick, tmp_path)
        # A second release waits on the stick for the school...
        write_tree(synced.content, {"news.html": b"<p>news</p>"})
        m.ctl("publish", "content", str(synced.content))
        s.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        answer = packs_in(stick, "to-school-1")
        assert answer
        # ...and the teacher slid the stick's lock.
        subprocess.run(["mount", "-o", "remount,ro", str(stick)], check=True)
        p = s.ctl("exchange", str(stick), check=False)
        assert p.returncode == 1
        [line] = p.stderr.splitlines()
        assert re.search(r"the stick is write-protected; what it carried was imported \(master-1/content release 2 "
                         r"\(\w+\) from master-1\), nothing could be written back", line), line
        assert (s.deploy / "content" / "news.html").read_bytes() == b"<p>news</p>"
        assert packs_in(stick, "to-school-1") == answer, "nothing removed from a read-only stick"
        # Unlocked, the next visit is quiet about what it already has and writes its request.
        subprocess.run(["mount", "-o", "remount,rw", str(stick)], check=True)
        p = s.ctl("exchange", str(stick))
        assert "received" not in p.stdout
        assert not packs_in(stick, "to-school-1")
        assert packs_in(stick, "to-master")
    s.ctl("verify")

"""The school's own disk fills during an import (RELIABILITY.md E1): the error
says "disk full" and how much is needed, and the trusted state is unchanged."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bad_input.helpers import SCHOOL_ID, assert_unchanged, exchange, inbox, refusal, snapshot
from tests.conftest import make_master, make_school, write_tree
from tests.crash.helpers import incoming_batches

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command"),
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_fills_during_import(tmp_path: Path, small_disk: Path) -> None:
    m, key = make_master(tmp_path)
    s = make_school(small_disk, m, key)  # config and state folder on the 2 MiB tmpfs
    stick = tmp_path / "stick"
    stick.mkdir()
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>big</h1>", "video.bin": random.Random(5).randbytes(4 << 20)})
    assert m.ctl("publish", "content", str(content)).stdout.strip() == "1"
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    # The answer: the release's pack (shared by every school) and the school's own
    # (acknowledgements). This test is about the first; the other is taken away.
    *own, pack = sorted(inbox(s, stick, empty=False).glob("*.hpk"), key=lambda p: p.stat().st_size)
    for extra in own:
        extra.unlink()
    before = snapshot(s)
    p = exchange(s, stick)
    line = refusal(p, pack, r"disk full")
    # How much: following the message must be enough. Freeing "needed" minus
    # "free" more bytes must make room for the 4 MiB of content.
    found = re.search(r"about ([0-9.]+) MiB needed, ([0-9.]+) (MiB|KiB|B) free", line)
    assert found, line
    needed = float(found.group(1)) * (1 << 20)
    free = float(found.group(2)) * {"MiB": 1 << 20, "KiB": 1 << 10, "B": 1}[found.group(3)]
    assert needed >= 4 << 20, line
    assert free > 0, "free space is measured after the staged objects are removed"
    assert_unchanged(s, before)
    assert pack.exists(), "the pack stays on the stick for the next visit"
    assert not incoming_batches(s), "staged objects are cleaned up"
    # Once there is room, the same stick works.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert (s.deploy / "content" / "video.bin").read_bytes() == (content / "video.bin").read_bytes()
    assert s.name == SCHOOL_ID

"""Things that are not pack files where pack files should be (RELIABILITY.md C6,
§5.5): symbolic links, FIFOs, devices, folders, huge sparse files. None may hang
the exchange, be followed or be read; each is named with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.bad_input.helpers import (
    MASTER_ID,
    SCHOOL_ID,
    Synced,
    assert_unchanged,
    exchange,
    genuine_packs_for_school,
    inbox,
    pack_file_name,
    refusal,
    snapshot,
)

NOT_ROOT = os.geteuid() != 0


@pytest.mark.timeout(120)
def test_links_fifos_devices_folders_and_huge_files(synced: Synced) -> None:
    s, stick = synced.school, synced.stick
    box = inbox(s, stick)
    [genuine] = genuine_packs_for_school(synced.master, synced.tmp / "elsewhere")
    cases: dict[str, tuple[Path, str]] = {}

    def case(tag: str, why: str) -> Path:
        p = box / pack_file_name(MASTER_ID, tag)
        cases[tag] = (p, why)
        return p

    os.symlink("/etc/passwd", case("link-passwd", r"symbolic link"))
    os.symlink("/dev/zero", case("link-zero", r"symbolic link"))
    os.symlink(genuine, case("link-genuine", r"symbolic link"))  # even a good pack is not read through a link
    os.symlink("missing-target.hpk", case("link-dangling", r"symbolic link"))
    os.mkfifo(case("fifo", r"not a regular file"))
    case("folder", r"not a regular file").mkdir()
    with open(case("sparse-5gib", r"larger than any pack"), "wb") as f:
        f.truncate(5 << 30)
    if not NOT_ROOT:
        zero = os.stat("/dev/zero").st_rdev
        os.mknod(case("chardev-zero", r"not a regular file"), 0o600 | 0o020000, zero)
    before = snapshot(s)
    p = exchange(s, stick, timeout=60)
    for path, why in cases.values():
        refusal(p, path, why)
    assert_unchanged(s, before)
    assert Path("/etc/passwd").stat().st_size > 0


@pytest.mark.skipif(NOT_ROOT, reason="making a block device node needs root")
def test_block_device_named_like_a_pack(synced: Synced) -> None:
    s, stick = synced.school, synced.stick
    p_dev = inbox(s, stick) / pack_file_name(MASTER_ID, "blockdev")
    os.mknod(p_dev, 0o600 | 0o060000, os.makedev(7, 250))  # a loop device number; never opened for data
    before = snapshot(s)
    p = exchange(s, stick, timeout=60)
    refusal(p, p_dev, r"not a regular file|cannot open")
    assert_unchanged(s, before)


def test_inbox_that_is_a_link(synced: Synced) -> None:
    """The stick's to-school-1 folder is a symbolic link (to a folder that holds a
    genuine pack): the folder is not used at all."""
    s, stick = synced.school, synced.stick
    target = synced.tmp / "somewhere"
    genuine_packs_for_school(synced.master, target)
    box = stick / "HARMONIC" / f"to-{SCHOOL_ID}"
    shutil.rmtree(box, ignore_errors=True)
    os.symlink(target, box)
    before = snapshot(s)
    p = exchange(s, stick, timeout=60)
    assert p.returncode == 1, p.stderr
    assert str(box) in p.stderr
    assert "not a folder" in p.stderr
    assert_unchanged(s, before)


def test_mailbox_that_is_a_link(synced: Synced) -> None:
    s, stick = synced.school, synced.stick
    shutil.rmtree(stick / "HARMONIC")
    target = synced.tmp / "elsewhere-box"
    (target / f"to-{SCHOOL_ID}").mkdir(parents=True)
    os.symlink(target, stick / "HARMONIC")
    before = snapshot(s)
    p = exchange(s, stick, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "HARMONIC" in p.stderr
    assert "not a folder" in p.stderr
    assert_unchanged(s, before)
    assert not any(target.rglob("*.hpk")), "nothing is written through the link"


@pytest.mark.timeout(120)
def test_folder_with_too_many_entries(synced: Synced) -> None:
    """A stick folder with more entries than any mailbox holds is read up to a cap,
    and the exchange says so instead of scanning forever."""
    from harmonicd.services.exchange import MAX_FOLDER_ENTRIES

    s, stick = synced.school, synced.stick
    box = inbox(s, stick)
    for i in range(MAX_FOLDER_ENTRIES + 50):
        (box / f"junk-{i:06d}.txt").touch()
    before = snapshot(s)
    p = exchange(s, stick, timeout=60)
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if str(box) in ln]
    assert len(lines) == 1, p.stderr
    assert f"more than {MAX_FOLDER_ENTRIES} entries" in lines[0]
    assert_unchanged(s, before)

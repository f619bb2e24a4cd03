"""Small sticks, as real small file systems (tmpfs with size=, as root): what fits
goes, most useful first, the rest on the next trip, nothing sent twice; the room
shared fairly between the schools on one stick; a stick too full for even a
request, and one that fills up while it is written."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harmonicd.core.objects import BLOB, TREE, object_id
from harmonicd.core.pack import PackReader
from harmonicd.errors import DiskFullError
from harmonicd.services.stick import prepare, visit
from harmonicd.store import faults
from tests.bad_input.helpers import assert_unchanged, snapshot
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import coll, packs_in, part_files, status

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs stick needs root"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command"),
]

MiB = 1 << 20


@contextmanager
def tmpfs_stick(where: Path, size: str) -> Iterator[Path]:
    """A real file system of the given size (tmpfs: ENOSPC and statvfs as a stick
    gives them), prepared for Harmonic."""
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        prepare(str(where))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def no_margin(server: Server) -> None:
    """[media] free_margin = 0: the tests measure the room to the byte."""
    text = server.config.read_text()
    assert "[media]\n" in text
    server.config.write_text(text.replace("[media]\n", "[media]\nfree_margin = 0\n", 1))


def record_ids(path: Path) -> list[tuple[int, bytes]]:
    """(kind, id) of every record in a pack file, as a receiver reads them."""
    out = []
    with open(path, "rb") as f:
        reader = PackReader(f, str(path), lambda h: h.sender_key)
        for rec in reader.records(lambda _oid: None, skip_unresolved=True):
            out.append((rec.kind, rec.id))
    return out


def content(root: Path, seed: int, small: int, big: int, big_size: int) -> None:
    """Incompressible files (photos, videos): what a pack holds is what the stick takes."""
    rng = random.Random(seed)
    files = {f"docs/page{i:03d}.html": rng.randbytes(rng.randint(2_000, 30_000)) for i in range(small)}
    files.update({f"video/clip{i}.bin": rng.randbytes(big_size + i * 1000) for i in range(big)})
    write_tree(root, files)


def test_what_fits_goes_the_rest_next_trip_nothing_twice(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    no_margin(m)
    no_margin(s)
    src = tmp_path / "content"
    content(src, seed=1, small=60, big=5, big_size=1200 << 10)  # about 7 MiB
    m.ctl("publish", "content", str(src))
    with tmpfs_stick(tmp_path / "stick", "3m") as stick:
        seen: dict[bytes, int] = {}
        trips = 0
        while tree_digest(s.deploy / "content") != tree_digest(src):
            trips += 1
            assert trips <= 6, "the release should arrive in a few trips of a 3 MiB stick"
            s.ctl("exchange", str(stick))
            out = m.ctl("exchange", str(stick)).stdout
            answer = packs_in(stick, "to-school-1")
            assert answer
            on_stick = sum(p.stat().st_size for p in answer)
            assert on_stick <= 3 * MiB
            records = [r for p in answer for r in record_ids(p)]
            for _kind, oid in records:
                assert oid not in seen, f"object {oid.hex()[:12]} sent on trip {seen[oid]} and again on {trips}"
                seen[oid] = trips
            if trips == 1:
                # Most useful first: the whole structure and the small files come on the first trip.
                assert re.search(r"next trip: for school-1: [0-9.]+ MiB more of content release 1 did not fit",
                                 out), out
                kinds = [k for k, _ in records]
                assert kinds.count(TREE) == len({p.parent for p in src.rglob("*") if p.is_file()}) + 1
                small = {object_id(BLOB, p.read_bytes()) for p in (src / "docs").iterdir()}
                assert small <= {oid for _k, oid in records}, "a small file was left for a later trip"
                receipt = (stick / "HARMONIC" / "RECEIPT-master-1.txt").read_text()
                assert "to school-1: content release 1" in receipt
                assert "Still waiting:\n  for school-1:" in receipt
                assert "it goes on the next trip" in receipt
            r = s.ctl("exchange", str(stick)).stdout
            if tree_digest(s.deploy / "content") != tree_digest(src):
                # A school never switches to a partial release: it keeps what came, and says so.
                assert "received part of" in r
                assert tree_digest(s.deploy / "content") == "absent"
                assert coll(status(s), "content")["seq"] == 0
                receipt = (stick / "HARMONIC" / "RECEIPT-school-1.txt").read_text()
                assert "content release 1 is incomplete; the rest comes next time" in receipt
        assert trips >= 3
        assert not part_files(stick)
    s.ctl("verify")


def test_two_schools_share_a_small_stick_fairly(tmp_path: Path) -> None:
    """One stick on a route of two schools: neither answer crowds out the other."""
    m, key = make_master(tmp_path)
    schools = [make_school(tmp_path, m, key, f"school-{i}") for i in (1, 2)]
    for x in (m, *schools):
        no_margin(x)
    src = tmp_path / "content"
    content(src, seed=2, small=20, big=4, big_size=1 << 20)  # about 4.3 MiB
    m.ctl("publish", "content", str(src))
    with tmpfs_stick(tmp_path / "stick", "4m") as stick:
        for s in schools:
            s.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        sizes = [sum(p.stat().st_size for p in packs_in(stick, f"to-{s.name}")) for s in schools]
        assert min(sizes) > 0.8 * max(sizes), f"unfair shares of one stick: {sizes}"
        assert sum(sizes) > 2.5 * MiB, f"the stick was not used: {sizes}"
        for _trip in range(4):
            for s in schools:
                s.ctl("exchange", str(stick))
            if all(tree_digest(s.deploy / "content") == tree_digest(src) for s in schools):
                break
            m.ctl("exchange", str(stick))
        for s in schools:
            assert tree_digest(s.deploy / "content") == tree_digest(src)
            s.ctl("verify")


def test_stick_too_full_for_the_request(tmp_path: Path) -> None:
    """A stick with no room left: one line saying how much is needed; nothing written
    to it; the school's state as it was."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    write_tree(s.source("stats"), {"day.bin": random.Random(3).randbytes(600 << 10)})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s.ctl("exchange", str(scratch))  # stats release 1 published; not yet confirmed
    no_margin(s)
    with tmpfs_stick(tmp_path / "stick", "1m") as stick:
        (stick / "homework.odt").write_bytes(random.Random(4).randbytes(800 << 10))
        before = snapshot(s)
        p = s.ctl("exchange", str(stick), check=False)
        assert p.returncode == 1, p.stdout
        [line] = p.stderr.splitlines()
        found = re.search(r"the stick is full: about ([0-9.]+) KiB needed for school-1's request, "
                          r"([0-9.]+) KiB free", line)
        assert found, line
        assert float(found.group(1)) >= 600, "the request carries the unconfirmed statistics"
        assert_unchanged(s, before)
        assert not packs_in(stick, "to-master")
        assert not part_files(stick)


def test_stick_fills_up_while_written(tmp_path: Path) -> None:
    """Something else takes the stick's space after the visit measured it (a
    desktop copying onto the same stick): ENOSPC while the request is written.
    The partial file is removed, the message says what is needed, the school's
    state is as it was, and with room again the next visit works."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    write_tree(s.source("stats"), {"day.bin": random.Random(5).randbytes(900 << 10)})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s.ctl("exchange", str(scratch))  # stats release 1 published; not yet confirmed
    with tmpfs_stick(tmp_path / "stick", "2m") as stick:
        filler = stick / "copied-by-someone-else.bin"

        def fill(_arg: object) -> None:
            free = os.statvfs(stick).f_bavail * os.statvfs(stick).f_frsize
            filler.write_bytes(b"\0" * max(0, free - (200 << 10)))

        before = snapshot(s)
        with faults.hooked("stick-room", fill), s.store() as st, pytest.raises(DiskFullError) as err:
            visit(st, str(stick), None, consent=False, free_margin=0)
        msg = str(err.value)
        assert re.search(r"disk full while writing the pack for master(-1)? in .*: about [0-9.]+ (KiB|MiB) needed, "
                         r"[0-9.]+ KiB free; nothing was written", msg), msg
        assert not packs_in(stick, "to-master")
        assert not part_files(stick)
        assert_unchanged(s, before)
        filler.unlink()
        no_margin(s)
        p = s.ctl("exchange", str(stick))
        assert re.search(r"wrote 1 pack file\(s\) for master: .*stats release 1", p.stdout), p.stdout
        m.ctl("exchange", str(stick))
        assert coll(status(m), "school-1/stats")["seq"] == 1

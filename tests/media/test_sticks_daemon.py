"""Sticks through real daemons: real loop devices carrying ext4 or exFAT (FUSE)
images, real kernel uevents reaching pyudev, harmonicd-mount run as udev and
systemd would run it, and the daemon's own status saying "safe to remove".

The only stand-in is who starts harmonicd-mount: on a real host a udev rule
asks systemd for harmonicd-stick@NAME.service; here no udevd runs and systemd
is not PID 1, so the test starts it (StickLab.helper) right after attaching
the image, as that unit would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, start_daemon, wait_for
from tests.media.helpers import MiB, StickLab, needs_root, require, sh

__all__ = ["start_daemon"]

pytestmark = [needs_root, pytest.mark.timeout(240)]


def use_sticks(server: Server, base: Path, adopt_blank: bool = True) -> None:
    """Loop devices as sticks, mounted under base (this test's own /media/harmonicd), no desktop folders."""
    text = server.config.read_text()
    text = re.sub(r"(?m)^devices = .*$", 'devices = ["loop"]', text)
    text = re.sub(r"(?m)^mount_base = .*$", f"mount_base = {json.dumps(str(base))}", text)
    text = re.sub(r"(?m)^adopt_blank = .*$", f"adopt_blank = {'true' if adopt_blank else 'false'}", text)
    if "\nwatch = " not in text:
        text = text.replace("[media]\n", "[media]\nwatch = []\n")
    server.config.write_text(text)
    assert server.cfg().media_mount_base == str(base)


def sticks(d: DaemonProc) -> dict[str, dict[str, Any]]:
    return {s["device"]: s for s in d.status()["media"]["sticks"]}


def wait_state(d: DaemonProc, name: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        s = sticks(d).get(name)
        return s if s is not None and s["state"] in states else None
    try:
        return wait_for(reached, timeout, every=0.1, what=f"{name} in state {'/'.join(states)}")  # type: ignore[no-any-return]
    except AssertionError:
        raise AssertionError(f"{name}: {sticks(d).get(name)}\n{d.output()[-3000:]}") from None


def insert(lab: StickLab, image: Path, read_only: bool = False) -> str:
    name = lab.attach(image, read_only=read_only)
    lab.helper(name)
    return name


def pull(lab: StickLab, name: str) -> None:
    """The stick comes out. A loop device still in use detaches only when its last user
    lets go (the helper unmounting); until then a second loop device on the same image
    would be a second, incoherent view of one stick, which no real stick can be: wait."""
    lab.detach(name)
    wait_for(lambda: not os.path.exists(f"/sys/class/block/{name}/loop/backing_file"), 30,
             what=f"{name} detached")


def mounted_under(base: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(base) + "/")]


def look_inside(lab: StickLab, image: Path) -> Path:
    """Mount a stick image read-only somewhere else to see what is on it (ext4 only)."""
    where = lab.tmp / f"look-{image.stem}-{time.monotonic_ns()}"
    where.mkdir()
    sh("mount", "-o", "ro,loop", str(image), str(where))
    return where


def unlook(where: Path) -> None:
    sh("umount", str(where), check=False)


@contextlib.contextmanager
def prepared(server: Server, lab: StickLab, image: Path) -> Iterator[Path]:
    """A person prepares the stick (ext4 image) on a server: `harmonicctl stick prepare`,
    with the stick mounted read-write elsewhere; the body may put more on it."""
    where = lab.tmp / f"prep-{image.stem}-{time.monotonic_ns()}"
    where.mkdir()
    sh("mount", "-o", "loop", str(image), str(where))
    try:
        server.ctl("stick", "prepare", str(where))
        yield where
    finally:
        sh("umount", str(where))


def servers(tmp: Path, content: dict[str, bytes]) -> tuple[Server, Server, StickLab, StickLab]:
    require("losetup", "mkfs.ext4", "blkid")
    m, key = make_master(tmp, "master-1")
    s = make_school(tmp, m, key, "school-1")
    for lab in ("at-master", "at-school"):
        (tmp / lab).mkdir(exist_ok=True)
    mlab, slab = StickLab(tmp / "at-master"), StickLab(tmp / "at-school")
    use_sticks(m, mlab.base)
    use_sticks(s, slab.base)
    src = tmp / "content"
    write_tree(src, content)
    m.ctl("publish", "content", str(src))
    return m, s, mlab, slab


@pytest.mark.parametrize("fs", ["ext4", "exfat"])
def test_round_trip_plug_wait_pull(tmp_path: Path, start_daemon: Callable[..., DaemonProc], fs: str) -> None:
    """A teacher carries one stick school -> master -> school without typing anything."""
    if fs == "exfat":
        require("mkfs.exfat", "mount.exfat-fuse")
    m, s, mlab, slab = servers(tmp_path, {"index.html": b"<h1>lessons</h1>\n", "maths.pdf": os.urandom(2 * MiB)})
    write_tree(s.source("stats"), {"visits.json": b'{"pupils": 31}\n'})
    with mlab, slab:
        md, sd = start_daemon(m), start_daemon(s)
        image = slab.image(fs, 64 * MiB)
        # At the school: its request and statistics go on the stick.
        name = insert(slab, image)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert "wrote" in st["message"], st
        assert "master" in st["message"], st
        assert not mounted_under(slab.base), "the helper unmounts once the daemon is done"
        pull(slab, name)
        wait_state(sd, name, ("gone",))
        # At the master: the statistics come in, the content goes out.
        name = insert(mlab, image)
        st = wait_state(md, name, ("safe-to-remove",))
        assert "school-1/stats" in st["message"], st
        pull(mlab, name)
        assert (m.deploy / "school-1" / "stats" / "visits.json").read_bytes() == b'{"pupils": 31}\n'
        # Back at the school: content deployed, statistics acknowledged.
        name = insert(slab, image)
        st = wait_state(sd, name, ("safe-to-remove",))
        pull(slab, name)
        assert tree_digest(s.deploy / "content") == tree_digest(tmp_path / "content")
        coll = {c["name"]: c for c in sd.status()["collections"]}
        assert coll["content"]["seq"] == 1
        assert coll["stats"]["acked_seq"] == 1
        # The journal says it too, in words a person reads.
        assert re.search(rf"stick {name} at \S+: safe to remove", sd.output()), sd.output()[-2000:]
        # And the receipts on the stick: who, when, what came, what went, what still waits.
        if fs == "ext4":
            inside = look_inside(slab, image)
            try:
                school = (inside / "HARMONIC" / "RECEIPT-school-1.txt").read_text()
                master = (inside / "HARMONIC" / "RECEIPT-master-1.txt").read_text()
            finally:
                unlook(inside)
            assert re.search(r"content release 1 \(\w+\) from master-1: now in use", school), school
            assert "confirmation from master-1 that it holds" in school, school
            assert re.search(r"Visit: \d{4}-\d\d-\d\d \d\d:\d\d UTC", school), school
            assert "read back from the stick and checked" in school, school
            assert "to school-1: content release 1" in master, master
    s.ctl("verify")


def test_unprepared_stick_is_never_written(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    _m, s, mlab, slab = servers(tmp_path, {"a.txt": b"a\n"})
    use_sticks(s, slab.base, adopt_blank=False)
    with mlab, slab:
        sd = start_daemon(s)
        image = slab.image("ext4", 32 * MiB)
        name = insert(slab, image)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert "not prepared" in st["message"], st
        pull(slab, name)
        inside = look_inside(slab, image)
        try:
            assert sorted(p.name for p in inside.iterdir()) == ["lost+found"], "nothing may be written"
        finally:
            unlook(inside)
        # Prepared by a person: the next insertion is used.
        with prepared(s, slab, image):
            pass
        name = insert(slab, image)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert "not prepared" not in st["message"], st
        assert "wrote" in st["message"], st
        pull(slab, name)


def test_pulled_mid_export_then_redone(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """exFAT through FUSE: killing the FUSE process is the stick going mid-write (RELIABILITY.md B1)."""
    require("mkfs.exfat", "mount.exfat-fuse")
    big = {f"video{i}.bin": os.urandom(24 * MiB) for i in range(4)}
    m, s, mlab, slab = servers(tmp_path, {"index.html": b"x\n", **big})
    with mlab, slab:
        md = start_daemon(m)
        sd = start_daemon(s)
        image = slab.image("exfat", 256 * MiB)
        name = insert(slab, image)
        wait_state(sd, name, ("safe-to-remove",))
        pull(slab, name)
        # At the master the answer is ~96 MiB: yank it while it is written.
        name = insert(mlab, image)
        busy = wait_for(lambda: (lambda st: st if st.get("state") == "visiting" and st.get("done_bytes", 0) > 4 * MiB
                                         else None)(sticks(md).get(name) or {}),
                        60, every=0.02, what="the master writing onto the stick")
        # Progress for the person waiting: bytes, the total and the time left.
        assert busy["total_bytes"], busy
        assert busy["total_bytes"] > busy["done_bytes"], busy
        assert busy["eta_s"] is not None, busy
        assert busy["message"].startswith("busy: do not remove"), busy
        fuse = subprocess.run(["pgrep", "-f", f"mount.exfat-fuse.*{name}"], capture_output=True, text=True)
        pids = [int(p) for p in fuse.stdout.split()]
        assert pids, "no FUSE process for the stick"
        for p in pids:
            os.kill(p, signal.SIGKILL)
        pull(mlab, name)
        st = wait_state(md, name, ("removed-early",))
        assert "removed" in st["message"], st
        assert md.proc.poll() is None, "the daemon carries on"
        # Nothing was marked done: the next insertion does it all again, and the school gets everything.
        name = insert(mlab, image)
        st = wait_state(md, name, ("safe-to-remove",), timeout=120)
        pull(mlab, name)
        name = insert(slab, image)
        wait_state(sd, name, ("safe-to-remove",), timeout=120)
        pull(slab, name)
        assert tree_digest(s.deploy / "content") == tree_digest(tmp_path / "content")
        logs = "\n".join(r.output() for r in mlab.runs)
        wait_for(lambda: not mounted_under(mlab.base), 10, what=f"no mount left at the master:\n{logs}")
        wait_for(lambda: not mounted_under(slab.base), 10, what="no mount left at the school")


def test_pulled_mid_import_keeps_the_old_content(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    require("mkfs.exfat", "mount.exfat-fuse")
    big = {f"video{i}.bin": os.urandom(24 * MiB) for i in range(4)}
    m, s, mlab, slab = servers(tmp_path, {"index.html": b"x\n", **big})
    with mlab, slab:
        md, sd = start_daemon(m), start_daemon(s)
        image = slab.image("exfat", 256 * MiB)
        for lab, d in ((slab, sd), (mlab, md)):
            name = insert(lab, image)
            wait_state(d, name, ("safe-to-remove",), timeout=120)
            pull(lab, name)
        name = insert(slab, image)
        wait_for(lambda: (sd.status().get("activity") or {}).get("done_bytes", 0) > 2 * MiB, 60, every=0.02,
                 what="the school reading the stick")
        for p in subprocess.run(["pgrep", "-f", f"mount.exfat-fuse.*{name}"], capture_output=True,
                                text=True).stdout.split():
            os.kill(int(p), signal.SIGKILL)
        pull(slab, name)
        wait_state(sd, name, ("removed-early",))
        assert tree_digest(s.deploy / "content") == "absent", "nothing half-imported is deployed"
        assert sd.proc.poll() is None
        name = insert(slab, image)
        wait_state(sd, name, ("safe-to-remove",), timeout=120)
        pull(slab, name)
        assert tree_digest(s.deploy / "content") == tree_digest(tmp_path / "content")
    s.ctl("verify")


def test_ten_insertions_in_ten_seconds_and_two_at_once(tmp_path: Path,
                                                       start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, mlab, slab = servers(tmp_path, {"a.txt": b"a\n"})
    write_tree(s.source("stats"), {"v.json": b"{}\n"})
    with mlab, slab:
        sd = start_daemon(s)
        fds = len(os.listdir(f"/proc/{sd.proc.pid}/fd"))
        image = slab.image("ext4", 32 * MiB)
        t0 = time.monotonic()
        for i in range(10):
            name = insert(slab, image)
            time.sleep(0.4 if i % 2 else 0.05)  # some pulled before the mount, some mid-visit
            pull(slab, name)
            for run in slab.runs:
                if run.proc.poll() is None:
                    run.stop()
        assert time.monotonic() - t0 < 15
        # Two at once, then left in until done.
        other = slab.image("ext4", 32 * MiB)
        a, b = insert(slab, image), insert(slab, other)
        for n in (a, b):
            wait_state(sd, n, ("safe-to-remove",))
        pull(slab, a)
        pull(slab, b)
        wait_for(lambda: all(st["state"] in ("gone", "removed-early", "unreadable")
                             for st in sticks(sd).values()), 30, what="every stick pulled")
        assert sd.proc.poll() is None
        assert not mounted_under(slab.base)
        assert len(os.listdir(f"/proc/{sd.proc.pid}/fd")) <= fds + 2, "file descriptors leak"
        # The request on the stick is whole: the master takes it.
        md = start_daemon(m)
        name = insert(mlab, image)
        st = wait_state(md, name, ("safe-to-remove",))
        assert "school-1/stats" in st["message"], st
        pull(mlab, name)


def test_unreadable_blank_and_read_only_sticks(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    _m, s, mlab, slab = servers(tmp_path, {"a.txt": b"a\n"})
    with mlab, slab:
        sd = start_daemon(s)
        # A blank stick (no file system): the helper cannot mount it and says why.
        name = insert(slab, slab.image("blank", 16 * MiB))
        st = wait_state(sd, name, ("unreadable",))
        assert "no file system" in st["message"], st
        pull(slab, name)
        # A corrupt one: bytes flipped over the ext4 superblock.
        bad = slab.image("ext4", 16 * MiB)
        with bad.open("r+b") as f:
            f.seek(1024)
            f.write(os.urandom(1024))
        name = insert(slab, bad)
        st = wait_state(sd, name, ("unreadable",))
        pull(slab, name)
        # A write-protected stick: read what it carries, say it could not be written.
        ro = slab.image("ext4", 32 * MiB)
        with prepared(s, slab, ro):
            pass
        name = insert(slab, ro, read_only=True)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert "write-protected" in st["message"], st
        pull(slab, name)
        assert sd.proc.poll() is None
        assert not mounted_under(slab.base)


def test_stick_a_desktop_mounted(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """A laptop as the school server: its desktop mounted the stick under /media/USER; the
    daemon takes it there, flushes and reads back, and says to eject it on the desktop."""
    _m, s, _mlab, slab = servers(tmp_path, {"a.txt": b"a\n"})
    desk = tmp_path / "media-desktop"
    (desk / "teacher").mkdir(parents=True)
    text = s.config.read_text().replace("watch = []", f"watch = [{json.dumps(str(desk))}]")
    s.config.write_text(text)
    write_tree(s.source("stats"), {"v.json": b"{}\n"})
    with slab:
        sd = start_daemon(s)
        image = slab.image("ext4", 32 * MiB)
        name = slab.attach(image)
        where = desk / "teacher" / "STICK"
        where.mkdir()
        sh("mount", "-o", "nosuid,nodev", f"/dev/{name}", str(where))
        try:
            st = wait_state(sd, name, ("safe-to-remove",))
            assert "eject it on the desktop" in st["message"], st
            assert st["path"] == str(where)
            assert list((where / "HARMONIC" / "to-master").iterdir()), "the request is on the stick"
            assert (where / "HARMONIC" / "RECEIPT-school-1.txt").exists()
        finally:
            sh("umount", str(where))
        pull(slab, name)
        wait_state(sd, name, ("gone",))


def test_tricks_and_a_full_stick(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """ext4 (FAT cannot hold these): links, a FIFO, a folder and a huge sparse file where
    packs should be (RELIABILITY.md C6); then a stick with no room (B2). Each: a clear
    line in status, the daemon running, nothing of the school's state changed."""
    from tests.bad_input.helpers import pack_file_name

    _m, s, _mlab, slab = servers(tmp_path, {"a.txt": b"a\n"})
    with slab:
        sd = start_daemon(s)
        image = slab.image("ext4", 64 * MiB)
        with prepared(s, slab, image) as mnt:
            box = mnt / "HARMONIC" / "to-school-1"
            box.mkdir()
            os.symlink("/etc/passwd", box / pack_file_name("master-1", "link"))
            os.mkfifo(box / pack_file_name("master-1", "fifo"))
            (box / pack_file_name("master-1", "folder")).mkdir()
            with open(box / pack_file_name("master-1", "sparse"), "wb") as f:
                f.truncate(10 << 30)
        # The replica (what the master sent) is what a hostile stick must not touch; the
        # school's own stats and backup may be published at a visit, as at any.
        def replica() -> tuple[int, str | None]:
            c = next(c for c in sd.status()["collections"] if c["name"] == "content")
            return c["seq"], c["root"]
        before = replica()
        t0 = time.monotonic()
        name = insert(slab, image)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert time.monotonic() - t0 < 30, "nothing may hang the visit (a FIFO, a 10 GiB file)"
        assert "FAILED: 4 pack(s) refused" in st["message"], st
        for why in ("symbolic link", "not a regular file", "larger than any pack"):
            assert why in st["message"], st
        pull(slab, name)
        assert replica() == before

        # A stick with no room left: one line with the space needed, nothing half-written.
        full = slab.image("ext4", 16 * MiB)
        with prepared(s, slab, full) as mnt, open(mnt / "homework.zip", "wb") as f:
            while True:  # a pupil's files fill it up
                try:
                    f.write(b"\0" * 65536)
                    f.flush()
                except OSError:
                    break
        write_tree(s.source("stats"), {f"big{i}.bin": os.urandom(MiB) for i in range(3)})
        name = insert(slab, full)
        st = wait_state(sd, name, ("safe-to-remove",))
        assert "FAILED" in st["message"], st
        assert re.search(r"no room|full|needed", st["message"]), st
        pull(slab, name)
        inside = look_inside(slab, full)
        try:
            leftovers = [p.name for p in (inside / "HARMONIC").rglob("*") if p.name.endswith((".part", ".hpk"))]
        finally:
            unlook(inside)
        assert leftovers == [], "nothing half-written stays on the stick"
        assert sd.proc.poll() is None

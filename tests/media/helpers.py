"""Real sticks for tests: file system images on loop devices, and harmonicd-mount run as udev and systemd would.

``StickLab`` owns everything it makes and undoes it all on exit, whatever failed: helpers
stopped, mounts under its base lazily unmounted, loop devices detached. Use it as a context
manager anywhere, or through the ``stick_lab`` fixture of tests/media/conftest.py::

    with StickLab(tmp_path) as lab:
        name = lab.attach(lab.image("exfat"))        # "loop3"; real kernel uevents follow
        run = lab.helper(name)                       # harmonicd-mount /dev/loop3, in the background
        mount = run.wait_mounted()                   # devices.Mount, as the daemon sees it
        lab.eject(name); assert run.wait_exit() == 0

Images: "ext4", "exfat" (exFAT, mounted through FUSE here: there is no exfat kernel driver),
"blank" (zeros), optionally with a partition table and the file system in partition 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from harmonicd.media import devices

MiB = 1 << 20
HELPER = [sys.executable, "-m", "harmonicd.media.helper"]
# Debian package of each tool the lab runs.
TOOLS = {"losetup": "mount", "blkid": "util-linux", "mount": "mount", "mkfs.ext4": "e2fsprogs",
         "mkfs.exfat": "exfatprogs", "mount.exfat-fuse": "exfat-fuse"}
_MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "exfat": ["mkfs.exfat"]}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


def require(*tools: str) -> None:
    """Skip the test, naming the Debian package, when a tool is missing; and without loop devices."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {TOOLS.get(tool, tool)})")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def wait_for(what: str, test: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def mount_of(mountpoint: str) -> devices.Mount | None:
    return next((m for m in devices.read_mounts() if m.mountpoint == mountpoint), None)


def write_mbr(image: Path, size: int) -> None:
    """One Linux partition from 1 MiB to the end, as fdisk would make it (no fdisk needed)."""
    start = MiB // 512
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, size // 512 - start)
    with image.open("r+b") as f:
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")


def write_config(path: Path, base: Path, kinds: tuple[str, ...] = ("loop",)) -> Path:
    """The least configuration harmonicd-mount reads: its [media] table (and the server a config needs)."""
    # JSON strings and lists are TOML ones too.
    path.write_text(f'[server]\nid = "school-1"\nrole = "master"\nstate_dir = {json.dumps(str(path.parent))}\n\n'
                    f"[media]\ndevices = {json.dumps(list(kinds))}\nmount_base = {json.dumps(str(base))}\n")
    return path


class HelperRun:
    """harmonicd-mount for one device, running in the background."""

    def __init__(self, name: str, base: Path, config: Path, log: Path) -> None:
        self.name, self.base, self.log = name, base, log
        self.mountpoint = str(base / name)
        with log.open("w") as out:
            self.proc = subprocess.Popen([*HELPER, "--config", str(config), f"/dev/{name}"],
                                         stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_mounted(self, timeout: float = 20.0) -> devices.Mount:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"harmonicd-mount exited {self.proc.returncode}:\n{self.output()}")
            # Mounted and announced: an exFAT mount gets noexec a moment after it appears.
            return "mounted" in self.output()
        wait_for(f"{self.name} mounted by harmonicd-mount", ready, timeout)
        m = mount_of(self.mountpoint)
        assert m is not None, f"harmonicd-mount said mounted, mountinfo has no {self.mountpoint}"
        return m

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"harmonicd-mount still running after {timeout} s:\n{self.output()}") from None

    def stop(self) -> int:
        """What systemd does when the stick is pulled or the unit stopped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()


class StickLab:
    def __init__(self, tmp: Path, kinds: tuple[str, ...] = ("loop",)) -> None:
        self.tmp = tmp
        self.base = tmp / "media"  # the mount base, as /media/harmonicd
        self.base.mkdir(parents=True, exist_ok=True)
        self.config = write_config(tmp / "harmonicd-mount.toml", self.base, kinds)
        self.loops: list[str] = []
        self.runs: list[HelperRun] = []
        self._n = 0

    def __enter__(self) -> StickLab:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def image(self, fs: str = "ext4", size: int = 32 * MiB, partitioned: bool = False) -> Path:
        """A stick image: "ext4", "exfat" or "blank"; with partitioned, the file system is in partition 1."""
        self._n += 1
        path = self.tmp / f"stick{self._n}-{fs}.img"
        with path.open("wb") as f:
            f.truncate(size)
        if partitioned:
            write_mbr(path, size)
        if fs == "blank":
            return path
        if not partitioned:
            sh(*_MKFS[fs], str(path))
            return path
        name = self.attach(path, partitions=True)
        sh(*_MKFS[fs], f"/dev/{name}p1")
        self.detach(name)
        return path

    def attach(self, image: Path, *, read_only: bool = False, partitions: bool = False) -> str:
        """Attaches IMAGE to a free loop device (the kernel sends a change uevent); returns its name."""
        cmd = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + \
            (["--partscan"] if partitions else [])
        name = os.path.basename(sh(*cmd, str(image)).stdout.strip())
        self.loops.append(name)
        if partitions:
            deadline = time.monotonic() + 3
            while not os.path.exists(f"/sys/class/block/{name}/{name}p1"):
                if time.monotonic() > deadline:
                    self.detach(name)
                    pytest.skip("this kernel reads no partition tables (no CONFIG_MSDOS_PARTITION)")
                time.sleep(0.05)
        return name

    def detach(self, name: str) -> None:
        """The stick pulled: on a loop device still mounted the kernel detaches at the unmount (autoclear)."""
        sh("losetup", "--detach", f"/dev/{name}", check=False)
        if name in self.loops:
            self.loops.remove(name)

    def helper(self, name: str, config: Path | None = None) -> HelperRun:
        """harmonicd-mount /dev/NAME, as harmonicd-stick@NAME.service runs it."""
        run = HelperRun(name, self.base, config or self.config, self.tmp / f"helper-{name}-{len(self.runs)}.log")
        self.runs.append(run)
        return run

    def eject(self, name: str) -> None:
        """What the daemon does once the visit is over."""
        Path(devices.eject_request(str(self.base), name)).touch()

    def close(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
                try:
                    run.proc.wait(30)
                except subprocess.TimeoutExpired:
                    run.proc.kill()
                    run.proc.wait()
        for m in reversed(devices.read_mounts()):
            if m.mountpoint.startswith(str(self.base) + "/"):
                sh("umount", "--lazy", m.mountpoint, check=False)
        for name in list(self.loops):
            self.detach(name)


@pytest.fixture
def stick_lab(tmp_path: Path) -> Iterator[StickLab]:
    """A StickLab in tmp_path, after checking root and the tools; everything undone at the end."""
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    require("losetup", "blkid", "mount", "mkfs.ext4")
    with StickLab(tmp_path) as lab:
        yield lab

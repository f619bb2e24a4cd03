"""Block devices and mounts as the kernel shows them, for sticks (no asyncio, no pyudev).

Everything here reads ``/sys`` and ``/proc/self/mountinfo`` only: the daemon runs with
``PrivateDevices=yes`` and cannot open ``/dev``, and it must judge a stick before anything
mounts it. The mount helper (``helper.py``) and the daemon meet at two files in the mount
base, named here and nowhere else: the daemon's eject request and the helper's error note.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

# File systems a stick may carry. exfat-fuse shows as fuseblk (libfuse 2 sets no subtype);
# a newer libfuse shows fuseblk.exfat, a mount by hand of the plain FUSE mode fuse.exfat.
STICK_FSTYPES = frozenset({"vfat", "exfat", "fuseblk", "fuseblk.exfat", "fuse.exfat", "ext2", "ext3", "ext4"})

_USB = re.compile(r"/usb\d+/")  # a USB host controller's root hub in a sysfs device path


@dataclass(frozen=True)
class BlockDevice:
    name: str  # kernel name: "sdb1", "mmcblk0p1", "loop3"
    kind: str  # "usb" | "mmc" | "loop" | "other"
    present: bool  # has a medium: a card reader without a card, or a detached loop device, has size 0
    size: int  # bytes
    removable: bool  # the disk's removable flag (USB hard disks say no, most sticks yes)
    sys_path: str  # /sys/devices/... (resolved)


@dataclass(frozen=True)
class Mount:
    source: str
    mountpoint: str
    fstype: str
    options: frozenset[str]  # per-mount options (nosuid, nodev, noexec, ...), and "ro" if the file system is so
    device: str | None  # kernel name when the source is /dev/NAME, else None


def check_name(name: str) -> str:
    """A kernel block device name, safe to join to a folder (it comes from udev or a command line)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a block device name")
    return name


def kind_of(dev_path: str, name: str) -> str:
    """The kind of a block device from its sysfs path, which the kernel's own uevents carry too (DEVPATH)."""
    if _USB.search(dev_path):
        return "usb"  # a stick, or an SD card in a USB reader
    if "/mmc_host/" in dev_path or name.startswith("mmcblk"):
        return "mmc"
    if dev_path.startswith(("/devices/virtual/block/loop", "/sys/devices/virtual/block/loop")):
        return "loop"
    return "other"


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip() or 0)


def block_device(name: str, sys_root: str = "/sys") -> BlockDevice | None:
    """The block device NAME (a disk or a partition), or None when the kernel has none of that name."""
    check_name(name)
    link = os.path.join(sys_root, "class", "block", name)
    try:
        sys_path = os.path.realpath(link, strict=True)
        # The size file counts 512-byte sectors whatever the device's block size.
        size = _read_int(os.path.join(sys_path, "size")) * 512
        # A partition has no removable flag of its own: its disk (the parent folder) has it.
        disk = os.path.dirname(sys_path) if os.path.exists(os.path.join(sys_path, "partition")) else sys_path
        removable = _read_int(os.path.join(disk, "removable")) == 1
    except (OSError, ValueError):
        return None  # gone between the look-up and the read: the same as never there
    dev_path = sys_path.removeprefix(os.path.realpath(sys_root))
    return BlockDevice(name=name, kind=kind_of(dev_path, name), present=size > 0, size=size,
                       removable=removable, sys_path=sys_path)


def partitions(name: str, sys_root: str = "/sys") -> list[str]:
    """Kernel names of the partitions of disk NAME ([] for a partition or an unpartitioned disk)."""
    folder = os.path.join(sys_root, "class", "block", check_name(name))
    try:
        return sorted(e.name for e in os.scandir(folder) if os.path.exists(os.path.join(e.path, "partition")))
    except OSError:
        return []


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash in paths as \ooo octal.
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes) -> list[Mount]:
    """``/proc/PID/mountinfo`` (proc(5)): ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - TYPE SOURCE SUPER."""
    mounts = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue  # not a mount line; the kernel writes none such, but a truncated read could end so
        if len(fields) < sep + 3:
            continue
        options = set(_unescape(fields[5]).split(","))
        # A file system the kernel turned read-only after an error keeps "rw" per mount.
        if "ro" in _unescape(fields[sep + 3] if len(fields) > sep + 3 else b"").split(","):
            options.add("ro")
        source = _unescape(fields[sep + 2])
        name = source.removeprefix("/dev/")
        device = name if source.startswith("/dev/") and name and "/" not in name else None
        mounts.append(Mount(source=source, mountpoint=_unescape(fields[4]), fstype=_unescape(fields[sep + 1]),
                            options=frozenset(options), device=device))
    return mounts


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def _strictly_under(path: str, base: str) -> bool:
    return path.startswith(base.rstrip("/") + "/")


def stick_mounts(mounts: Iterable[Mount], bases: Iterable[str], kinds: Iterable[str],
                 sys_root: str = "/sys") -> list[Mount]:
    """The mounts that are sticks for us: under a base (our mount base, or where desktops mount), of a
    device of a kind taken, with a file system a stick carries. Each mount once, in mountinfo order."""
    bases, kinds = tuple(bases), frozenset(kinds)
    out = []
    for m in mounts:
        if m.device is None or m.fstype not in STICK_FSTYPES:
            continue
        if not any(_strictly_under(m.mountpoint, b) for b in bases):
            continue
        dev = block_device(m.device, sys_root)
        if dev is not None and dev.kind in kinds:
            out.append(m)
    return out


def eject_request(base: str, name: str) -> str:
    """The file the daemon creates to ask harmonicd-mount to unmount stick NAME."""
    return os.path.join(base, f".{check_name(name)}.eject")


def error_note(base: str, name: str) -> str:
    """The file where harmonicd-mount says in one line why it could not mount stick NAME."""
    return os.path.join(base, f".{check_name(name)}.error")


def read_error_note(base: str, name: str) -> str | None:
    try:
        with open(error_note(base, name), "rb") as f:
            text = f.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    return text.strip().splitlines()[0] if text.strip() else None

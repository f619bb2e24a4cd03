"""harmonicd.media.devices: mountinfo parsing, device kinds, which mounts are sticks, the helper's two files.

Parsing and kinds are checked on written-out mountinfo lines and a small sysfs tree of
symlinks shaped as the kernel's; the last tests check the same on real loop devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harmonicd.media import devices
from harmonicd.media.devices import Mount, block_device, kind_of, parse_mountinfo, stick_mounts
from tests.media.helpers import MiB, StickLab, mount_of, sh

USB_DISK = "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
MMC_DISK = "/devices/platform/soc/fe340000.mmc/mmc_host/mmc0/mmc0:aaaa/block/mmcblk0"
SATA_DISK = "/devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sda"
LOOP_DISK = "/devices/virtual/block/loop3"


# --------------------------------------------------------------------------- mountinfo


def test_mountinfo_fields_and_escapes() -> None:
    data = (b"36 35 98:0 /mnt1 /mnt/my\\040stick\\134x\\012y rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
            b"44 27 7:0 / /media/harmonicd/loop0 rw,nosuid,nodev,noexec,noatime - fuseblk /dev/loop0 "
            b"rw,user_id=0,group_id=0,default_permissions,allow_other,blksize=4096\n"
            b"45 27 0:50 / /tmp/t rw,relatime shared:7 master:2 - tmpfs tmpfs rw,size=1024k\n")
    root, exfat, tmpfs = parse_mountinfo(data)
    assert root == Mount(source="/dev/root", mountpoint="/mnt/my stick\\x\ny", fstype="ext3",
                         options=frozenset({"rw", "noatime"}), device="root")
    assert exfat.options == {"rw", "nosuid", "nodev", "noexec", "noatime"}
    assert (exfat.fstype, exfat.device) == ("fuseblk", "loop0")
    assert (tmpfs.source, tmpfs.device, tmpfs.mountpoint) == ("tmpfs", None, "/tmp/t")


def test_mountinfo_read_only_file_system_shows_ro() -> None:
    # ext4 with errors=remount-ro turns the file system read-only; the mount still says rw.
    (m,) = parse_mountinfo(b"50 27 7:1 / /media/harmonicd/loop1 rw,nosuid - ext4 /dev/loop1 ro,errors=remount-ro\n")
    assert "ro" in m.options


def test_mountinfo_device_only_for_a_plain_dev_name() -> None:
    m1, m2, m3 = parse_mountinfo(b"1 0 8:1 / /a rw - ext4 /dev/mapper/vg-x rw\n"
                                 b"2 0 8:1 / /b rw - ext4 /dev/disk/by-uuid/1234 rw\n"
                                 b"3 0 8:1 / /c rw - ext4 /dev/sdb1 rw\n")
    assert (m1.device, m2.device, m3.device) == (None, None, "sdb1")


def test_mountinfo_of_this_process() -> None:
    mounts = devices.read_mounts()
    assert any(m.mountpoint == "/" for m in mounts)
    assert any(m.mountpoint == "/proc" and m.fstype == "proc" for m in mounts)


# --------------------------------------------------------------------------- kinds, from a sysfs tree


def fake_sys(root: Path, disk: str, size_sectors: int = 2048, removable: int = 1, part: str | None = None) -> str:
    """A sysfs tree with /sys/class/block/NAME -> /sys/devices/... as the kernel lays it out."""
    disk_dir = root / disk.lstrip("/")
    disk_dir.mkdir(parents=True)
    (disk_dir / "size").write_text(f"{size_sectors}\n")
    (disk_dir / "removable").write_text(f"{removable}\n")
    (root / "class" / "block").mkdir(parents=True, exist_ok=True)
    name = os.path.basename(disk)
    os.symlink(os.path.relpath(disk_dir, root / "class" / "block"), root / "class" / "block" / name)
    if part is None:
        return name
    part_dir = disk_dir / part
    part_dir.mkdir()
    (part_dir / "size").write_text(f"{size_sectors // 2}\n")
    (part_dir / "partition").write_text("1\n")
    os.symlink(os.path.relpath(part_dir, root / "class" / "block"), root / "class" / "block" / part)
    return part


@pytest.mark.parametrize(("path", "name", "kind"), [
    (USB_DISK, "sdb", "usb"), (USB_DISK + "/sdb1", "sdb1", "usb"),
    (MMC_DISK + "/mmcblk0p1", "mmcblk0p1", "mmc"), (SATA_DISK, "sda", "other"),
    (LOOP_DISK, "loop3", "loop"), ("/devices/virtual/block/zram0", "zram0", "other"),
    ("/devices/pci0000:00/0000:00:02.0/virtio1/block/vda", "vda", "other"),
])
def test_kind_from_the_device_path(path: str, name: str, kind: str) -> None:
    assert kind_of(path, name) == kind


def test_block_device_from_sysfs(tmp_path: Path) -> None:
    part = fake_sys(tmp_path, USB_DISK, size_sectors=4096, removable=1, part="sdb1")
    dev = block_device(part, sys_root=str(tmp_path))
    assert dev is not None
    # A partition has no removable flag: its disk's counts.
    assert (dev.name, dev.kind, dev.present, dev.size, dev.removable) == ("sdb1", "usb", True, 2048 * 512, True)
    assert dev.sys_path == str(tmp_path / USB_DISK.lstrip("/") / "sdb1")
    assert block_device("sdz", sys_root=str(tmp_path)) is None


def test_an_empty_reader_is_not_present(tmp_path: Path) -> None:
    name = fake_sys(tmp_path, MMC_DISK, size_sectors=0, removable=0)
    dev = block_device(name, sys_root=str(tmp_path))
    assert dev is not None
    assert (dev.kind, dev.present, dev.size, dev.removable) == ("mmc", False, 0, False)


@pytest.mark.parametrize("name", ["", "..", ".x", "a/b", "../etc", "sd\0b"])
def test_names_that_are_not_kernel_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a block device name"):
        devices.eject_request("/media/harmonicd", name)
    with pytest.raises(ValueError, match="not a block device name"):
        block_device(name)


# --------------------------------------------------------------------------- which mounts are sticks


def test_stick_mounts(tmp_path: Path) -> None:
    fake_sys(tmp_path, USB_DISK, part="sdb1")
    fake_sys(tmp_path, SATA_DISK, part="sda1")
    fake_sys(tmp_path, LOOP_DISK)
    mounts = parse_mountinfo(
        b"1 0 8:17 / /media/harmonicd/sdb1 rw,nosuid,nodev,noexec - vfat /dev/sdb1 rw\n"
        b"2 0 8:17 / /media/harmonicd rw - ext4 /dev/sdb1 rw\n"            # the base itself, never
        b"3 0 8:17 / /media/harmonicdx/sdb1 rw - vfat /dev/sdb1 rw\n"      # a sibling of the base
        b"4 0 8:1 / /media/alice/DISK rw - ext4 /dev/sda1 rw\n"            # a SATA disk: not a kind taken
        b"5 0 7:3 / /run/media/alice/STICK rw - fuseblk /dev/loop3 rw\n"   # a desktop's exFAT mount
        b"6 0 0:50 / /media/alice/t rw - tmpfs tmpfs rw\n"                 # no device
        b"7 0 8:17 / /media/alice/s rw - iso9660 /dev/sdb1 ro\n"           # not a stick file system
        b"8 0 8:17 / /mnt/sdb1 rw - vfat /dev/sdb1 rw\n")                  # under no base
    found = stick_mounts(mounts, ["/media/harmonicd", "/run/media/"], ["usb", "loop"], sys_root=str(tmp_path))
    assert [m.mountpoint for m in found] == ["/media/harmonicd/sdb1", "/run/media/alice/STICK"]
    # Our base under a watched one (the defaults): each mount once.
    found = stick_mounts(mounts, ["/media/harmonicd", "/media"], ["usb"], sys_root=str(tmp_path))
    assert [m.mountpoint for m in found] == ["/media/harmonicd/sdb1", "/media/harmonicd", "/media/harmonicdx/sdb1"]
    assert stick_mounts(mounts, ["/media"], [], sys_root=str(tmp_path)) == []


# --------------------------------------------------------------------------- the helper's two files


def test_eject_request_and_error_note(tmp_path: Path) -> None:
    base = str(tmp_path)
    assert devices.eject_request(base, "sdb1") == os.path.join(base, ".sdb1.eject")
    assert devices.error_note(base, "sdb1") == os.path.join(base, ".sdb1.error")
    assert devices.read_error_note(base, "sdb1") is None
    Path(devices.error_note(base, "sdb1")).write_text("no file system (blank or unformatted)\nmore\n")
    assert devices.read_error_note(base, "sdb1") == "no file system (blank or unformatted)"
    Path(devices.error_note(base, "sdb1")).write_text("\n")
    assert devices.read_error_note(base, "sdb1") is None


# --------------------------------------------------------------------------- real loop devices (root)


def test_a_real_loop_device(stick_lab: StickLab) -> None:
    image = stick_lab.image("ext4", size=24 * MiB)
    name = stick_lab.attach(image)
    dev = block_device(name)
    assert dev is not None
    assert (dev.kind, dev.present, dev.size) == ("loop", True, 24 * MiB)
    assert dev.sys_path == f"/sys/devices/virtual/block/{name}"
    stick_lab.detach(name)
    dev = block_device(name)
    assert dev is None or not dev.present  # a detached loop device stays, with size 0


def test_a_real_partition(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4", partitioned=True), partitions=True)
    part = block_device(f"{name}p1")
    assert part is not None
    assert (part.kind, part.present) == ("loop", True)
    assert devices.partitions(name) == [f"{name}p1"]
    assert devices.partitions(f"{name}p1") == []


def test_a_real_mount(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    where = stick_lab.base / "my stick"  # a space, escaped in mountinfo
    where.mkdir()
    sh("mount", "-o", "nosuid,nodev,noexec", f"/dev/{name}", str(where))
    m = mount_of(str(where))
    assert m is not None
    assert (m.device, m.fstype) == (name, "ext4")
    assert {"nosuid", "nodev", "noexec"} <= m.options
    assert stick_mounts(devices.read_mounts(), [str(stick_lab.base)], ["loop"]) == [m]
    assert stick_mounts(devices.read_mounts(), [str(stick_lab.base)], ["usb"]) == []

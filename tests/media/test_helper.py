"""harmonicd-mount on real stick images: ext4 through the kernel, exFAT through FUSE, blank and corrupt ones.

Each test runs the command as harmonicd-stick@NAME.service would (root, in the background)
and checks what the daemon sees: the mount in mountinfo with its options, the error note,
and a clean mount base after the eject request, a pull or a stop.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from harmonicd import config
from harmonicd.errors import ConfigError
from harmonicd.media import devices, helper
from harmonicd.media.helper import UNMOUNT_PAUSE, UNMOUNT_TRIES, WATCH_INTERVAL
from tests.media.helpers import HELPER, StickLab, mount_of, require, sh, wait_for, write_config

MOUNT_OPTIONS = {"nosuid", "nodev", "noexec", "noatime"}


def assert_clean(lab: StickLab, name: str) -> None:
    """Nothing left for NAME: no mount, no folder, no eject request."""
    assert mount_of(str(lab.base / name)) is None
    assert not (lab.base / name).exists()
    assert not os.path.exists(devices.eject_request(str(lab.base), name))


def corrupt(image: Path, offset: int, length: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * length)


def refused(lab: StickLab, name: str) -> tuple[int, str, str | None]:
    run = lab.helper(name)
    code = run.wait_exit()
    assert mount_of(run.mountpoint) is None
    assert not (lab.base / name).exists(), "a refused stick leaves no folder"
    return code, run.output(), devices.read_error_note(str(lab.base), name)


# --------------------------------------------------------------------------- mounting and unmounting


def test_ext4_mounted_for_the_daemon_and_unmounted_on_its_request(stick_lab: StickLab) -> None:
    image = stick_lab.image("ext4")
    name = stick_lab.attach(image)
    run = stick_lab.helper(name)
    m = run.wait_mounted()
    assert (m.device, m.fstype, m.mountpoint) == (name, "ext4", str(stick_lab.base / name))
    assert m.options >= MOUNT_OPTIONS
    assert "ro" not in m.options
    (Path(run.mountpoint) / "written").write_bytes(b"kept\n")
    time.sleep(0.5)
    assert run.proc.poll() is None, "the helper holds the stick until asked"
    stick_lab.eject(name)
    assert run.wait_exit() == 0
    assert_clean(stick_lab, name)
    assert f"{name}: unmounted (eject requested)" in run.output()
    # Unmounted cleanly: what was written is on the image.
    stick_lab.detach(name)
    name = stick_lab.attach(image)
    where = stick_lab.tmp / "check"
    where.mkdir()
    sh("mount", "-o", "ro", f"/dev/{name}", str(where))
    try:
        assert (where / "written").read_bytes() == b"kept\n"
    finally:
        sh("umount", str(where))


def test_exfat_through_fuse(stick_lab: StickLab) -> None:
    require("mkfs.exfat", "mount.exfat-fuse")
    name = stick_lab.attach(stick_lab.image("exfat"))
    run = stick_lab.helper(name)
    m = run.wait_mounted()
    exfat_driver = "exfat" in Path("/proc/filesystems").read_text().split()
    assert m.fstype == ("exfat" if exfat_driver else "fuseblk")
    # libfuse 2 drops noexec and noatime; the helper puts them on the mount itself.
    assert m.options >= MOUNT_OPTIONS
    folder = Path(run.mountpoint) / "HARMONIC"
    folder.mkdir()
    (folder / "pack").write_bytes(b"x" * 1000)
    uid = os.getuid() if os.geteuid() != 0 else 0  # no user harmonicd here: root owns it all
    for path, mode in ((folder, 0o750), (folder / "pack", 0o640)):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, mode), path
    stick_lab.eject(name)
    assert run.wait_exit() == 0
    assert_clean(stick_lab, name)


def test_read_only_stick_is_mounted_read_only(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"), read_only=True)
    run = stick_lab.helper(name)
    m = run.wait_mounted()
    assert "ro" in m.options
    assert run.stop() == 0
    assert_clean(stick_lab, name)


def test_stopped_by_systemd_unmounts(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    run = stick_lab.helper(name)
    run.wait_mounted()
    assert run.stop() == 0  # SIGTERM: the unit stopped, or the stick pulled (BindsTo=)
    assert_clean(stick_lab, name)
    assert "stopped by signal" in run.output()


def test_busy_stick_is_unmounted_lazily(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    run = stick_lab.helper(name)
    run.wait_mounted()
    with (Path(run.mountpoint) / "open").open("w") as held:  # a file the daemon still has open
        stick_lab.eject(name)
        assert run.wait_exit(UNMOUNT_TRIES * UNMOUNT_PAUSE + 20) == 0
        assert mount_of(run.mountpoint) is None
        held.write("still writable through the open file\n")
    assert_clean(stick_lab, name)


def test_pulled_ext4_stick_lazy_unmount_and_detach(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    run = stick_lab.helper(name)
    run.wait_mounted()
    sh("umount", "--lazy", run.mountpoint)
    stick_lab.detach(name)
    assert run.wait_exit() == 0
    assert_clean(stick_lab, name)


def test_yanked_exfat_stick_fuse_killed(stick_lab: StickLab) -> None:
    require("mkfs.exfat", "mount.exfat-fuse")
    if "exfat" in Path("/proc/filesystems").read_text().split():
        pytest.skip("the kernel's exfat driver mounts here, not FUSE")
    name = stick_lab.attach(stick_lab.image("exfat"))
    run = stick_lab.helper(name)
    run.wait_mounted()
    fuse = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p)[:1] == ["mount.exfat-fuse"]
            and f"/dev/{name}" in _cmdline(p)]
    assert len(fuse) == 1, fuse
    os.kill(int(fuse[0]), signal.SIGKILL)  # the stick gone from under the file system: ENOTCONN from now on
    # The loop device stays attached under the dead mount: the helper notices the mount itself.
    assert run.wait_exit() == 0
    assert_clean(stick_lab, name)
    assert "unmounted (file system gone)" in run.output()
    stick_lab.detach(name)
    wait_for("the loop device to go once unmounted", lambda: not _present(name))


def _present(name: str) -> bool:
    dev = devices.block_device(name)
    return dev is not None and dev.present


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_stale_notes_of_an_earlier_insertion_are_removed(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    Path(devices.eject_request(str(stick_lab.base), name)).touch()
    Path(devices.error_note(str(stick_lab.base), name)).write_text("no file system (blank or unformatted)\n")
    (stick_lab.base / name).mkdir()  # the empty folder of a helper that was killed
    run = stick_lab.helper(name)
    run.wait_mounted()
    time.sleep(0.5)
    assert run.proc.poll() is None, "an old eject request unmounted the new insertion"
    assert devices.read_error_note(str(stick_lab.base), name) is None
    stick_lab.eject(name)
    assert run.wait_exit() == 0


def test_a_symlink_in_place_of_the_mount_point_is_not_followed(stick_lab: StickLab) -> None:
    # The mount base belongs to the daemon's user: root must never mount through a link it put there.
    name = stick_lab.attach(stick_lab.image("ext4"))
    elsewhere = stick_lab.tmp / "elsewhere"
    elsewhere.mkdir()
    (stick_lab.base / name).symlink_to(elsewhere)
    run = stick_lab.helper(name)
    assert run.wait_exit() == 1
    assert mount_of(str(elsewhere)) is None
    note = devices.read_error_note(str(stick_lab.base), name)
    assert note == f"cannot use {stick_lab.base / name} as mount point: Not a directory"


def test_a_second_helper_for_a_mounted_stick_is_refused(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    first = stick_lab.helper(name)
    first.wait_mounted()
    second = stick_lab.helper(name)
    assert second.wait_exit() == 1
    assert "already a mount point" in second.output()
    assert mount_of(first.mountpoint) is not None
    assert first.proc.poll() is None
    stick_lab.eject(name)
    assert first.wait_exit() == 0


# --------------------------------------------------------------------------- refusals: one line, a note, nothing left


def test_blank_stick(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("blank"))
    code, out, note = refused(stick_lab, name)
    assert code == 1
    assert note == "no file system (blank or unformatted)"
    assert out.strip() == f"harmonicd-mount: {name}: {note}"


def test_corrupt_ext4_stick(stick_lab: StickLab) -> None:
    image = stick_lab.image("ext4")
    corrupt(image, 2048, 4096)  # the group descriptors after the superblock (1 KiB blocks on a small image)
    name = stick_lab.attach(image)
    code, out, note = refused(stick_lab, name)
    assert code == 1
    assert note is not None
    assert note.startswith("unreadable: "), note
    assert "dmesg" not in note
    assert out.count("\n") == 1, out


def test_corrupt_exfat_stick(stick_lab: StickLab) -> None:
    require("mkfs.exfat", "mount.exfat-fuse")
    image = stick_lab.image("exfat")
    corrupt(image, 11 * 512, 512)  # the boot region's checksum sector
    name = stick_lab.attach(image)
    code, _, note = refused(stick_lab, name)
    assert code == 1
    assert note is not None
    assert note.startswith("unreadable: "), note


def test_device_of_a_kind_not_taken(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    usb_only = write_config(stick_lab.tmp / "usb-only.toml", stick_lab.base, ("usb",))
    run = stick_lab.helper(name, config=usb_only)
    assert run.wait_exit() == 1
    assert devices.read_error_note(str(stick_lab.base), name) == f"not a kind taken: {name} is loop " \
        "([media] devices = ['usb'])"
    assert not (stick_lab.base / name).exists()


def test_detached_loop_device_has_no_medium(stick_lab: StickLab) -> None:
    name = stick_lab.attach(stick_lab.image("ext4"))
    stick_lab.detach(name)
    code, _, note = refused(stick_lab, name)
    assert (code, note) == (1, "no medium (the device is empty)")


@pytest.mark.parametrize(("device", "why"), [("/dev/null", "/dev/null is not a block device"),
                                              ("/dev/nosuchstick", "/dev/nosuchstick: no such device")])
def test_not_a_stick(stick_lab: StickLab, device: str, why: str) -> None:
    p = sh(*HELPER, "--config", str(stick_lab.config), device, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().endswith(why), p.stderr
    assert p.stderr.count("\n") == 1


def test_bad_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nid = "school-1"\nrole = "master"\nstate_dir = "/x"\n[media]\ndevices = ["floppy"]\n')
    p = sh(*HELPER, "--config", str(bad), "/dev/loop0", check=False)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1
    assert "media.devices" in p.stderr


# --------------------------------------------------------------------------- what the teacher waits for


def test_the_eject_request_is_seen_at_once(stick_lab: StickLab) -> None:
    """From the daemon's request to the stick unmounted and the helper gone: a look at the
    request every EJECT_INTERVAL (0.02 s), not at the device's pace (WATCH_INTERVAL)."""
    image = stick_lab.image("ext4")
    took = []
    for _ in range(3):
        name = stick_lab.attach(image)
        run = stick_lab.helper(name)
        run.wait_mounted()
        time.sleep(0.3)  # past the helper's first looks
        t0 = time.monotonic()
        stick_lab.eject(name)
        assert run.wait_exit() == 0
        took.append(time.monotonic() - t0)
        assert_clean(stick_lab, name)
        stick_lab.detach(name)
    # The unmount itself takes a few ms on a loop device; a busy machine adds some.
    assert sum(took) / len(took) < WATCH_INTERVAL / 2, took


CONFIGS = {
    "written by init": '[media]\ndevices = ["usb", "loop"]\nmount_base = "/srv/sticks"\n',
    "no media table": "",
    "mount_base only": '[media]\nmount_base = "/srv/sticks"\n',
    "devices only": '[media]\ndevices = ["mmc"]\n',
    "no devices": '[media]\ndevices = []\nmount_base = "/srv/sticks"\n',
}


@pytest.mark.parametrize("media", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_helper_reads_the_media_table_as_the_daemon(tmp_path: Path, media: str) -> None:
    """The helper reads [media] through the daemon's loader: the same values and defaults."""
    path = tmp_path / "harmonicd.toml"
    path.write_text(f'[server]\nid = "school-1"\nrole = "master"\nstate_dir = "{tmp_path}"\n{media}')
    cfg = config.load(str(path))
    assert helper._media(str(path)) == (cfg.media_mount_base, cfg.media_devices)


@pytest.mark.parametrize("media", ['devices = ["other"]', 'devices = "usb"', 'mount_base = "sticks"',
                                   'mount_base = 3'])
def test_a_media_table_the_daemon_refuses_is_refused(tmp_path: Path, media: str) -> None:
    path = tmp_path / "harmonicd.toml"
    path.write_text(f'[server]\nid = "school-1"\nrole = "master"\nstate_dir = "{tmp_path}"\n[media]\n{media}\n')
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    with pytest.raises(ConfigError) as got:
        helper._media(str(path))
    assert str(got.value) == str(exc.value)

"""harmonicd-mount: mount one stick for the daemon, hold it until asked, unmount it (runs as root).

The daemon has no privilege to mount (systemd/README.md, "Sticks"), so udev starts
``harmonicd-stick@NAME.service`` for each stick, which runs ``harmonicd-mount /dev/NAME``:

1. check the device is of a kind taken (``[media] devices``) and probe its file system;
2. mount it at ``MOUNT_BASE/NAME`` with nosuid,nodev,noexec,noatime;
3. wait until the daemon creates ``MOUNT_BASE/.NAME.eject``, the device or its file system
   goes (a FUSE process ended), someone else unmounts it, or SIGTERM (systemd stopping the
   unit: the stick was pulled);
4. unmount (lazily if still busy after retries), remove the folder and the request, exit 0.

Where it cannot mount, it writes one line into ``MOUNT_BASE/.NAME.error`` for the daemon
to show, says the same on stderr (the journal) and exits 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from types import FrameType

from harmonicd import config
from harmonicd.errors import HarmonicError
from harmonicd.media.devices import block_device, check_name, eject_request, error_note, partitions, read_mounts

# Imports are kept few: the helper starts at every insertion and the teacher waits for it
# (`python -X importtime -m harmonicd.media.helper`).

TAKEN = ("vfat", "exfat", "ext2", "ext3", "ext4")
# noexec and nosuid: nothing on a stick is run; nodev: a crafted ext4 image could carry device nodes.
OPTIONS = "nosuid,nodev,noexec,noatime"
FAT_MODES = "fmask=0137,dmask=0027"  # FAT keeps no owners or modes: files rw-r-----, folders rwxr-x---
WATCH_INTERVAL = 0.2  # seconds between looks at the device and the mount
# Seconds between looks at the eject request: the teacher waits for this one. One stat()
# of a file in the mount base each time: about 4 ms of CPU a second more than looking every
# WATCH_INTERVAL (measured), only while a stick is in.
EJECT_INTERVAL = 0.02
UNMOUNT_TRIES = 10  # at UNMOUNT_PAUSE apart, before a lazy unmount; the unit's TimeoutStopSec covers it
UNMOUNT_PAUSE = 0.3
DAEMON_USER = "harmonicd"


class Refused(Exception):
    """Why the stick is not mounted, in one line, for the journal and the daemon's error note."""


def _say(line: str, *, failure: bool = False) -> None:
    # One line per event for the journal (the unit's stdout and stderr); failures on stderr.
    stream = sys.stderr if failure else sys.stdout
    stream.write(f"harmonicd-mount: {line}\n")
    stream.flush()


def _run(cmd: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, pass_fds=pass_fds)


def _reason(text: str, target: str = "") -> str:
    """The line of a tool's output that says what went wrong, without the tool's prefixes."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # mount(8) adds "dmesg(1) may have more information" after its reason; exfat-fuse says "ERROR: ...".
    said = [ln for ln in lines if ln.startswith(("mount:", "umount:", "ERROR:"))] or lines
    if not said:
        return "no reason given"
    return said[0].removeprefix("ERROR: ").removeprefix(f"mount: {target}: ").removeprefix(f"umount: {target}: ")


def _check_device(device: str, name: str, kinds: tuple[str, ...]) -> None:
    try:
        if not stat.S_ISBLK(os.stat(device).st_mode):
            raise Refused(f"{device} is not a block device")
    except FileNotFoundError:
        raise Refused(f"{device}: no such device") from None
    dev = block_device(name)
    if dev is None:
        raise Refused(f"{device}: the kernel has no block device {name}")
    if dev.kind not in kinds:
        raise Refused(f"not a kind taken: {name} is {dev.kind} ([media] devices = {list(kinds)})")
    if not dev.present:
        raise Refused("no medium (the device is empty)")


def _probe(device: str, name: str) -> str | None:
    """The file system on DEVICE, read from its superblock (blkid -p ignores any cache); None for a disk
    whose partitions carry the file systems (each partition has its own helper)."""
    p = _run(["blkid", "-p", "-o", "export", device])
    fstype = next((ln.removeprefix("TYPE=") for ln in p.stdout.splitlines() if ln.startswith("TYPE=")), "")
    if p.returncode == 2 or (p.returncode == 0 and not fstype):
        if partitions(name):
            return None
        raise Refused("no file system (blank or unformatted)")
    if p.returncode != 0:
        raise Refused(f"unreadable: {_reason(p.stderr)}")
    if fstype not in TAKEN:
        raise Refused(f"file system {fstype} is not one Harmonic takes ({', '.join(TAKEN)})")
    return fstype


def _owner() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        return 0, 0  # a machine without the user (a test, a development box): the daemon runs as root there
    return pw.pw_uid, pw.pw_gid


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


def _mount(device: str, fstype: str, target: str, folder: int) -> None:
    """Mounts DEVICE on the folder open as FOLDER (an O_PATH descriptor of TARGET).

    Through /proc/self/fd, not by name: the mount base belongs to the daemon's user, which
    could swap the folder for a symlink between its making and the mount, and have root
    mount a stick over /etc. A mount point, once mounted, can be neither removed nor renamed.
    """
    at = f"/proc/self/fd/{folder}"
    options = OPTIONS
    if fstype in ("vfat", "exfat"):
        uid, gid = _owner()
        options += f",uid={uid},gid={gid},{FAT_MODES}"
    if fstype == "vfat":
        options += ",flush"  # write out as soon as a file is closed: sticks are pulled early
    fuse = fstype == "exfat" and not _kernel_has("exfat")
    cmd = ["mount.exfat-fuse", "-o", options, device, at] if fuse else \
        ["mount", "--no-canonicalize", "-t", fstype, "-o", options, device, at]
    try:
        p = _run(cmd, pass_fds=(folder,))
    except FileNotFoundError:
        raise Refused("unreadable: exFAT needs the kernel's exfat driver or exfat-fuse (Debian package)") from None
    if p.returncode != 0:
        raise Refused(f"unreadable: {_reason(p.stderr, at)}")
    if fuse:
        # libfuse 2 passes nosuid,nodev to the kernel but drops noexec and noatime (checked with
        # exfat-fuse 1.3): set them on the mount itself, which leaves the file system alone.
        # FOLDER is the folder under the mount now; TARGET, mounted, can no longer be swapped.
        p = _run(["mount", "--no-canonicalize", "-o", f"remount,bind,{OPTIONS}", target])
        if p.returncode != 0:
            _unmount(target)
            raise Refused(f"unreadable: could not make the mount noexec: {_reason(p.stderr, target)}")


def _mounted(target: str) -> bool:
    return any(m.mountpoint == target for m in read_mounts())


def _unmount(target: str) -> str | None:
    """Unmounts TARGET; None when done, else mount's reason. Lazy when still busy after the retries:
    the daemon may hold a file open for a moment after asking, but a pulled stick must not stay mounted."""
    for _ in range(UNMOUNT_TRIES):
        if not _mounted(target):
            return None
        if _run(["umount", target]).returncode == 0:
            return None
        time.sleep(UNMOUNT_PAUSE)
    p = _run(["umount", "--lazy", target])
    return None if p.returncode == 0 or not _mounted(target) else _reason(p.stderr, target)


def _write_note(base: str, name: str, why: str) -> None:
    path = error_note(base, name)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(why + "\n")
        os.chmod(tmp, 0o644)  # the daemon reads it as another user
        os.replace(tmp, path)
    except OSError as exc:
        _say(f"{name}: cannot write {path}: {exc.strerror}", failure=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_base(base: str) -> None:
    if not os.path.isdir(base):
        os.makedirs(base)
        os.chmod(base, 0o750)  # whatever the umask
        os.chown(base, *_owner())  # the daemon writes its eject requests here (tmpfiles makes it so too)


def _make_mount_point(target: str) -> int:
    """Makes TARGET and returns an O_PATH descriptor of it for _mount."""
    try:
        if os.path.lexists(target):
            os.rmdir(target)  # an empty folder left by a helper that was killed
        os.mkdir(target, 0o700)
        return os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
    except OSError as exc:
        raise Refused(f"cannot use {target} as mount point: {exc.strerror}") from None


def _alive(target: str) -> bool:
    """False once the file system behind TARGET has gone: an exFAT stick's FUSE process ended.
    A loop device stays attached under such a mount (the kernel holds it), so the device alone
    would never say the stick went."""
    try:
        os.stat(target)
    except OSError as exc:
        return exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV, errno.ENXIO)
    return True


def _wait(base: str, name: str, target: str, stopped: list[int]) -> str:
    """Why the stick is to be unmounted, once it is."""
    request = eject_request(base, name)
    every = max(1, round(WATCH_INTERVAL / EJECT_INTERVAL))
    tick = 0
    while not stopped:
        if os.path.exists(request):
            return "eject requested"
        if tick % every == 0:
            dev = block_device(name)
            if dev is None or not dev.present:
                return "device gone"
            if not _mounted(target):
                return "unmounted by someone else"
            if not _alive(target):
                return "file system gone"
        tick += 1
        time.sleep(EJECT_INTERVAL)
    return f"stopped by signal {stopped[0]}"


def run(device: str, base: str, kinds: tuple[str, ...]) -> int:
    name = check_name(os.path.basename(os.path.realpath(device)))
    target = os.path.join(base, name)
    stopped: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if _mounted(target):
        # Before touching the notes: they belong to the helper that holds this mount.
        _say(f"{name}: {target} is already a mount point (another harmonicd-mount for it?)", failure=True)
        return 1
    _make_base(base)
    # What a previous insertion left must not speak for this one (a stale request would unmount at once).
    _remove(error_note(base, name))
    _remove(eject_request(base, name))
    try:
        _check_device(device, name, kinds)
        fstype = _probe(device, name)
        if fstype is None:
            _say(f"{name}: holds partitions; each is mounted on its own")
            return 0
        folder = _make_mount_point(target)
        try:
            _mount(device, fstype, target, folder)
        except Refused:
            os.rmdir(target)
            raise
        finally:
            os.close(folder)
    except Refused as exc:
        _say(f"{name}: {exc}", failure=True)
        _write_note(base, name, str(exc))
        return 1
    _say(f"{name}: mounted {device} ({fstype}) at {target}")
    why = _wait(base, name, target, stopped)
    failed = _unmount(target)
    if failed is not None:
        _say(f"{name}: could not unmount {target}: {failed}", failure=True)
        return 1
    try:
        os.rmdir(target)
    except OSError as exc:
        _say(f"{name}: unmounted, but cannot remove {target}: {exc.strerror}", failure=True)
    _remove(eject_request(base, name))
    _say(f"{name}: unmounted ({why})")
    return 0


def _media(path: str) -> tuple[str, tuple[str, ...]]:
    """[media] mount_base and devices, read by the daemon's own loader: the same values and
    defaults, and the same one-line errors."""
    cfg = config.load(path, first_boot=True)  # a first boot mounts sticks too: its bundle may be on one
    return cfg.media_mount_base, cfg.media_devices


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="harmonicd-mount", description="Mount a stick for harmonicd (as root).")
    ap.add_argument("--config", help="the daemon's configuration file (default: as harmonicd)")
    ap.add_argument("device", metavar="DEVICE", help="the stick's block device, e.g. /dev/sdb1")
    args = ap.parse_args(argv)
    try:
        mount_base, kinds = _media(config.config_path(args.config))
        base = os.path.realpath(mount_base)  # mountinfo shows resolved paths
        return run(args.device, base, kinds)
    except (HarmonicError, ValueError) as exc:
        _say(f"{exc}", failure=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

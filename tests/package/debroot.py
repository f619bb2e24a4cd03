"""A fresh Debian root for the package tests: a debootstrap'ed bookworm minbase.

The first run makes the root with debootstrap and keeps it as a tar file under
CACHE (a few minutes, network to deb.debian.org); later runs unpack that tar
(seconds). Each test gets its own unpacked copy, entered with chroot, with /proc
and /dev mounted in and apt's download folder bound to a cache shared by all
runs, so the packages harmonicd depends on are fetched once.

``DebianRoot.fresh()`` unmounts everything it mounted before it deletes the
copy, and refuses to delete a copy that still has anything mounted inside (an
rmtree through a bind mount of /dev would delete the host's devices).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("HARMONICD_TEST_CACHE", "/var/cache/harmonicd-tests"))
MINBASE_TAR = CACHE / "bookworm-minbase.tar"
APT_ARCHIVES = CACHE / "apt-archives"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (f"deb {MIRROR} {SUITE} main\n"
           f"deb {MIRROR} {SUITE}-updates main\n"
           f"deb http://deb.debian.org/debian-security {SUITE}-security main\n")
# What a command inside the root sees: nothing of this machine's environment
# (its Python, pip settings, HARMONICD_CONFIG).
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}


class Unreachable(Exception):
    """The Debian mirror could not be reached: the tests skip with this reason."""


def _run(cmd: list[str], timeout: float = 1800, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload,no-any-return]


def ensure_minbase() -> Path:
    """The cached minbase tar, made by debootstrap if it is not there yet."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions at once make it once
        if MINBASE_TAR.exists():
            return MINBASE_TAR
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="debootstrap-") as work:
            target = Path(work) / "root"
            p = _run(["debootstrap", "--variant=minbase", SUITE, str(target), MIRROR])
            if p.returncode != 0:
                tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
                if any("Failed getting release file" in line or "Temporary failure" in line
                       or "Could not resolve" in line for line in tail):
                    raise Unreachable(f"debootstrap could not reach {MIRROR}: {' / '.join(tail)}")
                raise AssertionError(f"debootstrap exited {p.returncode}: {p.stdout}\n{p.stderr}")
            (target / "etc/apt/sources.list").write_text(SOURCES)
            # debootstrap's downloads are in the tar otherwise; apt's cache is shared instead.
            for deb in (target / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            part = MINBASE_TAR.with_suffix(".tar.part")
            p = _run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(part), "."])
            assert p.returncode == 0, f"tar: {p.stderr}"
            part.rename(MINBASE_TAR)
    return MINBASE_TAR


def _mounts_under(path: Path) -> list[str]:
    inside = []
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                inside.append(target)
    return inside


class DebianRoot:
    """An unpacked minbase root; ``run`` runs a command inside it (chroot)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    @contextlib.contextmanager
    def fresh(cls, parent: Path) -> Iterator[DebianRoot]:
        tar = ensure_minbase()
        root = Path(tempfile.mkdtemp(dir=parent, prefix="debroot-"))
        mounted: list[Path] = []
        try:
            p = _run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(tar)])
            assert p.returncode == 0, f"unpacking {tar}: {p.stderr}"
            shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
            (APT_ARCHIVES / "partial").mkdir(parents=True, exist_ok=True)
            for args, at in ((["-t", "proc", "proc"], root / "proc"),
                             (["--bind", "/dev"], root / "dev"),
                             (["--bind", "/dev/pts"], root / "dev/pts"),  # apt's terminal log
                             (["--bind", str(APT_ARCHIVES)], root / "var/cache/apt/archives")):
                p = _run(["mount", *args, str(at)])
                assert p.returncode == 0, f"mount {at}: {p.stderr}"
                mounted.append(at)
            yield cls(root)
        finally:
            for at in reversed(mounted):
                if _run(["umount", str(at)]).returncode != 0:
                    _run(["umount", "-l", str(at)])
            left = _mounts_under(root)
            if left:
                raise AssertionError(f"still mounted inside {root}, not deleting it: {left}")
            shutil.rmtree(root)

    def run(self, script: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the root, as root, with a clean environment."""
        p = _run(["chroot", str(self.path), "/bin/sh", "-ec", script], timeout=timeout, env=CHROOT_ENV)
        if check and p.returncode != 0:
            raise AssertionError(f"in the chroot, exit {p.returncode}: {script}\n"
                                 f"stdout: {p.stdout[-4000:]}\nstderr: {p.stderr[-4000:]}")
        return p

    def apt_update(self) -> None:
        # debootstrap leaves no package lists behind (an installed Debian has them).
        p = self.run("apt-get update -q", check=False)
        if p.returncode != 0 or "Failed to fetch" in p.stdout + p.stderr or "W: " in p.stderr:
            raise Unreachable(f"apt-get update in the chroot failed: {(p.stdout + p.stderr).strip()[-500:]}")

    def copy_in(self, src: Path) -> str:
        """Copy a file into the root's /tmp; returns its path inside the root."""
        shutil.copy(src, self.path / "tmp" / src.name)
        return f"/tmp/{src.name}"

    def host(self, inside: str) -> Path:
        """Where a path of the root is, seen from here (no symlink followed out of it)."""
        return self.path / inside.lstrip("/")


def tree_state(top: Path) -> dict[str, str]:
    """``top`` and every entry under it: kind, mode, owner and, for files, a SHA-256 of the content."""
    out: dict[str, str] = {}

    def note(full: str) -> None:
        st = os.lstat(full)
        meta = f"{oct(st.st_mode)} {st.st_uid}:{st.st_gid}"
        if os.path.islink(full):
            meta += " -> " + os.readlink(full)
        elif os.path.isfile(full):
            with open(full, "rb") as f:
                meta += " " + hashlib.sha256(f.read()).hexdigest()
        out[os.path.relpath(full, top)] = meta

    note(str(top))
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            note(os.path.join(dirpath, name))
    return out

"""Shared helpers for the scenario, crash, power-cut and disk-full tests.

``gen_tree`` builds a seeded tree of a few hundred files (nested folders,
chunked files above 256 KiB, an executable, an empty file, an empty folder);
``change_set`` applies edits, appends, deletes, renames, a moved folder and
new files to it. ``status`` reads `harmonicctl status --json`. The loop-image
helpers mount ext4 images and tmpfs for the root-only tests and always undo
what they did.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HARMONICCTL, Server, tree_digest

KiB = 1 << 10
MiB = 1 << 20


# --------------------------------------------------------------------------- trees


def _data(rng: random.Random, n: int, *, compressible: bool = False) -> bytes:
    if compressible:
        words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(64)]
        out = bytearray()
        while len(out) < n:
            out += rng.choice(words) + b" "
        return bytes(out[:n])
    return rng.randbytes(n)


def gen_tree(root: Path, seed: int = 1, files: int = 300, big: int = 4, big_size: int = 700 * KiB) -> None:
    """A seeded tree: ``files`` small files in nested folders, ``big`` files over
    256 KiB (chunked), an executable, an empty file and an empty folder."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    folders = [Path(".")]
    for i in range(24):
        parent = rng.choice(folders)
        d = parent / f"dir{i:02d}"
        if len(d.parts) > 5:
            d = Path(f"top{i:02d}")
        folders.append(d)
    for d in folders:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = rng.choice(folders)
        size = rng.choice([0, 10, 200, 1500, 4 * KiB, 9 * KiB, 20 * KiB, 40 * KiB])
        name = f"f{i:04d}" + rng.choice([".txt", ".html", ".bin", ".json", ""])
        (root / d / name).write_bytes(_data(rng, size, compressible=rng.random() < 0.6))
    for i in range(big):
        d = rng.choice(folders)
        (root / d / f"big{i}.dat").write_bytes(_data(rng, big_size + rng.randint(0, 300 * KiB)))
    tool = root / "bin" / "run.sh"
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_bytes(b"#!/bin/sh\necho hello\n")
    tool.chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "void" / "nothing").mkdir(parents=True, exist_ok=True)


def change_set(root: Path, seed: int = 2) -> None:
    """Edits, appends, deletes, renames, a moved folder and new files."""
    rng = random.Random(seed)
    all_files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "run.sh")
    picks = rng.sample(all_files, 40)
    edits, appends, deletes, renames = picks[:10], picks[10:20], picks[20:30], picks[30:40]
    for p in edits:
        b = bytearray(p.read_bytes())
        if b:
            for _ in range(3):
                b[rng.randrange(len(b))] ^= 0xFF
        else:
            b += b"now not empty"
        p.write_bytes(bytes(b))
    for p in appends:
        with open(p, "ab") as f:
            f.write(_data(rng, rng.randint(1, 30 * KiB)))
    for p in deletes:
        if p.exists():
            p.unlink()
    for p in renames:
        if p.exists():
            p.rename(p.with_name("renamed-" + p.name))
    # A folder moved under another one.
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("dir"))
    if len(dirs) >= 2:
        shutil.move(str(dirs[0]), str(dirs[-1] / ("moved-" + dirs[0].name)))
    new = root / "added" / "deep" / "er"
    new.mkdir(parents=True, exist_ok=True)
    for i in range(15):
        (new / f"new{i}.txt").write_bytes(_data(rng, rng.randint(0, 12 * KiB), compressible=True))
    (root / "added" / "bigger.dat").write_bytes(_data(rng, 600 * KiB))
    # One big file grows a little: only its last chunks change.
    bigs = sorted(root.rglob("big*.dat"))
    if bigs:
        with open(bigs[0], "ab") as f:
            f.write(_data(rng, 5000))


# --------------------------------------------------------------------------- commands


def status(server: Server) -> dict[str, Any]:
    return json.loads(server.ctl("status", "--json").stdout)


def coll(st: dict[str, Any], name: str) -> dict[str, Any]:
    for c in st["collections"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no collection {name} in status: {[c['name'] for c in st['collections']]}")


def packs_in(stick: Path, folder: str) -> list[Path]:
    d = stick / "HARMONIC" / folder
    return sorted(d.glob("*.hpk")) if d.is_dir() else []


def part_files(stick: Path) -> list[Path]:
    """`.part` files and files with a final pack name that are not complete."""
    box = stick / "HARMONIC"
    return sorted(box.rglob("*.part")) if box.is_dir() else []


def ctl_popen(server: Server, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = {k: v for k, v in os.environ.items() if k != "HARMONICD_CRASH_AT"}
    if env:
        e.update(env)
    return subprocess.Popen([*HARMONICCTL, "--config", str(server.config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def incoming_batches(server: Server) -> list[str]:
    """Segment files no index row points into: a batch that was never committed."""
    d = server.state / "objects" / "segments"
    if not d.is_dir():
        return []
    with server.store(lock=False) as st:
        live = {row[0] for row in st.db.conn.execute("SELECT DISTINCT seg FROM objects")}
    return sorted(n for n in os.listdir(d) if not (n.endswith(".seg") and int(n[:-4]) in live))


def assert_old_or_new(server: Server, old: str, new: str, what: str = "content") -> str:
    got = tree_digest(server.deploy / what)
    assert got in (old, new), f"deployed {what} is neither the old nor the new release (a mix?)"
    return "old" if got == old else "new"


def assert_recovers(server: Server, stick: Path, old: str, new: str) -> str:
    """The invariants after a crash: verify passes, content old or new, the next
    exchange completes and deploys the new release, no batch left over."""
    which = assert_old_or_new(server, old, new)
    v = server.ctl("verify", check=False)
    assert v.returncode == 0, f"verify after crash failed:\n{v.stderr}"
    assert not incoming_batches(server), "verify (a locked command) left an uncommitted batch behind"
    server.ctl("exchange", str(stick))
    assert tree_digest(server.deploy / "content") == new
    assert not incoming_batches(server)
    assert not part_files(stick)
    server.ctl("verify")
    return which


def kill_after(proc: subprocess.Popen[str], delay: float) -> int:
    """SIGKILL proc after delay seconds (if still running); returns its exit code."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    return proc.returncode


# --------------------------------------------------------------------------- root-only


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mounts)")
    for tool in ("mkfs.ext4", "losetup", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (e2fsprogs, util-linux, mount)")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}{p.stdout}")
    return p


class Mounts:
    """Loop devices and mounts made by a test; ``cleanup`` undoes all of them."""

    def __init__(self) -> None:
        self.mounts: list[str] = []
        self.loops: list[str] = []

    def make_ext4(self, image: Path, size: str, *extra: str) -> None:
        run("truncate", "-s", size, str(image))
        run("mkfs.ext4", "-q", "-F", *extra, str(image))

    def attach(self, image: Path) -> str:
        dev = run("losetup", "--direct-io=on", "-f", "--show", str(image)).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run("losetup", "-d", dev, check=False)
        if dev in self.loops:
            self.loops.remove(dev)

    def mount(self, *args: str) -> None:
        target = args[-1]
        Path(target).mkdir(parents=True, exist_ok=True)
        run("mount", *args)
        self.mounts.append(target)

    def umount(self, target: str) -> None:
        for _ in range(50):
            if run("umount", target, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            run("umount", "-l", target, check=False)
        if target in self.mounts:
            self.mounts.remove(target)

    def mount_image(self, image: Path, target: Path) -> str:
        dev = self.attach(image)
        self.mount(dev, str(target))
        return dev

    def cleanup(self) -> None:
        for t in reversed(list(self.mounts)):
            self.umount(t)
        for d in reversed(list(self.loops)):
            self.detach(d)


# --------------------------------------------------------------------------- a crash world


class World:
    """A master and a school where the school holds content release 1 (old) and the
    stick carries the master's answer with release 2 (new); the school's statistics
    changed too, so its exchange also publishes. ``reset`` puts the school's state
    and the stick back to that moment, so each crash run starts from the same place."""

    def __init__(self, base: Path, *, files: int = 200, big: int = 3, school_volume: str | None = None,
                 master_volume: str | None = None, grow: int = 0) -> None:
        from tests.conftest import make_master, make_school

        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        mx = ("--volume-size", master_volume) if master_volume else ()
        sx = ("--volume-size", school_volume) if school_volume else ()
        self.m, key = make_master(base, "master-1", *mx)
        self.s = make_school(base, self.m, key, "school-1", *sx)
        self.stick = base / "stick"
        self.stick.mkdir()
        self.src = base / "content"
        gen_tree(self.src, seed=31, files=files, big=big)
        m, s, stick = self.m, self.s, self.stick
        m.ctl("publish", "content", str(self.src))
        (s.source("stats") / "day1.json").write_bytes(b'{"day": 1}')
        s.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        s.ctl("exchange", str(stick))
        self.old = tree_digest(s.deploy / "content")
        assert self.old == tree_digest(self.src)
        change_set(self.src, seed=32)
        if grow:
            (self.src / "added" / "grow.bin").write_bytes(random.Random(33).randbytes(grow))
        m.ctl("publish", "content", str(self.src))
        self.new = tree_digest(self.src)
        m.ctl("exchange", str(stick))  # answers the school's last request with release 2
        assert packs_in(stick, "to-school-1")
        (s.source("stats") / "day2.json").write_bytes(b'{"day": 2}')
        self.snap = base / "snapshot"
        self.snap.mkdir()
        self.save()

    def save(self) -> None:
        for name, p in (("school", self.s.state), ("stick", self.stick)):
            shutil.rmtree(self.snap / name, ignore_errors=True)
            shutil.copytree(p, self.snap / name, symlinks=True)

    def reset(self) -> None:
        self.reset_school()
        self.reset_stick()

    def reset_school(self) -> None:
        # Empties the folder rather than removing it: it may be a mount point.
        clear(self.s.state)
        shutil.copytree(self.snap / "school", self.s.state, symlinks=True, dirs_exist_ok=True)

    def reset_stick(self) -> None:
        shutil.rmtree(self.stick)
        shutil.copytree(self.snap / "stick", self.stick, symlinks=True)


def clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def pack_verifies(path: Path) -> bool:
    """A pack file's footer digest and signature check out (what `import` first needs)."""
    import blake3

    from harmonicd.core import keys
    from harmonicd.core.pack import FOOTER_LEN, PREAMBLE, Header

    data = path.read_bytes()
    if len(data) < PREAMBLE.size + FOOTER_LEN:
        return False
    _magic, _v, _f, hlen = PREAMBLE.unpack_from(data)
    try:
        h = Header.decode(data[PREAMBLE.size:PREAMBLE.size + hlen], str(path))
    except Exception:
        return False
    body, footer = data[:-FOOTER_LEN], data[-FOOTER_LEN:]
    digest, sig = footer[:32], footer[32:96]
    return bool(blake3.blake3(body).digest() == digest and keys.verify(h.sender_key, keys.TAG_PACK, digest, sig))


def assert_stick_clean(stick: Path) -> None:
    """Every file with a pack's final name on the stick is a complete, signed pack."""
    box = stick / "HARMONIC"
    if not box.is_dir():
        return
    for p in box.rglob("*.hpk"):
        assert pack_verifies(p), f"{p} has a pack's final name but does not verify"


def pack_header(path: Path) -> Any:
    """The decoded header of a pack file (sender, releases, acks...)."""
    from harmonicd.core.pack import PREAMBLE, Header

    data = path.read_bytes()
    _magic, _v, _f, hlen = PREAMBLE.unpack_from(data)
    return Header.decode(data[PREAMBLE.size:PREAMBLE.size + hlen], str(path))


# What e2fsck may say after a crash of a journalled file system: journal replay,
# orphan cleanup and the lazily kept free counts. Anything else is a sample no
# real power cut would give (the image copy is not an atomic snapshot).
_BENIGN_FSCK = re.compile(
    r"^(\s*$|e2fsck \d|.*: recovering journal|Pass \d|Free (blocks|inodes) count wrong|Fix\? yes|"
    r".*FILE SYSTEM WAS MODIFIED|.*: \d+/\d+ files \(|Clearing orphaned inode|Setting free (inodes|blocks) count|"
    r".*: clean,|Truncating orphaned inode|.*orphan)")


def fsck_replay_only(image: Path) -> tuple[bool, str]:
    """Run `e2fsck -fy` on an image; True if it did no more than a crash allows."""
    r = run("e2fsck", "-fy", str(image), check=False)
    out = r.stdout + r.stderr
    if r.returncode not in (0, 1):
        return False, out
    odd = [line for line in out.splitlines() if not _BENIGN_FSCK.match(line)]
    return not odd, "\n".join(odd)


class PowerCut:
    """One ext4 image holding a server's state folder, mounted at ``mnt``.

    ``freeze()`` keeps the current image as the starting point; ``start()`` mounts
    a fresh copy of it; ``cut()`` copies the image as it is on the "disk" at once
    (what a power cut leaves), unmounts, checks the copy with e2fsck and mounts it
    at the same place. Returns False for a sample e2fsck had to repair beyond a
    journal replay."""

    def __init__(self, mounts: Mounts, tmp: Path, mnt: Path, size: str = "160M") -> None:
        self.mounts = mounts
        self.mnt = mnt
        self.image = tmp / "state.img"
        self.pristine = tmp / "pristine.img"
        self.work = tmp / "work.img"
        self.copy = tmp / "copy.img"
        self.dev = ""
        self.note = ""
        mounts.make_ext4(self.image, size)
        self.current = self.image
        self.dev = mounts.mount_image(self.image, mnt)

    def _umount(self) -> None:
        if self.dev:
            self.mounts.umount(str(self.mnt))
            self.mounts.detach(self.dev)
            self.dev = ""

    def freeze(self) -> None:
        self._umount()
        run("cp", "--sparse=always", str(self.current), str(self.pristine))

    def start(self) -> None:
        self._umount()
        run("cp", "--sparse=always", str(self.pristine), str(self.work))
        self.current = self.work
        self.dev = self.mounts.mount_image(self.work, self.mnt)

    def cut(self) -> bool:
        run("cp", "--sparse=always", str(self.work), str(self.copy))
        self._umount()
        ok, self.note = fsck_replay_only(self.copy)
        if ok:
            self.current = self.copy
            self.dev = self.mounts.mount_image(self.copy, self.mnt)
        return ok

    def done(self) -> None:
        self._umount()

    def loses_unflushed_data(self, probe: Path) -> bool:
        """Whether a file written without fsync just before a cut is gone from the copy."""
        self.start()
        (self.mnt / "canary").write_bytes(b"x" * 100_000)
        run("cp", "--sparse=always", str(self.work), str(self.copy))
        dev = self.mounts.attach(self.copy)
        run("e2fsck", "-fy", dev, check=False)
        self.mounts.mount(dev, str(probe))
        c = probe / "canary"
        lost = not c.exists() or c.stat().st_size == 0
        self.mounts.umount(str(probe))
        self.mounts.detach(dev)
        self._umount()
        return lost

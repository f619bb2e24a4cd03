"""Measuring tools: harmonicctl runs with their time and peak RSS, the ideal
delta of a change, rsync's batch, zstd baselines, tree digests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
MiB = 1 << 20
# The harmonicd code every harmonicctl child runs (None: the editable install).
CODE: dict[str, object] = {"path": None}


def snapshot_code(dest: str) -> dict[str, object]:
    """Copy the working tree's harmonicd/ (uncommitted changes included) to dest and use
    it for this process and every harmonicctl child: the code cannot change mid-run."""
    import hctl

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    info: dict[str, object] = {"commit": git("rev-parse", "--short", "HEAD"),
                               "dirty": bool(git("status", "--porcelain", "--", "harmonicd")), "path": dest}
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(os.path.join(REPO, "harmonicd"), os.path.join(dest, "harmonicd"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    hctl.use_code(dest)
    CODE.update(info)
    return info


# --------------------------------------------------------------------------- running commands


@dataclass
class Run:
    cmd: list[str]
    rc: int
    wall: float
    cpu: float  # user + system seconds of the child
    maxrss: int  # bytes, the child's peak resident set
    stdout: str
    stderr: str


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True, cwd: str | None = None) -> Run:
    """Run cmd; wall time, CPU time and peak RSS of that one process (measured by spawn.py)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as use:
        p = subprocess.run([PY, "-S", os.path.join(HERE, "spawn.py"), use.name, *cmd], stdout=out, stderr=err,
                           env=e, cwd=cwd, check=False)
        out.seek(0)
        err.seek(0)
        try:
            u = json.load(use)
        except ValueError:
            u = {"wall": 0.0, "cpu": 0.0, "maxrss": 0}
        r = Run(cmd, p.returncode, u["wall"], u["cpu"], u["maxrss"],
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and r.rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.rc}:\n{r.stdout}\n{r.stderr}")
    return r


def fmt_runs(step: dict[str, object]) -> str:
    runs = step.get("runs")
    if isinstance(runs, list) and len(runs) > 1:
        return "/".join(f"{x:.2f}" for x in runs) + " s"
    return f"{step['wall']:.2f} s"


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True)
    return time.perf_counter() - t0


@dataclass
class Server:
    name: str
    config: str
    state: str
    chunk: tuple[int, int, int] | None = None

    def ctl(self, *args: str) -> Run:
        env = {}
        if CODE["path"] is not None:
            env["HBENCH_CODE"] = str(CODE["path"])
        if self.chunk is not None:
            env["HBENCH_CHUNK"] = ",".join(str(x) for x in self.chunk)
        if env:
            cmd = [PY, os.path.join(HERE, "hctl.py"), "--config", self.config, *args]
        else:
            cmd = [PY, "-m", "harmonicd", "--config", self.config, *args]
        return run(cmd, env=env)

    @property
    def deployed(self) -> str:
        return os.path.join(self.state, "deploy", "content")

    def object_count(self) -> tuple[int, int]:
        """Objects in the store and their total payload bytes (the state database's
        index of the segment files, opened read-only)."""
        db = os.path.join(self.state, "state.db")
        conn = sqlite3.connect(f"file:{urllib.request.pathname2url(db)}?mode=ro", uri=True)
        try:
            n, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(len), 0) FROM objects").fetchone()
        finally:
            conn.close()
        return int(n), int(size)


def make_pair(base: str, chunk: tuple[int, int, int] | None = None) -> tuple[Server, Server, str]:
    """A master, an enrolled school and an empty stick folder under base (made afresh)."""
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    m = Server("master-1", os.path.join(base, "master-1.toml"), os.path.join(base, "master-1"), chunk)
    s = Server("school-1", os.path.join(base, "school-1.toml"), os.path.join(base, "school-1"), chunk)
    mkey = m.ctl("init", "master", "--id", m.name, "--state-dir", m.state).stdout.strip()
    skey = s.ctl("init", "node", "--id", s.name, "--state-dir", s.state, "--master-key", mkey).stdout.strip()
    m.ctl("enroll", s.name, skey)
    stick = os.path.join(base, "stick")
    os.makedirs(stick)
    return m, s, stick


def packs_for(stick: str, school: str) -> list[str]:
    d = os.path.join(stick, "HARMONIC", f"to-{school}")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".hpk")) if os.path.isdir(d) else []


def objects_in_output(out: str) -> int:
    m = re.search(r"\((\d+) objects", out)
    return int(m.group(1)) if m else -1


# --------------------------------------------------------------------------- trees


def walk_files(root: str) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for d in it:
                r = f"{rel}/{d.name}" if rel else d.name
                if d.is_dir(follow_symlinks=False):
                    stack.append((r, d.path))
                elif d.is_file(follow_symlinks=False):
                    out[r] = d.stat(follow_symlinks=False)
    return out


def deployed_inodes(root: str) -> dict[str, int]:
    """Path -> inode of every file below root (links resolved at the top)."""
    root = os.path.realpath(root)
    return {rel: st.st_ino for rel, st in walk_files(root).items()}


def tree_bytes(root: str) -> tuple[int, int]:
    files = walk_files(root)
    return len(files), sum(st.st_size for st in files.values())


def file_hash(path: str) -> bytes:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return h.digest()


_DIGESTS: dict[str, str] = {}


def input_digest(root: str) -> str:
    """tree_digest of an input tree, computed once per run (inputs do not change)."""
    if root not in _DIGESTS:
        _DIGESTS[root] = tree_digest(root)
    return _DIGESTS[root]


def tree_digest(root: str) -> str:
    """Digest of every regular file's path and content (what a replica must show)."""
    root = os.path.realpath(root)
    h = blake3.blake3()
    for rel, _st in sorted(walk_files(root).items()):
        h.update(rel.encode() + b"\0" + file_hash(os.path.join(root, rel)))
    return h.hexdigest()


# --------------------------------------------------------------------------- the ideal delta


@dataclass
class Ideal:
    bytes: int = 0
    small_files: int = 0  # new or changed files up to 1 MiB: zstd -3 of the whole file
    small_bytes: int = 0
    large_files: int = 0  # changed files over 1 MiB: zstd -3 of the changed byte range only
    large_bytes: int = 0
    new_large: int = 0  # new files over 1 MiB (no old version): the whole file
    renamed: int = 0  # content already held under another name: free
    unchanged: int = 0
    deleted: int = 0
    raw_changed: int = 0  # bytes of new or changed content before compression
    notes: list[str] = field(default_factory=list)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    i = 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    if i >= n:
        return n
    end = min(n, i + step)
    while i < end and a[i] == b[i]:
        i += 1
    return i


def ideal_delta(v1: str, v2: str, counterpart: Callable[[str], str] = lambda r: r, limit: int = MiB) -> Ideal:
    """zstd -3 of each new or changed file up to `limit`, of only the changed byte
    range (common prefix and suffix removed) of larger changed files; content
    already present in v1 under any name costs nothing; deletions cost nothing."""
    zc = zstandard.ZstdCompressor(level=3)
    f1 = walk_files(v1)
    f2 = walk_files(v2)
    res = Ideal()
    mapped = {counterpart(r) for r in f2}
    res.deleted = sum(1 for r in f1 if r not in mapped)
    candidates: list[tuple[str, str | None]] = []
    for rel, st in f2.items():
        old_rel = counterpart(rel)
        old = f1.get(old_rel)
        if old is not None and (old.st_ino == st.st_ino or (old.st_size == st.st_size and _same(
                os.path.join(v1, old_rel), os.path.join(v2, rel)))):
            res.unchanged += 1
            continue
        candidates.append((rel, old_rel if old is not None else None))
    sizes = {f2[r].st_size for r, _ in candidates}
    v1_hashes = {file_hash(os.path.join(v1, r)) for r, st in f1.items() if st.st_size in sizes}
    for rel, old_rel in candidates:
        path = os.path.join(v2, rel)
        size = f2[rel].st_size
        if size in sizes and file_hash(path) in v1_hashes:
            res.renamed += 1
            continue
        with open(path, "rb") as f:
            new = f.read()
        if size <= limit:
            n = len(zc.compress(new))
            res.small_files += 1
            res.small_bytes += n
            res.raw_changed += size
        elif old_rel is not None:
            with open(os.path.join(v1, old_rel), "rb") as f:
                old = f.read()
            p = _common_prefix(old, new)
            s = _common_prefix(old[p:][::-1], new[p:][::-1])
            part = new[p:len(new) - s]
            n = len(zc.compress(part)) if part else 0
            res.large_files += 1
            res.large_bytes += n
            res.raw_changed += len(part)
        else:
            n = len(zc.compress(new))
            res.new_large += 1
            res.small_bytes += n
            res.raw_changed += size
        res.bytes += n
    return res


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(1 << 20)
            if x != fb.read(1 << 20):
                return False
            if not x:
                return True


# --------------------------------------------------------------------------- other tools


@dataclass
class RsyncBatch:
    raw: int
    zstd: int
    seconds: float


def rsync_batch(v1: str, v2: str, work: str) -> RsyncBatch:
    """rsync's batch of the change v1 -> v2 (delta algorithm forced on, as over a
    network), compressed with zstd -3. v1 is not modified (--only-write-batch)."""
    os.makedirs(work, exist_ok=True)
    batch = os.path.join(work, "rsync.batch")
    for p in (batch, batch + ".sh", batch + ".zst"):
        if os.path.exists(p):
            os.unlink(p)
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-a", "--delete", "--no-whole-file", f"--only-write-batch={batch}",
                    v2.rstrip("/") + "/", v1.rstrip("/") + "/"], check=True, stdout=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    subprocess.run(["zstd", "-q", "-3", "-T1", "-f", batch, "-o", batch + ".zst"], check=True)
    out = RsyncBatch(os.path.getsize(batch), os.path.getsize(batch + ".zst"), secs)
    for p in (batch, batch + ".sh", batch + ".zst"):
        if os.path.exists(p):
            os.unlink(p)
    return out


@dataclass
class ZstdBaseline:
    raw: int
    compressed: int
    compress_s: float
    decompress_s: float
    compress_sync_s: float = 0.0  # the same followed by `sync`
    decompress_sync_s: float = 0.0


def zstd_baseline(tree: str, work: str) -> ZstdBaseline:
    """Single-core zstd -3 over the raw bytes of a tree (as one tar stream, made
    beforehand and not timed), and zstd -d of the result; both write a file."""
    os.makedirs(work, exist_ok=True)
    tar = os.path.join(work, "tree.tar")
    subprocess.run(["tar", "-cf", tar, "-C", tree, "."], check=True)
    raw = os.path.getsize(tar)
    settle()
    c = timed(["zstd", "-q", "-3", "-T1", "-f", tar, "-o", tar + ".zst"])
    os.unlink(tar + ".zst")
    settle()
    cs = timed(f"zstd -q -3 -T1 -f '{tar}' -o '{tar}.zst' && sync", shell=True)
    comp = os.path.getsize(tar + ".zst")
    os.unlink(tar)
    settle()
    d = timed(["zstd", "-q", "-d", "-f", tar + ".zst", "-o", tar])
    os.unlink(tar)
    settle()
    ds = timed(f"zstd -q -d -f '{tar}.zst' -o '{tar}' && sync", shell=True)
    for p in (tar, tar + ".zst"):
        os.unlink(p)
    return ZstdBaseline(raw, comp, c, d, cs, ds)


def cp_sync(tree: str, dest: str) -> float:
    """`cp -a` of the tree followed by `sync`, wall seconds."""
    shutil.rmtree(dest, ignore_errors=True)
    settle()
    t = timed(f"cp -a '{tree}' '{dest}' && sync", shell=True)
    shutil.rmtree(dest, ignore_errors=True)
    return t


STATE_FS_GIB = 64  # sparse; settle() trims it, so what a benchmark deletes is given back
_MOUNTED: list[str] = []


def settle() -> None:
    """Before a timed step: write back what is dirty, and trim the state image
    (what earlier steps deleted), so no step pays for another's leftovers. The
    image is not mounted with `discard`: that would trim during the next timed
    step's journal commits."""
    subprocess.run(["sync"], check=True)
    for mnt in _MOUNTED:
        subprocess.run(["fstrim", mnt], check=False, capture_output=True)


def mount_state_fs(work: str) -> str:
    """A fresh ext4 file system (mkfs.ext4 defaults: journal, as a Debian school
    server has) loop-mounted at work/state-fs, for the servers' state and every
    output the benchmarks time. Made afresh on each run, so the figures do not
    depend on the host's file system or on what earlier runs left in it: this
    machine's root file system has no journal, and there ext4 creates files
    slowly right after many were deleted (the allocator skips recently deleted
    inodes one by one), which made timings swing threefold between runs."""
    img = os.path.join(work, "state.img")
    mnt = os.path.join(work, "state-fs")
    unmount_state_fs(mnt)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(img)
    with open(img, "wb") as f:
        f.truncate(STATE_FS_GIB << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", img], check=True)
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    _MOUNTED.append(mnt)
    return mnt


@contextlib.contextmanager
def state_area(fs: str | None, folder: str) -> Iterator[tuple[str, str]]:
    """Where a benchmark's servers keep their state: a fresh ext4 image mounted
    under folder (fs "image"; the default when root and mkfs.ext4 exists) or
    folder itself ("work"). Yields (path, a description for the results)."""
    if fs is None:
        fs = "image" if os.geteuid() == 0 and shutil.which("mkfs.ext4") else "work"
    if fs != "image":
        yield folder, "the work folder's own file system"
        return
    mnt = mount_state_fs(folder)
    try:
        yield mnt, "fresh ext4 image (mkfs.ext4 defaults, journal), loop-mounted"
    finally:
        unmount_state_fs(mnt)


def rerender(json_path: str, render: Callable[[dict[str, object]], str]) -> None:
    """--render: rewrite the markdown next to a results JSON file."""
    with open(json_path) as f:
        data = json.load(f)
    md = os.path.splitext(json_path)[0] + ".md"
    with open(md, "w") as f:
        f.write(render(data))
    print(f"wrote {md}")


def unmount_state_fs(mnt: str) -> None:
    if mnt in _MOUNTED:
        _MOUNTED.remove(mnt)
    if os.path.ismount(mnt):
        subprocess.run(["umount", mnt], check=True)
    img = os.path.join(os.path.dirname(mnt), "state.img")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(img)


def drop_caches() -> bool:
    try:
        settle()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- what a pack holds


@dataclass
class Anatomy:
    """Where a pack's bytes go. Raw sizes are record payloads before frame compression;
    `stored` is what the frames take in the file (compressed), shared out by raw size."""

    file_bytes: int = 0
    header: int = 0
    frames: int = 0
    stored: dict[str, int] = field(default_factory=dict)
    raw: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    delta_target: int = 0  # bytes the delta records rebuild


def anatomy(paths: list[str]) -> Anatomy:
    """Parse pack volumes (without verifying them) and sum their records by kind:
    tree, recipe, blob sent whole, blob sent as a zstd patch against an old one."""
    from harmonicd.core import pack as P
    from harmonicd.core.objects import KIND_NAMES

    a = Anatomy()
    dctx = zstandard.ZstdDecompressor()
    for path in paths:
        a.file_bytes += os.path.getsize(path)
        with open(path, "rb") as f:
            pre = f.read(P.PREAMBLE.size)
            _magic, _v, _flags, hlen = P.PREAMBLE.unpack(pre)
            f.read(hlen)
            a.header += P.PREAMBLE.size + hlen
            while True:
                typ, raw_len, stored_len = P.FRAME_HEAD.unpack(f.read(P.FRAME_HEAD.size))
                body = f.read(stored_len)
                if typ == P.F_END:
                    break
                a.frames += 1
                raw = body if typ == P.F_STORED else dctx.decompress(body, max_output_size=raw_len)
                share = (stored_len + P.FRAME_HEAD.size) / max(raw_len, 1)
                pos = 0
                while pos < len(raw):
                    kind = raw[pos]
                    if kind & P.DELTA_BIT:
                        k, _oid, _bid, tlen, plen = P.REC_DELTA.unpack_from(raw, pos)
                        name, n, hdr = f"{KIND_NAMES[k & ~P.DELTA_BIT]} (delta)", plen, P.REC_DELTA.size
                        a.delta_target += tlen
                    else:
                        k, _oid, n = P.REC_PLAIN.unpack_from(raw, pos)
                        name, hdr = KIND_NAMES[k], P.REC_PLAIN.size
                    pos += hdr + n
                    a.raw[name] = a.raw.get(name, 0) + hdr + n
                    a.count[name] = a.count.get(name, 0) + 1
                    a.stored[name] = a.stored.get(name, 0) + int((hdr + n) * share)
    return a


def anatomy_note(a: Anatomy) -> str:
    parts = [f"{k}: {a.count[k]} records, {a.raw[k] / MiB:.2f} MiB raw -> ~{a.stored[k] / MiB:.2f} MiB"
             for k in sorted(a.raw)]
    return "pack content: " + "; ".join(parts) + (
        f" (patches rebuild {a.delta_target / MiB:.2f} MiB)" if a.delta_target else "")

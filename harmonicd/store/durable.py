"""Durable file-system steps, in one place so every commit point follows the
same rules (RELIABILITY.md §3.6): write a temp file in the target folder,
fsync it, rename it over the target, fsync the folder. Where many files land
at once (a deployed tree) the per-file fsyncs are replaced by one ``syncfs``
of the file system; objects go into a few segment files, each fsynced (see
store/objects.py). A commit never becomes visible before the data it
references is on disk.

A failed fsync leaves data in an unknown state: we never retry it and report
success; the caller's operation fails and is redone from the source.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from harmonicd.core.pack import file_hash
from harmonicd.errors import DiskFullError, StoreError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# What a removable stick answers once it is gone: a FUSE mount whose process
# died (ENOTCONN), a device pulled out (EIO, ENODEV, ENXIO), a transport shut down.
# A stick pulled mid-way: FUSE (exFAT) answers ENOTCONN, or ECONNABORTED for requests in
# flight when its process dies; a kernel file system EIO, or ENODEV/ENXIO once the device is gone.
MEDIA_GONE = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV, errno.ENXIO, errno.ESHUTDOWN})


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush every dirty page and inode of the file system holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs failed: {os.strerror(e)}", str(path))
    finally:
        os.close(fd)


def read_back(path: str, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """The BLAKE3 digest and length of a file as its device returns it, not as the
    page cache remembers it: the file's clean pages are dropped first (call after
    syncfs, when all of them are clean), so a stick that lost what it was given
    (fake capacity, failing flash) shows it here."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return file_hash(f, chunk)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably: the old or the new content survives a crash."""
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(folder)


def disk_error(exc: OSError, doing: str, needed: int, where: str,
               outcome: str = "nothing was applied") -> StoreError:
    """Turn ENOSPC/EDQUOT into a message that says how much space is needed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        no_inodes = False
        try:
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            # ENOSPC also means no free inodes, with bytes to spare: say so
            # (the caller may have freed its own files before asking).
            no_inodes = st.f_files > 0 and (st.f_favail == 0 or 0 < needed < free)
        except OSError:
            free = -1
        need = f"about {mib(needed)} needed" if needed else "more space needed"
        have = f", {mib(free)} free" if free >= 0 else ""
        if no_inodes:
            have += " but no room for more files (no free inodes; delete files or remake with more)"
        return DiskFullError(f"disk full while {doing} in {where}: {need}{have}; {outcome}")
    return StoreError(f"{doing} failed in {where}: {exc.strerror or exc}")


class WriteBehind:
    """A file written by a background thread that also starts writeback as it
    goes (fdatasync every ``flush_every`` bytes), so the caller's work overlaps
    with copying into the page cache and with the disk, and the final
    ``sync()`` finds little left to write. Errors surface at the next call."""

    def __init__(self, fd: int, flush_every: int = 64 << 20, max_inflight: int = 16 << 20) -> None:
        self.fd = fd
        self.flush_every = flush_every
        self.max_inflight = max_inflight
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="writebehind")
        self._inflight: deque[tuple[Future[None], int]] = deque()
        self._inflight_bytes = 0
        self._unsynced = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = bytes(data) if not isinstance(data, bytes) else data
        self._inflight.append((self._pool.submit(self._write, chunk), len(chunk)))
        self._inflight_bytes += len(chunk)
        self._drain(self.max_inflight)
        return len(chunk)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self._unsynced += len(data)
        if self._unsynced >= self.flush_every:
            self._unsynced = 0
            os.fdatasync(self.fd)

    def _drain(self, limit: int) -> None:
        while self._inflight and (self._inflight_bytes > limit or self._inflight[0][0].done()):
            fut, n = self._inflight.popleft()
            self._inflight_bytes -= n
            fut.result()

    def sync(self) -> None:
        """Everything written and on disk."""
        self._drain(0)
        os.fsync(self.fd)

    def close(self) -> None:
        for fut, _n in self._inflight:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._inflight.clear()
        os.close(self.fd)


def mib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / 1024:.0f} KiB"
    return f"{max(n, 0)} B"

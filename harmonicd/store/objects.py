"""The object store: objects appended to segment files, found through an index.

``objects/segments/<n>.seg`` holds records ``kind (1) | payload length (4,
little-endian) | id (32) | payload`` after an 8-byte magic. Which object
lives where is the ``objects`` table of the state database (id -> kind,
segment, offset, length). One file per object, as this store had first,
made the file system the bottleneck: creating, renaming and flushing tens of
thousands of small files cost more than hashing and chunking a gigabyte.

A *batch* appends the objects it is given to new segment files of its own
and makes them durable together: fsync of each segment and of the folder,
then one transaction that adds their index rows. Before that commit nothing
points into the new segments, so a batch that is not committed (a refused
pack, a crash, a full disk) is simply a segment no index row names, removed
by ``recover`` at the next start. Objects are never changed in place: gc
deletes index rows, and ``compact`` copies what is still live out of
mostly-dead segments into a new one (the same commit protocol) and only
then removes the old files.

The id stored with each record lets ``verify`` and a future repair rebuild
the index from the segments alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from harmonicd.core.objects import KIND_NAMES, ObjectId, object_id, short
from harmonicd.errors import IntegrityError
from harmonicd.store import durable
from harmonicd.store.db import transaction
from harmonicd.store.faults import crash_point

MAGIC = b"HRMNSEG1"
RECORD = struct.Struct("<BI32s")  # kind, payload length, id
SEGMENT_MAX = 256 << 20  # a batch starts a new segment file beyond this
COMPACT_BELOW = 0.5  # gc rewrites a segment once less than this share of it is live
WRITE_BUFFER = 4 << 20  # bytes gathered before writing to the segment
IOV_MAX = 1024  # buffers one writev() takes at most (Linux)
MAX_INFLIGHT = 32 << 20  # bytes handed to the writer thread and not yet written
FLUSH_EVERY = 64 << 20  # the writer starts writeback (fdatasync) after this many bytes
_SEG_NAME = re.compile(r"(\d{8})\.seg\Z")

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id BLOB PRIMARY KEY, kind INTEGER NOT NULL, seg INTEGER NOT NULL,
    off INTEGER NOT NULL, len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_seg ON objects (seg);
"""


def _seg_name(seg: int) -> str:
    return f"{seg:08d}.seg"


class ObjectStore:
    def __init__(self, root: str, conn: sqlite3.Connection, db_path: str) -> None:
        self.root = root
        self.segments = os.path.join(root, "segments")
        self.conn = conn
        self.db_path = db_path
        conn.executescript(SCHEMA)
        self._fds: dict[int, int] = {}
        self._fds_lock = threading.Lock()
        # Deployment reads objects from a few threads: each gets its own
        # (read-only) connection, as SQLite connections are not to be shared.
        self._owner = threading.get_ident()
        self._local = threading.local()
        self._thread_conns: list[sqlite3.Connection] = []

    def _db(self) -> sqlite3.Connection:
        if threading.get_ident() == self._owner:
            return self.conn
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=600, check_same_thread=False)
            self._local.conn = c
            with self._fds_lock:
                self._thread_conns.append(c)
        return c

    def setup(self) -> None:
        os.makedirs(self.segments, exist_ok=True)

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for c in self._thread_conns:
                c.close()
            self._thread_conns.clear()

    def recover(self) -> None:
        """Remove segment files no index row points into: batches never committed
        (a crash, a refused pack) and segments a finished compaction left behind."""
        live = {row[0] for row in self.conn.execute("SELECT DISTINCT seg FROM objects")}
        for seg, path in self._segment_files():
            if seg not in live:
                os.unlink(path)

    def _segment_files(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self.segments)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _SEG_NAME.match(name)
            if m:
                out.append((int(m.group(1)), os.path.join(self.segments, name)))
            elif name.endswith(".seg.tmp"):
                os.unlink(os.path.join(self.segments, name))
        return sorted(out)

    def _next_segment(self) -> int:
        on_disk = [seg for seg, _ in self._segment_files()]
        row = self.conn.execute("SELECT MAX(seg) FROM objects").fetchone()
        return max([0, *on_disk, row[0] or 0]) + 1

    # -- reading
    def _locate(self, oid: ObjectId) -> tuple[int, int, int, int] | None:
        row = self._db().execute("SELECT kind, seg, off, len FROM objects WHERE id = ?", (oid,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def has(self, oid: ObjectId) -> bool:
        return self._db().execute("SELECT 1 FROM objects WHERE id = ?", (oid,)).fetchone() is not None

    def kind(self, oid: ObjectId) -> int | None:
        """The kind of a stored object, or None if it is not held."""
        row = self._db().execute("SELECT kind FROM objects WHERE id = ?", (oid,)).fetchone()
        return None if row is None else int(row[0])

    def size(self, oid: ObjectId) -> int:
        row = self._db().execute("SELECT len FROM objects WHERE id = ?", (oid,)).fetchone()
        if row is None:
            raise IntegrityError(f"object {short(oid)} is missing from the store")
        return int(row[0])

    def totals(self) -> tuple[int, int]:
        """Objects held and their payload bytes."""
        n, total = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(len), 0) FROM objects").fetchone()
        return int(n), int(total)

    def _fd(self, seg: int) -> int:
        with self._fds_lock:
            fd = self._fds.get(seg)
            if fd is None:
                try:
                    fd = os.open(os.path.join(self.segments, _seg_name(seg)), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise IntegrityError(f"segment {_seg_name(seg)} is missing from the store") from None
                self._fds[seg] = fd
            return fd

    def _read(self, oid: ObjectId, where: tuple[int, int, int, int]) -> bytes:
        kind, seg, off, length = where
        raw = os.pread(self._fd(seg), RECORD.size + length, off)
        if len(raw) != RECORD.size + length:
            raise IntegrityError(f"object {oid.hex()} is damaged (segment {_seg_name(seg)} is cut short)")
        k, n, rid = RECORD.unpack_from(raw)
        if k != kind or n != length or rid != oid:
            raise IntegrityError(f"object {oid.hex()} is damaged (its record in {_seg_name(seg)} is not it)")
        return raw[RECORD.size:]

    def get(self, oid: ObjectId) -> tuple[int, bytes]:
        """Read and verify an object; damage raises IntegrityError naming it."""
        where = self._locate(oid)
        if where is None:
            raise IntegrityError(f"object {short(oid)} is missing from the store")
        payload = self._read(oid, where)
        if where[0] not in KIND_NAMES or object_id(where[0], payload) != oid:
            raise IntegrityError(f"object {oid.hex()} is damaged (content does not match its hash)")
        return where[0], payload

    def read_unverified(self, oid: ObjectId, kind: int) -> bytes:
        """Payload without rehashing: only for objects verified moments ago by this
        process (deploying what an import just checked)."""
        where = self._locate(oid)
        if where is None:
            raise IntegrityError(f"object {short(oid)} is missing from the store")
        if where[0] != kind:
            raise IntegrityError(f"object {oid.hex()} is damaged (not a {KIND_NAMES[kind]})")
        return self._read(oid, where)

    def copy_unverified(self, oid: ObjectId, kind: int, out_fd: int) -> int:
        """Append an object's payload to out_fd without rehashing (see
        read_unverified), in the kernel where it can (copy_file_range: no copy
        through this process). Returns the bytes written."""
        where = self._locate(oid)
        if where is None:
            raise IntegrityError(f"object {short(oid)} is missing from the store")
        k, seg, off, length = where
        if k != kind:
            raise IntegrityError(f"object {oid.hex()} is damaged (not a {KIND_NAMES[kind]})")
        src = self._fd(seg)
        head = os.pread(src, RECORD.size, off)
        if len(head) != RECORD.size or RECORD.unpack(head) != (kind, length, oid):
            raise IntegrityError(f"object {oid.hex()} is damaged (its record in {_seg_name(seg)} is not it)")
        pos, left = off + RECORD.size, length
        while left:
            try:
                n = os.copy_file_range(src, out_fd, left, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = -1
            if n <= 0:
                if n == 0:
                    raise IntegrityError(f"object {oid.hex()} is damaged (segment {_seg_name(seg)} is cut short)")
                # Not supported between these file systems: copy through memory.
                data = os.pread(src, left, pos)
                if len(data) != left:
                    raise IntegrityError(f"object {oid.hex()} is damaged (segment {_seg_name(seg)} is cut short)")
                view = memoryview(data)
                while view:
                    view = view[os.write(out_fd, view):]
                return length
            pos += n
            left -= n
        return length

    def get_kind(self, oid: ObjectId, kind: int) -> bytes:
        k, payload = self.get(oid)
        if k != kind:
            raise IntegrityError(f"object {oid.hex()} is a {KIND_NAMES[k]}, expected a {KIND_NAMES[kind]}")
        return payload

    def ids(self) -> Iterator[ObjectId]:
        """Every stored id, in the order they lie on disk (sequential reads for verify)."""
        for (oid,) in self.conn.execute("SELECT id FROM objects ORDER BY seg, off").fetchall():
            yield bytes(oid)

    # -- removing (gc)
    def remove(self, oids: Iterable[ObjectId]) -> tuple[int, int]:
        """Forget objects (one transaction); their bytes are reclaimed by compact()."""
        n = total = 0
        with transaction(self.conn, self.db_path):
            for oid in oids:
                row = self.conn.execute("DELETE FROM objects WHERE id = ? RETURNING len", (oid,)).fetchone()
                if row is not None:
                    n += 1
                    total += row[0]
        return n, total

    def compact(self) -> int:
        """Rewrite segments that are mostly dead; returns the bytes given back."""
        live = dict(self.conn.execute(
            "SELECT seg, SUM(len + ?) FROM objects GROUP BY seg", (RECORD.size,)).fetchall())
        victims = []
        freed = 0
        for seg, path in self._segment_files():
            size = os.path.getsize(path)
            used = live.get(seg, 0)
            if used == 0:
                # Nothing in it is wanted any more: no copy needed.
                os.unlink(path)
                self._forget_fd(seg)
                freed += size
            elif used < COMPACT_BELOW * size:
                victims.append((seg, size, used))
        if not victims:
            return freed
        segs = [v[0] for v in victims]
        with self.batch() as batch:
            for seg in segs:
                rows = self.conn.execute("SELECT id, kind, off, len FROM objects WHERE seg = ? ORDER BY off",
                                         (seg,)).fetchall()
                for oid, kind, off, length in rows:
                    payload = self._read(bytes(oid), (kind, seg, off, length))
                    batch.put(kind, bytes(oid), payload, check_store=False)
            batch.commit()
        for seg, size, used in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.segments, _seg_name(seg)))
            self._forget_fd(seg)
            freed += size - used
        durable.fsync_dir(self.segments)
        return freed

    def _forget_fd(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)

    def batch(self) -> Batch:
        return Batch(self)


class Batch:
    """Objects written together and made durable together (see module doc)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        os.makedirs(store.segments, exist_ok=True)
        self.pending: dict[ObjectId, int] = {}  # id -> payload size
        self.kinds: dict[ObjectId, int] = {}
        self.where: dict[ObjectId, tuple[int, int]] = {}  # id -> (segment, offset)
        self.bytes = 0
        self.closed = False
        self._segs: list[int] = []
        self._fds: list[int] = []  # of this batch's segments, fsynced at commit
        self._fd = -1
        self._seg = 0
        self._size = 0  # of the segment being written, buffered bytes included
        self._buf: list[bytes] = []
        self._buffered = 0
        # One writer thread appends while the caller goes on hashing and
        # chunking, and flushes every FLUSH_EVERY bytes so that the final fsync
        # of commit() finds little left to write.
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[Future[None], int]] = deque()
        self._inflight_bytes = 0
        self._unsynced = 0

    # -- staging
    def has(self, oid: ObjectId) -> bool:
        return oid in self.pending or self.store.has(oid)

    def kind(self, oid: ObjectId) -> int | None:
        """Kind of a staged object, None if it is not staged in this batch."""
        return self.kinds.get(oid)

    def get(self, oid: ObjectId) -> tuple[int, bytes]:
        w = self.where.get(oid)
        if w is None:
            return self.store.get(oid)
        self._flush()
        self._drain(0)
        seg, off = w
        length = self.pending[oid]
        fd = self._fd if seg == self._seg else self.store._fd(seg)
        raw = os.pread(fd, RECORD.size + length, off)
        return self.kinds[oid], raw[RECORD.size:]

    def put(self, kind: int, oid: ObjectId, payload: bytes | bytearray | memoryview, *,
            check_store: bool = True) -> bool:
        """Stage an object (already verified or computed by us). False if already held.

        ``check_store=False`` skips the look-up in the index: for a pack, whose
        sender sent only what we lack; an object we did hold is then written
        again and its index row moved to the new copy, which is harmless."""
        if oid in self.pending or (check_store and self.store.has(oid)):
            return False
        if self._fd < 0 or self._size + RECORD.size + len(payload) > SEGMENT_MAX:
            self._open_segment()
        data = payload if isinstance(payload, bytes) else bytes(payload)
        self.where[oid] = (self._seg, self._size)
        self.pending[oid] = len(data)
        self.kinds[oid] = kind
        self.bytes += len(data)
        head = RECORD.pack(kind, len(data), oid)
        self._buf.append(head)
        self._buf.append(data)
        n = len(head) + len(data)
        self._size += n
        self._buffered += n
        if self._buffered >= WRITE_BUFFER:
            self._flush()
        return True

    def _open_segment(self) -> None:
        self._flush()
        seg = max(self._segs[-1] + 1 if self._segs else 0, self.store._next_segment())
        path = os.path.join(self.store.segments, _seg_name(seg))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._segs.append(seg)
        self._fd, self._seg = fd, seg
        self._buf, self._buffered = [MAGIC], len(MAGIC)
        self._size = len(MAGIC)
        self._fds.append(fd)

    def _flush(self) -> None:
        """Hand the buffered records to the writer thread."""
        if not self._buffered:
            return
        data, n = self._buf, self._buffered
        self._buf, self._buffered = [], 0
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="segwrite")
        self._inflight.append((self._writer.submit(self._write, self._fd, data), n))
        self._inflight_bytes += n
        self._drain(MAX_INFLIGHT)

    def _drain(self, limit: int) -> None:
        """Wait until at most ``limit`` bytes are in flight; re-raise the writer's errors."""
        while self._inflight and (self._inflight_bytes > limit or self._inflight[0][0].done()):
            fut, n = self._inflight.popleft()
            self._inflight_bytes -= n
            fut.result()

    def _write(self, fd: int, data: list[bytes]) -> None:
        for i in range(0, len(data), IOV_MAX):
            part = data[i:i + IOV_MAX]
            total = sum(len(b) for b in part)
            n = os.writev(fd, part)
            if n < total:  # short write: finish it plainly
                rest = memoryview(b"".join(part))[n:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            self._unsynced += total
        if self._unsynced >= FLUSH_EVERY:
            self._unsynced = 0
            os.fdatasync(fd)

    def commit(self) -> None:
        """Make every staged object durable and findable."""
        if self.closed:
            return
        if self.pending:
            self._flush()
            self._drain(0)
            crash_point("batch-staged")
            for fd in self._fds:
                os.fsync(fd)
            durable.fsync_dir(self.store.segments)
            crash_point("batch-indexing")
            conn = self.store.conn
            rows = [(oid, self.kinds[oid], seg, off, self.pending[oid]) for oid, (seg, off) in self.where.items()]
            with transaction(conn, self.store.db_path):
                # INSERT OR REPLACE: an object sent again (or moved by compaction)
                # is found at its newest, durable copy.
                conn.executemany("INSERT OR REPLACE INTO objects (id, kind, seg, off, len) VALUES (?, ?, ?, ?, ?)",
                                 rows)
            crash_point("batch-committed")
            self._close_fds()
            self.closed = True
            return
        self.discard()

    def _close_fds(self) -> None:
        if self._writer is not None:
            for fut, _n in self._inflight:
                fut.cancel()
            self._writer.shutdown(wait=True)
            self._writer = None
            self._inflight.clear()
            self._inflight_bytes = 0
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._fd = -1

    def discard(self) -> None:
        """Throw the staged objects away: their segments are removed."""
        if self.closed:
            return
        self._buf, self._buffered = [], 0
        self._close_fds()
        for seg in self._segs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.store.segments, _seg_name(seg)))
        self.closed = True

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        # Commit is explicit; leaving the block without it throws the batch away.
        if not self.closed:
            self.discard()

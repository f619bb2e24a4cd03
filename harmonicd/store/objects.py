"""Object files, named by their BLAKE3 id and sharded by the first byte.

``objects/ab/<64 hex>`` holds ``kind || payload``. New objects are first
written into a *batch* folder under ``objects/incoming/``; ``Batch.commit``
flushes them (one syncfs), renames them into place and flushes again, so an
object file under its final name is always complete. A batch that is not
committed (a pack that failed to verify, a crash) leaves no trace once its
folder is removed, and ``recover`` removes leftovers at start.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from harmonicd.core.objects import ID_LEN, KIND_NAMES, ObjectId, object_id, short
from harmonicd.errors import IntegrityError
from harmonicd.store import durable
from harmonicd.store.faults import crash_point


class ObjectStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self.incoming = os.path.join(root, "incoming")

    def setup(self) -> None:
        os.makedirs(self.incoming, exist_ok=True)

    def recover(self) -> None:
        """Drop batches that were never committed (a crash or a refused pack)."""
        if os.path.isdir(self.incoming):
            for name in os.listdir(self.incoming):
                shutil.rmtree(os.path.join(self.incoming, name), ignore_errors=True)

    def path(self, oid: ObjectId) -> str:
        h = oid.hex()
        return os.path.join(self.root, h[:2], h[2:])

    def has(self, oid: ObjectId) -> bool:
        return os.path.exists(self.path(oid))

    def kind(self, oid: ObjectId) -> int | None:
        """The kind byte of a stored object, or None if it is not held."""
        try:
            with open(self.path(oid), "rb") as f:
                b = f.read(1)
        except FileNotFoundError:
            return None
        return b[0] if b else None

    def size(self, oid: ObjectId) -> int:
        """Payload size without reading the object."""
        return os.stat(self.path(oid)).st_size - 1

    def get(self, oid: ObjectId) -> tuple[int, bytes]:
        """Read and verify an object; damage raises IntegrityError naming it."""
        try:
            with open(self.path(oid), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise IntegrityError(f"object {short(oid)} is missing from the store") from None
        if not raw or raw[0] not in KIND_NAMES:
            raise IntegrityError(f"object {oid.hex()} is damaged (unknown kind)")
        payload = raw[1:]
        if object_id(raw[0], payload) != oid:
            raise IntegrityError(f"object {oid.hex()} is damaged (content does not match its hash)")
        return raw[0], payload

    def read_unverified(self, oid: ObjectId, kind: int) -> bytes:
        """Payload without rehashing: only for objects verified moments ago by this
        process (deploying what an import just checked)."""
        try:
            with open(self.path(oid), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise IntegrityError(f"object {short(oid)} is missing from the store") from None
        if not raw or raw[0] != kind:
            raise IntegrityError(f"object {oid.hex()} is damaged (not a {KIND_NAMES[kind]})")
        return raw[1:]

    def get_kind(self, oid: ObjectId, kind: int) -> bytes:
        k, payload = self.get(oid)
        if k != kind:
            raise IntegrityError(f"object {oid.hex()} is a {KIND_NAMES[k]}, expected a {KIND_NAMES[kind]}")
        return payload

    def ids(self) -> Iterator[ObjectId]:
        for shard in os.listdir(self.root):
            if len(shard) != 2:
                continue
            d = os.path.join(self.root, shard)
            for name in os.listdir(d):
                if len(name) == 2 * ID_LEN - 2 and ".tmp" not in name:
                    try:
                        yield bytes.fromhex(shard + name)
                    except ValueError:
                        continue

    def delete(self, oid: ObjectId) -> None:
        try:
            os.unlink(self.path(oid))
        except FileNotFoundError:
            pass

    def batch(self) -> Batch:
        return Batch(self)


WRITERS = 3  # threads writing object files: os.write releases the GIL, and page-cache copies scale
MAX_INFLIGHT = 32 << 20  # bytes handed to writer threads and not yet written
GROUP_BYTES = 1 << 20  # objects are handed to the writers in groups of about this much
GROUP_COUNT = 256


class Batch:
    """Objects written together and made durable together (see module doc).

    Files are written by a few threads while the caller goes on decoding or
    chunking: at most MAX_INFLIGHT bytes wait for them, so memory stays bounded.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.dir = os.path.join(store.incoming, f"{os.getpid()}-{os.urandom(6).hex()}")
        os.makedirs(self.dir)
        for c in "0123456789abcdef":
            os.mkdir(os.path.join(self.dir, c))
        self.pending: dict[ObjectId, int] = {}  # id -> payload size
        self.kinds: dict[ObjectId, int] = {}
        self.bytes = 0
        self.closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[Future[None], int]] = deque()
        self._inflight_bytes = 0
        # One future per object costs more than writing a small file: group them.
        self._group: list[tuple[int, ObjectId, bytes]] = []
        self._group_bytes = 0

    def has(self, oid: ObjectId) -> bool:
        return oid in self.pending or self.store.has(oid)

    def kind(self, oid: ObjectId) -> int | None:
        """Kind of a staged object, None if it is not staged in this batch."""
        return self.kinds.get(oid)

    def staged_path(self, oid: ObjectId) -> str | None:
        return self._staged(oid) if oid in self.pending else None

    def _staged(self, oid: ObjectId) -> str:
        # Sixteen sub-folders: file creation in one folder is serialised by the
        # kernel, and several writer threads create files at once.
        h = oid.hex()
        return os.path.join(self.dir, h[0], h)

    def get(self, oid: ObjectId) -> tuple[int, bytes]:
        p = self.staged_path(oid)
        if p is None:
            return self.store.get(oid)
        self._flush()
        with open(p, "rb") as f:
            raw = f.read()
        return raw[0], raw[1:]

    def put(self, kind: int, oid: ObjectId, payload: bytes | bytearray | memoryview, *,
            check_store: bool = True) -> bool:
        """Stage an object (already verified or computed by us). False if already held.

        ``check_store=False`` skips the look-up in the store (one stat per object):
        for a pack, whose sender sent only what we lack; an object we did hold is
        then replaced by identical bytes, which is harmless."""
        if oid in self.pending or (check_store and self.store.has(oid)):
            return False
        data = payload if isinstance(payload, bytes) else bytes(payload)
        self.pending[oid] = len(data)
        self.kinds[oid] = kind
        self.bytes += len(data)
        self._group.append((kind, oid, data))
        self._group_bytes += len(data)
        if self._group_bytes >= GROUP_BYTES or len(self._group) >= GROUP_COUNT:
            self._submit()
        return True

    def _submit(self) -> None:
        if not self._group:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="objwrite")
        group, n = self._group, self._group_bytes
        self._group, self._group_bytes = [], 0
        self._inflight.append((self._pool.submit(self._write_group, group), n))
        self._inflight_bytes += n
        self._drain(MAX_INFLIGHT)

    def _flush(self) -> None:
        """Every staged object written (errors re-raised)."""
        self._submit()
        self._drain(0)

    def _write_group(self, group: list[tuple[int, ObjectId, bytes]]) -> None:
        for kind, oid, data in group:
            self._write(kind, oid, data)

    def _write(self, kind: int, oid: ObjectId, data: bytes) -> None:
        fd = os.open(self._staged(oid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            total = 1 + len(data)
            n = os.writev(fd, [bytes((kind,)), data])
            if n < total:  # short write: finish it plainly
                rest = memoryview(bytes((kind,)) + data)[n:]
                while rest:
                    rest = rest[os.write(fd, rest):]
        finally:
            os.close(fd)

    def _drain(self, limit: int) -> None:
        """Wait for writer threads until at most ``limit`` bytes are in flight; re-raise their errors."""
        while self._inflight and (self._inflight_bytes > limit or self._inflight[0][0].done()):
            fut, n = self._inflight.popleft()
            self._inflight_bytes -= n
            fut.result()

    def commit(self) -> None:
        """Make every staged object durable under its final name."""
        if self.closed:
            return
        self._flush()
        if self.pending:
            crash_point("batch-staged")
            durable.syncfs(self.dir)
            shards = set()
            half = len(self.pending) // 2
            for i, oid in enumerate(self.pending):
                if i == half:
                    crash_point("batch-renaming")
                final = self.store.path(oid)
                shard = os.path.dirname(final)
                if shard not in shards:
                    os.makedirs(shard, exist_ok=True)
                    shards.add(shard)
                os.replace(self._staged(oid), final)
            durable.syncfs(self.dir)
            crash_point("batch-committed")
        self.discard()

    def discard(self) -> None:
        if self._pool is not None:
            for fut, _n in self._inflight:
                fut.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
            self._inflight.clear()
            self._inflight_bytes = 0
        self._group, self._group_bytes = [], 0
        shutil.rmtree(self.dir, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        # Commit is explicit; leaving the block without it throws the batch away.
        if not self.closed:
            self.discard()

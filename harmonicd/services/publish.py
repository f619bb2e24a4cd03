"""Publish: snapshot a folder into the next signed release of a collection.

Unchanged files are not read again: a stat cache keyed by path holds size,
mtime, ctime and inode with the id they hashed to, as git's index does. And
as git does, an entry whose mtime is not safely older than the moment the
cache was written is "racily clean": a write within the same timestamp tick
could have changed the file without changing its stat data, so it is hashed
again next time.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonicd.config import NODE_COLLECTIONS
from harmonicd.core import names
from harmonicd.core.ident import check_collection, check_server_id
from harmonicd.core.objects import (
    BLOB,
    CHUNK_AVG,
    CHUNK_MIN,
    FLAG_EXEC,
    MAX_OBJECT,
    MAX_TREE_ENTRIES,
    RECIPE,
    T_BLOB,
    T_DIR,
    T_RECIPE,
    TREE,
    Chunker,
    Entry,
    ObjectId,
    encode_recipe,
    encode_tree,
    object_id,
)
from harmonicd.core.release import Release, sign
from harmonicd.errors import HarmonicError, StoreError, UsageError
from harmonicd.store import durable
from harmonicd.store.db import ReleaseRow
from harmonicd.store.objects import Batch
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.publish")

# Coarsest mtime granularity we expect (FAT: 2 s). An entry modified less
# than this before the cache was written is re-read next time.
RACY_NS = 2_000_000_000

CacheRow = tuple[str, int, int, int, int, int, bytes]  # path, size, mtime, ctime, ino, type, id


@dataclass
class Snapshot:
    root: ObjectId
    size: int = 0
    files: int = 0
    read_bytes: int = 0
    newest_ns: int = 0  # latest mtime or ctime seen (files and folders)
    skipped: list[str] = field(default_factory=list)
    cache: list[CacheRow] = field(default_factory=list)


class _Snapshotter:
    def __init__(self, store: Store, batch: Batch, cache: dict[str, tuple[int, int, int, int, int, bytes]],
                 trusted_before_ns: int, progress: Callable[[int], None] | None) -> None:
        self.store = store
        self.batch = batch
        self.cache = cache
        self.trusted_before_ns = trusted_before_ns
        self.chunker = Chunker()
        self.progress = progress
        self.snap = Snapshot(root=b"")

    def folder(self, path: str, rel: str, depth: int) -> tuple[ObjectId, int]:
        if depth > names.MAX_DEPTH:
            raise HarmonicError(f"{path}: folders nested deeper than {names.MAX_DEPTH} levels")
        try:
            with os.scandir(path) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise StoreError(f"cannot read folder {path}: {exc.strerror}") from exc
        entries: list[Entry] = []
        total = 0
        for d in items:
            child_rel = names.join(rel, d.name)
            names.check_name(d.name, rel or os.path.basename(path))
            st = d.stat(follow_symlinks=False)
            self.snap.newest_ns = max(self.snap.newest_ns, st.st_mtime_ns, st.st_ctime_ns)
            if stat.S_ISDIR(st.st_mode):
                oid, size = self.folder(d.path, child_rel, depth + 1)
                entries.append(Entry(d.name, T_DIR, 0, oid, size))
            elif stat.S_ISREG(st.st_mode):
                typ, oid, size = self.file(d.path, child_rel, st)
                flags = FLAG_EXEC if st.st_mode & 0o100 else 0
                entries.append(Entry(d.name, typ, flags, oid, size))
                self.snap.files += 1
            else:
                # Symlinks could point out of the tree on the receiving side;
                # devices and FIFOs have no content. Neither is published.
                self.snap.skipped.append(child_rel)
                continue
            total += entries[-1].size
        names.check_siblings((e.name for e in entries), rel or "the top folder")
        payload = encode_tree(entries)
        if len(entries) > MAX_TREE_ENTRIES or len(payload) > MAX_OBJECT:
            raise HarmonicError(f"{path}: a folder of {len(entries)} entries is more than one release can carry "
                                f"(at most {MAX_TREE_ENTRIES} entries and {MAX_OBJECT >> 20} MiB of listing); "
                                "split it into sub-folders")
        oid = object_id(TREE, payload)
        self.batch.put(TREE, oid, payload)
        return oid, total

    def file(self, path: str, rel: str, st: os.stat_result) -> tuple[int, ObjectId, int]:
        hit = self.cache.get(rel)
        if (hit is not None and hit[:4] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                and st.st_mtime_ns < self.trusted_before_ns):
            # The cached id belongs to this collection's latest release, which gc
            # always keeps, so its objects are in the store.
            self.snap.cache.append((rel, *hit))
            return hit[4], hit[5], st.st_size
        typ, oid, size, after = self._read(path)
        # A file that changed while we read it is cached with an impossible
        # size, so it is read again next time.
        stable = size == st.st_size == after.st_size and after.st_mtime_ns == st.st_mtime_ns
        self.snap.cache.append((rel, size if stable else -1, after.st_mtime_ns, after.st_ctime_ns,
                                after.st_ino, typ, oid))
        return typ, oid, size

    def _read(self, path: str) -> tuple[int, ObjectId, int, os.stat_result]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if st.st_size < CHUNK_MIN:
                data = f.read()
                oid = object_id(BLOB, data)
                self.batch.put(BLOB, oid, data)
                self._read_bytes(len(data))
                return T_BLOB, oid, len(data), os.fstat(fd)
            chunks: list[tuple[ObjectId, int]] = []
            size = 0
            for c in self.chunker.chunks(f):
                cid = object_id(BLOB, c)
                self.batch.put(BLOB, cid, c)
                chunks.append((cid, len(c)))
                size += len(c)
                self._read_bytes(len(c))
            after = os.fstat(fd)
        if len(chunks) == 1:
            return T_BLOB, chunks[0][0], size, after
        if not chunks:
            oid = object_id(BLOB, b"")
            self.batch.put(BLOB, oid, b"")
            return T_BLOB, oid, 0, after
        payload = encode_recipe(chunks)
        if len(payload) > MAX_OBJECT:
            raise HarmonicError(f"{path}: {size} bytes is larger than one file in a release may be "
                                f"(about {MAX_OBJECT // 36 * CHUNK_AVG >> 30} GiB)")
        rid = object_id(RECIPE, payload)
        self.batch.put(RECIPE, rid, payload)
        return T_RECIPE, rid, size, after

    def _read_bytes(self, n: int) -> None:
        self.snap.read_bytes += n
        if self.progress:
            self.progress(n)


def _same_cache(before: dict[str, tuple[int, int, int, int, int, bytes]], after: list[CacheRow]) -> bool:
    return len(before) == len(after) and all(before.get(r[0]) == r[1:] for r in after)


def snapshot(store: Store, name: str, src: str, batch: Batch,
             progress: Callable[[int], None] | None = None,
             cache: dict[str, tuple[int, int, int, int, int, bytes]] | None = None) -> Snapshot:
    coll = store.db.collection(name)
    scanned = coll.scanned_ns if coll else 0
    if cache is None:
        cache = store.db.statcache(name) if coll else {}
    s = _Snapshotter(store, batch, cache, scanned - RACY_NS, progress)
    if not os.path.isdir(src):
        raise UsageError(f"{src} is not a folder")
    s.snap.root, s.snap.size = s.folder(src, "", 0)
    return s.snap


def local_name(collection: str, target: str | None) -> str:
    return f"{collection}@{target}" if target else collection


class Unsettled(HarmonicError):
    """The folder changed moments ago: something may still be writing into it."""


def publish(store: Store, collection: str, src: str, target: str | None = None,
            progress: Callable[[int], None] | None = None, settle: float = 0) -> tuple[int, bool]:
    """Snapshot src as the next release; returns (seq, whether a release was made).

    ``settle`` > 0 (the daemon's watcher): raise Unsettled, making nothing, if
    anything in the folder changed less than that many seconds before the scan
    began, so a file still being written is never published half-written."""
    check_collection(collection)
    cfg = store.cfg
    if target is not None:
        check_server_id(target)
        if not cfg.is_master:
            raise UsageError("--for is for the master: only it publishes for one school")
        peer = store.db.peer(target)
        if peer is None or peer.role != "node":
            raise UsageError(f"--for {target}: no enrolled school server with that id")
    if cfg.is_master and collection in NODE_COLLECTIONS:
        raise UsageError(f"{collection!r} is a school server's own collection; the master cannot publish it")
    name = local_name(collection, target)
    # At the school both would be called `collection`, with two unrelated seqs.
    for other in store.db.collections():
        if other.mode == "owned" and other.collection == collection and other.name != name and (
                target is None or other.target is None or other.target == target):
            kind = "for every school" if other.target is None else f"for {other.target} only"
            raise UsageError(f"{collection!r} is already published {kind}; a collection is either for "
                             "every school or per school, not both")
    coll = store.db.collection(name)
    if coll is not None and coll.mode != "owned":
        raise UsageError(f"{name} is a replica owned by {coll.owner}; only its owner publishes it")
    src = os.path.abspath(src)
    started = time.time_ns()
    cache_before = store.db.statcache(name) if coll else {}
    batch = store.objects.batch()
    with batch:
        try:
            snap = snapshot(store, name, src, batch, progress, cache_before)
        except OSError as exc:
            raise durable.disk_error(exc, f"publishing {name}", 0, store.dir) from exc
        seq = coll.seq if coll else 0
        changed = coll is None or coll.root != snap.root
        if changed and settle > 0 and snap.newest_ns > started - int(settle * 1e9):
            raise Unsettled(f"{src} changed less than {settle:g} s ago")
        for p in snap.skipped:
            log.warning("%s: skipped %s (not a regular file or folder)", name, p)
        try:
            batch.commit()
        except OSError as exc:
            raise durable.disk_error(exc, f"publishing {name}", batch.bytes, store.dir) from exc
    db = store.db
    with db.tx():
        if coll is None:
            db.add_collection(name, collection, cfg.id, "owned", target=target, source=src)
        elif coll.source != src:
            db.update_collection(name, source=src)
        if changed:
            reported = _reported_seq(store, collection, target)
            if reported > seq:
                log.warning("%s: a school holds release %d, this server's latest is %d (restored from an "
                            "older backup?): the next release is %d", name, reported, seq, reported + 1)
            seq = max(seq, reported) + 1
            rel = Release(collection=collection, owner=cfg.id, seq=seq, root=snap.root,
                          created=int(time.time()), size=snap.size, files=snap.files, target=target)
            sr = sign(rel, store.key)
            for old in db.releases(name, "live"):
                db.set_release_state(name, old.seq, "kept")
            db.put_release(ReleaseRow(name, seq, snap.root, sr.body, sr.signature, snap.size,
                                      int(time.time()), "live"))
            db.update_collection(name, seq=seq, root=snap.root)
        if not _same_cache(cache_before, snap.cache):
            db.replace_statcache(name, snap.cache)
        db.update_collection(name, scanned_ns=started)
    if changed:
        log.info("published %s release %d (%d files, %d bytes, %d bytes read)",
                 name, seq, snap.files, snap.size, snap.read_bytes)
    return seq, changed


def _reported_seq(store: Store, collection: str, target: str | None) -> int:
    """On the master: the highest release of one of its own collections that a
    school says it holds. Above the master's own seq only when the master was
    restored from a backup older than its last release: numbering on from
    there would give an old number a new tree, which every school refuses as
    an equivocation, so the next release takes a number above theirs."""
    if not store.cfg.is_master:
        return 0
    from harmonicd.services.exchange import stored_have  # exchange imports much; only the master needs it

    key = f"{store.cfg.id}/{collection}"
    best = 0
    for peer in store.db.peers("node"):
        if target is not None and peer.id != target:
            continue
        held, _ = stored_have(peer.have)
        if key in held and held[key][0] > best:
            best = held[key][0]
    return best


def unacked_bytes(store: Store, name: str) -> int:
    """Bytes of an owned collection's releases kept until the master acknowledges them."""
    coll = store.db.collection(name)
    if coll is None or coll.mode != "owned" or store.cfg.is_master:
        return 0
    return sum(r.size for r in store.db.releases(name) if r.seq > coll.acked_seq and r.state in ("live", "kept"))


def over_quota(store: Store) -> str | None:
    """Why automatic publishing is held back, or None. Policy (docs/operations.md):
    once the upward data waiting for the master's acknowledgement reaches
    publish.pending_quota, stats and backup get no new release by themselves;
    their folders still hold the data, nothing is dropped, and publishing
    resumes when an acknowledgement frees space."""
    used = sum(unacked_bytes(store, name) for name in store.cfg.sources)
    if used < store.cfg.pending_quota:
        return None
    return (f"upward data waiting for the master's acknowledgement is {durable.mib(used)}, at or over "
            f"publish.pending_quota ({durable.mib(store.cfg.pending_quota)}): stats and backup are not "
            "published by themselves until the master acknowledges what it has")


def publish_changed_sources(store: Store, settle: float = 0) -> list[tuple[str, int]]:
    """Publish every owned collection with a source folder whose content changed
    (nothing while over the pending quota)."""
    made: list[tuple[str, int]] = []
    why = over_quota(store)
    if why is not None:
        log.warning("%s", why)
        return made
    for name, src in store.cfg.sources.items():
        if not os.path.isdir(src):
            continue
        seq, changed = publish(store, name, src, settle=settle)
        if changed:
            made.append((name, seq))
    return made

"""verify and gc: the store's self-check and its housekeeping.

``verify`` is the invariant every crash test checks: each stored object
rehashes to its id, each kept release is complete, each deployed folder
holds exactly the files of its tree with the right bytes, and SQLite's
integrity check passes.

``gc`` keeps what a live, kept or pending release, an unacknowledged upward
release, a deployed archive or a school's known state needs, and removes the
rest, so the disk does not fill over months.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from harmonicd.core.diff import reachable
from harmonicd.core.objects import BLOB, T_BLOB, T_DIR, T_RECIPE, ObjectId, object_id, short
from harmonicd.errors import HarmonicError, IntegrityError, StoreError
from harmonicd.services import deploy as deploy_mod
from harmonicd.services.deploy import union_tree
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.maintenance")


@dataclass
class VerifyReport:
    objects: int = 0
    bytes: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)


def verify(store: Store, progress: Callable[[int], None] | None = None) -> VerifyReport:
    rep = VerifyReport()
    db = store.db
    ok = db.check_integrity()
    if ok != "ok":
        rep.problems.append(f"state database: {ok}")
    for oid in store.objects.ids():
        try:
            _k, payload = store.objects.get(oid)
        except IntegrityError as exc:
            rep.problems.append(str(exc))
            continue
        rep.objects += 1
        rep.bytes += len(payload)
        if progress:
            progress(len(payload))
    for row in db.releases():
        if row.state == "pending":
            continue
        try:
            missing, _ = store.missing(row.root)
        except HarmonicError as exc:
            rep.problems.append(f"{row.name} release {row.seq}: {exc}")
            continue
        if missing:
            rep.problems.append(f"{row.name} release {row.seq}: {len(missing)} objects missing "
                                f"(first {short(missing[0])})")
    for coll in db.collections():
        if coll.mode in ("replica", "archive") and coll.deployed is not None and coll.path:
            _verify_deployed(store, coll.name, coll.path, coll.deployed, rep)
    return rep


def _verify_deployed(store: Store, name: str, path: str, root: ObjectId, rep: VerifyReport) -> None:
    try:
        if not deploy_mod.is_deployed(store, store.db.collection(name)):  # type: ignore[arg-type]
            rep.problems.append(f"{name}: {path} does not show the live release")
            return
    except StoreError as exc:
        rep.problems.append(str(exc))
        return
    top = os.path.realpath(path)

    def walk(tree: ObjectId, folder: str, rel: str) -> None:
        try:
            entries = store.tree(tree)
        except HarmonicError as exc:
            rep.problems.append(f"{name}: {exc}")
            return
        expected = {e.name for e in entries}
        try:
            present = set(os.listdir(folder))
        except OSError as exc:
            rep.problems.append(f"{name}: deployed folder {rel or '/'} unreadable ({exc.strerror})")
            return
        for extra in sorted(present - expected):
            rep.problems.append(f"{name}: deployed file {rel + '/' if rel else ''}{extra} is not in the release")
        for e in entries:
            p = os.path.join(folder, e.name)
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                rep.problems.append(f"{name}: deployed file {r} is missing")
                continue
            if e.type == T_DIR:
                if not stat.S_ISDIR(st.st_mode):
                    rep.problems.append(f"{name}: deployed {r} should be a folder")
                else:
                    walk(e.id, p, r)
                continue
            if not stat.S_ISREG(st.st_mode):
                rep.problems.append(f"{name}: deployed {r} should be a regular file")
                continue
            rep.files += 1
            if st.st_size != e.size or not _file_matches(store, p, e.type, e.id):
                rep.problems.append(f"{name}: deployed file {r} is damaged (differs from release)")

    walk(root, top, "")


def _file_matches(store: Store, path: str, typ: int, oid: ObjectId) -> bool:
    with open(path, "rb") as f:
        if typ == T_BLOB:
            return bool(object_id(BLOB, f.read()) == oid)
        if typ == T_RECIPE:
            for cid, n in store.recipe(oid):
                h = blake3.blake3(bytes((BLOB,)))
                h.update(f.read(n))
                if h.digest() != cid:
                    return False
            return f.read(1) == b""
    return False


def _expire_archive(store: Store) -> int:
    """Master: drop a school's releases older than archive.keep_days (never the live
    one) and rebuild the deployed archive from what remains."""
    keep = store.cfg.archive_keep_days
    if not keep:
        return 0
    db = store.db
    now = int(time.time())
    dropped = 0
    for coll in db.collections():
        if coll.mode != "archive":
            continue
        rows = db.releases(coll.name)
        old = [r for r in rows if r.state == "kept" and now - r.received > keep * 86400]
        if not old:
            continue
        remaining = [r.root for r in rows if r.state in ("live", "kept") and r not in old]
        batch = store.objects.batch()
        with batch:
            union = union_tree(store, batch, remaining) if remaining else coll.root
            batch.commit()
        with db.tx():
            for r in old:
                db.delete_release(coll.name, r.seq)
            db.update_collection(coll.name, deployed=union)
        dropped += len(old)
        log.info("archive %s: dropped %d releases older than %d days", coll.name, len(old), keep)
    return dropped


def recover(store: Store) -> None:
    """After a crash: bring every deployment to what the database says is live.
    (Uncommitted object batches are already removed when the store is opened.)"""
    deploy_mod.converge(store)


@dataclass
class GcReport:
    kept: int = 0
    removed: int = 0
    removed_bytes: int = 0
    freed_bytes: int = 0  # segment space given back to the file system
    releases_dropped: int = 0


def gc(store: Store) -> GcReport:
    rep = GcReport()
    db = store.db
    cfg = store.cfg
    # Master: its own older releases are kept only while some school holds
    # them (they are the bases of the smallest deltas); otherwise dropped.
    if cfg.is_master:
        from harmonicd.services import shared
        from harmonicd.services.exchange import stored_have

        shared.prune(store)  # shared packs of releases that are no longer the latest

        held_roots: set[ObjectId] = set()
        for p in db.peers("node"):
            held_roots |= {root for _s, root in stored_have(p.have)[0].values()}
        with db.tx():
            for row in db.releases():
                coll = db.collection(row.name)
                if coll and coll.mode == "owned" and row.state == "kept" and row.root not in held_roots:
                    db.delete_release(row.name, row.seq)
                    rep.releases_dropped += 1
        rep.releases_dropped += _expire_archive(store)
    roots: list[ObjectId] = []
    partial_roots: list[ObjectId] = []
    for row in db.releases():
        (partial_roots if row.state == "pending" else roots).append(row.root)
    for coll in db.collections():
        for r in (coll.root, coll.deployed, coll.acked_root):
            if r is not None:
                roots.append(r)
    try:
        keep = reachable(store, roots)
    except HarmonicError as exc:
        # Never collect on a partial view: a damaged tree could hide what it references.
        raise StoreError(f"gc stopped, nothing removed: {exc} (run `harmonicctl verify`)") from exc
    for r in partial_roots:
        _missing, held = store.missing(r)
        keep |= held
    # Objects of incomplete transfers whose trees have not arrived yet.
    keep |= db.partial_ids()
    dead = []
    for oid in store.objects.ids():
        if oid in keep:
            rep.kept += 1
        else:
            dead.append(oid)
    rep.removed, rep.removed_bytes = store.objects.remove(dead)
    rep.freed_bytes = store.objects.compact()
    if rep.removed:
        log.info("gc removed %d objects (%d bytes)", rep.removed, rep.removed_bytes)
    deploy_mod.converge(store)
    return rep

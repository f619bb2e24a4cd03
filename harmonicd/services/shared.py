"""Shared release packs: one pack per (collection, from-root, to-root), for every school.

Online, most schools ask the master for the same thing: the latest release of
a collection for everyone, as a delta from the release they hold. The master
builds that pack once, with no recipient (anyone may read it; it is signed by
the master like every pack it writes, and the school checks the release's own
signature too), and keeps it in ``STATE/shared/<sha256 of the file>/<name>``.
The HTTP server serves it at a URL naming that hash, so the URL's bytes never
change: HTTP caches (nginx) may keep it for a year, and the 200th school at
the same release costs the master a file lookup, not a tree walk and a pack.

Only what is the same for every school goes there: a school that holds part
of an unfinished release (its have-state lists it as pending) gets that
collection planned from its own state in its per-school pack, as before.

``index.json`` names the packs built: {key: entry}, key
``<collection>:<from root hex or ->:<to root hex>``. Entries for releases that
are no longer the latest are dropped at each answer and at gc; at most
MAX_ENTRIES are kept (least recently used go first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harmonicd.core.codec import unpack_msg
from harmonicd.core.objects import ObjectId
from harmonicd.errors import HarmonicError
from harmonicd.services.exchange import Outgoing, _known_from, stored_have, write_packs
from harmonicd.store import durable
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

SHARED = "shared"
INDEX = "index.json"
MAX_ENTRIES = 64  # (collection, from, to) packs kept; a school at an unusual release costs one more build
DIGEST_HEX = 64


@dataclass
class Shared:
    """What of a school's answer goes in shared packs."""

    collections: frozenset[str] = frozenset()  # collection names left out of the per-school pack
    files: list[str] = field(default_factory=list)  # STATE/shared/<digest>/<name>, in order
    releases: list[str] = field(default_factory=list)
    built: int = 0  # packs built by this answer (the others were already there)


def shared_dir(store: Store) -> str:
    return os.path.join(store.dir, SHARED)


def file_digest(path: str) -> str:
    """The SHA-256 a shared pack's URL names (what an HTTP cache can be checked against)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pending_keys(have: bytes | None) -> set[str]:
    """Collections (owner/name) a school holds part of an unfinished release of."""
    if not have:
        return set()
    try:
        raw = unpack_msg(have, what="stored have-state")
    except HarmonicError:
        return set()
    out: set[str] = set()
    pend = raw.get("pending") if isinstance(raw, dict) else None
    for p in pend if isinstance(pend, list) else []:
        if isinstance(p, list) and p and isinstance(p[0], str):
            out.add(p[0])
    return out


def _load(store: Store) -> dict[str, dict[str, Any]]:
    try:
        with open(os.path.join(shared_dir(store), INDEX), "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is damaged; the shared packs are built again", os.path.join(shared_dir(store), INDEX))
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}


def _save(store: Store, index: dict[str, dict[str, Any]]) -> None:
    os.makedirs(shared_dir(store), exist_ok=True)
    durable.atomic_write(os.path.join(shared_dir(store), INDEX), json.dumps(index, sort_keys=True).encode())


def _whole(store: Store, entry: dict[str, Any]) -> bool:
    files = entry.get("files")
    if not isinstance(files, list) or not files:
        return False
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("name"), str)):
            return False
        path = os.path.join(shared_dir(store), f["sha256"], f["name"])
        try:
            if os.path.getsize(path) != f.get("size"):
                return False
        except OSError:
            return False
    return True


def for_school(store: Store, school: str, progress: Callable[[int], None] | None = None) -> Shared:
    """The shared packs a school's answer names, built if not yet there. Runs as the
    master's answer job (the store's lock held: one writer of STATE/shared/)."""
    db = store.db
    peer = db.peer(school)
    if peer is None:
        return Shared()
    held, _partial = stored_have(peer.have)
    pending = _pending_keys(peer.have)
    index = _load(store)
    changed = prune(store, index)
    out = Shared()
    names: set[str] = set()
    used: set[str] = set()
    now = int(time.time())
    for c in db.collections():
        if c.mode != "owned" or c.root is None or c.target is not None:
            continue
        key = f"{c.owner}/{c.collection}"
        theirs = held.get(key)
        if (theirs is not None and theirs[0] >= c.seq) or key in pending:
            continue
        row = db.release(c.name, c.seq)
        if row is None:
            continue
        # A delta from what the school holds, if that is a release of ours whose
        # objects we still have; otherwise the whole release (shared with new schools).
        base: ObjectId | None = None
        if theirs is not None:
            old = db.release(c.name, theirs[0])
            if old is not None and old.root == theirs[1] and store.objects.has(old.root):
                base = old.root
        ikey = f"{c.name}:{base.hex() if base else '-'}:{row.root.hex()}"
        entry = index.get(ikey)
        if entry is None or not _whole(store, entry):
            entry = _build(store, c.name, row.seq, row.root, base, row, progress)
            index[ikey] = entry
            out.built += 1
        entry["used"] = now
        used.add(ikey)
        changed = True
        names.add(c.name)
        out.releases.append(f"{c.name} release {row.seq} (shared)")
        out.files += [os.path.join(shared_dir(store), f["sha256"], f["name"]) for f in entry["files"]]
    if len(index) > MAX_ENTRIES:
        stale = sorted((k for k in index if k not in used), key=lambda k: int(index[k].get("used", 0)))
        for k in stale[: len(index) - MAX_ENTRIES]:
            del index[k]
        _sweep(store, index)
    if changed:
        _save(store, index)
    out.collections = frozenset(names)
    return out


def _build(store: Store, name: str, seq: int, root: ObjectId, base: ObjectId | None, row: Any,
           progress: Callable[[int], None] | None) -> dict[str, Any]:
    top = shared_dir(store)
    tmp = os.path.join(top, f"tmp-{os.getpid()}-{os.urandom(4).hex()}")
    os.makedirs(tmp)
    try:
        known = _known_from(store, [base]) if base is not None else set()
        res = write_packs(store, Outgoing(recipient=None, recipient_key=None, releases=[row], roots=[(root, base)],
                                          known=known, held=set(), acks=[], have={}), tmp, progress)
        files: list[dict[str, Any]] = []
        total = 0
        for p in res.files:
            digest, n = file_digest(p), os.path.getsize(p)
            dest = os.path.join(top, digest)
            os.makedirs(dest, exist_ok=True)
            os.replace(p, os.path.join(dest, os.path.basename(p)))
            durable.fsync_dir(dest)
            files.append({"name": os.path.basename(p), "size": n, "sha256": digest})
            total += n
        durable.fsync_dir(top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the shared pack of %s release %d (%s), %d bytes", name, seq,
             f"delta from {base.hex()[:12]}" if base else "whole", total)
    return {"collection": name, "seq": seq, "from": base.hex() if base else None, "to": root.hex(),
            "files": files, "created": int(time.time())}


def prune(store: Store, index: dict[str, dict[str, Any]] | None = None) -> bool:
    """Drop the shared packs of releases that are no longer the latest (and files no
    entry names). With no index given, the one on disk is read and saved. True if
    something was dropped."""
    own = index is None
    idx = _load(store) if index is None else index
    dropped = False
    for k, e in list(idx.items()):
        c = store.db.collection(str(e.get("collection")))
        if c is None or c.root is None or c.root.hex() != e.get("to") or c.target is not None:
            del idx[k]
            dropped = True
    _sweep(store, idx)
    if own and (dropped or os.path.exists(os.path.join(shared_dir(store), INDEX))):
        _save(store, idx)
    return dropped


def _sweep(store: Store, index: dict[str, dict[str, Any]]) -> None:
    """Remove what no entry names: old packs, and what an interrupted build left."""
    top = shared_dir(store)
    keep: set[str] = set()
    for e in index.values():
        keep |= {str(f.get("sha256")) for f in e.get("files", []) if isinstance(f, dict)}
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return
    for n in names:
        if n == INDEX or n in keep:
            continue
        path = os.path.join(top, n)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

"""Shared release packs: one pack per (collection, from-root, to-root), for every school.

Online, most schools ask the master for the same thing: the latest release of
a collection for everyone, as a delta from the release they hold. The master
builds that pack once, with no recipient (anyone may read it; it is signed by
the master like every pack it writes, and the school checks the release's own
signature too), and keeps it in ``STATE/shared/<sha256 of the file>/<name>``.
The HTTP server serves it at a URL naming that hash, so the URL's bytes never
change: HTTP caches (nginx) may keep it for a year, and the 200th school at
the same release costs the master a file lookup, not a tree walk and a pack.

A stick carries the same answer (services/stick.py): the shared packs are
copied onto it as they are, with the per-school pack beside them. prepare()
builds them ahead, after each publish, so that the first school's answer
copies files instead of planning and compressing.

Only what is the same for every school goes there: a school that holds part
of an unfinished release (its have-state lists it as pending) gets that
collection planned from its own state in its per-school pack, as before.

``index.json`` names the packs built: {key: entry}, key
``<collection>:<from root hex or ->:<to root hex>``. Entries for releases that
are no longer the latest, or signed by a key that is no longer the master's
signing key (``trust rotate``), are dropped at each answer, at prepare and at
gc; at most MAX_ENTRIES are kept (least recently used go first).
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
from harmonicd.services.exchange import Outgoing, _known_from, on_disk, stored_have, write_packs
from harmonicd.services.exchange import for_school as exchange_for_school
from harmonicd.store import durable
from harmonicd.store.db import Collection, ReleaseRow
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

SHARED = "shared"
INDEX = "index.json"
MAX_ENTRIES = 64  # (collection, from, to) packs kept; a school at an unusual release costs one more build
DIGEST_HEX = 64


@dataclass(frozen=True)
class Part:
    """One shared pack (in one or more volume files): the latest release of one
    collection, as a delta from a release some school holds, or whole."""

    collection: str
    release: str  # for reports: "content release 2", as write_packs names it
    files: tuple[str, ...]  # STATE/shared/<digest>/<name>, in order
    sizes: tuple[int, ...]
    objects: int = 0

    def on_disk(self, block: int) -> int:
        """What its files take of a file system allocating whole blocks of block bytes."""
        return sum(on_disk(n, block) for n in self.sizes)


@dataclass
class Shared:
    """What of a school's answer goes in shared packs."""

    parts: list[Part] = field(default_factory=list)
    built: int = 0  # packs built by this answer (the others were already there)

    @property
    def collections(self) -> frozenset[str]:
        """Collection names left out of the per-school pack."""
        return frozenset(p.collection for p in self.parts)

    @property
    def files(self) -> list[str]:
        return [f for p in self.parts for f in p.files]

    @property
    def releases(self) -> list[str]:
        return [p.release for p in self.parts]

    def within(self, room: int, block: int) -> Shared:
        """The parts that fit whole in room (in whole blocks), in order: a shared pack
        goes whole or not at all; a smaller one further on may still fit."""
        out = Shared(built=self.built)
        for p in self.parts:
            if p.on_disk(block) <= room:
                out.parts.append(p)
                room -= p.on_disk(block)
        return out


@dataclass
class Answer:
    """The master's answer to one school, as online sync and a stick carry it: the
    shared packs (whole files, the same for every school at the same release), then
    the per-school pack planned from what is left (acknowledgements, collections
    for that school alone, collections whose shared pack is not taken)."""

    shared: Shared
    rest: Outgoing


def answer(store: Store, school: str, progress: Callable[[int], None] | None = None, *,
           room: int | None = None, block: int = 1, build: bool = True) -> Answer:
    """Plan the master's answer to an enrolled school. Online every shared pack is
    named (room None), built if not yet there. On a stick (build False) only those
    already built (prepare) that fit whole in room go: the collections of the others
    are planned in the per-school pack, written straight onto the stick (what fits
    goes) rather than built here first and copied, while the teacher waits."""
    common = for_school(store, school, progress, build=build)
    if room is not None:
        common = common.within(room, block)
    return Answer(common, exchange_for_school(store, school, common.collections))


def shared_dir(store: Store) -> str:
    return os.path.join(store.dir, SHARED)


def file_digest(path: str) -> str:
    """The SHA-256 a shared pack's URL names (what an HTTP cache can be checked against)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pending_keys(have: bytes | None) -> set[str]:
    """Collections a school holds part of an unfinished release of, by name: until a
    school's first release of a collection is complete it knows the master only as
    "master" (its configuration's placeholder), so the owner is not compared."""
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
            out.add(p[0].rpartition("/")[2])
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


def for_everyone(store: Store) -> list[Collection]:
    """The master's collections whose latest release is the same for every school."""
    return [c for c in store.db.collections() if c.mode == "owned" and c.root is not None and c.target is None]


def _base(store: Store, c: Collection, theirs: tuple[int, ObjectId] | None) -> ObjectId | None:
    """The root a school's shared pack of c is a delta from: the release it holds, if
    that is a release of ours whose objects we still have; else None (the whole release)."""
    if theirs is None:
        return None
    old = store.db.release(c.name, theirs[0])
    if old is not None and old.root == theirs[1] and store.objects.has(old.root):
        return old.root
    return None


def _key(name: str, base: ObjectId | None, root: ObjectId) -> str:
    return f"{name}:{base.hex() if base else '-'}:{root.hex()}"


def _part(store: Store, entry: dict[str, Any], label: str) -> Part:
    files = entry["files"]
    return Part(collection=str(entry["collection"]), release=label,
                files=tuple(os.path.join(shared_dir(store), f["sha256"], f["name"]) for f in files),
                sizes=tuple(int(f["size"]) for f in files), objects=int(entry.get("objects", 0)))


def _ensure(store: Store, index: dict[str, dict[str, Any]], c: Collection, row: ReleaseRow,
            base: ObjectId | None, progress: Callable[[int], None] | None, now: int) -> tuple[str, bool]:
    """The index key of c's shared pack from base, built first if not there whole.
    Returns the key and whether it was built now."""
    ikey = _key(c.name, base, row.root)
    entry = index.get(ikey)
    built = entry is None or not _whole(store, entry)
    if built:
        index[ikey] = _build(store, c.name, row.seq, row.root, base, row, progress)
    index[ikey]["used"] = now
    return ikey, built


def _bound(store: Store, index: dict[str, dict[str, Any]], used: set[str]) -> None:
    """At most MAX_ENTRIES packs kept: the least recently used others go first."""
    if len(index) > MAX_ENTRIES:
        stale = sorted((k for k in index if k not in used), key=lambda k: int(index[k].get("used", 0)))
        for k in stale[: len(index) - MAX_ENTRIES]:
            del index[k]
        _sweep(store, index)


def for_school(store: Store, school: str, progress: Callable[[int], None] | None = None, *,
               build: bool = True) -> Shared:
    """The shared packs a school's answer names, built if not yet there (with build
    False, only those built already). Runs as the master's answer job (the store's
    lock held: one writer of STATE/shared/)."""
    db = store.db
    peer = db.peer(school)
    if peer is None:
        return Shared()
    held, _partial = stored_have(peer.have)
    pending = _pending_keys(peer.have)
    index = _load(store)
    changed = prune(store, index)
    out = Shared()
    used: set[str] = set()
    now = int(time.time())
    for c in for_everyone(store):
        key = f"{c.owner}/{c.collection}"
        theirs = held.get(key)
        if (theirs is not None and theirs[0] >= c.seq) or c.collection in pending:
            continue
        row = db.release(c.name, c.seq)
        if row is None:
            continue
        base = _base(store, c, theirs)
        if not build:
            entry = index.get(_key(c.name, base, row.root))
            if entry is None or not _whole(store, entry):
                continue
        ikey, built = _ensure(store, index, c, row, base, progress, now)
        out.built += built
        used.add(ikey)
        changed = True
        out.parts.append(_part(store, index[ikey], f"{c.name} release {row.seq}"))
    _bound(store, index, used)
    if changed:
        _save(store, index)
    return out


def whole_releases(store: Store, names: set[str]) -> list[Part]:
    """The shared packs already built of the latest releases of the collections named,
    whole (from nothing): what a stick's to-everyone/ carries. Nothing is built here."""
    index = _load(store)
    out = []
    for c in for_everyone(store):
        if c.name not in names:
            continue
        row = store.db.release(c.name, c.seq)
        entry = index.get(_key(c.name, None, row.root)) if row is not None else None
        if row is not None and entry is not None and _whole(store, entry):
            out.append(_part(store, entry, f"{c.name} release {row.seq}"))
    return out


def prepare(store: Store, progress: Callable[[int], None] | None = None) -> list[str]:
    """Build ahead the shared packs enrolled schools will ask for: of the latest release
    of each collection for everyone, a delta from each release some school last said it
    holds (peer.have), and the whole release (new schools, to-everyone/ on sticks). Then
    the first school's answer after a publish, online or on a stick, copies files
    instead of planning and compressing. Runs as a job of the master's daemon after
    each publish (the store's lock held). Returns what was built, one line each; the
    most asked-for first, at most MAX_ENTRIES kept."""
    db = store.db
    index = _load(store)
    changed = prune(store, index)
    colls = for_everyone(store)
    # (collection, base) -> how many schools will ask for it; the whole release always.
    asked: dict[tuple[str, ObjectId | None], int] = {}
    from_seq: dict[tuple[str, ObjectId | None], int] = {}
    for c in colls:
        asked[(c.name, None)] = 0
    for peer in db.peers("node"):
        if peer.revoked:
            continue
        held, _partial = stored_have(peer.have)
        pending = _pending_keys(peer.have)
        for c in colls:
            key = f"{c.owner}/{c.collection}"
            theirs = held.get(key)
            if (theirs is not None and theirs[0] >= c.seq) or c.collection in pending:
                continue
            b = (c.name, _base(store, c, theirs))
            asked[b] = asked.get(b, 0) + 1
            if b[1] is not None and theirs is not None:
                from_seq[b] = theirs[0]
    # A school's have-state is from its last request: one that took the previous release
    # since has not said so yet, and schools that keep up are most of them. So the delta
    # from the previous release is always built too.
    for c in colls:
        prev = db.release(c.name, c.seq - 1) if c.seq > 1 else None
        if prev is not None and store.objects.has(prev.root):
            b = (c.name, prev.root)
            asked.setdefault(b, 0)
            from_seq[b] = prev.seq
    by_name = {c.name: c for c in colls}
    order = sorted(asked, key=lambda k: (-asked[k], k[0], k[1] is None, k[1] or b""))[:MAX_ENTRIES]
    done: list[str] = []
    used: set[str] = set()
    now = int(time.time())
    for name, base in order:
        c = by_name[name]
        row = db.release(c.name, c.seq)
        if row is None:
            continue
        ikey, built = _ensure(store, index, c, row, base, progress, now)
        used.add(ikey)
        changed = True
        if built:
            done.append(f"{c.name} release {row.seq} "
                        + (f"from release {from_seq[(name, base)]}" if base is not None else "whole"))
    _bound(store, index, used)
    if changed:
        _save(store, index)
    return done


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
            "files": files, "objects": res.objects, "created": int(time.time()), "key": store.key.public.hex()}


def prune(store: Store, index: dict[str, dict[str, Any]] | None = None) -> bool:
    """Drop the shared packs of releases that are no longer the latest (and files no
    entry names). With no index given, the one on disk is read and saved. True if
    something was dropped."""
    own = index is None
    idx = _load(store) if index is None else index
    dropped = False
    # A pack the master's previous signing key signed (before `trust rotate`) would be
    # refused by a school that follows the chain: built again with the current key.
    signer = store.key.public.hex()
    for k, e in list(idx.items()):
        c = store.db.collection(str(e.get("collection")))
        if (c is None or c.root is None or c.root.hex() != e.get("to") or c.target is not None
                or e.get("key") != signer):
            del idx[k]
            dropped = True
    _sweep(store, idx)
    if own and (dropped or os.path.exists(os.path.join(shared_dir(store), INDEX))):
        _save(store, idx)
    return dropped


def discard_all(store: Store) -> int:
    """Throw away every shared pack built (trust rotate: the old key signed them).
    Returns how many there were; prepare() and the next answers build them again."""
    index = _load(store)
    _sweep(store, {})
    if index or os.path.exists(os.path.join(shared_dir(store), INDEX)):
        _save(store, {})
    return len(index)


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

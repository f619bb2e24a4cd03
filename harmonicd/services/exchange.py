"""Exchange: packs in, packs out. The same code serves a stick and (later) HTTP.

A stick (or any folder) holds a mailbox ``HARMONIC/``::

    HARMONIC/README.txt                 what this is, for whoever finds the stick
    HARMONIC/to-master/<pack files>     requests and data from school servers
    HARMONIC/to-<school id>/<pack files> answers from the master to that school
    HARMONIC/to-everyone/<pack files>   the master's latest releases for every school
    HARMONIC/RECEIPT-<server id>.txt    what each server did at its last visit

A visit of the mailbox (what is read, written, checked, in which order) is
services/stick.py; this module reads and writes the packs.

A pack file is ``<sender>-<time>-<pack id>-v<volume>.hpk``; it is written as
``.<name>.part``, flushed and renamed, so a stick pulled early leaves only a
``.part`` file (ignored, and cleaned up by its writer) or a pack that fails
verification; either way nothing is applied from it.

Import is two-phase: every object is verified and staged while the pack is
read; only when the footer's digest and signature verify are the objects
committed, and then, in one database transaction, the releases go live.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from harmonicd.core import names
from harmonicd.core.codec import Compressor, delta_compress, pack_msg, unpack_msg
from harmonicd.core.diff import Want, plan, reachable
from harmonicd.core.ident import check_server_id
from harmonicd.core.objects import (
    BLOB,
    ID_LEN,
    KIND_NAMES,
    MAX_OBJECT,
    RECIPE,
    T_BLOB,
    T_DIR,
    T_RECIPE,
    TREE,
    Entry,
    ObjectId,
    decode_recipe,
    decode_tree,
    short,
)
from harmonicd.core.pack import Hashed, Header, PackReader, PackWriter, empty_size, new_pack_id
from harmonicd.core.release import SignedRelease, decode
from harmonicd.errors import (
    CorruptPack,
    Equivocation,
    HarmonicError,
    IntegrityError,
    Misaddressed,
    NoRoom,
    PackError,
    StickRemoved,
    StoreError,
    TrustError,
    UntrustedPack,
)
from harmonicd.services import deploy as deploy_mod
from harmonicd.services import enrollment, leases
from harmonicd.services import trust as trust_mod
from harmonicd.services.deploy import default_path, union_tree
from harmonicd.store import durable
from harmonicd.store.db import Collection, ReleaseRow
from harmonicd.store.faults import crash_point
from harmonicd.store.objects import Batch
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.exchange")

MAILBOX = "HARMONIC"
TO_MASTER = "to-master"
SUFFIX = ".hpk"
# Whatever a stick holds, a pack volume is below 4 GiB (FAT32); anything
# bigger is not ours and is not read.
MAX_PACK_FILE = 1 << 32
MAX_FOLDER_ENTRIES = 10_000
# Objects held from unfinished transfers listed in a request, at most (32 bytes each).
MAX_PARTIAL = 200_000
# A patch is used only if it saves at least this share of the plain blob.
DELTA_GAIN = 0.9


Digest = bytes  # BLAKE3-256 of a whole pack file


def to_folder(recipient: str | None) -> str:
    return TO_MASTER if recipient is None else f"to-{recipient}"


# --------------------------------------------------------------------------- reports


@dataclass
class ImportResult:
    path: str
    sender: str = ""
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0
    duplicate: bool = False
    staged: list[ObjectId] = field(default_factory=list)  # objects this pack added to the store
    # The pack's creation time when the master signed it for this server (a school's
    # measure of its clock against the master's at an online sync: services/leases.py).
    master_time: int | None = None


@dataclass
class ExportResult:
    recipient: str
    files: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    objects: int = 0
    raw_bytes: int = 0
    bytes: int = 0
    sums: dict[str, Digest] = field(default_factory=dict)  # file -> BLAKE3 of its bytes, computed while writing
    left_objects: int = 0  # planned but left out: no room (they go next time)
    left_bytes: int = 0  # their payload bytes
    stick_bytes: int = 0  # what the files take of the budget (whole blocks)

    def add(self, other: ExportResult, first: bool = False) -> None:
        """Take in other's packs for the same recipient: its files and release lines
        before these (first) or after, and its counts."""
        self.files = other.files + self.files if first else self.files + other.files
        self.releases = other.releases + self.releases if first else self.releases + other.releases
        self.sums.update(other.sums)
        self.objects += other.objects
        self.raw_bytes += other.raw_bytes
        self.bytes += other.bytes
        self.stick_bytes += other.stick_bytes
        self.left_objects += other.left_objects
        self.left_bytes += other.left_bytes


@dataclass
class ExchangeReport:
    imported: list[ImportResult] = field(default_factory=list)
    exported: list[ExportResult] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line each, naming the file and why
    published: list[tuple[str, int]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


# --------------------------------------------------------------------------- trust


@dataclass
class Decision:
    signed: SignedRelease
    name: str
    action: str  # 'apply', 'skip' (already held), 'old' (older than held), 'other' (not for us)
    missing: int = 0  # objects of its tree still absent after the pack was read


def _trust(store: Store, enrolling: list[enrollment.Enrollment] | None = None) -> Callable[[Header], bytes]:
    """The PackReader's check of a header: the key the pack must be signed with.
    ``enrolling`` (master): receives a first contact's enrollment, recorded with
    the pack's import (services/enrollment.py)."""
    cfg = store.cfg
    mine = trust_mod.own_keys(store)  # the master: any signing key of its chain

    def check(h: Header) -> bytes:
        if h.recipient_key is not None and h.recipient_key not in mine:
            raise Misaddressed(f"pack is addressed to {h.recipient or 'another server'}, not to {cfg.id}")
        if cfg.is_master:
            try:
                check_server_id(h.sender, exc=CorruptPack)
            except CorruptPack:
                raise UntrustedPack(f"pack claims an invalid sender id {h.sender[:40]!r}") from None
            revoked = enrollment.revoked_sender(store, h)  # a revoked key, whatever id it claims
            if revoked is not None:
                raise UntrustedPack(revoked)
            peer = store.db.peer(h.sender)
            if peer is None or peer.role != "node" or peer.revoked or peer.key != h.sender_key:
                # Not an enrolled school with this key: a first contact proving its bundle's token?
                first = enrollment.first_contact(store, h)
                if first is not None:
                    if enrolling is not None:
                        enrolling.append(first)
                    return h.sender_key
            if peer is None or peer.role != "node":
                raise UntrustedPack(f"pack is from {h.sender!r}, which is not an enrolled school server")
            if peer.revoked:
                raise UntrustedPack(f"pack is from {h.sender!r}, whose enrollment was revoked")
            if peer.key != h.sender_key:
                raise UntrustedPack(f"pack claims to be from {h.sender!r} but is signed by another key")
            return peer.key
        # The chain the pack carries is followed first (nothing stored yet): the
        # master's pack is signed by the signing key it ends at; one signed by a
        # key it has retired is refused (a rollback).
        if trust_mod.follow(store, h).from_master:
            return h.sender_key
        # Not the master's pack: a relay's, serving the master's releases from its
        # replica. Whoever signed it, every release in it must verify against the
        # master's key (_assess) and it may carry no acknowledgement: the pack's own
        # signature only says which server sent it.
        try:
            check_server_id(h.sender, exc=CorruptPack)
        except CorruptPack:
            raise UntrustedPack(f"pack claims an invalid sender id {h.sender[:40]!r}") from None
        master = next(iter(store.db.peers("master")), None)
        if master is not None and h.sender == master.id:
            raise UntrustedPack(f"pack claims to be from the master {h.sender!r} but is signed by a key this "
                                "server does not trust")
        return h.sender_key

    return check


def _assess(store: Store, h: Header, where: str, followed: trust_mod.Followed | None = None) -> list[Decision]:
    """Check every release in a pack's header before anything is read or stored.
    ``followed`` (school): the master's key chain as the pack's own chain advances it."""
    cfg = store.cfg
    out = []
    if not cfg.is_master and followed is None:
        followed = trust_mod.follow(store, h)
    relayed = followed is not None and not followed.from_master
    if relayed and h.acks:
        # Only the master can say what it holds: a relay's acknowledgement would let
        # this school drop data the master may never have received.
        raise UntrustedPack(f"{where}: carries acknowledgements but is signed by {h.sender}, not the master: "
                            "only the master's own packs may confirm what it holds")
    master = next(iter(store.db.peers("master")), None) if relayed else None
    for body, sig in h.releases:
        sr = decode(body, sig)
        r = sr.release
        if cfg.is_master:
            if r.owner != h.sender:
                raise UntrustedPack(f"{where}: carries {r.label()}, which {h.sender} does not own")
            owner_key = h.sender_key
            name = f"{r.owner}/{r.collection}"
            if r.target is not None:
                raise CorruptPack(f"{where}: a school release may not name a target school")
        else:
            if not relayed and r.owner != h.sender:
                raise UntrustedPack(f"{where}: carries {r.label()} not signed by the master")
            if relayed and master is not None and r.owner != master.id:
                raise UntrustedPack(f"{where}: {h.sender} serves {r.label()}, which the master {master.id} "
                                    "does not own")
            # The master's current signing key, whoever signed the pack: a relay can
            # pass a release on, never make or change one.
            assert followed is not None
            owner_key = followed.state.signing
            if r.target is not None and r.target != cfg.id:
                out.append(Decision(sr, "", "other"))
                continue
            name = r.collection
        try:
            sr.verify(owner_key)
        except TrustError:
            if followed is not None:
                trust_mod.check_release(followed.state, sr, where)  # a retired key's: a rollback
            if not relayed:
                raise
            raise UntrustedPack(f"{where}: {r.label()} from {h.sender} is not signed by the master: the pack "
                                "is signed by a key this server does not trust") from None
        coll = store.db.collection(name)
        if coll is not None and coll.mode == "owned":
            raise TrustError(f"{where}: carries {r.label()}, but {name} is this server's own collection")
        same = store.db.release(name, r.seq)
        if followed is not None and coll is not None:
            # What the master's current key signed again (trust rotate): the same
            # release takes its new signature; another one replaces what a retired
            # key signed (a leaked key's release, even at a higher number).
            live = store.db.release(name, coll.seq)
            if same is not None and same.root == r.root and same.state != "pending" \
                    and trust_mod.stale(followed.state, same):
                out.append(Decision(sr, name, "resign"))
                continue
            if live is not None and (r.seq, r.root) != (live.seq, live.root) and r.seq <= coll.seq \
                    and trust_mod.stale(followed.state, live):
                out.append(Decision(sr, name, "reset"))
                continue
        if same is not None:
            if same.root != r.root:
                raise Equivocation(
                    f"{where}: {r.label()} differs from the release {r.seq} already held "
                    f"({short(same.root)}): two different releases with one number, refused")
            if same.state != "pending":
                out.append(Decision(sr, name, "skip"))
                continue
        if coll is not None and r.seq < coll.seq:
            if relayed:
                # An old stick is harmless and only noted; a relay that serves an
                # older release than held is rolling back (or broken): refused, so
                # that the sync fails and says so.
                raise TrustError(f"upstream {h.sender} offered {name} release {r.seq}, older than release "
                                 f"{coll.seq} held; kept {coll.seq}")
            out.append(Decision(sr, name, "old"))
            continue
        if coll is not None and r.seq == coll.seq and same is None:
            raise Equivocation(f"{where}: {r.label()} differs from the release {r.seq} already held")
        out.append(Decision(sr, name, "apply"))
    return out


# --------------------------------------------------------------------------- import


class _Media:
    """A pack file being read from removable media: a read that fails because the
    stick went away says so (StickRemoved), which no other error must hide."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except OSError as exc:
            if exc.errno in durable.MEDIA_GONE:
                raise StickRemoved("import") from exc
            raise

    def __enter__(self) -> _Media:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def open_pack(path: str) -> _Media:
    """Open a pack file on untrusted media: no symlinks, no FIFOs, no devices, bounded size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackError(f"{path}: is a symbolic link, not a pack file; not read") from None
        if exc.errno in durable.MEDIA_GONE:
            raise StickRemoved("import") from exc
        raise PackError(f"{path}: cannot open ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PackError(f"{path}: is not a regular file; not read")
    if st.st_size > MAX_PACK_FILE:
        os.close(fd)
        raise PackError(f"{path}: is {st.st_size} bytes, larger than any pack volume; not read")
    os.set_blocking(fd, True)
    return _Media(os.fdopen(fd, "rb", buffering=1 << 20))


def import_pack(store: Store, path: str, how: str = "stick",
                progress: Callable[[int], None] | None = None) -> ImportResult:
    """Verify and apply one pack volume. Raises a PackError/TrustError if refused;
    then nothing of the trusted state has changed."""
    res = ImportResult(path)
    with open_pack(path) as f:
        first: list[enrollment.Enrollment] = []
        reader = PackReader(f, path, _trust(store, first))
        h = reader.header
        res.sender = h.sender
        db = store.db
        if db.pack_seen(h.pack_id, h.volume, "in"):
            res.duplicate = True
            return res
        # The chain again, as the trust check followed it: releases are checked
        # against the key it ends at, and its new links are stored by _apply.
        followed = None if store.cfg.is_master else trust_mod.follow(store, h)
        decisions = _assess(store, h, path, followed)
        incoming = enrollment.assess(store, h, path, first[0] if first else None)
        # A pack none of whose releases we still need (an old stick) is only
        # read to check its signature, for the acknowledgements it carries.
        needed = any(d.action in ("apply", "reset") for d in decisions)
        batch = store.objects.batch()
        with batch:
            def base(bid: ObjectId) -> bytes | None:
                if not batch.has(bid):
                    return None
                try:
                    return batch.get(bid)[1]
                except IntegrityError:
                    return None

            need = int(h.plan.get("bytes", 0))
            try:
                last = 0
                # A delta against an object we no longer hold (an answer computed
                # from an older request) is passed over: the release then stays
                # incomplete and our next request asks for what is missing.
                for rec in reader.records(base, skip_unresolved=True):
                    if needed and batch.put(rec.kind, rec.id, rec.data, check_store=False):
                        res.objects += 1
                        res.bytes += len(rec.data)
                    if progress and reader.offset - last > 1 << 20:
                        progress(reader.offset - last)
                        last = reader.offset
                # Before anything is committed: is each release complete, and is
                # every tree well formed (kinds, depth, path length)?
                for d in decisions:
                    if d.action in ("apply", "reset"):
                        d.missing = _check_release(store, batch, d, path)
                res.staged = list(batch.pending)
                batch.commit()
            except OSError as exc:
                # What was staged is thrown away, so the whole pack must fit at
                # once: say so, and measure what is free once it is gone.
                batch.discard()
                raise durable.disk_error(exc, f"importing {path}", need, store.dir) from exc
    _apply(store, h, decisions, res, how, incoming, followed=followed)
    return res


def _check_release(store: Store, batch: Batch, d: Decision, where: str) -> int:
    """Count the objects of d's tree that are still missing, checking on the way that
    every reference has the right kind and no path is too deep or too long.
    Subtrees of the collection's live release were checked when they arrived."""
    coll = store.db.collection(d.name)
    checked: set[ObjectId] = set()
    if coll is not None and coll.root is not None:
        try:
            checked = reachable(store, [coll.root])
        except HarmonicError:
            checked = set()
    missing = 0
    seen: set[ObjectId] = set()
    # Depth and path length depend on where a folder is, not on what it is: a
    # folder met again deeper or longer than before (a shared subtree, or one of
    # the live release now placed lower) is walked again at that place.
    walked: dict[ObjectId, tuple[int, int]] = {}
    label = d.signed.release.label()

    def kind_of(oid: ObjectId) -> int | None:
        k = batch.kind(oid)
        return k if k is not None else store.objects.kind(oid)

    def payload(oid: ObjectId) -> bytes:
        return batch.get(oid)[1]

    def size_of(oid: ObjectId) -> int | None:
        if oid in batch.pending:
            return batch.pending[oid]
        return store.objects.size(oid) if store.objects.has(oid) else None

    def lies(path: str, what: str, said: int, real: int) -> CorruptPack:
        return CorruptPack(f"{where}: {label}: {path} is {said} bytes by its {what}, its data has {real}")

    stack: list[tuple[ObjectId, int, str, int]] = [(d.signed.release.root, TREE, "", 0)]
    while stack:
        oid, want, path, depth = stack.pop()
        if want == TREE:
            at = (depth, len(path.encode()))
            prev = walked.get(oid)
            if prev is not None and prev[0] >= at[0] and prev[1] >= at[1]:
                continue
            walked[oid] = at if prev is None else (max(prev[0], at[0]), max(prev[1], at[1]))
            if prev is not None or oid in checked:
                # Only where it lies is new: its entries were checked already.
                k = kind_of(oid)
                if k == TREE:
                    _walk_again(payload(oid), path, depth, stack, where, label)
                continue
        elif oid in checked or oid in seen:
            continue
        seen.add(oid)
        k = kind_of(oid)
        if k is None:
            missing += 1
            continue
        if k != want:
            raise CorruptPack(f"{where}: {label}: {path or '/'} refers to a {KIND_NAMES[k]} "
                              f"where a {KIND_NAMES[want]} belongs")
        if k == TREE:
            for e in _walk_again(payload(oid), path, depth, stack, where, label):
                # A file's length in its folder must be that of its data.
                child = names.join(path, e.name)
                if e.type == T_BLOB:
                    n = size_of(e.id)
                    if n is not None and n != e.size:
                        raise lies(child, "folder entry", e.size, n)
                elif e.type == T_RECIPE and kind_of(e.id) == RECIPE:
                    n = sum(c for _cid, c in decode_recipe(payload(e.id), child))
                    if n != e.size:
                        raise lies(child, "folder entry", e.size, n)
        elif k == RECIPE:
            for cid, n in decode_recipe(payload(oid), path):
                real = size_of(cid)
                if real is not None and real != n:
                    raise lies(path, "file recipe's chunk list", n, real)
                stack.append((cid, BLOB, path, depth))
    return missing


def _walk_again(tree: bytes, path: str, depth: int, stack: list[tuple[ObjectId, int, str, int]],
                where: str, label: str) -> list[Entry]:
    """Check a folder's depth and its entries' path lengths at this place, and
    queue its entries; returns them."""
    if depth > names.MAX_DEPTH:
        raise CorruptPack(f"{where}: {label}: folders nested deeper than {names.MAX_DEPTH} at {path[:80]}")
    entries = decode_tree(tree, path)
    for e in entries:
        child = names.join(path, e.name)
        if len(child.encode()) > names.MAX_PATH_BYTES:
            raise CorruptPack(f"{where}: {label}: path {child[:80]}… is longer than "
                              f"{names.MAX_PATH_BYTES} bytes")
        kind = TREE if e.type == T_DIR else RECIPE if e.type == T_RECIPE else BLOB
        stack.append((e.id, kind, child, depth + 1))
    return entries


def _apply(store: Store, h: Header, decisions: list[Decision], res: ImportResult, how: str,
           incoming: enrollment.Incoming | None = None, *, followed: trust_mod.Followed | None = None) -> None:
    db = store.db
    cfg = store.cfg
    now = int(time.time())
    to_deploy: list[str] = []
    archive_union: dict[str, ObjectId] = {}
    batch = store.objects.batch()
    with batch:
        # Work out, before the transaction, what can go live.
        live: dict[str, list[Decision]] = {}
        for d in sorted(decisions, key=lambda d: (d.name, d.signed.release.seq)):
            r = d.signed.release
            if d.action in ("skip", "resign"):
                res.skipped.append(r.label())
            elif d.action == "old":
                coll = db.collection(d.name)
                if coll is not None and coll.mode == "replica":
                    msg = (f"ignored {r.label()} from {os.path.basename(res.path)}: older than release "
                           f"{coll.seq} already held (an old stick?)")
                    res.warnings.append(msg)
                    log.warning("%s", msg)
            elif d.action in ("apply", "reset"):
                if d.missing:
                    res.pending.append(f"{r.label()}: {d.missing} objects still to come")
                else:
                    live.setdefault(d.name, []).append(d)
        for name, ds in live.items():
            if cfg.is_master:
                roots = [row.root for row in _retained(store, name, now)] + [d.signed.release.root for d in ds]
                archive_union[name] = union_tree(store, batch, roots)
        batch.commit()
    with db.tx():
        # The links of the master's key chain this pack brought, first: everything
        # below that asks store.master_key() gets the key they end at.
        trust_mod.commit(store, followed)
        if incoming is not None:
            # A first contact enrolled, a newer revocation list kept: with the import, or not at all.
            enrollment.after_import(store, h, incoming, now)
        for d in decisions:
            if d.action == "resign":
                db.set_release_sig(d.name, d.signed.release.seq, d.signed.signature)
            if d.action not in ("apply", "reset"):
                continue
            r = d.signed.release
            if d.name in live and d in live[d.name]:
                continue
            if db.release(d.name, r.seq) is None:
                db.put_release(ReleaseRow(d.name, r.seq, r.root, d.signed.body, d.signed.signature,
                                          r.size, now, "pending"))
        for name, ds in live.items():
            coll = db.collection(name)
            owner = ds[0].signed.release.owner
            if coll is None:
                mode = "archive" if cfg.is_master else "replica"
                db.add_collection(name, ds[0].signed.release.collection, owner, mode,
                                  target=ds[0].signed.release.target, path=default_path(store, name))
                coll = db.collection(name)
                assert coll is not None
            elif coll.owner != owner:
                # A school learns its master's id from the master's first pack.
                db.update_collection(name, owner=owner)
            for old in db.releases(name):
                if old.state == "live":
                    db.set_release_state(name, old.seq, "kept")
            for d in ds:
                r = d.signed.release
                db.put_release(ReleaseRow(name, r.seq, r.root, d.signed.body, d.signed.signature,
                                          r.size, now, "kept"))
                res.applied.append(r.label())
            top = ds[-1].signed.release
            db.set_release_state(name, top.seq, "live")
            if coll.mode == "replica":
                # A replica keeps only what it serves: older rows go (their
                # objects are collected by gc), pending ones below too; after a
                # reset (the master's release in place of a retired key's) the
                # higher ones too.
                reset = any(d.action == "reset" for d in ds)
                for old in db.releases(name):
                    if old.seq < top.seq or (reset and old.seq > top.seq):
                        db.delete_release(name, old.seq)
            deployed = archive_union.get(name, top.root)
            db.update_collection(name, seq=top.seq, root=top.root, deployed=deployed)
            to_deploy.append(name)
        _take_acks(store, h, res)
        if not cfg.is_master:
            # Times the master signed, verified just now, raise the clock floor that
            # laptops' leases are judged against (services/leases.py).
            by_master = h.sender_key == store.master_key()
            times = [d.signed.release.created for d in decisions if d.action != "other"]
            leases.raise_floor(store, [*times, h.created] if by_master else times, res.path)
            if by_master and h.recipient_key == store.key.public:
                res.master_time = h.created
        if cfg.is_master:
            db.peer_seen(h.sender, now, how, pack_msg(h.have) if h.have else None)
        elif followed is not None and followed.from_master:
            if db.peer(h.sender) is None:
                db.put_peer(h.sender, h.sender_key, "master", now)
            db.peer_seen(h.sender, now, how, None)
        elif live and not db.peers("master"):
            # Through a relay the master is not heard from, but its releases name
            # it (and its key signed them): the school's requests are addressed to it.
            owner = next(iter(live.values()))[0].signed.release.owner
            if db.peer(owner) is None:
                db.put_peer(owner, store.master_key(), "master", now)
        db.record_pack(h.pack_id, h.volume, "in", h.sender, now, res.objects, res.bytes)
        # What arrived for a release that is not complete yet is kept (gc spares it)
        # and listed in our next request, so nothing is sent twice.
        if db.releases(state="pending"):
            db.add_partial(res.staged)
        else:
            db.clear_partial()
    crash_point("db-committed")
    fresh = set(res.staged)
    for name in to_deploy:
        coll = db.collection(name)
        if coll is not None:
            deploy_mod.deploy(store, coll, fresh)


def _retained(store: Store, name: str, now: int) -> list[ReleaseRow]:
    """Releases of a school's collection kept in the master's archive."""
    keep = store.cfg.archive_keep_days
    rows = [r for r in store.db.releases(name) if r.state in ("live", "kept")]
    if keep:
        rows = [r for r in rows if r.state == "live" or now - r.received <= keep * 86400]
    return rows


def _take_acks(store: Store, h: Header, res: ImportResult) -> None:
    """A school records which of its own releases the master now holds durably."""
    if store.cfg.is_master:
        return
    if h.acks and h.sender_key != store.master_key():
        # _assess refused such a pack already; this stays the one place acks are taken.
        raise UntrustedPack(f"{res.path}: acknowledgements from {h.sender}, not from the master")
    db = store.db
    for a in h.acks:
        name, seq, root = a.get("collection"), a.get("seq"), a.get("root")
        if not (isinstance(name, str) and type(seq) is int and isinstance(root, bytes)):
            raise CorruptPack(f"{res.path}: malformed acknowledgement")
        coll = db.collection(name)
        if coll is None or coll.mode != "owned":
            continue
        if seq < coll.acked_seq:
            _master_forgot(store, coll, seq, root, h, res)
            continue
        if seq == coll.acked_seq:
            continue
        row = db.release(name, seq)
        if row is None or row.root != root:
            continue  # an ack for a release we no longer know is no use as a diff base
        db.update_collection(name, acked_seq=seq, acked_root=root)
        db.set_meta(f"acked-at/{name}", str(h.created))
        for old in db.releases(name):
            if old.seq < seq:
                db.delete_release(name, old.seq)
        res.acked.append(f"{name} release {seq}")


def _master_forgot(store: Store, coll: Collection, seq: int, root: bytes, h: Header, res: ImportResult) -> None:
    """The master says it holds less of coll than it once confirmed: it was
    restored from an older backup. Sending on from the old confirmation would
    leave every later release of coll incomplete at the master for ever, so
    the next pack is planned from what the master says it holds now (more
    bytes, never less than needed). A pack the master made before the one
    that confirmed more (two sticks read out of order) is only old news."""
    db = store.db
    if h.created < int(db.get_meta(f"acked-at/{coll.name}") or 0):
        return
    row = db.release(coll.name, seq)
    known = row is not None and row.root == root
    db.update_collection(coll.name, acked_seq=seq if known else 0, acked_root=root if known else None)
    db.set_meta(f"acked-at/{coll.name}", str(h.created))
    msg = (f"the master now holds {coll.name} release {seq}, below release {coll.acked_seq} it had confirmed "
           "(restored from an older backup?): what it lacks is sent again")
    log.warning("%s", msg)
    res.warnings.append(msg)


# --------------------------------------------------------------------------- export


def have_state(store: Store) -> dict[str, Any]:
    """What this server holds of others' collections: the request a school sends up."""
    held: dict[str, list[Any]] = {}
    pending: list[list[Any]] = []
    known_roots = []
    for c in store.db.collections():
        if c.mode == "owned" or c.root is None:
            continue
        held[f"{c.owner}/{c.collection}"] = [c.seq, c.root]
        known_roots.append(c.root)
    partial: set[ObjectId] = set()
    pend = store.db.releases(state="pending")
    if pend:
        known = reachable(store, known_roots)
        for row in pend:
            coll = store.db.collection(row.name)
            owner = coll.owner if coll else ""
            pending.append([f"{owner}/{row.name}", row.seq, row.root])
        partial = {oid for oid in store.db.partial_ids() - known if store.objects.has(oid)}
    if len(partial) > MAX_PARTIAL:
        # Past this the header would grow too big: say less, receive more.
        partial = set(sorted(partial)[:MAX_PARTIAL])
    return {"held": held, "pending": pending, "partial": b"".join(sorted(partial)),
            trust_mod.HAVE_KEY: trust_mod.signed_version(store)}


def stored_have(have: bytes | None) -> tuple[dict[str, tuple[int, ObjectId]], set[ObjectId]]:
    """A school's last have-state as the master stored it: held (seq, root) per
    collection, and the ids it holds of incomplete releases. Damage reads as empty."""
    if not have:
        return {}, set()
    try:
        raw = unpack_msg(have, what="stored have-state")
    except HarmonicError:
        return {}, set()
    return _parse_have(raw if isinstance(raw, dict) else {})


def _parse_have(raw: dict[str, Any]) -> tuple[dict[str, tuple[int, ObjectId]], set[ObjectId]]:
    held: dict[str, tuple[int, ObjectId]] = {}
    h = raw.get("held", {})
    if isinstance(h, dict):
        for k, v in h.items():
            if (isinstance(k, str) and isinstance(v, list) and len(v) == 2 and type(v[0]) is int
                    and isinstance(v[1], bytes) and len(v[1]) == ID_LEN):
                held[k] = (v[0], v[1])
    part = raw.get("partial", b"")
    ids: set[ObjectId] = set()
    if isinstance(part, bytes) and len(part) % ID_LEN == 0:
        ids = {part[i:i + ID_LEN] for i in range(0, len(part), ID_LEN)}
    return held, ids


def _known_from(store: Store, roots: list[ObjectId]) -> set[ObjectId]:
    known: set[ObjectId] = set()
    for r in roots:
        if not store.objects.has(r):
            continue
        try:
            known |= reachable(store, [r])
        except (IntegrityError, PackError):
            # We no longer hold all of that tree: we know less, so we send
            # more. Never less than needed.
            continue
    return known


@dataclass
class Outgoing:
    recipient: str | None
    recipient_key: bytes | None  # None: anyone may read it (a shared release pack, services/shared.py)
    releases: list[ReleaseRow]
    roots: list[tuple[ObjectId, ObjectId | None]]
    known: set[ObjectId]
    held: set[ObjectId]
    acks: list[dict[str, Any]]
    have: dict[str, Any]


def for_master(store: Store) -> Outgoing:
    """A school's pack for its master: its new releases and what it holds."""
    db = store.db
    releases: list[ReleaseRow] = []
    roots: list[tuple[ObjectId, ObjectId | None]] = []
    base_roots = []
    for c in db.collections():
        if c.mode != "owned":
            continue
        if c.acked_root is not None:
            base_roots.append(c.acked_root)
        for row in db.releases(c.name):
            if row.seq > c.acked_seq and row.state in ("live", "kept"):
                releases.append(row)
                roots.append((row.root, c.acked_root))
    master = next(iter(db.peers("master")), None)
    return Outgoing(recipient=master.id if master else None, recipient_key=store.master_key(),
                    releases=releases, roots=roots, known=_known_from(store, base_roots), held=set(),
                    acks=[], have=have_state(store))


def lacking(store: Store, colls: list[Collection], held: dict[str, tuple[int, ObjectId]]
            ) -> tuple[list[ReleaseRow], list[tuple[ObjectId, ObjectId | None]], set[ObjectId]]:
    """The latest releases of colls that a server holding ``held`` (its have-state)
    lacks, each with the root it holds as the diff base, and the objects it is
    known to hold. One planning for the master answering a school and for a relay
    answering a downstream school from its replica, so the two cannot differ."""
    db = store.db
    releases = []
    roots: list[tuple[ObjectId, ObjectId | None]] = []
    for c in colls:
        if c.root is None:
            continue
        theirs = held.get(f"{c.owner}/{c.collection}")
        if theirs is not None and theirs[0] >= c.seq:
            continue
        row = db.release(c.name, c.seq)
        if row is None:
            continue
        releases.append(row)
        roots.append((row.root, theirs[1] if theirs else None))
    # What the school holds matters only when something is to be sent: walking
    # its trees is most of a no-op sync's cost on a big collection.
    known = _known_from(store, [root for _seq, root in held.values()]) if releases else set()
    return releases, roots, known


def for_school(store: Store, school: str, leave_out: frozenset[str] = frozenset()) -> Outgoing:
    """The master's answer to a school: what it lacks of the master's collections, and acks.
    Collections named in leave_out go to the school in a shared pack instead (online sync)."""
    db = store.db
    peer = db.peer(school)
    if peer is None:
        raise HarmonicError(f"{school} is not an enrolled school server")
    if peer.revoked:
        # Nothing more is written for a revoked school, online or on a stick.
        raise UntrustedPack(f"{school}'s enrollment was revoked: nothing is written for it")
    held, partial = stored_have(peer.have)
    colls = [c for c in db.collections()
             if c.mode == "owned" and c.target in (None, school) and c.name not in leave_out]
    releases, roots, known = lacking(store, colls, held)
    # Releases it holds signed by a key the chain has retired, as signed now (services/trust.py).
    again, again_roots = trust_mod.resend(
        store, [c for c in db.collections() if c.mode == "owned" and c.target in (None, school)], held,
        trust_mod.stored_version(peer.have))
    releases += again
    roots += again_roots
    acks = []
    for c in db.collections():
        if c.mode == "archive" and c.owner == school and c.root is not None:
            acks.append({"collection": c.collection, "seq": c.seq, "root": c.root})
    return Outgoing(recipient=school, recipient_key=peer.key, releases=releases, roots=roots,
                    known=known, held=partial, acks=acks, have={})


def _pack_name(sender: str, created: int, pack_id: bytes, volume: int) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
    return f"{sender}-{stamp}-{pack_id.hex()[:12]}-v{volume:03d}{SUFFIX}"


def planned(store: Store, out: Outgoing) -> list[Want]:
    """What a pack for out holds, in the order it is written (core/diff.py)."""
    return plan(store, out.roots, out.known, out.held)


def need_bytes(wants: list[Want]) -> int:
    """About what those objects take in a pack before compression (trees are
    sized only when read: a few hundred bytes each)."""
    return sum(w.size + REC_OVERHEAD for w in wants)


# Bytes a record takes besides its payload, about (record head; a tree's own size).
REC_OVERHEAD = 96


def on_disk(size: int, block: int) -> int:
    """What a file of size bytes takes of a file system that allocates whole blocks."""
    return -(-size // block) * block if block > 1 else size


def write_packs(store: Store, out: Outgoing, folder: str,
                progress: Callable[[int], None] | None = None, *,
                wants: list[Want] | None = None, budget: int | None = None, block: int = 1) -> ExportResult:
    """Write the pack for out.recipient into folder, in volumes of at most volume_size bytes.

    With a budget (bytes of the folder's file system, counted in whole blocks of
    ``block`` bytes), the pack takes no more than that: objects that would not
    fit are left out (res.left_objects, res.left_bytes) and the next pack, planned
    from the receiver's next request, carries them; smaller objects further on
    may still fit. A budget too small for the pack's header raises NoRoom
    before anything is written."""
    cfg = store.cfg
    if wants is None:
        wants = planned(store, out)
    total = sum(w.size for w in wants)
    res = ExportResult(out.recipient or ("master" if out.recipient_key else "everyone"))
    res.releases = [f"{r.name} release {r.seq}" for r in out.releases]
    pack_id = new_pack_id()
    created = int(time.time())
    _real_dir(folder)
    volume = 0
    written: list[str] = []
    writer: PackWriter | None = None
    f: durable.WriteBehind | None = None
    sink: Hashed | None = None
    tmp = final = ""
    comp = Compressor()
    spent = 0  # what the closed volumes take of the budget

    def header(v: int) -> Header:
        return _header(store, out, pack_id, created, v, len(wants), total)

    bare = _bare(header(1))
    if budget is not None and on_disk(bare, block) > budget:
        raise NoRoom(f"no room in {folder} for the pack for {res.recipient}: about "
                            f"{durable.mib(bare + need_bytes(wants))} needed, {durable.mib(max(budget, 0))} "
                            "free; nothing was written")

    def open_volume() -> PackWriter:
        nonlocal volume, f, sink, tmp, final
        volume += 1
        final = os.path.join(folder, _pack_name(cfg.id, created, pack_id, volume))
        tmp = os.path.join(folder, "." + os.path.basename(final) + ".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        f = durable.WriteBehind(fd)
        sink = Hashed(f)
        w = PackWriter(sink, store.key, header(volume), pool, depth=6)
        if w.worst_case_size() > cfg.volume_size:
            raise HarmonicError(f"packs.volume_size {cfg.volume_size} is too small for this pack's header")
        return w

    def close_volume(w: PackWriter, last: bool) -> None:
        nonlocal f, spent
        assert f is not None
        assert sink is not None
        w.close(last=last)
        f.sync()
        f.close()
        f = None
        crash_point("pack-part-written")
        os.replace(tmp, final)
        durable.fsync_dir(folder)
        written.append(final)
        res.sums[final] = sink.hash.digest()
        res.bytes += w.written
        res.objects += w.objects
        res.raw_bytes += w.raw_bytes
        spent += on_disk(w.written, block)

    def fits(w: PackWriter, rec_len: int, new_volume: bool) -> bool:
        if budget is None:
            return True
        if new_volume:
            return spent + on_disk(w.worst_case_size(), block) + on_disk(bare + rec_len, block) <= budget
        return spent + on_disk(w.worst_case_size(rec_len), block) <= budget

    def leave_out(n: int) -> None:
        res.left_objects += 1
        res.left_bytes += n

    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="zstd") as pool:
            writer = open_volume()
            for want in wants:
                # What surely cannot fit is not even read (a full stick, a long plan left).
                if (budget is not None and want.kind != TREE and want.base is None
                        and not fits(writer, want.size + 64, False) and not fits(writer, want.size + 64, True)):
                    leave_out(want.size)
                    continue
                kind, payload = store.objects.get(want.id)
                rec_len, patch = len(payload), None
                if want.base is not None and len(payload) > 64:
                    patch = _delta(store, want, payload, comp)
                    if patch is not None:
                        rec_len = len(patch) + 80
                new_volume = writer.worst_case_size(rec_len + 64) > cfg.volume_size and writer.objects > 0
                if not fits(writer, rec_len + 64, new_volume):
                    leave_out(len(payload))
                    continue
                if new_volume:
                    close_volume(writer, last=False)
                    writer = open_volume()
                    if writer.worst_case_size(rec_len + 64) > cfg.volume_size:
                        raise HarmonicError(
                            f"packs.volume_size {cfg.volume_size} is too small for object {short(want.id)}")
                if patch is not None and want.base is not None:
                    writer.add_delta(kind, want.id, want.base, len(payload), patch)
                else:
                    writer.add(kind, want.id, payload)
                if progress:
                    progress(len(payload))
            close_volume(writer, last=True)
    except OSError as exc:
        _abandon(f, tmp, written)
        if exc.errno == errno.EROFS:
            raise StoreError(f"{folder}: the stick is write-protected; nothing was written") from exc
        if exc.errno in durable.MEDIA_GONE:
            raise StickRemoved("export") from exc
        raise durable.disk_error(exc, f"writing the pack for {res.recipient}", total + bare, folder,
                                 "nothing was written") from exc
    except BaseException:
        _abandon(f, tmp, written)
        raise
    res.files = written
    res.stick_bytes = spent
    if out.recipient_key is None:
        # A pack for anyone (to-everyone/ on a stick, a shared pack online) is
        # published rather than sent: there is no one to record it against, and
        # writing one changes nothing of this server's state.
        return res
    with store.db.tx():
        for i in range(1, volume + 1):
            store.db.record_pack(pack_id, i, "out", res.recipient, created, res.objects, res.bytes)
    return res


def _header(store: Store, out: Outgoing, pack_id: bytes, created: int, volume: int, objects: int,
            total: int) -> Header:
    return Header(pack_id=pack_id, sender=store.cfg.id, sender_key=store.key.public,
                  recipient=out.recipient, recipient_key=out.recipient_key, created=created,
                  volume=volume, have=out.have, releases=[(r.body, r.sig) for r in out.releases],
                  acks=out.acks, plan={"objects": objects, "bytes": total},
                  extra={**enrollment.header_extra(store, out.recipient_key),
                         **trust_mod.header_extra(store, out.recipient_key)})


def _bare(first: Header) -> int:
    # A volume number takes at most 5 bytes more than the first one's.
    return empty_size(first) + 8


def least_bytes(store: Store, out: Outgoing, wants: list[Want]) -> int:
    """What the pack for out takes at least (its header and closing, no object): the
    room to keep for it when other files share its budget (shared packs on a stick)."""
    return _bare(_header(store, out, new_pack_id(), int(time.time()), 1, len(wants),
                         sum(w.size for w in wants)))


def _abandon(f: durable.WriteBehind | None, tmp: str, written: list[str]) -> None:
    """Remove what a failed write left: the volume being written and those before
    it (a partial set is no use; a stick that is gone is left as it is)."""
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
    for p in [tmp, *written]:
        try:
            _unlink(p)
        except OSError as exc:
            log.info("could not remove %s: %s", p, exc.strerror)


def copy_pack(src: str, target: str, progress: Callable[[int], None] | None) -> bytes:
    """Copy a pack onto the stick as write_packs writes one (a .part file,
    flushed, renamed, the folder flushed). Returns the hash of what was handed
    to the stick, for the visit's read-back."""
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, "." + os.path.basename(target) + ".part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            with open(src, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:
                sink = Hashed(out)
                while chunk := f.read(1 << 20):
                    sink.write(chunk)
                    if progress:
                        progress(len(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        durable.fsync_dir(folder)
    except OSError:
        _unlink(tmp)
        raise
    return sink.hash.digest()


def _delta(store: Store, want: Want, payload: bytes, comp: Compressor) -> bytes | None:
    assert want.base is not None
    try:
        _k, base = store.objects.get(want.base)
    except IntegrityError:
        return None
    if not base or len(base) > MAX_OBJECT:
        return None
    patch = delta_compress(base, payload)
    plain = len(comp.compress(payload))
    return patch if len(patch) < plain * DELTA_GAIN else None


def _unlink(p: str) -> None:
    if p:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- the mailbox


def list_packs(folder: str) -> tuple[list[str], list[str]]:
    """Pack files in folder (sorted) and one-line complaints about entries that are not."""
    problems: list[str] = []
    try:
        with os.scandir(folder) as it:
            entries = []
            for i, d in enumerate(it):
                if i >= MAX_FOLDER_ENTRIES:
                    problems.append(f"{folder}: more than {MAX_FOLDER_ENTRIES} entries; the rest was not read")
                    break
                entries.append(d)
    except FileNotFoundError:
        return [], []
    except NotADirectoryError:
        return [], [f"{folder}: is not a folder"]
    packs = []
    for d in sorted(entries, key=lambda d: d.name):
        if d.name.startswith(".") or not d.name.endswith(SUFFIX):
            continue
        packs.append(d.path)
    return packs, problems


_PACK_NAME = re.compile(r"\.?(?P<sender>[a-z0-9][a-z0-9._-]*)-\d{8}T\d{6}-[0-9a-f]{12}-v\d{3}\.hpk(\.part)?\Z")


def _supersede(folder: str, sender: str, keep: list[str]) -> None:
    """Remove this sender's older packs and abandoned .part files from folder
    (matched on the whole sender id: school-1 must not take school-1-a's packs)."""
    try:
        names_ = os.listdir(folder)
    except FileNotFoundError:
        return
    keep_names = {os.path.basename(p) for p in keep}
    for n in names_:
        m = _PACK_NAME.match(n)
        if m and m.group("sender") == sender and n not in keep_names:
            _unlink(os.path.join(folder, n))
    durable.fsync_dir(folder)


def _remove_imported(path: str) -> None:
    try:
        os.unlink(path)
        durable.fsync_dir(os.path.dirname(path))
    except OSError as exc:
        # A read-only stick: the pack stays; it is recognised and skipped next time.
        log.info("could not remove %s after import: %s", path, exc.strerror)


def _real_dir(path: str) -> None:
    """Create path if needed and make sure it is a real folder: a stick may carry a
    symbolic link named like our folders, pointing anywhere on this server."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno == errno.EROFS:
            pass
        else:
            raise StoreError(f"{path}: cannot create the sync folder ({exc.strerror})") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: cannot create the sync folder (read-only stick?)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: is not a folder (a link or a file where the sync folder should be)")

"""A visit of a stick: what the daemon does with a stick it finds mounted and
what `harmonicctl exchange DIR` does with a folder, in one place.

The order (RELIABILITY.md §3.6, "Packs on a stick"):

1. Whose stick: a stick without ``HARMONIC/`` is written to only with consent
   (a person typing `exchange DIR`, or ``[media] adopt_blank``); otherwise
   NotPrepared, and nothing is written.
2. Import: the packs addressed to this server (``to-master/`` on the master,
   ``to-<id>/`` and ``to-everyone/`` on a school). Each is verified whole
   before anything is applied (services/exchange.py).
3. Export within the room the stick has: its free space less a margin
   (``[media] free_margin``) and a little for the receipt. What does not fit
   is left out, most useful first (core/diff.py's order) and goes next trip:
   the receiver keeps what arrived and lists it in its next request, so
   nothing is sent twice. On the master each answer is the one online sync
   makes (services/shared.py): the shared packs of the collections for
   everyone, copied whole from ``STATE/shared/`` (built once for every school
   at the same release, ahead by shared.prepare), then a small pack for the
   school alone; a shared pack not built yet, or that does not fit whole, is
   replaced by the school's own plan, of which what fits goes. The room is shared fairly
   between the schools answered (water-filling: a school that needs less than
   an equal share takes what it needs, the others split the rest); then, if
   the latest releases for every school fit whole, they go to
   ``to-everyone/`` (packs with no recipient: the shared packs of the whole
   releases when built), so a school that left no request on this stick is
   brought up to date too. A school server with an upstream relays for the
   other schools whose requests are on the stick (services/relay.py).
4. ``syncfs``, then every file written is read back with its cached pages
   dropped and checked against the hash taken while it was written: a stick
   that does not keep what it was given (fake capacity, failing flash) is
   caught here, its bad files removed, and the visit fails (StickUnreliable).
5. The receipt, in plain words: for which school what was received, what was
   sent, when, and what is still waiting.

A stick that goes away (ENOTCONN from a dead FUSE mount, EIO, ENODEV) raises
StickRemoved: what was in flight is not marked done, and the next insertion
does it again. A read-only stick is imported from, then the visit fails with
"write-protected".
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from harmonicd.core.diff import Want
from harmonicd.core.pack import footer_matches
from harmonicd.errors import (
    DiskFullError,
    Misaddressed,
    NoRoom,
    NotPrepared,
    PackError,
    StickRemoved,
    StickUnreliable,
    StoreError,
    TrustError,
)
from harmonicd.services import relay, shared
from harmonicd.services.exchange import (
    MAILBOX,
    TO_MASTER,
    ExchangeReport,
    ExportResult,
    Outgoing,
    _real_dir,
    _remove_imported,
    _supersede,
    copy_pack,
    for_master,
    import_pack,
    lacking,
    least_bytes,
    list_packs,
    need_bytes,
    on_disk,
    planned,
    stored_have,
    to_folder,
    write_packs,
)
from harmonicd.services.publish import publish_changed_sources
from harmonicd.store import durable
from harmonicd.store.db import Collection
from harmonicd.store.faults import crash_point, fault_hook
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.stick")

TO_EVERYONE = "to-everyone"
# Kept free besides the margin: the receipt, the README and new folder entries.
RECEIPT_ROOM = 256 << 10

README = """Harmonic sync folder
====================

This folder carries data between school servers and the Harmonic master.
Please do not change or delete anything in it.

- to-master/        packs from school servers for the master
- to-<school>/      packs from the master for that school server
- to-everyone/      the master's latest content for every school
- RECEIPT-*.txt     what each server received and sent at its last visit

Each pack proves by itself that it is complete: if the stick is pulled out
too early, nothing is lost; the next visit simply does the work again.
"""


@dataclass
class VisitReport:
    report: ExchangeReport
    verified_files: int = 0  # pack files read back past the page cache and found as written
    verified_bytes: int = 0
    left_over: list[str] = field(default_factory=list)  # what did not fit: goes next trip, in plain words


# --------------------------------------------------------------------------- whose stick


def is_prepared(folder: str) -> bool:
    """The stick holds a HARMONIC/ folder (a real one, not a link): it is ours to write."""
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(folder, MAILBOX)).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def prepare(folder: str) -> str:
    """Make folder (a stick's top) a Harmonic mailbox: HARMONIC/ and its README.
    Returns the mailbox's path. Nothing else on the stick is touched."""
    if not os.path.isdir(folder):
        raise StoreError(f"{folder}: is not a folder")
    box = os.path.join(folder, MAILBOX)
    try:
        _real_dir(box)
        _write_readme(box)
        durable.fsync_dir(folder)
    except StoreError as exc:
        if _read_only(folder):
            raise StoreError(f"{folder}: the stick is write-protected; it cannot be prepared") from exc
        raise
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise StoreError(f"{folder}: the stick is write-protected; it cannot be prepared") from exc
        raise StoreError(f"{folder}: cannot prepare the stick ({exc.strerror})") from exc
    return box


def _write_readme(box: str) -> None:
    path = os.path.join(box, "README.txt")
    if not os.path.exists(path):
        durable.atomic_write(path, README.encode())


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextmanager
def _on_stick(during: str, box: str) -> Iterator[None]:
    """Errors of the stick itself, each as one line: gone, write-protected, other."""
    try:
        yield
    except OSError as exc:
        if exc.errno in durable.MEDIA_GONE:
            raise StickRemoved(during) from exc
        if exc.errno == errno.EROFS:
            raise StoreError(f"{box}: the stick is write-protected; nothing could be written back") from exc
        raise StoreError(f"{box}: cannot use the stick during {during} ({exc.strerror})") from exc


# --------------------------------------------------------------------------- the visit


def visit(store: Store, folder: str, progress: Callable[[int], None] | None, *, consent: bool,
          read_back: bool = True, free_margin: int | None = None,
          forward: Callable[[], str | None] | None = None,
          on_total: Callable[[int], None] | None = None) -> VisitReport:
    """Exchange with the stick (or folder) at folder; see the module's docstring.

    consent: write to a stick that holds no HARMONIC/ yet (a person typed the
    command; the daemon passes [media] adopt_blank). free_margin: bytes left
    free on the stick (None: [media] free_margin). forward: one online sync now,
    for a relaying school server. on_total: the visit's bytes for an ETA,
    first those of the packs to read, then once planned, plus the bytes to write."""
    cfg = store.cfg
    box = os.path.join(folder, MAILBOX)
    with _on_stick("import", box):
        prepared = is_prepared(folder)
    if not prepared:
        if not consent:
            raise NotPrepared(folder)
        prepare(folder)
    _real_dir(box)
    v = VisitReport(ExchangeReport())
    rep = v.report
    with _on_stick("import", box):
        answered, read, taken = _import_all(store, box, rep, progress, on_total)
    if _read_only(box):
        got = [f"{a} from {r.sender}" for r in rep.imported for a in r.applied + r.pending]
        raise StoreError(f"{box}: the stick is write-protected; "
                         + (f"what it carried was imported ({', '.join(got)}), " if got else "")
                         + "nothing could be written back")
    margin = cfg.media_free_margin if free_margin is None else free_margin
    with _on_stick("export", box):
        _write_readme(box)
        if cfg.is_master:
            _master_writes(store, box, answered, v, margin, read, progress, on_total)
        else:
            _school_writes(store, box, v, margin, read, progress, forward, on_total)
        rep.waiting = waiting(store)
        written = [p for e in rep.exported for p in e.files]
        if written:
            durable.syncfs(box)
    fault_hook("stick-synced", written)
    if written and read_back:
        with _on_stick("export", box):
            _read_back(box, v)
    with _on_stick("export", box):
        for p in taken:
            _remove_imported(p)
        write_receipt(store, box, v)
    # No garbage collection here: the teacher is waiting for "safe to remove". The
    # caller collects afterwards (the CLI at once, the daemon as its next job).
    return v


def _import_all(store: Store, box: str, rep: ExchangeReport, progress: Callable[[int], None] | None,
                on_total: Callable[[int], None] | None = None) -> tuple[set[str], int, list[str]]:
    """Import what is addressed to this server. Returns the senders answered (on
    the master: the schools whose requests were read), the bytes read, and the
    requests to remove from the stick once answered (on the master). on_total
    gets the bytes of the packs to read first (the ETA of a long import)."""
    cfg = store.cfg
    answered: set[str] = set()
    taken: list[str] = []
    read = 0
    folders = [(TO_MASTER, True)] if cfg.is_master else [(to_folder(cfg.id), True), (TO_EVERYONE, False)]
    todo: list[tuple[str, bool, int]] = []
    for name, remove in folders:
        inbox = os.path.join(box, name)
        if os.path.lexists(inbox):
            _real_dir(inbox)
        packs, problems = list_packs(inbox)
        rep.refused += problems
        for p in packs:
            try:
                todo.append((p, remove, os.lstat(p).st_size))
            except FileNotFoundError:
                continue  # taken since the folder was listed (a folder several servers use)
    if on_total and todo:
        on_total(sum(size for _p, _r, size in todo))
    for p, remove, size in todo:
        try:
            r = import_pack(store, p, "stick", progress)
        except Misaddressed:
            continue  # another server's pack in a shared folder: left alone
        except (PackError, TrustError) as exc:
            if not os.path.lexists(p):
                # Gone since the folder was listed (its writer replaced it with a
                # newer pack, in a folder several servers use): nothing to refuse.
                continue
            # One line naming the pack and why (a release or tree check deep
            # down does not know which file it came from).
            msg = str(exc)
            rep.refused.append(msg if msg.startswith(p) else f"{p}: {msg}")
            continue
        answered.add(r.sender)
        read += size
        if not remove:
            # to-everyone/ is for every school that comes by: never removed by
            # a school, and seen once it is quietly passed over.
            if not r.duplicate:
                rep.imported.append(r)
            continue
        rep.imported.append(r)
        crash_point("pack-imported")
        if cfg.is_master:
            # A request stays on the stick until its answer is written and
            # read back: a stick pulled before then is answered again at the
            # next insertion (the request is then known, and quietly taken).
            taken.append(p)
        else:
            _remove_imported(p)
    return answered, read, taken


def _room(box: str, margin: int) -> tuple[int, int]:
    """Bytes this visit may write on the stick, and its allocation unit."""
    st = os.statvfs(box)
    block = st.f_frsize or st.f_bsize or 1
    # The margin is for the stick's other users; on a small stick, a sixteenth of it at most.
    margin = min(margin, st.f_blocks * block // 16)
    return st.f_bavail * block - margin - RECEIPT_ROOM, block


def _master_writes(store: Store, box: str, answered: set[str], v: VisitReport, margin: int, read: int,
                   progress: Callable[[int], None] | None, on_total: Callable[[int], None] | None) -> None:
    cfg = store.cfg
    schools = sorted(s for s in answered if s != cfg.id)
    # This visit's answers and broadcast replace the master's older ones (planned
    # from older requests): they go first, so that their room counts as free.
    for school in schools:
        _supersede(os.path.join(box, to_folder(school)), cfg.id, [])
    _supersede(os.path.join(box, TO_EVERYONE), cfg.id, [])
    room, block = _room(box, margin)
    # Each answer as online sync makes it (services/shared.py): the shared packs of
    # the collections for everyone, copied as they are (built once for all schools,
    # ahead by shared.prepare), then the small per-school pack.
    answers = []
    for school in schools:
        # Only shared packs built already (shared.prepare, after each publish): one
        # not there is not built now, while the teacher waits, to be copied after.
        a = shared.answer(store, school, build=False)
        wants = planned(store, a.rest)
        answers.append((_shared_bytes(a.shared.parts, block) + need_bytes(wants), school, a, wants))
    if on_total:
        on_total(read + max(0, min(room, sum(x[0] for x in answers))))
    fault_hook("stick-room", box)
    # Fair shares: the smallest answers first, each taking at most an equal share
    # of what is left, so what one does not use goes to the others.
    answers.sort(key=lambda x: (x[0], x[1]))
    for i, (need, school, a, wants) in enumerate(answers):
        share = max(0, room) // (len(answers) - i)
        res = _answer(store, box, school, a, wants, share, block, progress, v, need)
        if res is not None:
            room -= res.stick_bytes
    _broadcast(store, box, schools, room, block, progress, v)


def _shared_bytes(parts: list[shared.Part], block: int) -> int:
    return sum(p.on_disk(block) for p in parts)


def _answer(store: Store, box: str, school: str, a: shared.Answer, wants: list[Want], share: int, block: int,
            progress: Callable[[int], None] | None, v: VisitReport, need: int) -> ExportResult | None:
    """One school's answer within its share: the shared packs that fit whole, copied,
    then its own pack (acknowledgements first of all) with what fits of the rest."""
    folder = to_folder(school)
    if a.shared.parts:
        keep = on_disk(least_bytes(store, a.rest, wants), block)
        if _shared_bytes(a.shared.parts, block) + keep > share:
            # Not every shared pack fits whole: those that do go; the collections of the
            # others are planned from the school's state, most useful first, and what
            # fits of them goes (the school says what it got in its next request).
            a = shared.answer(store, school, room=share - keep, block=block, build=False)
            wants = planned(store, a.rest)
    copied = _copy_parts(a.shared.parts, os.path.join(box, folder), block, progress, ExportResult(school))
    if copied.files and not (a.rest.releases or a.rest.acks):
        # The shared packs carry all of it: a pack with nothing in it would only be
        # one more file to write, read back and import.
        v.report.exported.append(copied)
        return copied
    res = _write(store, box, folder, a.rest, wants, share - copied.stick_bytes, block, progress, v, school, need)
    if res is None:
        if not copied.files:
            return None
        v.report.exported.append(copied)
        return copied
    res.add(copied, first=True)
    return res


def _copy_parts(parts: list[shared.Part], dest: str, block: int, progress: Callable[[int], None] | None,
                res: ExportResult) -> ExportResult:
    """Shared packs copied whole into dest, each file's hash taken while copying (for
    the read-back), into res."""
    if parts:
        _real_dir(dest)
    for part in parts:
        for src, size in zip(part.files, part.sizes, strict=True):
            target = os.path.join(dest, os.path.basename(src))
            res.sums[target] = copy_pack(src, target, progress)
            res.files.append(target)
            res.bytes += size
            res.raw_bytes += size
            res.stick_bytes += on_disk(size, block)
        res.objects += part.objects
        res.releases.append(part.release)
    return res


def _broadcast(store: Store, box: str, answered: list[str], room: int, block: int,
               progress: Callable[[int], None] | None, v: VisitReport) -> None:
    """The latest releases for everyone that some enrolled school which left no
    request on this stick lacks (by what it last said it holds; a school never
    heard from lacks all), whole, into to-everyone/: packs with no recipient,
    which any school of this master may take. The shared packs of those releases
    from nothing (services/shared.py) are copied when built already; the others
    are planned into one pack. Only if everything fits whole: half a release for
    schools that did not ask is worth less than the room."""
    db = store.db
    colls = shared.for_everyone(store)
    lacked: dict[str, Collection] = {}
    for peer in db.peers("node"):
        if peer.revoked or peer.id in answered:
            continue
        held, _partial = stored_have(peer.have)
        for c in colls:
            theirs = held.get(f"{c.owner}/{c.collection}")
            if theirs is None or theirs[0] < c.seq:
                lacked[c.name] = c
    if not lacked:
        return
    parts = shared.whole_releases(store, set(lacked))
    copied = {p.collection for p in parts}
    rest = sorted((c for c in lacked.values() if c.name not in copied), key=lambda c: c.name)
    releases, roots, _known = lacking(store, rest, {})
    out = Outgoing(recipient=None, recipient_key=None, releases=releases, roots=roots, known=set(), held=set(),
                   acks=[], have={})
    wants = planned(store, out) if releases else []
    need = _shared_bytes(parts, block) + (need_bytes(wants) + on_disk(least_bytes(store, out, wants), block)
                                          if releases else 0)
    what = ", ".join([p.release for p in parts]
                     + [f"{r.name} release {r.seq}" for r in releases])
    no_room = f"for every school: {what} ({durable.mib(need)}) did not fit; not put on this stick"
    if need > room:
        v.left_over.append(no_room)
        return
    dest = os.path.join(box, TO_EVERYONE)
    res = _copy_parts(parts, dest, block, progress, ExportResult("every school"))
    if releases:
        try:
            w = write_packs(store, out, dest, progress, wants=wants, budget=room - res.stick_bytes, block=block)
        except NoRoom:
            w = None
        if w is None or w.left_objects:
            for p in res.files + (w.files if w else []):
                os.unlink(p)
            durable.fsync_dir(dest)
            v.left_over.append(no_room)
            return
        w.add(res, first=True)
        res = w
    res.recipient = "every school"
    v.report.exported.append(res)


def _school_writes(store: Store, box: str, v: VisitReport, margin: int, read: int,
                   progress: Callable[[int], None] | None, forward: Callable[[], str | None] | None,
                   on_total: Callable[[int], None] | None) -> None:
    cfg = store.cfg
    rep = v.report
    dest = os.path.join(box, TO_MASTER)
    # This server's older requests are replaced by the one written now.
    _supersede(dest, cfg.id, [])
    room, block = _room(box, margin)
    if cfg.upstream_url:
        # Online, this server answers the other schools whose requests are on the
        # stick (they have no other way); its own request could go online.
        exported, refused = relay.for_stick(store, box, max(0, room), progress, forward)
        rep.exported += exported
        rep.refused += refused
        for e in exported:
            if e.left_bytes:
                v.left_over.append(f"for {e.recipient}: {durable.mib(e.left_bytes)} more did not fit on this "
                                   "stick; it goes next trip")
        room, block = _room(box, margin)
    rep.published = publish_changed_sources(store)
    out = for_master(store)
    wants = planned(store, out)
    need = need_bytes(wants)
    if on_total:
        on_total(read + max(0, min(room, need)))
    fault_hook("stick-room", box)
    master = out.recipient or "the master"
    res = _write(store, box, TO_MASTER, out, wants, max(0, room), block, progress, v, master, need)
    if res is None and not cfg.upstream_url:
        free = max(0, room + margin + RECEIPT_ROOM)
        raise DiskFullError(
            f"{box}: the stick is full: about {durable.mib(need + 4096)} needed for {cfg.id}'s request, "
            f"{durable.mib(free)} free ({durable.mib(margin + RECEIPT_ROOM)} kept free); nothing was written"
            + ("; what it carried was imported" if rep.imported else ""))


def _write(store: Store, box: str, folder: str, out: Outgoing, wants: list[Want], budget: int, block: int,
           progress: Callable[[int], None] | None, v: VisitReport, who: str, need: int) -> ExportResult | None:
    """One recipient's pack within budget; what did not fit is noted for the receipt.
    None if not even its header fitted."""
    try:
        res = write_packs(store, out, os.path.join(box, folder), progress, wants=wants, budget=budget, block=block)
    except NoRoom:
        v.left_over.append(f"for {who}: everything ({durable.mib(need)}) did not fit on this stick; "
                           "it goes on the next trip")
        return None
    v.report.exported.append(res)
    if res.left_objects:
        what = ", ".join(res.releases) or "its data"
        v.left_over.append(f"for {who}: {durable.mib(res.left_bytes)} more of {what} did not fit on this stick "
                           f"({res.left_objects} objects); it goes on the next trip")
    return res


# --------------------------------------------------------------------------- read-back


def _read_back(box: str, v: VisitReport) -> None:
    """Read every file written back from the stick itself and check it (the
    caller ran syncfs, so every page is clean and can be dropped)."""
    bad: list[str] = []
    total = 0
    for e in v.report.exported:
        for p in list(e.files):
            total += 1
            want = e.sums.get(p)
            try:
                if want is not None:
                    got, n = durable.read_back(p)
                    ok = got == want
                else:
                    # Copied rather than written here (a relay's copy of the master's
                    # pack): checked against the pack's own footer digest.
                    ok, n = _footer_read_back(p)
            except FileNotFoundError:
                # Taken already: its receiver works on the same folder (a network
                # share) and imported it, which checked it whole.
                continue
            if ok:
                v.verified_files += 1
                v.verified_bytes += n
                continue
            log.error("read back from the stick, %s differs from what was written", p)
            bad.append(p)
            os.unlink(p)
            e.files.remove(p)
    if bad:
        durable.syncfs(box)
        names = ", ".join(os.path.basename(p) for p in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise StickUnreliable(
            f"{box}: the stick did not keep what was written ({len(bad)} of {total} pack files read back "
            f"differ: {names}; removed): fake capacity or failing stick; use another")


def _footer_read_back(path: str) -> tuple[bool, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return footer_matches(f)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the receipt


def waiting(store: Store) -> list[str]:
    """What this server still waits for, for the receipt: confirmations, the rest of
    incomplete releases, and (a relay) other schools' requests kept for the master."""
    out = relay.waiting(store) if not store.cfg.is_master else []
    for c in store.db.collections():
        if c.mode == "owned" and not store.cfg.is_master and c.seq > c.acked_seq:
            out.append(f"{c.collection} releases {c.acked_seq + 1}..{c.seq} not yet confirmed by the master")
    for row in store.db.releases(state="pending"):
        out.append(f"{row.name} release {row.seq} is incomplete; the rest comes next time")
    return out


def write_receipt(store: Store, box: str, v: VisitReport) -> None:
    """RECEIPT-<id>.txt: what this server did at this visit, for a person."""
    cfg = store.cfg
    rep = v.report
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    role = "master server" if cfg.is_master else "school server"
    lines = [f"Harmonic receipt of {cfg.id} ({role})", f"Visit: {when}", "", "Received:"]
    got = False
    for r in rep.imported:
        for a in r.applied:
            lines.append(f"  {a} from {r.sender}: now in use")
            got = True
        for a in r.pending:
            lines.append(f"  {a} from {r.sender}: kept, not yet complete")
            got = True
        for a in r.acked:
            lines.append(f"  confirmation from {r.sender} that it holds {a}")
            got = True
        for w in r.warnings:
            lines.append(f"  note: {w}")
            got = True
        if not (r.applied or r.pending or r.acked or r.warnings or r.duplicate):
            lines.append(f"  a pack from {r.sender} with nothing new ({durable.mib(r.bytes)})")
            got = True
    if not got:
        lines.append("  nothing")
    lines += ["", "Sent:"]
    for e in rep.exported:
        what = ", ".join(e.releases) or "its current state (a request)"
        lines.append(f"  to {e.recipient}: {what}; {durable.mib(e.bytes)} in {len(e.files)} pack file(s)")
    if not rep.exported:
        lines.append("  nothing")
    if v.verified_files:
        lines.append(f"  read back from the stick and checked: {v.verified_files} pack file(s), "
                     f"{durable.mib(v.verified_bytes)}")
    lines += ["", "Refused:"] + ([f"  {x}" for x in rep.refused] or ["  nothing"])
    lines += ["", "Still waiting:"] + ([f"  {x}" for x in v.left_over + rep.waiting] or ["  nothing"])
    lines.append("")
    durable.atomic_write(os.path.join(box, f"RECEIPT-{cfg.id}.txt"), "\n".join(lines).encode())


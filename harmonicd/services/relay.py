"""A relay: a school server that serves downstream school servers (a regional
relay, or a laptop standing in for the school server of a classroom).

Trust does not pass through the relay. A downstream takes from it only what
the master signed (services/exchange.py, _assess: every release verifies
against the master's key whoever signed the pack; a pack not signed by the
master carries no acknowledgement; an older release than held is a rollback
and refused). So a relay can delay, never forge or roll back.

What a relay does with a downstream's sync (its request pack, POSTed to the
relay as to the master):

- checks the pack by itself: well formed, signed by the key its header names
  (the whole pack is read to check the footer), from a valid server id,
  addressed to the master this relay trusts. Whether the sender is enrolled
  only the master knows: it checks again when the request reaches it;
- keeps it in ``relay/up/<school>/`` (the latest request per school, all its
  volumes; at most ``[relay] queue_quota`` bytes for all schools) until its
  own next sync with the master forwards it (peer/sync.py);
- answers at once from its replica: a pack it signs itself, addressed to the
  downstream's key, with the master's releases (as the master signed them)
  that the downstream lacks, planned from the request's have-state by the
  master's own planning (exchange.lacking); then the master's answer packs
  for that school that it brought back (``relay/down/<school>/``), as they
  are: they carry the acknowledgements and the collections for that school.

Files served: ``outbox/<school>/``, like the master's, so the HTTP shell
serves both alike (the master's packs are hard links of ``relay/down``).

On a stick (``for_stick``): any online school server, with or without
``server.listen``, does the same for the requests other schools left in the
stick's ``HARMONIC/to-master/``, forwarding them at once, and writes the
answers into ``HARMONIC/to-<school>/`` instead of an outbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonicd.core.ident import check_server_id
from harmonicd.core.pack import Header, PackReader
from harmonicd.core.release import decode
from harmonicd.errors import (
    CorruptPack,
    HarmonicError,
    Misaddressed,
    NoRoom,
    PackError,
    TrustError,
    UntrustedPack,
)
from harmonicd.services import enrollment
from harmonicd.services import trust as trust_mod
from harmonicd.services.exchange import (
    _PACK_NAME,
    SUFFIX,
    TO_MASTER,
    ExportResult,
    Outgoing,
    _pack_name,
    _parse_have,
    _real_dir,
    _remove_imported,
    _supersede,
    copy_pack,
    lacking,
    list_packs,
    need_bytes,
    on_disk,
    open_pack,
    planned,
    to_folder,
    write_packs,
)
from harmonicd.services.online import outbox
from harmonicd.store import durable
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

RELAY = "relay"
UP = "up"  # relay/up/<school>/: the latest request of each downstream school, for the master
DOWN = "down"  # relay/down/<school>/: the master's answer packs for that school, for the school


class QueueFull(HarmonicError):
    """The relay keeps no more requests for the master until it has forwarded some."""


def up_dir(store: Store, school: str | None = None) -> str:
    base = os.path.join(store.dir, RELAY, UP)
    return base if school is None else os.path.join(base, school)


def down_dir(store: Store, school: str) -> str:
    return os.path.join(store.dir, RELAY, DOWN, school)


@dataclass
class Answer:
    school: str
    files: list[str] = field(default_factory=list)  # the master's packs first, then the relay's own
    releases: list[str] = field(default_factory=list)
    queued: bool = False  # a new request was kept for the master
    from_master: int = 0  # of files, the master's answer packs


def check_request(store: Store, path: str) -> Header:
    """Read a downstream's request pack whole: its own signature and header.
    Raises PackError/UntrustedPack (the HTTP shell answers 403)."""
    cfg = store.cfg
    # A downstream addresses the master by the signing key it knows: any of the chain's.
    master_keys = set(store.trust_chain().signing_keys())

    def trust(h: Header) -> bytes:
        try:
            check_server_id(h.sender, exc=CorruptPack)
        except CorruptPack:
            raise UntrustedPack(f"request claims an invalid sender id {h.sender[:40]!r}") from None
        if h.recipient_key not in master_keys:
            raise Misaddressed(f"request is addressed to {h.recipient or 'another master'}, not to the master "
                               f"{cfg.id} relays for")
        if h.sender == cfg.id or h.sender_key == store.key.public:
            raise UntrustedPack(f"request claims to be from this relay ({cfg.id})")
        if h.releases and h.acks:
            raise CorruptPack("a request carries no acknowledgements")
        # The master's revocation list, as this relay last verified it: a revoked
        # school is neither queued nor answered (the master would refuse it too).
        enrollment.refuse_revoked(store, h)
        return h.sender_key

    with open_pack(path) as f:
        reader = PackReader(f, os.path.basename(path), trust)
        # Every record is read (a delta against an object the relay lacks is
        # passed over: it is the master's to resolve) so that the footer's
        # digest and signature are checked: a damaged or altered request is
        # refused here, not after a round trip to the master.
        for _rec in reader.records(lambda _oid: None, skip_unresolved=True):
            pass
        return reader.header


def enqueue(store: Store, path: str, h: Header) -> bool:
    """Keep a downstream's request (the latest per school) for the master.
    False: an older request than the one queued (a copy replayed): not kept."""
    school = h.sender
    folder = up_dir(store, school)
    os.makedirs(folder, exist_ok=True)
    name = _pack_name(school, h.created, h.pack_id, h.volume)
    mine = h.pack_id.hex()[:12]
    queued = list_packs(folder)[0]
    if any(mine not in os.path.basename(p) and _stamp(p, school) > _stamp(name, school) for p in queued):
        return False
    size = os.path.getsize(path)
    others = _queue_bytes(store, keep_school=school, keep_pack=mine)
    if others + size > store.cfg.relay_queue_quota:
        raise QueueFull(f"relay {store.cfg.id} holds {others} bytes of requests for the master, and this one "
                        f"({size} bytes) would pass [relay] queue_quota ({store.cfg.relay_queue_quota}); "
                        "try again after the relay has reached the master")
    final = os.path.join(folder, name)
    tmp = os.path.join(folder, "." + name + ".part")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.link(path, tmp)  # the request is in state/tmp, on the same file system
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    # Older requests of that school go: the newest carries all its unacknowledged data.
    for p in queued:
        if mine not in os.path.basename(p):
            os.unlink(p)
    durable.fsync_dir(folder)
    return True


def _stamp(path: str, school: str) -> str:
    """The creation time in a pack's name (``<sender>-<YYYYmmddTHHMMSS>-...``)."""
    return os.path.basename(path)[len(school) + 1:len(school) + 16]


def _queue_bytes(store: Store, keep_school: str, keep_pack: str) -> int:
    """Bytes queued for all schools, less keep_school's requests but keep_pack
    (they go when the new one is kept)."""
    total = 0
    base = up_dir(store)
    try:
        schools = os.listdir(base)
    except FileNotFoundError:
        return 0
    for s in schools:
        for p in list_packs(os.path.join(base, s))[0]:
            if s == keep_school and keep_pack not in os.path.basename(p):
                continue
            total += os.path.getsize(p)
    return total


def queued(store: Store) -> dict[str, list[str]]:
    """The requests waiting for the master: school -> its pack volumes, in order."""
    out: dict[str, list[str]] = {}
    base = up_dir(store)
    try:
        schools = sorted(os.listdir(base))
    except FileNotFoundError:
        return out
    for s in schools:
        files = list_packs(os.path.join(base, s))[0]
        if files:
            out[s] = files
    return out


def for_downstream(store: Store, h: Header) -> Outgoing:
    """The relay's own pack for a downstream school: the master's releases (from
    the replica, for every school) it lacks, by the master's planning."""
    held, partial = _parse_have(h.have if isinstance(h.have, dict) else {})
    colls = [c for c in store.db.collections() if c.mode == "replica" and c.target is None]
    releases, roots, known = lacking(store, colls, held)
    # A relay that has followed a rotation (its replica signed again by the master's
    # new key) passes the releases a downstream holds with an older signature on too.
    again, again_roots = trust_mod.resend(store, colls, held, trust_mod.have_version(h.have))
    releases += again
    roots += again_roots
    return Outgoing(recipient=h.sender, recipient_key=h.sender_key, releases=releases, roots=roots,
                    known=known, held=partial, acks=[], have={})


def answer(store: Store, request: str, progress: Callable[[int], None] | None = None) -> Answer:
    """A downstream's sync: check and queue its request, answer from the replica."""
    h = check_request(store, request)
    school = h.sender
    out = Answer(school)
    out.queued = enqueue(store, request, h)
    dest = outbox(store, school)
    os.makedirs(dest, exist_ok=True)
    res: ExportResult = write_packs(store, for_downstream(store, h), dest, progress)
    _supersede(dest, store.cfg.id, res.files)
    out.releases = res.releases
    master = _serve_down(store, school, dest)
    out.from_master = len(master)
    out.files = master + res.files
    return out


def _serve_down(store: Store, school: str, dest: str) -> list[str]:
    """The master's answer packs for school, linked into its outbox; stale links go."""
    down = down_dir(store, school)
    packs = list_packs(down)[0]
    names = {os.path.basename(p) for p in packs}
    for n in os.listdir(dest):
        p = os.path.join(dest, n)
        m = _PACK_NAME.match(n)
        if m and m.group("sender") != store.cfg.id and n.endswith(SUFFIX) and n not in names:
            os.unlink(p)
    out = []
    for p in packs:
        link = os.path.join(dest, os.path.basename(p))
        if not os.path.exists(link):
            os.link(p, link)
        out.append(link)
    return out



# --------------------------------------------------------------------------- relaying for a stick
#
# An online school server (upstream.url set) that finds on a stick other
# schools' requests (HARMONIC/to-master/, left there by offline schools on
# the stick's route) does for them what it does for a downstream's online
# sync: checks and queues each request, forwards the queue with one online
# sync at once, and writes into HARMONIC/to-<school>/ the master's answer
# packs that came back and its own answer from its replica. Trust is as for
# an online downstream: the school takes releases only as the master signed
# them and acknowledgements only from the master's own packs.

REFUSED_META = "relay.refused."  # + school: why the master refused its last forwarded request


@dataclass
class _StickRequest:
    school: str
    files: list[str]  # on the stick: every checked request volume of that school
    newest: Header  # the newest request's header: the relay answers from its have-state
    queued: list[str] = field(default_factory=list)  # the copies in relay/up that for_stick put there


def for_stick(store: Store, box: str, budget: int | None, progress: Callable[[int], None] | None,
              forward: Callable[[], str | None] | None) -> tuple[list[ExportResult], list[str]]:
    """Relay for the other schools whose requests are on the stick (box is its
    HARMONIC/ folder). Returns what was written for each school and one line
    for each request refused (naming the file and why).

    ``budget``: bytes this may write on the stick (None: no limit), shared
    between the schools; the master's packs go first (they carry the
    acknowledgements), then the relay's own. ``forward``: one online sync now
    (peer.sync.forward_now), called once if a request was queued; None or a
    failed sync leaves the requests queued here and on the stick."""
    cfg = store.cfg
    inbox = os.path.join(box, TO_MASTER)
    packs, refused = list_packs(inbox)
    scratch = os.path.join(store.dir, "tmp", f"stick-relay-{os.getpid()}-{os.urandom(4).hex()}")
    requests: dict[str, _StickRequest] = {}
    try:
        for p in packs:
            m = _PACK_NAME.match(os.path.basename(p))
            if m and m.group("sender") == cfg.id:
                continue  # this server's own request, for the master's next visit
            try:
                h, copy, full = _take_request(store, p, scratch, progress)
            except Misaddressed:
                continue  # for another master: another deployment's stick, left alone
            except (PackError, TrustError) as exc:
                if os.path.lexists(p):  # gone since listed: its school replaced it, nothing to refuse
                    refused.append(_one_line(p, exc))
                continue
            if full is not None:
                # Not kept for the master (it stays on the stick for the next
                # trip), but answered from the replica all the same.
                refused.append(_one_line(p, full))
            r = requests.get(h.sender)
            if r is None:
                r = requests[h.sender] = _StickRequest(h.sender, [], h)
            elif (h.created, h.volume) > (r.newest.created, r.newest.volume):
                r.newest = h
            r.files.append(p)
            if copy is not None:
                r.queued.append(copy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not requests:
        return [], refused
    if forward is not None and any(r.queued for r in requests.values()):
        reason = forward()
        if reason is not None:
            log.warning("relaying a stick: the master was not reached (%s); %d request(s) stay queued here "
                        "and on the stick", reason, sum(1 for r in requests.values() if r.queued))
    for r in requests.values():
        if r.queued and not any(os.path.exists(q) for q in r.queued):
            # Out of the queue: the master took it (or refused it for good):
            # the stick need not carry it on. Its school's data stays with the
            # school until the master's acknowledgement reaches it.
            why = store.db.get_meta(REFUSED_META + r.school)
            if why:
                refused.append(f"{r.files[-1]}: the master refused {r.school}'s request: {why}")
            for p in r.files:
                _remove_imported(p)
    return _answer_on_stick(store, box, list(requests.values()), budget, progress), refused


def _take_request(store: Store, path: str, scratch: str, progress: Callable[[int], None] | None
                  ) -> tuple[Header, str | None, QueueFull | None]:
    """Copy a request off the stick into the store (so that what is checked is
    what is queued, whatever the stick does next), check it and queue it.
    Returns its header, the queued copy's path (None: not kept, an older request
    than the one queued or the queue full) and the queue's refusal if full."""
    os.makedirs(scratch, exist_ok=True)
    copy = os.path.join(scratch, os.path.basename(path))
    with open_pack(path) as src, open(copy, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            if progress:
                progress(len(chunk))
    h = check_request(store, copy)
    try:
        if not enqueue(store, copy, h):
            return h, None, None
    except QueueFull as exc:
        return h, None, exc
    return h, os.path.join(up_dir(store, h.sender), _pack_name(h.sender, h.created, h.pack_id, h.volume)), None


def _one_line(path: str, exc: Exception) -> str:
    msg = str(exc)
    base = os.path.basename(path)
    for prefix in (path + ": ", base + ": "):  # check_request names the scratch copy by its base name
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return f"{path}: {msg}"


def _answer_on_stick(store: Store, box: str, requests: list[_StickRequest], budget: int | None,
                     progress: Callable[[int], None] | None) -> list[ExportResult]:
    """Each school's answer into box/to-<school>/, within budget shared evenly
    (what one school leaves unused goes to the next)."""
    st = os.statvfs(box)
    block = st.f_frsize or st.f_bsize or 1
    out = []
    left = budget
    requests = sorted(requests, key=lambda r: r.school)
    for i, r in enumerate(requests):
        share = None if left is None else max(0, left) // (len(requests) - i)
        res = _answer_one(store, box, r, share, block, progress)
        if left is not None:
            left -= res.stick_bytes
        out.append(res)
    return out


def _answer_one(store: Store, box: str, r: _StickRequest, share: int | None, block: int,
                progress: Callable[[int], None] | None) -> ExportResult:
    cfg = store.cfg
    dest = os.path.join(box, to_folder(r.school))
    _real_dir(dest)
    # The relay's older answers for that school were planned from an older
    # request: they go first, so that their room is free for this one.
    _supersede(dest, cfg.id, [])
    res = ExportResult(r.school)
    room = share
    # The master's answer packs first: they carry the acknowledgements that
    # let the school drop what the master now holds, and anything for it alone.
    # Each is copied whole or not at all: it is signed by the master as it is.
    for p in list_packs(down_dir(store, r.school))[0]:
        size = os.path.getsize(p)
        target = os.path.join(dest, os.path.basename(p))
        if os.path.exists(target) and os.path.getsize(target) == size:
            res.files.append(target)  # put there at an earlier visit, not yet taken
        elif room is None or on_disk(size, block) <= room:
            res.sums[target] = copy_pack(p, target, progress)
            res.files.append(target)
            res.bytes += size
            res.stick_bytes += on_disk(size, block)
            if room is not None:
                room -= on_disk(size, block)
        else:
            res.left_bytes += size
            log.info("relaying a stick: the master's answer pack %s for %s (%s) does not fit; it goes next trip",
                     os.path.basename(p), r.school, durable.mib(size))
            continue
        res.releases += _master_labels(p)
    mine = for_downstream(store, r.newest)
    if mine.releases:
        # What fits goes, most useful first; the school keeps a part received
        # and its next request says so (write_packs, core/diff.py).
        try:
            w = write_packs(store, mine, dest, progress, budget=room, block=block)
        except NoRoom:
            res.left_bytes += need_bytes(planned(store, mine))
        else:
            # Files after the master's packs; the replica's releases named first.
            releases = w.releases + res.releases
            res.add(w)
            res.releases = releases
    if res.left_bytes:
        log.info("relaying a stick: %s more for %s did not fit; it goes next trip", durable.mib(res.left_bytes),
                 r.school)
    return res


def _master_labels(path: str) -> list[str]:
    """What a master's answer pack carries, for the receipt (its header only:
    the school checks the pack whole when it imports it)."""
    try:
        with open_pack(path) as f:
            h = PackReader(f, path, lambda hh: hh.sender_key).header
    except PackError:
        return []
    rels = [decode(b, s).release for b, s in h.releases]
    labels = [f"{r.collection} release {r.seq} from {h.sender}" for r in rels]
    labels += [f"{h.sender}'s confirmation of {a.get('collection')} release {a.get('seq')}" for a in h.acks]
    return labels


def waiting(store: Store) -> list[str]:
    """Lines for a receipt or status: the requests this relay keeps for the master."""
    out = []
    why = store.db.get_meta("upstream.last_error")
    for school, files in queued(store).items():
        size = sum(os.path.getsize(f) for f in files)
        line = f"{school}'s request ({durable.mib(size)}) is kept here for the master"
        out.append(line + (f" (last attempt: {why})" if why else ""))
    return out

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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonicd.core.ident import check_server_id
from harmonicd.core.pack import Header, PackReader
from harmonicd.errors import CorruptPack, HarmonicError, Misaddressed, UntrustedPack
from harmonicd.services.exchange import (
    _PACK_NAME,
    SUFFIX,
    ExportResult,
    Outgoing,
    _pack_name,
    _parse_have,
    _supersede,
    lacking,
    list_packs,
    open_pack,
    write_packs,
)
from harmonicd.services.online import outbox
from harmonicd.store import durable
from harmonicd.store.store import Store

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

    def trust(h: Header) -> bytes:
        try:
            check_server_id(h.sender, exc=CorruptPack)
        except CorruptPack:
            raise UntrustedPack(f"request claims an invalid sender id {h.sender[:40]!r}") from None
        if h.recipient_key != cfg.master_key:
            raise Misaddressed(f"request is addressed to {h.recipient or 'another master'}, not to the master "
                               f"{cfg.id} relays for")
        if h.sender == cfg.id or h.sender_key == store.key.public:
            raise UntrustedPack(f"request claims to be from this relay ({cfg.id})")
        if h.releases and h.acks:
            raise CorruptPack("a request carries no acknowledgements")
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


def for_stick(store: Store, box: str, budget: int | None, progress: Callable[[int], None] | None,
              forward: Callable[[], str | None] | None) -> tuple[list[ExportResult], list[str]]:
    """Relay on a stick: other schools' requests in box/to-master, forwarded and
    answered. (Stub: the real one follows.)"""
    return [], []

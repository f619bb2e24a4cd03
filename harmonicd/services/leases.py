"""Anti-theft leases: issuing them (master), serving them and keeping the clock
honest (school). The lease format is core/lease.py; docs/leases.md says what a
laptop asks for and what it gets.

Master: ``issue`` signs one lease per laptop of a school into
``STATE/leases/<school>/<SERIAL>.lease`` and publishes that folder as the
school's collection ``leases`` (local name ``leases@<school>``), which the
normal sync carries, online or by stick. The serials issued are kept in the
``leases`` table, so ``renew`` can issue them again (a cron job, or after a
key rotation) without the list.

School: the ``leases`` replica is deployed like any other; ``serve`` hands one
laptop its lease (the HTTP route ``GET /v1/lease/SERIAL``) after checking it
with the master's current key, for this school, against the effective time.

The clock: a school server often has a wrong clock (no RTC battery, a BIOS
reset). Each verified time the master signed (the creation time of a pack it
signed, of each release it signed) raises the school's *clock floor*, kept in
state.db (meta ``clock.floor``) and never lowered; leases are judged at
``max(system clock, floor)``. Setting the clock back therefore cannot revive
an expired lease. A system clock behind the floor, or far from the master's
at an online sync with the master itself, is reported (status, a log line),
never taken as a reason to accept anything.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harmonicd.core import lease as core
from harmonicd.core.ident import check_school_id
from harmonicd.errors import LeaseError, UsageError
from harmonicd.store.store import Store

if TYPE_CHECKING:
    from harmonicd.services.exchange import ImportResult

log = logging.getLogger("harmonicd.leases")

COLLECTION = "leases"
FOLDER = "leases"  # master: STATE/leases/<school>/ is the source folder of leases@<school>
FLOOR = "clock.floor"  # meta: the newest master-signed time verified (unix seconds)
OFFSET = "clock.master_offset"  # meta: system clock minus the master's, at the last online sync with it
CHECKED = "clock.checked"  # meta: when (system clock) that was measured
# For tests only: seconds added to the system clock wherever leases read it
# (system_time below, the one place). A test cannot set the machine's clock;
# this lets one daemon or command run "with a wrong clock". Never set it on a
# real server.
TEST_CLOCK_ENV = "HARMONICD_TEST_CLOCK_OFFSET"
DEFAULT_DAYS = 30


def system_time() -> int:
    """The system clock, as leases see it (with the test-only offset, if set)."""
    offset = os.environ.get(TEST_CLOCK_ENV)
    return int(time.time()) + (int(offset) if offset else 0)


# --------------------------------------------------------------------------- the clock floor


def floor(store: Store) -> int | None:
    v = store.db.get_meta(FLOOR)
    return int(v) if v else None


def now(store: Store) -> int:
    """The effective time: what leases are judged against on this server."""
    return core.effective_time(system_time(), floor(store))


def raise_floor(store: Store, signed_times: Iterable[int], where: str) -> None:
    """Within the import's transaction: the times the master signed in a pack just
    verified raise the floor (never lower it). Logs when the system clock is
    behind the new floor by more than the tolerance."""
    new = max(signed_times, default=None)
    old = floor(store)
    if new is None or (old is not None and new <= old) or not 0 < new < 1 << 40:
        return
    store.db.set_meta(FLOOR, str(new))
    system = system_time()
    if new - system > store.cfg.clock_tolerance:
        log.warning("clock: %s", core.clock_warning(system, new, None, int(store.cfg.clock_tolerance)))


def note_online_answer(store: Store, results: list[ImportResult], asked: int, answered: int) -> None:
    """After an online sync: the master's own per-school pack was written while we
    waited for the answer (between ``asked`` and ``answered``, by our clock), so
    its signed creation time shows how far our clock is from the master's. Only
    when the answer came from the master itself: a relay passes on the master's
    packs, written at some earlier time."""
    master = next(iter(store.db.peers("master")), None)
    if master is None or not results or any(r.sender != master.id for r in results):
        return
    times = [r.master_time for r in results if r.master_time is not None]
    if not times:
        return
    m = max(times)
    offset = asked - m if m < asked else answered - m if m > answered else 0
    with store.db.tx():
        store.db.set_meta(OFFSET, str(offset))
        store.db.set_meta(CHECKED, str(answered))
    if abs(offset) > store.cfg.clock_tolerance:
        log.warning("clock: %s", core.clock_warning(answered, None, offset, int(store.cfg.clock_tolerance)))


def clock_status(store: Store) -> dict[str, Any]:
    db = store.db
    system = system_time()
    fl = floor(store)
    off = db.get_meta(OFFSET)
    checked = db.get_meta(CHECKED)
    offset = int(off) if off else None
    return {
        "system": core.iso(system),
        "floor": core.iso(fl) if fl is not None else None,
        "effective": core.iso(core.effective_time(system, fl)),
        "master_offset_seconds": offset,
        "checked": core.iso(int(checked)) if checked else None,
        "tolerance_seconds": int(store.cfg.clock_tolerance),
        "warning": core.clock_warning(system, fl, offset, int(store.cfg.clock_tolerance)),
    }


# --------------------------------------------------------------------------- master: issuing


@dataclass
class Issued:
    school: str
    laptops: int
    not_before: int
    expires: int
    seq: int  # the leases release that carries them


def lease_dir(store: Store, school: str) -> str:
    return os.path.join(store.dir, FOLDER, school)


def key_version(store: Store) -> int:
    """The version of the master's current signing key in its key chain (0: the
    key schools pin), named in each lease so a laptop knows which key signed it."""
    return store.trust_chain().version


def issue(store: Store, school: str, serials: list[str] | None, days: int = DEFAULT_DAYS) -> Issued:
    """Master: sign a lease for each laptop of school, valid for ``days`` days from
    now, and publish them as leases@school. ``serials`` None: the laptops issued
    for last time (a renewal)."""
    from harmonicd.services.publish import publish

    cfg = store.cfg
    if not cfg.is_master:
        raise UsageError("leases are issued by the master; a school server serves them (GET /v1/lease/SERIAL)")
    check_school_id(school)
    peer = store.db.peer(school)
    if peer is None or peer.role != "node":
        raise UsageError(f"{school}: no enrolled school server with that id")
    if peer.revoked:
        raise UsageError(f"{school}: its enrollment was revoked; no lease is issued for it")
    if serials is None:
        serials = [r[0] for r in store.db.leases_issued(school)]
        if not serials:
            raise UsageError(f"{school}: no laptop was issued a lease yet; give the list with --serials FILE")
    t = system_time()
    signed = core.issue(serials, school, cfg.id, t, days, store.key, key_version(store))
    folder = lease_dir(store, school)
    _write_folder(folder, {core.file_name(s.lease.serial): s.encode() for s in signed})
    seq, _changed = publish(store, COLLECTION, folder, school)
    with store.db.tx():
        store.db.replace_leases(school, [(s.lease.serial, s.lease.not_before, s.lease.expires, s.lease.issued)
                                         for s in signed])
    log.info("issued %d leases for %s, valid until %s (leases release %d)", len(signed), school,
             core.iso(t + days * core.DAY), seq)
    return Issued(school, len(signed), t - core.NOT_BEFORE_GRACE, t + days * core.DAY, seq)


def renew(store: Store, schools: list[str] | None, days: int | None = None) -> list[Issued]:
    """Master: issue again the leases of the schools named (None: every school that
    has any), for the same laptops, from now; for ``days`` days, or (None) for
    as long as each school's last ones were issued for."""
    if schools is None:
        if not store.db.lease_schools():
            raise UsageError("no school has leases yet: `harmonicctl lease issue SCHOOL --serials FILE` first")
        schools = _renewable(store)
    return [issue(store, s, None, days or _period_days(store, s)) for s in schools]


def _period_days(store: Store, school: str) -> int:
    rows = store.db.leases_issued(school)
    if not rows:
        return DEFAULT_DAYS
    _serial, _nb, expires, issued = rows[0]
    return max(1, min(core.MAX_DAYS, round((expires - issued) / core.DAY)))


def due(store: Store) -> list[str]:
    """Master: the schools whose leases are past half their time. The daemon
    renews them (renew_due), so a school that syncs, or whose stick comes by,
    at least every half period never has a laptop lock: nobody has to remember
    a renewal."""
    t = system_time()
    out = []
    for school in _renewable(store):
        rows = store.db.leases_issued(school)
        if rows and min(r[2] for r in rows) - t < (rows[0][2] - rows[0][3]) / 2:
            out.append(school)
    return out


def _renewable(store: Store) -> list[str]:
    """Schools with leases, but not those revoked: a stolen server's leases run out."""
    out = []
    for school in store.db.lease_schools():
        peer = store.db.peer(school)
        if peer is not None and not peer.revoked:
            out.append(school)
    return out


def renew_due(store: Store) -> list[Issued]:
    schools = due(store)
    return renew(store, schools) if schools else []


def _write_folder(folder: str, files: dict[str, bytes]) -> None:
    """Make folder hold exactly these files. Not flushed: the release published
    from it is the durable copy (and `lease issue` rewrites the folder whole)."""
    os.makedirs(folder, mode=0o750, exist_ok=True)
    for entry in os.listdir(folder):
        if entry not in files:
            p = os.path.join(folder, entry)
            if stat.S_ISDIR(os.lstat(p).st_mode):
                raise UsageError(f"{p}: a folder where only lease files belong; move it away")
            os.unlink(p)
    for name, data in files.items():
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, name))


def school_summary(store: Store, school: str, held_seq: int) -> dict[str, Any] | None:
    """Master status: the leases last issued for a school and whether it holds them."""
    rows = store.db.leases_issued(school)
    if not rows:
        return None
    coll = store.db.collection(f"{COLLECTION}@{school}")
    return {"laptops": len(rows), "until": core.iso(min(r[2] for r in rows)),
            "seq": coll.seq if coll else 0, "held": coll is not None and held_seq >= coll.seq}


# --------------------------------------------------------------------------- school: serving


def _replica(store: Store) -> str | None:
    """The deployed folder of this school's leases, or None."""
    c = store.db.collection(COLLECTION)
    if c is None or c.mode != "replica" or c.root is None or not c.path:
        return None
    return c.path


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LeaseError(f"{path}: not a regular file", "invalid")
        return f.read(core.MAX_FILE + 1)


def serve(store: Store, serial: str) -> bytes:
    """A laptop's lease file as a school serves it: raises LeaseError (with its
    reason) unless it is the master's, for this school and laptop, valid now."""
    cfg = store.cfg
    core.check_serial(serial)
    if cfg.is_master:
        raise LeaseError("the master does not hand out leases: a laptop asks its school server", "none")
    folder = _replica(store)
    if folder is None:
        raise LeaseError(f"{cfg.id} holds no leases yet (the master publishes them; they come with the next sync "
                         "or stick)", "none")
    where = f"lease of {serial}"
    try:
        data = _read(os.path.join(folder, core.file_name(serial)))
    except FileNotFoundError:
        raise LeaseError(f"no lease for laptop {serial} at {cfg.id}", "unknown") from None
    except OSError as exc:
        raise LeaseError(f"{where}: cannot be read ({exc.strerror})", "invalid") from None
    key = store.master_key()
    assert key is not None  # a school pins the master's key (config)
    core.check(data, key, now(store), school=cfg.id, serial=serial, where=where)
    return data


def school_status(store: Store) -> dict[str, Any] | None:
    """School status: how many laptops hold a lease valid now, and until when."""
    folder = _replica(store)
    coll = store.db.collection(COLLECTION)
    if folder is None or coll is None:
        return None
    key = store.master_key()
    assert key is not None
    t = now(store)
    valid: list[int] = []
    counts = {"expired": 0, "not_yet_valid": 0, "refused": 0}
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        entries = []
    for name in entries:
        if not name.endswith(core.SUFFIX):
            continue
        serial = name[: -len(core.SUFFIX)]
        try:
            sl = core.check(_read(os.path.join(folder, name)), key, t, school=store.cfg.id, serial=serial,
                            where=name)
        except LeaseError as exc:
            counts[{"expired": "expired", "not-yet-valid": "not_yet_valid"}.get(exc.reason, "refused")] += 1
            continue
        except OSError:
            counts["refused"] += 1
            continue
        valid.append(sl.lease.expires)
    warn_days = store.cfg.lease_warn_days
    until = min(valid) if valid else None
    warning = None
    if not valid:
        warning = (f"no valid lease for any laptop ({counts['expired']} expired, {counts['refused']} refused): "
                   "laptops will lock; sync with the master online or by stick")
    elif until is not None and until - t < warn_days * core.DAY:
        warning = (f"leases for {len(valid)} laptops run out in {_days(until - t)} ({core.iso(until)}): "
                   "renew by sync or stick")
    elif counts["expired"] or counts["refused"]:
        warning = (f"{counts['expired']} expired and {counts['refused']} refused lease file(s) in {folder}: "
                   "those laptops get no lease")
    return {"seq": coll.seq, "path": folder, "laptops": len(valid),
            "valid_until": core.iso(until) if until is not None else None,
            "last_until": core.iso(max(valid)) if valid else None,
            **counts, "warn_days": warn_days, "warning": warning}


def _days(seconds: int) -> str:
    d = seconds / core.DAY
    return f"{d:.1f} days" if d < 10 else f"{int(d)} days"

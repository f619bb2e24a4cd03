"""A school's online sync job: the request pack up, the answer's packs down.

Runs in the job runner's worker thread with the store's lock held; the
daemon's `sync` command and its timer both end here.

A relay (a school server with ``server.listen``, serving downstream schools,
services/relay.py) then forwards what its downstream schools asked for: each
queued request goes to the master as it came (signed by its school), and the
master's answer packs for that school (the per-school ones: the shared ones
the relay serves from its own replica) come back into ``relay/down/<school>/``
for the school's next sync. A relay that cannot reach the master keeps the
queue and goes on serving from its replica. Any online school that took
other schools' requests off a stick (services/relay.py, for_stick) forwards
them the same way, at once (forward_now) and at its next sync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from harmonicd.config import AUTO_UPSTREAM
from harmonicd.errors import HarmonicError, PackError, TrustError
from harmonicd.jobs import Outcome
from harmonicd.peer import UpstreamError, client
from harmonicd.services import leases, relay
from harmonicd.services.exchange import ImportResult
from harmonicd.services.online import downloads, make_request, record_upstream, take_answer
from harmonicd.store import durable
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")


def upstream_url(store: Store) -> str:
    """upstream.url, or with "auto" the server found on the LAN now (mDNS),
    remembered for status."""
    url = store.cfg.upstream_url
    if url != AUTO_UPSTREAM:
        return url
    from harmonicd.peer import mdns

    try:
        found = mdns.discover(store)
    except UpstreamError as exc:
        record_upstream(store, exc.reachable, str(exc), exc.reason)
        raise
    with store.db.tx():
        store.db.set_meta("upstream.found", f"{found.url} ({found.id}, {found.role})")
    log.info("upstream.url auto: using %s %s at %s", found.role, found.id, found.url)
    return found.url


def sync_online(store: Store, progress: Callable[[int], None]) -> Outcome:
    """One online sync: the request pack up, the answer's packs down (resumed
    where a cut download stopped), applied as from a stick."""
    url = upstream_url(store)
    folder = os.path.join(store.dir, "tmp", f"request-{os.getpid()}-{os.urandom(4).hex()}")
    earlier: list[ImportResult] = []
    rate, wait, tls = store.cfg.rate_limit, store.cfg.sync_timeout, client.tls_context(store.cfg.ca_file)
    try:
        # What a cut link left half-downloaded is finished first (Range), not asked for again.
        earlier = _take(store, client.resume_pending(url, downloads(store), progress, rate, wait, tls), progress)
    except UpstreamError as exc:
        record_upstream(store, exc.reachable, str(exc), exc.reason)
        raise
    try:
        req = make_request(store, folder)
        try:
            packs: list[dict[str, Any]] = []
            asked = answered = 0
            for f in req.files:
                asked = leases.system_time()
                packs = client.post_request(url, f, rate, wait, tls)
                answered = leases.system_time()
            paths = [client.download(url, p, downloads(store), progress, rate, wait, tls) for p in packs]
        except UpstreamError as exc:
            record_upstream(store, exc.reachable, str(exc), exc.reason)
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fresh = _take(store, paths, progress)
    results = earlier + fresh
    record_upstream(store, True, None)
    # The master's answer was written while we waited: how far is our clock from its?
    leases.note_online_answer(store, fresh, asked, answered)
    received = [f"{a} from {r.sender}" for r in results for a in r.applied]
    acked = [f"{r.sender} confirmed {a}" for r in results for a in r.acked]
    data: dict[str, Any] = {"received": received, "acked": acked,
                            "published": [f"{n} release {s}" for n, s in req.published]}
    what = "; ".join(received + acked) or "nothing new"
    # A relay forwards its downstream schools' requests; so does any online
    # school that took other schools' requests off a stick (relay.for_stick).
    if store.cfg.listen or relay.queued(store):
        fw = forward(store, url, progress)
        data["forwarded"] = fw
        if fw:
            what += f"; forwarded {len(fw)} downstream request(s): {', '.join(fw)}"
    return Outcome(f"synced with {url}: {what}", data)


def _take(store: Store, paths: list[str], progress: Callable[[int], None]) -> list[ImportResult]:
    """Apply downloaded answer packs; a refused one (a relay's forgery or rollback,
    a damaged pack) fails the sync with its reason in status, and what was
    downloaded with it is dropped: the next sync asks again."""
    try:
        return take_answer(store, paths, progress)
    except (PackError, TrustError) as exc:
        msg = str(exc)
        # The one line for status: the reason, not the name of a temporary download.
        for p in paths:
            if msg.startswith(p + ": "):
                msg = msg[len(p) + 2:]
        record_upstream(store, True, f"refused what the upstream sent: {msg}", "untrusted")
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise type(exc)(f"refused what the upstream sent: {msg}") from None


def forward(store: Store, url: str, progress: Callable[[int], None]) -> list[str]:
    """Relay: each downstream school's queued request to the master, and the
    master's per-school answer back into relay/down/<school>/. Returns the
    schools answered. A request the master refuses (not enrolled, a copy) is
    dropped with a warning; an unreachable master keeps the queue (raised)."""
    rate, wait, tls = store.cfg.rate_limit, store.cfg.sync_timeout, client.tls_context(store.cfg.ca_file)
    done = []
    for school, files in relay.queued(store).items():
        down = relay.down_dir(store, school)
        try:
            # The last answer's downloads that a cut link stopped, finished first.
            client.resume_pending(url, down, progress, rate, wait, tls)
            packs: list[dict[str, Any]] = []
            for f in files:
                packs = client.post_request(url, f, rate, wait, tls)
        except UpstreamError as exc:
            if exc.reachable and exc.reason == "refused-by-server":
                log.warning("the master refused %s's request that this relay forwarded: %s", school, exc)
                with store.db.tx():  # for the receipt of the stick that carried it (relay.for_stick)
                    store.db.set_meta(relay.REFUSED_META + school, str(exc))
                _drop(files)
                continue
            record_upstream(store, exc.reachable, f"forwarding {school}'s request: {exc}", exc.reason)
            raise
        # Answered: the request leaves the queue now. If a download below is cut,
        # its .json sidecar lets the next forward finish it; the school's data
        # stays with the school until the master's acknowledgement reaches it.
        _drop(files)
        if store.db.get_meta(relay.REFUSED_META + school):
            with store.db.tx():
                store.db.set_meta(relay.REFUSED_META + school, "")
        mine = [p for p in packs if not p.get("shared")]
        try:
            got = [client.download(url, p, down, progress, rate, wait, tls) for p in mine]
        except UpstreamError as exc:
            record_upstream(store, exc.reachable, f"forwarding {school}'s answer: {exc}", exc.reason)
            raise
        _supersede_down(down, got)
        done.append(school)
    return done


def _drop(files: list[str]) -> None:
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
    if files:
        durable.fsync_dir(os.path.dirname(files[0]))


def _supersede_down(folder: str, keep: list[str]) -> None:
    """The master's newest answer for a school replaces the one before (each
    answer is planned from the master's whole state: nothing is lost)."""
    names = {os.path.basename(p) for p in keep}
    for n in os.listdir(folder):
        if n.endswith(".hpk") and n not in names:
            os.unlink(os.path.join(folder, n))
    durable.fsync_dir(folder)


def forward_now(store: Store, progress: Callable[[int], None] | None = None) -> str | None:
    """One online sync now, as sync_online (the queue of other schools'
    requests forwarded with it): None when it worked, else the one-line reason
    (also in status, as for any sync). For a stick's visit, which goes on
    without the master: what is queued stays queued."""
    if not store.cfg.upstream_url:
        return "no upstream.url is set"
    try:
        out = sync_online(store, progress or (lambda _n: None))
    except HarmonicError as exc:
        return str(exc)
    log.info("%s", out.summary)
    return None

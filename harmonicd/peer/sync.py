"""A school's online sync job: the request pack up, the answer's packs down.

Runs in the job runner's worker thread with the store's lock held; the
daemon's `sync` command and its timer both end here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from harmonicd.jobs import Outcome
from harmonicd.peer import UpstreamError, client
from harmonicd.services.exchange import ImportResult
from harmonicd.services.online import downloads, make_request, record_upstream, take_answer
from harmonicd.store.store import Store


def sync_online(store: Store, progress: Callable[[int], None]) -> Outcome:
    """One online sync: the request pack up, the answer's packs down (resumed
    where a cut download stopped), applied as from a stick."""
    url = store.cfg.upstream_url
    folder = os.path.join(store.dir, "tmp", f"request-{os.getpid()}-{os.urandom(4).hex()}")
    earlier: list[ImportResult] = []
    try:
        # What a cut link left half-downloaded is finished first (Range), not asked for again.
        rate, wait = store.cfg.rate_limit, store.cfg.sync_timeout
        earlier = take_answer(store, client.resume_pending(url, downloads(store), progress, rate, wait), progress)
    except UpstreamError as exc:
        record_upstream(store, exc.reachable, str(exc), exc.reason)
        raise
    try:
        req = make_request(store, folder)
        try:
            packs: list[dict[str, Any]] = []
            for f in req.files:
                packs = client.post_request(url, f, rate, wait)
            paths = [client.download(url, p, downloads(store), progress, rate, wait) for p in packs]
        except UpstreamError as exc:
            record_upstream(store, exc.reachable, str(exc), exc.reason)
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = earlier + take_answer(store, paths, progress)
    record_upstream(store, True, None)
    received = [f"{a} from {r.sender}" for r in results for a in r.applied]
    acked = [f"{r.sender} confirmed {a}" for r in results for a in r.acked]
    data = {"received": received, "acked": acked, "published": [f"{n} release {s}" for n, s in req.published]}
    what = "; ".join(received + acked) or "nothing new"
    return Outcome(f"synced with {url}: {what}", data)

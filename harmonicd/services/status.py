"""The status model: what `harmonicctl status` shows and `--json` prints."""

from __future__ import annotations

import time
from typing import Any

from harmonicd import __version__
from harmonicd.services import leases
from harmonicd.store.store import Store


def _iso(ts: int | None) -> str | None:
    return None if not ts else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def status(store: Store, store_size: dict[str, int] | None = None) -> dict[str, Any]:
    """The status model; ``store_size`` given by a caller that keeps it (the
    daemon, which refreshes it now and then)."""
    from harmonicd.services.publish import over_quota, unacked_bytes

    cfg = store.cfg
    db = store.db
    master = next(iter(db.peers("master")), None)
    colls = []
    for c in db.collections():
        row = db.release(c.name, c.seq) if c.seq else None
        pending = sum(r.size for r in db.releases(c.name) if r.state == "pending") + unacked_bytes(store, c.name)
        owner = c.owner
        if owner == "master" and master is not None:
            owner = master.id
        colls.append({
            "name": c.name,
            "owner": owner,
            "seq": c.seq,
            "root": c.root.hex() if c.root else None,
            "path": c.source if c.mode == "owned" else c.path,
            "pending_bytes": pending,
            "mode": c.mode,
            "for": c.target,
            "size": row.size if row else 0,
            "released": _iso(row.received) if row else None,
            "acked_seq": c.acked_seq if c.mode == "owned" and not cfg.is_master else None,
        })
    out: dict[str, Any] = {
        "id": cfg.id,
        "role": cfg.role,
        "version": __version__,
        "daemon": False,
        "collections": colls,
        "upstream": None,
        "activity": None,
    }
    if not cfg.is_master:
        if cfg.upstream_url:
            # reachable: only the daemon, which tries, says (INTERFACE.md).
            out["upstream"] = {"url": cfg.upstream_url, "reachable": None,
                               "last_sync": db.get_meta("upstream.last_sync"),
                               "last_error": db.get_meta("upstream.last_error") or None,
                               "reason": db.get_meta("upstream.reason") or None}
        out["pending_quota"] = {"limit_bytes": cfg.pending_quota,
                                "used_bytes": sum(unacked_bytes(store, n) for n in cfg.sources),
                                "exceeded": over_quota(store)}
        out["master"] = {"id": master.id if master else None,
                         "last_seen": _iso(master.last_seen) if master else None,
                         "how": master.last_how if master else None}
        # Set up from a bundle, and the master has not answered it yet (services/enrollment.py).
        out["enrolling"] = bool(db.get_meta("enroll.token"))
        # The laptops' anti-theft leases this school serves, and the clock they are judged by.
        out["leases"] = leases.school_status(store)
        out["clock"] = leases.clock_status(store)
    else:
        out["schools"] = _schools(store)
        out["bundles"] = _bundles(store)
    out["store"] = store_size if store_size is not None else store_size_of(store)
    return out


def _schools(store: Store) -> list[dict[str, Any]]:
    from harmonicd.services.exchange import stored_have

    db = store.db
    rows = []
    for p in db.peers("node"):
        held: dict[str, Any] = {k: v[0] for k, v in stored_have(p.have)[0].items()}
        waiting = 0
        for c in db.collections():
            if (c.mode == "owned" and c.root is not None and c.target in (None, p.id)
                    and held.get(f"{c.owner}/{c.collection}", 0) < c.seq):
                row = db.release(c.name, c.seq)
                waiting += row.size if row else 0
        data = {c.collection: c.seq for c in db.collections() if c.mode == "archive" and c.owner == p.id}
        rows.append({"id": p.id, "last_seen": _iso(p.last_seen), "how": p.last_how,
                     "revoked": bool(p.revoked), "holds": held, "sent": data, "waiting_bytes": waiting,
                     "leases": leases.school_summary(store, p.id, held.get(f"{store.cfg.id}/leases", 0))})
    return rows


def _bundles(store: Store) -> list[dict[str, Any]]:
    """Master: the bootstrap bundles still waiting to be used (not expired, not
    withdrawn, enrollments left): which schools are on their way."""
    db = store.db
    now = int(time.time())
    out = []
    for t in db.tokens():
        used = len(db.token_uses(t.id))
        if t.withdrawn or t.expires <= now or used >= t.count:
            continue
        out.append({"token": t.id.hex()[:8], "school": t.school, "prefix": t.prefix, "used": used,
                    "count": t.count, "expires": _iso(t.expires)})
    return out


def store_size_of(store: Store) -> dict[str, int]:
    n, total = store.objects.totals()
    return {"objects": n, "bytes": total}

"""Online sync, transport-free: the same packs a stick carries, exchanged over HTTP.

DESIGN.md's "one protocol, two transports": a school's request online is the
pack it would write into ``to-master/`` on a stick (its have-state and its
own new releases, signed by its key); the master answers with the pack it
would write into ``to-<school>/``. Both sides decide and apply through
services/exchange.py, so what is sent and what is accepted cannot differ
between the two. The HTTP shell (harmonicd/peer/) only moves files.

The master keeps each school's latest answer in ``outbox/<school>/`` until
the next sync replaces it, so a school whose link drops mid-download takes
the rest with a Range request instead of asking again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonicd.errors import PackError, ReplayedRequest, StoreError
from harmonicd.services import shared
from harmonicd.services.exchange import (
    ExportResult,
    ImportResult,
    _supersede,
    for_master,
    import_pack,
    write_packs,
)
from harmonicd.services.publish import publish_changed_sources
from harmonicd.store.store import Store

OUTBOX = "outbox"  # master: state/outbox/<school>/ holds the latest answer for each school
DOWNLOADS = "online"  # school: state/online/ holds answers being downloaded


def outbox(store: Store, school: str) -> str:
    return os.path.join(store.dir, OUTBOX, school)


def downloads(store: Store) -> str:
    return os.path.join(store.dir, DOWNLOADS)


@dataclass
class Request:
    files: list[str]
    published: list[tuple[str, int]] = field(default_factory=list)


def make_request(store: Store, folder: str) -> Request:
    """School: publish what changed, then write the request pack into folder."""
    published = publish_changed_sources(store)
    os.makedirs(folder, exist_ok=True)
    res = write_packs(store, for_master(store), folder)
    return Request(res.files, published)


def answer(store: Store, request: str,
           progress: Callable[[int], None] | None = None) -> tuple[ImportResult, ExportResult]:
    """Master: take a school's request pack (verified exactly as one from a stick;
    a pack from anyone but an enrolled school is refused there) and write the
    answer into the school's outbox.

    The answer's files: first the shared packs (STATE/shared/, services/shared.py)
    of the collections for everyone it lacks, built once for all schools at the
    same release; then the per-school pack (acknowledgements, collections for
    this school alone, anything planned from its unfinished releases)."""
    got = import_pack(store, request, "online", progress)
    if got.duplicate:
        # A school makes a new request pack for every sync (a retry too): the same
        # pack id again is a copy, and the answer is not for whoever sent it.
        raise ReplayedRequest(f"this request pack ({got.sender}) was answered before; a copy is not "
                              "answered again (each sync sends a new one)")
    peer = store.db.peer(got.sender)
    if peer is None or peer.role != "node":
        raise PackError(f"{os.path.basename(request)}: not from an enrolled school server")
    plan = shared.answer(store, got.sender, progress)
    dest = outbox(store, got.sender)
    os.makedirs(dest, exist_ok=True)
    res = write_packs(store, plan.rest, dest, progress)
    _supersede(dest, store.cfg.id, res.files)
    res.files = plan.shared.files + res.files
    res.releases = plan.shared.releases + res.releases
    return got, res


def take_answer(store: Store, paths: list[str],
                progress: Callable[[int], None] | None = None) -> list[ImportResult]:
    """School: apply the master's answer (downloaded, whole); each file is removed
    once what it carried is stored."""
    out = []
    for p in paths:
        out.append(import_pack(store, p, "online", progress))
        os.unlink(p)
    return out


def record_upstream(store: Store, reachable: bool, error: str | None, reason: str | None = None) -> None:
    """What status shows about the upstream, kept in the database so that
    `harmonicctl status` shows it without the daemon too. No error: a sync
    completed now. ``reason``: the error's code (peer.UpstreamError.reason)."""
    db = store.db
    with db.tx():
        db.set_meta("upstream.reachable", "1" if reachable else "0")
        db.set_meta("upstream.last_error", error or "")
        db.set_meta("upstream.reason", (reason or "") if error else "")
        if error is None:
            db.set_meta("upstream.last_sync", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def clean_request_folder(folder: str) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot remove {folder}: {exc.strerror}") from exc

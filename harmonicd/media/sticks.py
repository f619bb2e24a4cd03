"""Sticks as a teacher sees them: plugged in, busy, safe to remove.

One ``StickManager`` per daemon, on the event loop. It joins three sources:

- block-device uevents (media/events.py, pyudev): a stick came or went;
- the mount table (media/events.py MountWatch, /proc/self/mountinfo): the mount
  helper (media/helper.py, a separate privileged unit) mounted a stick under
  ``media.mount_base``, or a desktop did under ``media.watch``;
- the visit, a job like any other (jobs.py): import, export within the stick's
  free space, read-back, receipt (services/stick.py).

Each stick (by its kernel name, "sdb1") goes through::

    inserted -> visiting -> ejecting -> safe-to-remove -> (pulled) gone
         \\          \\-> removed-early     (pulled before "safe to remove")
          \\-> unreadable                  (the helper could not mount it)

A stick whose visit failed, or that was not prepared for Harmonic, is still
unmounted and called safe to remove: nothing of it is in use by then. The
daemon never mounts or unmounts: it asks the helper, by a file in the mount
base, to unmount what the helper mounted. A desktop's mount is flushed and
read back, then the teacher is told to pull it (or eject it on the desktop).

At most one visit per mount: a mount seen again (ten insertions in ten
seconds) is visited once per time it appears, one after the other (jobs run
one at a time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from harmonicd.activity import Activity
from harmonicd.config import Config
from harmonicd.jobs import JobRunner, Outcome
from harmonicd.media.devices import (
    Mount,
    block_device,
    eject_request,
    error_note,
    partitions,
    read_error_note,
    read_mounts,
    stick_mounts,
)
from harmonicd.media.events import BlockEvent, MountWatch, choose_source
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.media")

RESCAN_EVERY = 10.0  # seconds; the mount table is watched, this is only a safety net
UNMOUNT_WAIT = 30.0  # seconds the helper has to unmount before we say "safe" anyway (data is flushed)
FORGET_AFTER = 600.0  # seconds a stick that was pulled stays in status
SAFE_OPTIONS = frozenset({"nosuid", "nodev", "noexec"})  # a helper's mount is used only with all three
MOUNT_HINT_AFTER = 15.0  # seconds without a mount before status suggests the helper is missing

INSERTED, VISITING, EJECTING, SAFE, REMOVED_EARLY, UNREADABLE, GONE = (
    "inserted", "visiting", "ejecting", "safe-to-remove", "removed-early", "unreadable", "gone")


class EventSource(Protocol):
    source: str

    def start(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[BlockEvent], None]) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Stick:
    device: str  # kernel name: sdb1, loop3
    kind: str = ""
    state: str = INSERTED
    message: str = ""
    path: str | None = None  # where it is mounted
    ours: bool = False  # mounted by harmonicd-mount under media.mount_base (we may ask for the unmount)
    since: float = field(default_factory=time.time)
    changed: float = field(default_factory=time.time)
    summary: str = ""  # what the last visit did, in a line
    done_bytes: int = 0
    total_bytes: int | None = None
    eta_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "kind": self.kind, "state": self.state, "message": self.message,
                "path": self.path, "since": _iso(self.since), "changed": _iso(self.changed),
                "done_bytes": self.done_bytes, "total_bytes": self.total_bytes, "eta_s": self.eta_s}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StickManager:
    def __init__(self, config: Callable[[], Config], jobs: JobRunner, activity: Activity,
                 source: EventSource | None = None,
                 forward: Callable[[Store], str | None] | None = None) -> None:
        self.config = config
        self.jobs = jobs
        self.activity = activity
        self.source: EventSource | None = source
        self.forward = forward  # an online relay forwards stick requests at once (peer/sync.forward_now)
        self.mounts = MountWatch()
        self.sticks: dict[str, Stick] = {}
        self._lock = threading.Lock()  # status() runs in a status thread
        self._visited: set[tuple[str, str]] = set()  # (device, mountpoint) visited while mounted
        self._jobs: dict[str, asyncio.Future[Outcome]] = {}
        self.error: str | None = None  # why uevents are not watched, if they are not

    # -- lifetime
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.source is None:
                self.source = choose_source()
            self.source.start(loop, self.on_block_event)
        except Exception as exc:  # no netlink (a container): mounts are still watched
            self.error = f"block-device events not watched: {exc}"
            log.warning("sticks: %s; sticks are still found when mounted", self.error)
        try:
            self.mounts.start(loop, self.rescan)
        except OSError as exc:
            log.warning("sticks: the mount table is not watched (%s); looking every %g s", exc, RESCAN_EVERY)
        try:
            self.rescan()
            while True:
                await asyncio.sleep(RESCAN_EVERY)
                self.rescan()
                self._forget_old()
        finally:
            self.mounts.stop()
            if self.source is not None:
                self.source.stop()

    # -- what happens
    def on_block_event(self, ev: BlockEvent) -> None:
        cfg = self.config()
        if ev.kind not in cfg.media_devices:
            return  # an internal disk, or a kind not taken: none of our business
        if ev.action == "remove" or not ev.present:
            self._pulled(ev.name)
            return
        if partitions(ev.name):
            return  # a partitioned stick: each partition comes as its own device
        st = self.sticks.get(ev.name)
        if st is None or st.state in (GONE, REMOVED_EARLY):
            self._set(Stick(ev.name, kind=ev.kind), INSERTED, "inserted; waiting for it to be mounted")
        self.rescan()

    def rescan(self) -> None:
        """Look at the mount table: visit new stick mounts; finish ejects whose mount went."""
        cfg = self.config()
        bases = [cfg.media_mount_base, *cfg.media_watch]
        try:
            mounts = stick_mounts(read_mounts(), bases, cfg.media_devices)
        except OSError as exc:
            log.warning("sticks: cannot read the mount table: %s", exc)
            return
        by_device = {m.device: m for m in mounts if m.device}
        now_mounted = {(m.device, m.mountpoint) for m in mounts if m.device}
        # A mount that went: its next appearance is a new visit.
        self._visited &= now_mounted
        for name, st in list(self.sticks.items()):
            m = by_device.get(name)
            if st.state == EJECTING and (m is None or m.mountpoint != st.path):
                self._safe(st)
            elif st.state == INSERTED and m is None:
                note = self._fresh_note(cfg, st)
                if note:
                    self._set(st, UNREADABLE, f"cannot be read: {note}; nothing was done; safe to remove")
        for m in mounts:
            assert m.device is not None
            if (m.device, m.mountpoint) in self._visited:
                continue
            ours = under(m.mountpoint, cfg.media_mount_base)
            if ours and not m.options >= SAFE_OPTIONS:
                # The helper's mount of an exFAT stick gets noexec a moment after it
                # appears (a bind remount); that remount wakes us again.
                continue
            self._visited.add((m.device, m.mountpoint))
            self._visit(m, ours)

    @staticmethod
    def _fresh_note(cfg: Config, st: Stick) -> str | None:
        """The helper's note of why it could not mount this insertion (not an older one's)."""
        try:
            if os.stat(error_note(cfg.media_mount_base, st.device)).st_mtime < st.since - 1:
                return None
        except OSError:
            return None
        return read_error_note(cfg.media_mount_base, st.device)

    def _visit(self, m: Mount, ours: bool) -> None:
        assert m.device is not None
        st = self.sticks.get(m.device)
        if st is None or st.state not in (INSERTED, VISITING):
            dev = block_device(m.device)
            st = Stick(m.device, kind=dev.kind if dev else "")
        st.path, st.ours = m.mountpoint, ours
        st.done_bytes, st.total_bytes, st.eta_s = 0, None, None
        where = "" if ours else " (mounted by the desktop)"
        self._set(st, VISITING, f"busy: do not remove{where}")
        cfg = self.config()
        # An exchange like a typed one (INTERFACE.md's activity kinds), its detail naming the stick.
        fut = self.jobs.submit("exchange", f"{m.device} at {m.mountpoint}", self._work(m.mountpoint, cfg),
                               key=f"stick:{m.device}:{m.mountpoint}")
        self._jobs[m.device] = fut
        fut.add_done_callback(lambda f: self._visited_done(st, m.mountpoint, f))

    def _work(self, folder: str, cfg: Config) -> Callable[[Store, Callable[[int], None]], Outcome]:
        # The visit itself decides whether to forward (an online school relaying others' requests).
        return visit_work(folder, cfg.media_adopt_blank, cfg.media_read_back, cfg.media_free_margin, self.activity,
                          self.forward)

    def _visited_done(self, st: Stick, folder: str, fut: asyncio.Future[Outcome]) -> None:
        self._jobs.pop(st.device, None)
        if fut.cancelled():
            return
        out = fut.result()
        # What the visit made unneeded goes now, while the helper unmounts: not
        # inside the visit, which the teacher waits for.
        self.jobs.submit("gc", "store", gc_work)
        if st.state != VISITING or st.path != folder:
            return  # pulled meanwhile, or inserted again elsewhere: that state stands
        if not out.ok and out.data.get("removed"):
            self._set(st, REMOVED_EARLY, f"removed before it was safe: {out.summary}")
            return
        st.summary = out.summary if out.ok else f"FAILED: {out.summary}"
        if st.ours and st.path is not None:
            try:
                cfg = self.config()
                path = eject_request(cfg.media_mount_base, st.device)
                with open(path, "w") as f:
                    f.write("done\n")
            except OSError as exc:
                log.warning("sticks: cannot ask for %s to be unmounted (%s)", st.device, exc.strerror)
                self._safe(st)
                return
            self._set(st, EJECTING, "finishing: do not remove yet")
            loop = asyncio.get_running_loop()
            loop.call_later(UNMOUNT_WAIT, self._unmount_overdue, st, st.changed)
            self.rescan()
        else:
            self._safe(st)

    def _unmount_overdue(self, st: Stick, changed: float) -> None:
        if st.state == EJECTING and st.changed == changed:
            log.warning("sticks: %s is still mounted %g s after the unmount request; its data is flushed",
                        st.device, UNMOUNT_WAIT)
            self._safe(st, still_mounted=True)

    def _safe(self, st: Stick, still_mounted: bool = False) -> None:
        tail = " (still mounted: eject it on the desktop first)" if not st.ours else (
            " (the helper did not unmount it; everything was flushed)" if still_mounted else "")
        self._set(st, SAFE, f"safe to remove{tail}: {st.summary}" if st.summary else f"safe to remove{tail}")

    def _pulled(self, name: str) -> None:
        st = self.sticks.get(name)
        if st is None or st.state == GONE:
            return
        if st.state in (VISITING, EJECTING):
            if st.state == VISITING:
                self._set(st, REMOVED_EARLY, "removed before it was safe: nothing from this visit is marked "
                          "done; insert it again to finish")
            else:
                # Flushed and read back already; only the unmount was missing.
                self._set(st, GONE, f"removed (the visit had finished): {st.summary}")
            return
        if st.state != REMOVED_EARLY:
            self._set(st, GONE, "removed" + (f"; last visit: {st.summary}" if st.summary else ""))

    def _set(self, st: Stick, state: str, message: str) -> None:
        with self._lock:
            st.state, st.message, st.changed = state, message, time.time()
            self.sticks[st.device] = st
        level = logging.WARNING if state in (REMOVED_EARLY, UNREADABLE) else logging.INFO
        log.log(level, "stick %s%s: %s", st.device, f" at {st.path}" if st.path else "", message)
        self.activity.emit("stick", device=st.device, state=state, message=message, path=st.path)

    def _forget_old(self) -> None:
        cut = time.time() - FORGET_AFTER
        with self._lock:
            for name, st in list(self.sticks.items()):
                if st.state in (GONE, REMOVED_EARLY, UNREADABLE, SAFE) and st.changed < cut:
                    del self.sticks[name]

    # -- status (any thread)
    def status(self) -> dict[str, Any]:
        cfg = self.config()
        cur = self.activity.snapshot()
        with self._lock:
            seen = [(st.as_json(), st.since) for st in self.sticks.values()]
        sticks = [s for s, _since in seen]
        for s, since in seen:
            busy = cur is not None and cur["kind"] == "exchange" and cur["detail"] == f"{s['device']} at {s['path']}"
            if s["state"] == VISITING and cur is not None and busy:
                s["done_bytes"], s["total_bytes"], s["eta_s"] = cur["done_bytes"], cur["total_bytes"], cur["eta_s"]
            if s["state"] == INSERTED and time.time() - since > MOUNT_HINT_AFTER:
                s["message"] = ("inserted but not mounted: is the mount helper installed "
                                "(harmonicd-stick@.service, see docs/operations.md)?")
        return {"devices": list(cfg.media_devices), "events": self.source.source if self.source and not self.error
                else None, "error": self.error, "sticks": sticks}


def under(path: str, base: str) -> bool:
    base = base.rstrip("/") + "/"
    return path.startswith(base)


# --------------------------------------------------------------------------- the visit, as a job


def visit_work(folder: str, consent: bool, read_back: bool, free_margin: int, activity: Activity | None,
               forward: Callable[[Store], str | None] | None) -> Callable[[Store, Callable[[int], None]], Outcome]:
    """One visit of the stick (or folder) at ``folder``: the daemon's for a stick
    it found, and the control socket's `exchange DIR` (consent=True)."""

    def work(store: Store, progress: Callable[[int], None]) -> Outcome:
        from harmonicd.errors import StickRemoved
        from harmonicd.services.stick import visit

        if not os.path.isdir(folder):
            return Outcome(f"{folder} is gone (removed before the visit began)", {"removed": True}, ok=False)
        try:
            rep = visit(store, folder, progress, consent=consent, read_back=read_back, free_margin=free_margin,
                        forward=(lambda: forward(store)) if forward else None,
                        on_total=activity.set_total if activity else None)
        except StickRemoved as exc:
            return Outcome(str(exc), {"removed": True}, ok=False, error=exc)
        return summarize(rep.report, folder, rep.verified_bytes, rep.left_over)
    return work


def gc_work(store: Store, progress: Callable[[int], None]) -> Outcome:
    from harmonicd.services.maintenance import gc
    from harmonicd.store import durable

    g = gc(store)
    # gc logs what it removed itself; nothing removed is not worth a line after every visit.
    return Outcome(f"removed {g.removed} objects ({durable.mib(g.removed_bytes)}), kept {g.kept}",
                   {"removed": g.removed, "removed_bytes": g.removed_bytes, "kept": g.kept}, logged=True)


def summarize(rep: Any, folder: str, verified: int = 0, left_over: list[str] | None = None) -> Outcome:
    """An exchange report as a job outcome: one line for people, the lists for scripts."""
    from harmonicd.store import durable

    received = [f"{a} from {r.sender}" for r in rep.imported for a in r.applied]
    partial = [f"part of {a} from {r.sender}" for r in rep.imported for a in r.pending]
    written = [f"{e.recipient}: {', '.join(e.releases) or 'request'}" for e in rep.exported]
    sent = sum(e.bytes for e in rep.exported)
    data = {"received": received, "partial": partial, "written": written, "refused": rep.refused,
            "waiting": rep.waiting, "published": [f"{n} release {s}" for n, s in rep.published],
            "left_over": left_over or [], "verified_bytes": verified}
    parts = []
    if received or partial:
        parts.append("received " + ", ".join(received + partial))
    if written:
        parts.append(f"wrote {durable.mib(sent)} for " + ", ".join(sorted({e.recipient for e in rep.exported})))
    if left_over:
        parts.append("next trip: " + "; ".join(left_over))
    line = "; ".join(parts) or "nothing to exchange"
    if rep.refused:
        return Outcome(f"{len(rep.refused)} pack(s) refused: " + "; ".join(rep.refused) + f" ({line})", data,
                       ok=False)
    return Outcome(line, data)

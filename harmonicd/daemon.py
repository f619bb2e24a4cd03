"""harmonicd: the daemon (composition root).

One ``asyncio.run``, one TaskGroup owning the long-lived parts: the job
runner (store work in a worker thread, one job at a time), the control
socket, the watchdog heartbeat, the rescan timer. The folder watcher's
thread only posts names into the loop.

Start: configuration, then recovery of the store (converging deployments a
crash left half-switched), then the control socket, then READY=1. Stop
(SIGTERM, SIGINT): STOPPING=1, no new connections or jobs, wait up to
``server.stop_grace_seconds`` for the job that runs, then exit. A job still
running then is abandoned where it is, which is safe: every step of the
store is crash-consistent, and the next start recovers and redoes it.
SIGHUP reloads the configuration (a bad one is logged and the old one kept).

Exit codes: 0 stopped cleanly; 78 (EX_CONFIG) configuration, state folder,
key or socket path unusable, which a restart will not fix (the unit's
RestartPreventExitStatus); 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harmonicd import __version__
from harmonicd import config as config_mod
from harmonicd.activity import Activity
from harmonicd.config import Config
from harmonicd.control import ControlServer, prepare_socket_path
from harmonicd.errors import ConfigError, HarmonicError, StartupError, StateError, UsageError
from harmonicd.jobs import JobRunner, Outcome
from harmonicd.logs import setup_daemon_logging
from harmonicd.media.sticks import StickManager, gc_work, visit_work
from harmonicd.peer import UpstreamError, limits
from harmonicd.peer.netwatch import NetWatch
from harmonicd.peer.server import PeerServer, tls_context
from harmonicd.store import durable
from harmonicd.store.store import Store
from harmonicd.systemd import Notifier
from harmonicd.watch import FolderWatcher

log = logging.getLogger("harmonicd")

EX_CONFIG = 78
SETTLE_MAX = 60.0  # a folder that never stays quiet is published anyway after this long (or 10 quiet periods)
STARTUP_SYNC_DELAY = 2.0  # seconds after start before the first online sync
BACKOFF_BASE = 15.0  # seconds; doubled after each failed online sync, up to the interval
PREPARE_EVERY = 10.0  # seconds between looks (on the master) for a new release to prepare packs of
STORE_SIZE_MAX_AGE = 60.0  # seconds a status answer may show an old count of the store's objects


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.activity = Activity()
        self.jobs = JobRunner(self.activity, lambda: self.cfg)
        self.control = ControlServer(self, cfg.socket, cfg.socket_group, cfg.admin_group)
        self.peer: PeerServer | None = None
        if cfg.listen:
            tls = tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
            self.peer = PeerServer(cfg.id, cfg.role, cfg.state_dir, cfg.listen, self._answer, cfg.max_request,
                                   reader=self._read, tls=tls, rates=limits.Settings(
                                       cfg.max_syncs_per_minute, cfg.max_address_syncs_per_minute,
                                       cfg.max_downloads_per_address, cfg.max_request_age, cfg.max_answer_wait))
        self.watcher: FolderWatcher | None = None
        self._announcer: Any = None  # peer.mdns.Announcer while server.listen is announced on the LAN
        self._master_fp = ""
        self.started = time.time()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._network_up = asyncio.Event()  # set by the network watch: sync now (see _sync_loop)
        self.netwatch = NetWatch(self._network_came_up)
        self.sticks = StickManager(lambda: self.cfg, self.jobs, self.activity, forward=_forward_now)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._first_change: dict[str, float] = {}
        self._store_size: dict[str, int] | None = None
        self._store_size_at = 0.0
        self._sizing = False
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="status")
        self._local = threading.local()

    # -- lifetime
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.activity.bind(loop)
        self.jobs.on_change = self._job_changed
        # Signals first: the socket answers during recovery, so a stop may come then.
        for sig, why in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.stop, why)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        # A second daemon on the same socket (or something planted at its path)
        # is refused before it waits for the store's lock; the socket itself is
        # bound after recovery, so a daemon that answers is a daemon that is ready.
        prepare_socket_path(self.cfg.socket, self.cfg.socket_group)
        try:
            await loop.run_in_executor(self._pool, self._startup_checks)
        except (StateError, ConfigError) as exc:
            raise StartupError(str(exc)) from None
        self._start_watcher(loop)
        await self.control.start()
        if self.peer is not None:
            try:
                await self.peer.start()
            except BaseException:
                await self.control.stop()
                raise
            # Announced in the background: mDNS probing takes seconds, and a LAN
            # without multicast only costs the announcement (logged).
            self._announce_task = asyncio.create_task(self._announce(), name="mdns")
        what = f"{self.cfg.role} {self.cfg.id}: idle"
        self.notifier.ready(what)
        log.info("harmonicd %s started as %s %s; control socket %s", __version__, self.cfg.role,
                 self.cfg.id, self.cfg.socket)
        for name in self.cfg.sources:
            self.folder_changed(name)  # what changed while we were stopped
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.jobs.run(), name="jobs"),
                         tg.create_task(self._rescan(), name="rescan")]
                if self.cfg.is_master:
                    tasks.append(tg.create_task(self._prepare_loop(), name="prepare"))
                else:
                    tasks.append(tg.create_task(self._sync_loop(), name="online-sync"))
                    tasks.append(tg.create_task(self.netwatch.run(), name="netwatch"))
                if self.cfg.media_devices:
                    tasks.append(tg.create_task(self.sticks.run(), name="sticks"))
                if self.notifier.watchdog_interval:
                    tasks.append(tg.create_task(self._heartbeat(self.notifier.watchdog_interval), name="watchdog"))
                await self._stop.wait()
                await self._shutdown()
                for t in tasks:
                    t.cancel()
        finally:
            self._pool.shutdown(wait=False)
        return 0

    def stop(self, why: str = "") -> None:
        if not self._stop.is_set():
            self._stop_reason = why
            self._stop.set()

    async def _shutdown(self) -> None:
        running = self.jobs.running
        self.notifier.stopping(f"stopping ({self._stop_reason or 'asked'})")
        log.info("stopping (%s)", self._stop_reason or "asked")
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        if self.watcher is not None:
            self.watcher.stop()
        self.jobs.close()
        self.activity.close_streams()
        await self.control.stop()
        if self.peer is not None:
            await self.peer.stop()
        await self._unannounce()
        if running is not None and not running.future.done():
            log.info("waiting up to %g s for %s %s to finish", self.cfg.stop_grace_seconds, running.kind,
                     running.detail)
            try:
                await asyncio.wait_for(asyncio.shield(running.future), self.cfg.stop_grace_seconds)
            except TimeoutError:
                # Abandoned mid-way: crash-safe by construction, recovered at the next start.
                again = ("published again at the next start" if running.kind == "publish" and
                         running.key.startswith("publish:") else "nothing half-done is kept; ask for it again")
                log.warning("%s %s did not finish in %g s; stopping anyway (%s)",
                            running.kind, running.detail, self.cfg.stop_grace_seconds, again)
                self.abandoned = True

    abandoned = False

    def _startup_checks(self) -> None:
        """Recovery before READY: a crash may have left a deployment half-switched."""
        from harmonicd.services.maintenance import recover
        from harmonicd.services.status import store_size_of

        with Store(self.cfg) as store:
            recover(store)
            store.key  # noqa: B018 - an unreadable key must stop the start, not the first job
            if self.cfg.listen:
                from harmonicd.peer.mdns import fingerprint

                # The anchor of the master's key chain (a master's key before its first
                # rotation; a relay's upstream.master_key): what every school is configured
                # with, and the same through every rotation. It only says which deployment
                # this is (nothing announced is trusted: packs are judged by signatures).
                self._master_fp = fingerprint(store.trust_chain().anchor)
            self._store_size, self._store_size_at = store_size_of(store), time.monotonic()

    async def _announce(self) -> None:
        from harmonicd.peer.mdns import Announcer

        announcer = Announcer(self.cfg, self._master_fp)
        try:
            await asyncio.to_thread(announcer.start)
        except Exception as exc:  # the LAN announcement is a convenience, never fatal
            log.warning("mDNS: announcing failed: %s", exc)
            return
        self._announcer = announcer

    async def _unannounce(self) -> None:
        task = getattr(self, "_announce_task", None)
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 5)
        if self._announcer is not None:
            announcer, self._announcer = self._announcer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(announcer.stop), 5)

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.cfg.sources:
            self.watcher = FolderWatcher(self.cfg.sources, self.folder_changed)
            self.watcher.start(loop)

    async def _heartbeat(self, every: float) -> None:
        # Runs on the loop: a loop blocked for longer than WatchdogSec stops the
        # pings and systemd restarts us, which is the point.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    async def _prepare_loop(self) -> None:
        """Master: after a new release of a collection for everyone (published here or by a
        `harmonicctl publish` in another process), build ahead the shared packs schools will
        ask for (services/shared.prepare), as a job of its own. Then the first school after a
        publish, online or by stick, gets copies of files instead of a pack made while it (or
        a teacher holding a stick) waits."""
        prepared: tuple[tuple[str, int], ...] | None = None
        while True:
            latest: tuple[tuple[str, int], ...] | None = None
            try:
                latest = await asyncio.get_running_loop().run_in_executor(self._pool, self._latest_for_everyone)
            except HarmonicError as exc:
                log.warning("cannot read the latest releases: %s", exc)
            if latest and latest != prepared:
                out = await self.jobs.submit("prepare", "shared packs", _prepare_work, key="prepare:shared")
                if out.ok:
                    prepared = latest
            if self.cfg.lease_auto_renew and await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._leases_due):
                # A publish of leases@SCHOOL; the next round builds its shared packs.
                await self.jobs.submit("publish", "leases renewal", _renew_leases_work, key="leases:renew")
            await asyncio.sleep(PREPARE_EVERY)

    def _leases_due(self) -> bool:
        from harmonicd.services.leases import due

        try:
            return bool(due(self._reader()))
        except HarmonicError as exc:
            log.warning("cannot read the leases: %s", exc)
            return False

    def _latest_for_everyone(self) -> tuple[tuple[str, int], ...]:
        from harmonicd.services.shared import for_everyone

        store = self._reader()
        # A rotation (`trust rotate`) threw away the packs its old key signed: built again.
        return (*sorted((c.name, c.seq) for c in for_everyone(store)), ("key chain", store.trust_chain().version))

    async def _rescan(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rescan_seconds)
            if self.watcher is not None:
                self.watcher.refresh()
            for name in self.cfg.sources:
                self.folder_changed(name)

    async def _sync_loop(self) -> None:
        """A school with an upstream syncs soon after start, then every
        upstream.interval_seconds (10% jitter, so schools do not all come at
        once), inside upstream.window if one is set; after a failure it tries
        again sooner, with jittered exponential backoff, and never before an
        upstream's Retry-After.

        The network coming up (peer/netwatch.py) wakes it at once, whatever the
        backoff or the time left of the interval: that is exactly when a school
        on a flaky link should sync. It does not override what the admin set:
        interval 0 means only when asked, and the window still holds (a metered
        link may cost more by day). A sync already running is not doubled: one
        that ends well covers the event; one that failed is followed by ours."""
        failures = 0
        delay = STARTUP_SYNC_DELAY
        not_before = 0.0  # monotonic: the upstream asked us to wait until then (429)
        owed = False  # the network came up while we had to wait: sync once the wait is over
        while True:
            network = await self._sleep_or_network(delay) or owed
            owed = False
            cfg = self.cfg
            if not cfg.upstream_url or not cfg.sync_interval:
                delay = 60.0  # a reload may turn it on
                continue
            wait = not_before - time.monotonic()
            if wait > 0:
                owed, delay = network, wait
                continue
            now = time.localtime()
            if not config_mod.in_window(cfg.sync_window, now.tm_hour * 60 + now.tm_min):
                delay = 60.0 - now.tm_sec  # look again at the next minute
                continue
            if network:
                running = self.jobs.running
                if running is not None and running.kind == "sync":
                    out = await asyncio.shield(running.future)
                    if out.ok:
                        log.info("the network came up during a sync that completed; no second sync")
                        failures, delay = 0, self._next_sync(cfg)
                        continue
            # Events from here on come after this sync started: they ask for another.
            self._network_up.clear()
            out = await asyncio.shield(self.command("sync", {}))
            if out.ok:
                failures = 0
                delay = self._next_sync(cfg)
            else:
                failures += 1
                delay = random.uniform(0, min(cfg.sync_interval or 3600.0, BACKOFF_BASE * 2 ** failures))
                if isinstance(out.error, UpstreamError) and out.error.retry_after is not None:
                    not_before = time.monotonic() + out.error.retry_after
                    delay = max(delay, out.error.retry_after)
                log.info("next online sync try in %.0f s (or when the network comes up)", delay)

    @staticmethod
    def _next_sync(cfg: Config) -> float:
        # Interval 0: only when asked; look again in a minute (a reload may change it).
        return cfg.sync_interval * random.uniform(0.9, 1.1) if cfg.sync_interval else 60.0

    async def _sleep_or_network(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if the network came up meanwhile (or before)."""
        if not self._network_up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._network_up.wait(), delay)
        if self._network_up.is_set():
            self._network_up.clear()
            return True
        return False

    def _network_came_up(self, why: str) -> None:
        if self.cfg.upstream_url and self.cfg.sync_interval and not self._stop.is_set():
            log.info("the network came up (%s): syncing with %s now", why, self.cfg.upstream_url)
            self._network_up.set()

    def _job_changed(self) -> None:
        cur = self.activity.current
        if cur is None:
            self._store_size_at = 0.0  # a job ended: the next status counts the store again
        self.notifier.status(f"{self.cfg.role} {self.cfg.id}: "
                             + (f"{cur.kind} {cur.detail}" if cur else "idle"))

    def _reload(self) -> None:
        try:
            new = config_mod.load(self.cfg.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        fixed = [k for k in ("id", "role", "state_dir", "socket", "socket_group")
                 if getattr(new, k) != getattr(self.cfg, k)]
        if fixed:
            log.warning("reload: %s changed; that takes a restart (the rest is applied now)", ", ".join(fixed))
            new = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in fixed})
        old, self.cfg = self.cfg, new
        self.control.group, self.control.admin_group = new.socket_group, new.admin_group
        if new.sources != old.sources:
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher = None
            self._start_watcher(asyncio.get_running_loop())
            for name in new.sources:
                self.folder_changed(name)
        log.info("configuration reloaded from %s", new.path)

    # -- watched folders
    def folder_changed(self, name: str) -> None:
        """A source folder changed (or may have): publish it once it has been quiet."""
        if self._stop.is_set() or name not in self.cfg.sources:
            return
        now = time.monotonic()
        first = self._first_change.setdefault(name, now)
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        quiet = self.cfg.quiet_seconds
        # A folder written into without pause (a log) still gets published,
        # after at most SETTLE_MAX or ten quiet periods.
        patience = max(SETTLE_MAX, 10 * quiet)
        overdue = now - first >= patience
        delay = 0.0 if overdue else quiet
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._publish_source, name, not overdue)

    def _publish_source(self, name: str, settle: bool) -> None:
        self._timers.pop(name, None)
        src = self.cfg.sources.get(name)
        if src is None:
            return
        if self.watcher is not None:
            # A folder removed and made anew (or replaced) since: watch the new one.
            self.watcher.refresh()
        quiet = self.cfg.quiet_seconds

        def work(store: Store, progress: Callable[[int], None]) -> Outcome:
            from harmonicd.services.publish import Unsettled, over_quota, publish

            why = over_quota(store)
            if why is not None:
                self.activity.warnings["pending_quota"] = why
                return Outcome(f"{name} not published: over quota", {"published": False, "held_back": True})
            self.activity.warnings.pop("pending_quota", None)
            if not os.path.isdir(src):
                return Outcome("", {"published": False})
            try:
                seq, changed = publish(store, name, src, progress=progress, settle=quiet if settle else 0)
            except Unsettled:
                return Outcome("", {"published": False, "unsettled": True})
            return Outcome(f"published {name} release {seq}" if changed else "",
                           {"published": changed, "seq": seq}, logged=True)

        fut = self.jobs.submit("publish", name, work, key=f"publish:{name}")
        fut.add_done_callback(lambda f: self._published(name, f))

    def _published(self, name: str, fut: asyncio.Future[Outcome]) -> None:
        if fut.cancelled():
            return
        out = fut.result()
        if out.data.get("unsettled"):
            # Still being written: look again after another quiet period.
            self.folder_changed(name)
            return
        self._first_change.pop(name, None)
        if out.data.get("published"):
            self._store_size_at = 0.0
        if out.data.get("held_back") and name == next(iter(self.cfg.sources), None):
            log.warning("%s", self.activity.warnings.get("pending_quota", "over the pending quota"))

    # -- the peer HTTP API's backend
    async def _answer(self, request: str) -> tuple[str, list[tuple[str, int]]]:
        """A school's request pack, taken and answered as one job (with the store's lock)."""

        def work(store: Store, progress: Callable[[int], None]) -> Outcome:
            if not store.cfg.is_master:
                # A school server with server.listen: a relay for downstream schools.
                from harmonicd.services import relay

                ans = relay.answer(store, request, progress)
                what = ", ".join(ans.releases) or "nothing new from the replica"
                files = [(p, os.path.getsize(p)) for p in ans.files]
                kept = "request queued for the master" if ans.queued else "an older request than the one queued"
                return Outcome(f"answered {ans.school} as a relay: {what}; {ans.from_master} answer pack(s) of the "
                               f"master; {kept}", {"school": ans.school, "files": files})
            from harmonicd.services.online import answer

            got, res = answer(store, request, progress)
            what = ", ".join(res.releases) or "nothing new"
            files = [(p, os.path.getsize(p)) for p in res.files]
            return Outcome(f"answered {got.sender} online: {what}", {"school": got.sender, "files": files})

        out = await self.jobs.submit("serve", os.path.basename(request), work, key=f"serve:{request}")
        if not out.ok:
            if out.error is not None:
                raise out.error
            raise HarmonicError(out.summary)
        return out.data["school"], list(out.data["files"])

    # -- the control API's backend
    async def status(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._status)

    async def _read(self, fn: Callable[[Store], Any]) -> Any:
        """The peer HTTP API's reads (objects, releases), in a status thread with its store view."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(self._reader()))

    def _reader(self) -> Store:
        """This status thread's own read-only view of the store, opened once: opening
        the database for every query made status slow while an import kept the
        machine busy. A reload's new configuration opens a new one."""
        store: Store | None = getattr(self._local, "store", None)
        if store is None or store.cfg is not self.cfg:
            if store is not None:
                store.close()
            store = Store(self.cfg, lock=False)
            self._local.store = store
        return store

    def _status(self) -> dict[str, Any]:
        from harmonicd.services.status import status, store_size_of

        store = self._reader()
        if time.monotonic() - self._store_size_at > STORE_SIZE_MAX_AGE and not self._sizing:
            self._sizing = True
            try:
                self._store_size, self._store_size_at = store_size_of(store), time.monotonic()
            finally:
                self._sizing = False
        st = status(store, self._store_size)
        if st.get("upstream"):
            seen = store.db.get_meta("upstream.reachable")
            st["upstream"]["reachable"] = None if seen is None else seen == "1"
            if self.cfg.upstream_url == config_mod.AUTO_UPSTREAM:
                # Which server mDNS found at the last sync (peer/mdns.py).
                st["upstream"]["found"] = store.db.get_meta("upstream.found") or None
            # Whether a sync starts by itself when the network comes up (peer/netwatch.py).
            st["upstream"]["network_watch"] = self.netwatch.active
        st["daemon"] = True
        st["activity"] = self.activity.snapshot()
        st["queued"] = [{"kind": j.kind, "detail": j.detail} for j in list(self.jobs.queue)]
        st["last"] = dict(self.activity.last)
        # This runs in a status thread: copy what the loop and the job thread change (one C-level step each).
        st["warnings"] = sorted(self.activity.warnings.copy().values())
        st["pid"] = os.getpid()
        st["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        watcher = self.watcher
        st["watching"] = sorted(watcher.watching) if watcher else []
        st["media"] = self.sticks.status()
        return st

    def command(self, name: str, args: dict[str, Any]) -> asyncio.Future[Outcome]:
        """A changing command from the control socket, as a queued job."""

        def text(key: str, required: bool = True) -> str | None:
            v = args.get(key)
            if v is None and not required:
                return None
            if not isinstance(v, str) or not v:
                raise UsageError(f"{name}: {key!r} must be a non-empty string")
            return v

        if name == "exchange":
            folder = text("dir")
            assert folder is not None
            if not os.path.isabs(folder):
                raise UsageError(f"exchange: {folder!r} must be an absolute path")
            cfg = self.cfg
            # Asked for by a person: consent to write there (INTERFACE.md).
            fut = self.jobs.submit("exchange", folder, visit_work(
                folder, True, cfg.media_read_back, cfg.media_free_margin, self.activity, _forward_now))
            fut.add_done_callback(lambda _f: self.jobs.submit("gc", "store", gc_work))
            return fut
        if name == "publish":
            coll, folder, target = text("collection"), text("dir"), text("for", required=False)
            assert coll is not None
            assert folder is not None
            if not os.path.isabs(folder):
                raise UsageError(f"publish: {folder!r} must be an absolute path")
            return self.jobs.submit("publish", coll, _publish_work(coll, folder, target),
                                    key=f"publish-explicit:{coll}:{target}:{folder}")
        if name == "verify":
            return self.jobs.submit("verify", "store", _verify_work)
        if name == "gc":
            return self.jobs.submit("gc", "store", gc_work)
        if name == "sync":
            return self.jobs.submit("sync", self.cfg.upstream_url or "(no upstream)", _sync_work)
        raise UsageError(f"unknown command {name}")


# --------------------------------------------------------------------------- job bodies


def _forward_now(store: Store) -> str | None:
    from harmonicd.peer.sync import forward_now

    return forward_now(store)


def _publish_work(coll: str, folder: str, target: str | None) -> Callable[[Store, Callable[[int], None]], Outcome]:
    def work(store: Store, progress: Callable[[int], None]) -> Outcome:
        from harmonicd.services.publish import publish

        seq, changed = publish(store, coll, folder, target, progress)
        return Outcome(f"published {coll} release {seq}" if changed else f"{coll} unchanged at release {seq}",
                       {"seq": seq, "changed": changed})
    return work


def _verify_work(store: Store, progress: Callable[[int], None]) -> Outcome:
    from harmonicd.services.maintenance import verify

    rep = verify(store, progress)
    data = {"objects": rep.objects, "files": rep.files, "problems": rep.problems}
    if rep.problems:
        return Outcome(f"verify found {len(rep.problems)} problem(s): " + "; ".join(rep.problems[:5]), data, ok=False)
    return Outcome(f"{rep.objects} objects ({durable.mib(rep.bytes)}) and {rep.files} deployed files verified", data)


def _prepare_work(store: Store, progress: Callable[[int], None]) -> Outcome:
    from harmonicd.services.shared import prepare

    built = prepare(store, progress)
    return Outcome(f"built {len(built)} shared pack(s) ahead: " + "; ".join(built) if built else "",
                   {"built": built})


def _renew_leases_work(store: Store, progress: Callable[[int], None]) -> Outcome:
    from harmonicd.core.lease import iso
    from harmonicd.services.leases import renew_due

    done = renew_due(store)
    return Outcome("; ".join(f"renewed {i.laptops} leases for {i.school} until {iso(i.expires)} "
                             f"(leases release {i.seq})" for i in done), {"renewed": [i.school for i in done]})


def _sync_work(store: Store, progress: Callable[[int], None]) -> Outcome:
    from harmonicd.services.publish import publish_changed_sources

    cfg = store.cfg
    if cfg.is_master:
        made = publish_changed_sources(store)
        return Outcome("the master has no upstream to sync with",
                       {"published": [f"{n} release {s}" for n, s in made]})
    if not cfg.upstream_url:
        made = publish_changed_sources(store)
        return Outcome("no upstream.url configured: this school syncs by stick only",
                       {"published": [f"{n} release {s}" for n, s in made]}, ok=False)
    from harmonicd.peer.sync import sync_online

    return sync_online(store, progress)


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonicd", description="Harmonic's daemon, in the foreground.")
    p.add_argument("--config", help="configuration file (default: $HARMONICD_CONFIG or /etc/harmonicd/harmonicd.toml)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"harmonicd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_daemon_logging(args.verbose)
    path = config_mod.config_path(args.config)
    try:
        # No configuration yet: a first boot, waiting for a bundle (harmonicd/firstboot.py).
        cfg = config_mod.load(path, first_boot=True)
        if not cfg.configured:
            from harmonicd.firstboot import wait_for_bundle

            first = Notifier()
            try:
                if not asyncio.run(wait_for_bundle(cfg, first)):
                    return 0
            finally:
                first.close()
            cfg = config_mod.load(path)
        if not os.path.isdir(cfg.state_dir):
            raise StateError(f"state folder {cfg.state_dir} does not exist (run `harmonicctl init`)")
    except (ConfigError, StateError, StartupError) as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 0
    notifier = Notifier()
    daemon: Daemon | None = None
    try:
        async def run() -> int:
            nonlocal daemon
            daemon = Daemon(cfg, notifier)
            return await daemon.run()

        code = asyncio.run(run())
    except (ConfigError, StartupError, StateError) as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except HarmonicError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        code = 0
    finally:
        notifier.close()
    log.info("stopped")
    logging.shutdown()
    if daemon is not None and daemon.abandoned:
        # A worker thread is still inside a job; it must not keep the process alive.
        sys.stderr.flush()
        os._exit(code)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return code

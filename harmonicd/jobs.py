"""The daemon's jobs: store work, one at a time, in a worker thread.

Publishing, exchanging, verifying and collecting garbage all change (or
read all of) the store. The daemon runs them one after another, each in a
worker thread that opens the store with its lock, so the event loop never
waits on a disk and a command-line `harmonicctl exchange` simply waits its
turn (and the daemon waits for it). A job queued twice under the same key
runs once.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from harmonicd.activity import Activity
from harmonicd.config import Config
from harmonicd.errors import HarmonicError
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

Work = Callable[[Store, Callable[[int], None]], "Outcome"]


@dataclass
class Outcome:
    summary: str
    data: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: HarmonicError | None = None  # what failed, for callers that re-raise it
    logged: bool = False  # the service already logged the success itself


@dataclass
class Job:
    kind: str
    detail: str
    work: Work
    key: str
    total: int | None = None
    future: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class JobRunner:
    def __init__(self, activity: Activity, config: Callable[[], Config]) -> None:
        self.activity = activity
        self.config = config
        self.queue: deque[Job] = deque()
        self.running: Job | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self.on_change: Callable[[], None] | None = None  # a job started or ended (systemd STATUS=)
        # Our own thread, not the loop's default executor: asyncio.run() waits for
        # the default executor's threads at exit, so a job abandoned at stop
        # (server.stop_grace_seconds) would hold the exit until it finished.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job")

    def submit(self, kind: str, detail: str, work: Work, key: str | None = None,
               total: int | None = None) -> asyncio.Future[Outcome]:
        key = key or f"{kind}:{detail}"
        if self._closed:
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            fut.set_result(Outcome("the daemon is stopping", ok=False))
            return fut
        for queued in self.queue:
            if queued.key == key:
                return queued.future
        job = Job(kind, detail, work, key, total)
        self.queue.append(job)
        self._wake.set()
        return job.future

    @property
    def busy(self) -> bool:
        return self.running is not None or bool(self.queue)

    async def run(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            job = self.queue.popleft()
            self.running = job
            try:
                await self._run_one(job)
            finally:
                self.running = None

    async def _run_one(self, job: Job) -> None:
        self.activity.start(job.kind, job.detail, job.total)
        if self.on_change:
            self.on_change()
        cfg = self.config()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._thread, self._execute, cfg, job)
        except HarmonicError as exc:
            out = Outcome(str(exc), ok=False, error=exc)
        except Exception as exc:  # a bug: log it whole, keep the daemon running
            log.exception("%s %s failed unexpectedly", job.kind, job.detail)
            out = Outcome(f"unexpected error: {exc!r}", ok=False)
        if out.ok:
            if out.summary and not out.logged:
                log.info("%s: %s", job.kind, out.summary)
        else:
            log.error("%s %s failed: %s", job.kind, job.detail, out.summary)
        self.activity.finish(out.ok, out.summary)
        if self.on_change:
            self.on_change()
        if not job.future.done():
            job.future.set_result(out)

    def _execute(self, cfg: Config, job: Job) -> Outcome:
        from harmonicd.services.maintenance import recover

        try:
            with Store(cfg) as store:
                recover(store)
                return job.work(store, self.activity.progress)
        finally:
            _give_back_memory()

    def close(self) -> None:
        """No new jobs; queued ones are answered as not done. A job still running
        goes on in its thread until it ends or the process exits."""
        self._closed = True
        self._thread.shutdown(wait=False)
        while self.queue:
            job = self.queue.popleft()
            if not job.future.done():
                job.future.set_result(Outcome("the daemon stopped before this ran", ok=False))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _give_back_memory() -> None:
    """An import's buffers are freed to malloc, which keeps most of them: hand
    them back to the system so an idle daemon stays small (measured: ~30 MiB
    after a 1 GiB import)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)

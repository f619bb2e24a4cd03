"""What the daemon is doing right now, and the events it has to tell.

One ``Activity`` per daemon. Worker threads report progress through
``progress()`` (thread-safe, cheap: a lock and two additions); the event loop
owns everything else. Subscribers of the event stream get their own bounded
queue; one that does not keep up is dropped rather than let the daemon's
memory grow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

PROGRESS_EVERY = 0.5  # seconds between progress events of one job
SUBSCRIBER_QUEUE = 256  # events waiting for one stream reader at most
RECENT = 100  # events kept for a reader that connects later


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Current:
    kind: str  # sync, exchange, publish, verify, gc
    detail: str
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=now_iso)
    done_bytes: int = 0
    total_bytes: int | None = None

    def as_json(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        eta = None
        if self.total_bytes and rate > 0 and self.done_bytes <= self.total_bytes:
            eta = round((self.total_bytes - self.done_bytes) / rate, 1)
        return {"kind": self.kind, "detail": self.detail, "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes, "started": self.started_at,
                "elapsed_s": round(elapsed, 1), "rate_bytes_s": round(rate), "eta_s": eta}


class Activity:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Current | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_progress = 0.0
        self.last: dict[str, dict[str, Any]] = {}  # kind -> last result event
        self.warnings: dict[str, str] = {}  # topic -> one line, shown in status while it holds

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- events (event loop only, or through emit_threadsafe)
    def emit(self, event: str, **fields: Any) -> None:
        ev = {"time": now_iso(), "event": event, **fields}
        if event != "progress":
            self.recent.append(ev)
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                # A reader this far behind is gone or stuck: end its stream.
                self._subscribers.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    def emit_threadsafe(self, event: str, **fields: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self.emit(event, **fields))

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.discard(q)

    def close_streams(self) -> None:
        for q in list(self._subscribers):
            self._subscribers.discard(q)
            try:
                q.put_nowait(None)
            except asyncio.QueueFull:
                pass

    # -- the current job
    def start(self, kind: str, detail: str, total: int | None = None) -> None:
        with self._lock:
            self.current = Current(kind, detail, total_bytes=total)
            self._last_progress = 0.0
        self.emit("started", kind=kind, detail=detail, total_bytes=total)

    def set_total(self, total: int | None) -> None:
        with self._lock:
            if self.current is not None:
                self.current.total_bytes = total

    def progress(self, n: int) -> None:
        """From any thread: n more bytes done."""
        with self._lock:
            cur = self.current
            if cur is None:
                return
            cur.done_bytes += n
            t = time.monotonic()
            if t - self._last_progress < PROGRESS_EVERY:
                return
            self._last_progress = t
            snap = cur.as_json()
        self.emit_threadsafe("progress", **snap)

    def finish(self, ok: bool, summary: str) -> None:
        with self._lock:
            cur, self.current = self.current, None
        if cur is None:
            return
        ev = {"kind": cur.kind, "detail": cur.detail, "ok": ok, "summary": summary,
              "seconds": round(time.monotonic() - cur.started, 2), "done_bytes": cur.done_bytes}
        self.last[cur.kind] = {"time": now_iso(), **ev}
        self.emit("done" if ok else "failed", **ev)

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return self.current.as_json() if self.current else None

"""The control socket: a versioned JSON API over a Unix socket (docs/control-api.md).

Server side: aiohttp serving connections that our own accept loop hands to
it, so that every connection is counted, given a deadline and refused
beyond a limit before aiohttp sees a byte. Who may do what is decided from
the caller's credentials as the kernel reports them (SO_PEERCRED and
SO_PEERGROUPS), never from anything the caller says: reading (status,
events) is for whoever can open the socket (its mode and group do that);
changing anything is for root, the daemon's own user, or the admin group.

Client side: harmonicd/ctlclient.py (``call`` and ``events`` are re-exported
here for the daemon's tests and tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from harmonicd.activity import Activity
from harmonicd.ctlclient import API, call, events
from harmonicd.errors import HarmonicError, StartupError

log = logging.getLogger("harmonicd")

MAX_BODY = 64 << 10  # a control request is a few hundred bytes
MAX_CONNECTIONS = 64  # beyond this, the oldest idle connection is closed, or else the new one
MAX_STREAMS = 32  # event streams at once: they never end by themselves, so they get at most half
REQUEST_DEADLINE = 10.0  # seconds a connection may take, unless it streams events or waits for a job
STREAM_KEEPALIVE = 30.0  # seconds between empty lines on a quiet event stream
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the constant
CHANGING = frozenset({"sync", "exchange", "publish", "verify", "gc"})


class Backend(Protocol):
    """What the daemon (or, unconfigured, its first-boot wait) offers the control API:
    its status, its changing commands, and its events (activity.Activity)."""

    activity: Activity

    async def status(self) -> dict[str, Any]: ...
    def command(self, name: str, args: dict[str, Any]) -> asyncio.Future[Any]: ...


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: Any) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        # Python caps getsockopt's buffer at 1024 bytes: 256 groups, or ERANGE.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        groups = _groups_of(uid, gid)  # more groups than that, or an old kernel: ask the user database
    return Caller(pid, uid, gid, groups)


def _groups_of(uid: int, gid: int) -> frozenset[int]:
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return frozenset()


class _Throttle:
    """At most `burst` log lines per `window` seconds: a caller must not be able to flood the journal."""

    def __init__(self, burst: int, window: float) -> None:
        self.burst, self.window = burst, window
        self._start, self._count = -window, 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._start > self.window:
            self._start, self._count = now, 0
        self._count += 1
        return self._count <= self.burst


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a 10 MB line, too many headers, not HTTP at
    all) as an error with a traceback. For us that is an expected refusal: one warning
    line, throttled. Anything else it logs (a bug in a handler) keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = _Throttle(5, 60)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not self.throttle.allow():
            return False
        reason = (exc.message or "").split(":", 1)[0].strip()
        reason = "".join(ch if ch.isprintable() else "?" for ch in reason)[:100] or type(exc).__name__
        record.msg, record.args = "control: malformed request refused (%d %s)", (exc.code, reason)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


http_log = logging.getLogger("harmonicd.http")
http_log.addFilter(_MalformedRequests())


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def prepare_socket_path(path: str, group: str) -> None:
    """Make the socket's folder (0750, the socket group) and clear a stale socket.

    Anything other than a socket at the path (a regular file, a symlink
    planted by someone else) is refused, never removed or followed; so is a
    socket another daemon still answers on."""
    folder = os.path.dirname(path)
    gid = _gid(group)
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=0o750)
        except OSError as exc:
            raise StartupError(f"control socket folder {folder}: cannot create it ({exc.strerror})") from None
        if gid is not None:
            with contextlib.suppress(PermissionError):
                os.chown(folder, -1, gid)
        os.chmod(folder, 0o750)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"control socket {path}: a symlink is there; refusing to follow or remove it")
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"control socket {path}: something that is not a socket is there; refusing to remove it")
    if st.st_uid != os.geteuid():
        raise StartupError(f"control socket {path}: a socket owned by uid {st.st_uid} is there; not ours to remove")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # a socket nobody listens on: left by a daemon that was killed
    else:
        raise StartupError(f"control socket {path}: another harmonicd is answering there")
    finally:
        probe.close()


def bind_socket(path: str, group: str) -> socket.socket:
    prepare_socket_path(path, group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)  # bind() applies the umask: the socket is born 0660, never wider
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"control socket {path}: cannot bind ({exc.strerror})") from None
    finally:
        os.umask(old)
    gid = _gid(group)
    if gid is not None:
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, gid)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ControlServer:
    def __init__(self, backend: Backend, path: str, group: str, admin_group: str) -> None:
        self.backend = backend
        self.path = path
        self.group = group
        self.admin_group = admin_group
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: dict[asyncio.BaseTransport, None] = {}  # in the order they came
        self._busy: set[asyncio.BaseTransport] = set()  # a request is being handled
        self._long_lived: set[asyncio.BaseTransport] = set()
        self._refusals = _Throttle(1, 60)
        self._cutoffs = _Throttle(1, 60)

    # -- lifetime
    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_get(f"{API}/status", self._status)
        app.router.add_get(f"{API}/events", self._events)
        for name in sorted(CHANGING):
            app.router.add_post(f"{API}/{name}", self._command)
        if os.environ.get("HARMONICD_DEBUG_HOOKS") == "1":
            # Tests only: block the event loop on purpose (the watchdog must notice).
            app.router.add_post(f"{API}/debug/block-loop", self._block_loop)
        # handler_cancellation: a handler whose client went away is cancelled
        # (an event stream must not hold one of the MAX_STREAMS places).
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=5,
                                     logger=http_log, handler_cancellation=True)
        await self._runner.setup()
        self._sock = bind_socket(self.path, self.group)
        self._accept_task = asyncio.create_task(self._accept(), name="control-accept")

    async def stop(self) -> None:
        """Stop accepting, end event streams, close every connection."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for t in list(self._conns):
            t.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        assert self._runner is not None
        factory = self._runner.server
        assert factory is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control socket: %s; pausing accept for a second", exc.strerror)
                    await asyncio.sleep(1)
                    continue
                raise
            self._conns = {t: None for t in self._conns if not t.is_closing()}
            if len(self._conns) >= MAX_CONNECTIONS and not self._make_room():
                conn.close()
                continue
            try:
                transport, _proto = await loop.connect_accepted_socket(factory, conn)
            except OSError:
                conn.close()
                continue
            self._conns[transport] = None
            loop.call_later(REQUEST_DEADLINE, self._deadline, transport)

    def _make_room(self) -> bool:
        """At the limit: close the oldest connection that has not sent a request yet (or sits
        idle between two), so that clients holding connections open cannot lock out an
        admin's `status`. False when every connection is busy: the new one is refused."""
        if self._refusals.allow():
            log.warning("control socket: more than %d connections at once; closing idle or new ones",
                        MAX_CONNECTIONS)
        for t in self._conns:
            if t not in self._busy and t not in self._long_lived:
                t.close()
                del self._conns[t]
                return True
        return False

    def _deadline(self, transport: asyncio.BaseTransport) -> None:
        # A client that trickles its request (or never sends one) is cut off;
        # event streams and waiting commands marked themselves long-lived.
        if transport not in self._long_lived and not transport.is_closing():
            transport.close()
            if self._cutoffs.allow():
                log.warning("control socket: a connection took longer than %g s; closed it", REQUEST_DEADLINE)

    def _keep_open(self, request: web.Request) -> asyncio.BaseTransport | None:
        t = request.transport
        if t is not None:
            self._long_lived.add(t)
        return t

    # -- handlers
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        t = request.transport
        if t is not None:
            self._busy.add(t)
        try:
            return await handler(request)
        except ConnectionResetError:
            # The caller went away (or was cut off at the deadline) while we read its request:
            # nobody is left to answer, and it is no error of ours.
            return _error(400, "connection lost")
        except web.HTTPException as exc:
            if exc.content_type == "application/json":
                raise
            return _error(exc.status, exc.reason if exc.status != 413 else
                          f"request body larger than {MAX_BODY} bytes")
        finally:
            if t is not None:
                self._busy.discard(t)

    def _caller(self, request: web.Request) -> Caller:
        t = request.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is None:
            raise web.HTTPForbidden(reason="caller unknown")
        return peer_credentials(sock)

    def _may_change(self, c: Caller) -> bool:
        if c.uid in (0, os.geteuid()):
            return True
        admin = _gid(self.admin_group)
        return admin is not None and (c.gid == admin or admin in c.groups)

    async def _block_loop(self, request: web.Request) -> web.StreamResponse:
        seconds = float(request.query.get("seconds", "1"))
        time.sleep(min(seconds, 30))  # noqa: ASYNC251 - blocking is the point
        return web.json_response({"blocked_s": seconds})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.backend.status())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._long_lived) >= MAX_STREAMS:
            return _error(503, f"too many event streams at once (at most {MAX_STREAMS})")
        transport = self._keep_open(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await resp.prepare(request)
        q = self.backend.activity.subscribe()
        try:
            if request.query.get("recent") in ("1", "true", "yes"):
                for old in list(self.backend.activity.recent):
                    await resp.write(_line(old))
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), STREAM_KEEPALIVE)
                except TimeoutError:
                    await resp.write(b"\n")  # an empty line: finds a reader that is gone
                    continue
                if ev is None:
                    break
                await resp.write(_line(ev))
        except ConnectionResetError:
            pass  # the reader went away
        finally:
            self.backend.activity.unsubscribe(q)
            if transport is not None:
                self._long_lived.discard(transport)
        return resp

    async def _command(self, request: web.Request) -> web.StreamResponse:
        name = request.path.rsplit("/", 1)[-1]
        caller = self._caller(request)
        if not self._may_change(caller):
            log.warning("control: refused %s for uid %d (not root and not in group %s)",
                        name, caller.uid, self.admin_group)
            return _error(403, f"permission denied: {name} needs root or membership of group {self.admin_group}")
        args: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return _error(400, "request body is not valid JSON")
            except UnicodeDecodeError:
                return _error(400, "request body is not UTF-8")
            if not isinstance(body, dict):
                return _error(400, "request body must be a JSON object")
            args = body
        wait = bool(args.pop("wait", False))
        log.info("control: uid %d asked for %s %s", caller.uid, name, json.dumps(args, sort_keys=True))
        try:
            fut = self.backend.command(name, args)
        except HarmonicError as exc:
            return _error(400, str(exc))
        if not wait:
            return web.json_response({"queued": True, "command": name}, status=202)
        transport = self._keep_open(request)
        try:
            out = await asyncio.shield(fut)
        finally:
            if transport is not None:
                self._long_lived.discard(transport)
        return web.json_response({"command": name, "ok": out.ok, "summary": out.summary, **out.data},
                                 status=200 if out.ok else 500)


def _line(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, separators=(",", ":")).encode() + b"\n"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


__all__ = ["API", "ControlServer", "call", "events", "prepare_socket_path"]

"""The peer HTTP API's server side (docs/http-api.md), aiohttp on TCP."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable

from aiohttp import web

from harmonicd import __version__
from harmonicd.errors import HarmonicError, PackError, TrustError
from harmonicd.peer import API, CHUNK, MAX_REQUEST, PACK_NAME, SERVER_ID, limits

log = logging.getLogger("harmonicd")

# (request pack path) -> (school id, [(answer file path, size)]); runs the store work as a job
Answerer = Callable[[str], Awaitable[tuple[str, list[tuple[str, int]]]]]

class PeerServer:
    def __init__(self, server_id: str, role: str, state_dir: str, listen: str, answerer: Answerer,
                 max_request: int = MAX_REQUEST, rates: limits.Settings | None = None) -> None:
        self.max_request = max_request
        self.limits = limits.Limits(rates or limits.Settings())  # peer/limits.py: who, how often, why not
        self.server_id = server_id
        self.role = role
        self.state_dir = state_dir
        self.listen = listen
        self.answerer = answerer
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        app = web.Application(client_max_size=1 << 20, middlewares=[self.limits.middleware])
        app.router.add_post(f"{API}/sync", self._sync)
        app.router.add_get(f"{API}/packs/{{school}}/{{name}}", self._pack)
        app.router.add_get(f"{API}/health", self._health)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise HarmonicError(f"server.listen {self.listen}: cannot listen ({exc.strerror})") from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": self.server_id, "role": self.role, "version": __version__})

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > self.max_request:
            return _error(413, f"request pack larger than {self.max_request} bytes (server.max_request)")
        tmp_dir = os.path.join(self.state_dir, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="request-", suffix=".hpk", dir=tmp_dir)
        try:
            got = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.content.iter_chunked(CHUNK):
                    got += len(chunk)
                    if got > self.max_request:
                        return _error(413, f"request pack larger than {self.max_request} bytes (server.max_request)")
                    f.write(chunk)
            if length is not None and got != length:
                return _error(400, f"request body cut short ({got} of {length} bytes)")
            try:
                # Before the store is asked (peer/limits.py): too old, or this school's syncs used up.
                header = await asyncio.to_thread(limits.read_header, path)
                limits.check_age(header, self.limits.settings.max_request_age)
                self.limits.school_may_sync(header.sender)
            except limits.Refused as exc:
                log.warning("online sync refused from %s: %s", request.remote, exc)
                return exc.response()
            try:
                school, files = await self.answerer(path)
            except (PackError, TrustError) as exc:
                log.warning("online sync refused from %s: %s", request.remote, exc)
                return limits.refusal(exc).response()
            except HarmonicError as exc:
                log.error("online sync from %s failed: %s", request.remote, exc)
                return _error(503, f"the server could not answer: {exc}")
            self.limits.school_synced(school)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        packs = [{"name": os.path.basename(p), "size": size,
                  "url": f"{API}/packs/{school}/{os.path.basename(p)}"} for p, size in files]
        return web.json_response({"server": self.server_id, "school": school, "packs": packs})

    async def _pack(self, request: web.Request) -> web.StreamResponse:
        school, name = request.match_info["school"], request.match_info["name"]
        if not SERVER_ID.match(school) or not PACK_NAME.match(name):
            return _error(404, "no such pack")
        path = os.path.join(self.state_dir, "outbox", school, name)
        if not await asyncio.to_thread(os.path.isfile, path):
            return _error(404, "no such pack (a newer sync replaced it?)")
        # FileResponse answers Range requests: a cut download resumes where it stopped.
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=0"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)

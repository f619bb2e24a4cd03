"""The peer HTTP API's server side (docs/http-api.md), aiohttp on TCP (or TLS).

Two kinds of answers, for two kinds of HTTP caches:

- private (``Cache-Control: private, no-store``): the sync exchange and the
  per-school answer pack, which only its school may read;
- public: shared release packs (``/v1/shared/<sha256>/<name>``) and objects by
  hash (``/v1/objects/<id>``), whose URL names a hash of their bytes, so they
  never change: strong ETag, ``public, max-age=31536000, immutable``, Range;
  and the latest signed release of each collection and the master's key
  chain (``public, max-age=60``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from harmonicd import __version__
from harmonicd.core.diff import reachable
from harmonicd.core.objects import object_id
from harmonicd.errors import HarmonicError, IntegrityError, LeaseError, PackError, TrustError
from harmonicd.peer import API, CHUNK, HEX64, MAX_REQUEST, PACK_NAME, SERVER_ID, limits
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

# (request pack path) -> (school id, [(answer file path, size)]); runs the store work as a job
Answerer = Callable[[str], Awaitable[tuple[str, list[tuple[str, int]]]]]
# Runs a function with a read-only view of the store, off the event loop.
Reader = Callable[[Callable[[Store], Any]], Awaitable[Any]]

IMMUTABLE = "public, max-age=31536000, immutable"
RELEASE_MAX_AGE = 60  # seconds a cache may serve a collection's latest release before asking again
TRUST_MAX_AGE = 60  # seconds a cache may serve the master's key chain (GET /v1/trust)
PRIVATE = "private, no-store"
SHARED = "shared"  # STATE/shared/<sha256>/<name> (services/shared.py)
COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,191}\Z")  # NAME, or NAME@SCHOOL (refused below)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context (config.load has checked the files already)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise HarmonicError(f"server.tls_cert/server.tls_key: cannot be used ({exc})") from None
    return ctx


class PeerServer:
    def __init__(self, server_id: str, role: str, state_dir: str, listen: str, answerer: Answerer,
                 max_request: int = MAX_REQUEST, reader: Reader | None = None,
                 tls: ssl.SSLContext | None = None, rates: limits.Settings | None = None) -> None:
        self.max_request = max_request
        self.limits = limits.Limits(rates or limits.Settings())  # peer/limits.py: who, how often, why not
        self.server_id = server_id
        self.role = role
        self.state_dir = state_dir
        self.listen = listen
        self.answerer = answerer
        self.reader = reader
        self.tls = tls
        # Objects served by hash: those of the latest releases for everyone, as
        # (their roots, every object reachable from them), recomputed when a root changes.
        self._public: tuple[tuple[bytes, ...], frozenset[bytes]] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        app = web.Application(client_max_size=1 << 20, middlewares=[self.limits.middleware])
        app.router.add_post(f"{API}/sync", self._sync)
        app.router.add_get(f"{API}/packs/{{school}}/{{name}}", self._pack)
        app.router.add_get(f"{API}/shared/{{digest}}/{{name}}", self._shared)
        app.router.add_get(f"{API}/objects/{{oid}}", self._object)
        app.router.add_get(f"{API}/releases/{{name}}", self._release)
        app.router.add_get(f"{API}/trust", self._trust)
        app.router.add_get(f"{API}/health", self._health)
        app.router.add_get(f"{API}/revocations", self._revocations)
        app.router.add_get(f"{API}/lease/{{serial}}", self._lease)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), reuse_address=True,
                           ssl_context=self.tls)
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

    async def _trust(self, request: web.Request) -> web.StreamResponse:
        """The master's key chain (services/trust.py): the master's own, or on a relay
        the copy it verified. Anyone checks it from the anchor key; a short cache
        time, as a rotation must reach a school soon."""
        if self.reader is None:
            return _error(404, "this server does not serve the key chain")
        from harmonicd.services import trust

        try:
            chain: dict[str, Any] = await self.reader(trust.served)
        except HarmonicError as exc:
            log.error("GET trust: %s", exc)
            return _error(500, f"the server could not read its key chain: {exc}")
        etag = f'"{chain["version"]}-{chain["signing"][-16:]}"'
        headers = {"Cache-Control": f"public, max-age={TRUST_MAX_AGE}", "ETag": etag}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.json_response(chain, headers=headers)

    async def _revocations(self, request: web.Request) -> web.StreamResponse:
        """The master's signed revocation list (on a relay: the newest it verified), as
        packs carry it in extra["revoked"]; anyone checks it against the master's key."""
        if self.reader is None:
            return _error(404, "this server serves no revocation list")
        got = await self.reader(_revocations)
        if got is None:
            return _error(404, "no school server has been revoked")
        master, seq, body, sig = got
        etag = f'"{seq}-{sig[:8].hex()}"'  # a new signing key (rotation) signs anew: a new tag
        headers = {"Cache-Control": f"public, max-age={RELEASE_MAX_AGE}", "ETag": etag}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.json_response({"master": master, "seq": seq, "body": base64.b64encode(body).decode(),
                                  "sig": base64.b64encode(sig).decode()}, headers=headers)

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > self.max_request:
            return _error(413, f"request pack larger than {self.max_request} bytes (server.max_request)")
        try:
            self.limits.may_queue()
        except limits.Refused as exc:
            log.info("online sync from %s: %s", request.remote, exc)
            return exc.response()
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
                if self.limits.settings.max_request_age:
                    limits.check_age(header, self.limits.settings.max_request_age)
                self.limits.school_may_sync(header.sender)
            except limits.Refused as exc:
                log.warning("online sync refused from %s: %s", request.remote, exc)
                return exc.response()
            try:
                with self.limits.answering():
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
        shared_top = os.path.join(self.state_dir, SHARED)
        packs: list[dict[str, Any]] = []
        for p, size in files:
            name, folder = os.path.basename(p), os.path.dirname(p)
            if os.path.dirname(folder) == shared_top:
                digest = os.path.basename(folder)
                packs.append({"name": name, "size": size, "url": f"{API}/shared/{digest}/{name}",
                              "shared": True, "sha256": digest})
            else:
                packs.append({"name": name, "size": size, "url": f"{API}/packs/{school}/{name}", "shared": False})
        return web.json_response({"server": self.server_id, "school": school, "packs": packs},
                                 headers={"Cache-Control": PRIVATE})

    async def _pack(self, request: web.Request) -> web.StreamResponse:
        school, name = request.match_info["school"], request.match_info["name"]
        if not SERVER_ID.match(school) or not PACK_NAME.match(name):
            return _error(404, "no such pack")
        # The name is the ETag (a random pack id: never two contents). Addressed to
        # one school and replaced at its next sync: no cache may keep it.
        return await _serve_file(request, os.path.join(self.state_dir, "outbox", school, name), name, PRIVATE,
                                 "no such pack (a newer sync replaced it?)")

    async def _shared(self, request: web.Request) -> web.StreamResponse:
        digest, name = request.match_info["digest"], request.match_info["name"]
        if not HEX64.match(digest) or not PACK_NAME.match(name):
            return _error(404, "no such pack")
        return await _serve_file(request, os.path.join(self.state_dir, SHARED, digest, name), digest, IMMUTABLE,
                                 "no such pack (the release is no longer the latest?)")

    async def _object(self, request: web.Request) -> web.StreamResponse:
        oid = request.match_info["oid"].lower()
        if not HEX64.match(oid):
            return _error(404, "not an object id (64 hex digits)")
        if self.reader is None:
            return _error(404, "this server does not serve objects")
        try:
            got: tuple[int, bytes] | None = await self.reader(lambda st: self._public_object(st, bytes.fromhex(oid)))
        except HarmonicError as exc:
            log.error("GET object %s: %s", oid, exc)
            return _error(500, f"the server's copy is damaged: {exc}")
        if got is None:
            return _error(404, "no such object here")
        body = bytes((got[0],)) + got[1]

        async def whole(start: int, end: int) -> Any:
            yield body[start:end]

        return await _ranged(request, len(body), oid, IMMUTABLE, whole)

    async def _release(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not COLLECTION.match(name) or self.reader is None:
            return _error(404, "no such collection")
        master = self.role == "master"
        row = await self.reader(lambda st: _latest(st, name, master))
        if row is None:
            return _error(404, "no such collection")
        seq, root, body, sig = row
        etag = f'"{seq}-{root.hex()}"'
        headers = {"Cache-Control": f"public, max-age={RELEASE_MAX_AGE}", "ETag": etag}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.json_response({"collection": name, "seq": seq, "root": root.hex(),
                                  "body": base64.b64encode(body).decode(), "sig": base64.b64encode(sig).decode()},
                                 headers=headers)


    async def _lease(self, request: web.Request) -> web.StreamResponse:
        """A laptop's anti-theft lease (docs/leases.md): the file as the master signed it,
        only if it is this school's, for that laptop, and valid by the effective clock."""
        from harmonicd.services import leases

        serial = request.match_info["serial"]
        if self.reader is None:
            return _error(404, "this server does not serve leases")
        try:
            data: bytes = await self.reader(lambda st: leases.serve(st, serial))
        except LeaseError as exc:
            log.info("lease for %s from %s not served: %s", serial[:64], request.remote, exc)
            return web.json_response({"error": str(exc), "reason": exc.reason}, status=404,
                                     headers={"Cache-Control": PRIVATE})
        except HarmonicError as exc:
            log.error("GET lease %s: %s", serial[:64], exc)
            return _error(500, f"the server could not read its leases: {exc}")
        # Renewed at the next sync: no cache may keep an older one for the laptop.
        return web.Response(body=data, content_type="application/json", headers={"Cache-Control": PRIVATE})

    def _public_object(self, store: Store, oid: bytes) -> tuple[int, bytes] | None:
        """An object of a latest release for everyone, or None: a school's statistics
        and backups, and collections for one school, are never served by hash (their
        ids are not secrets enough: a known file's hash would confirm a school holds it)."""
        mode = "owned" if self.role == "master" else "replica"
        roots = tuple(sorted(c.root for c in store.db.collections()
                             if c.mode == mode and c.target is None and c.root is not None))
        public = self._public
        if public is None or public[0] != roots:
            public = self._public = (roots, frozenset(reachable(store, roots)))
        if oid not in public[1]:
            return None
        return _get_object(store, oid)


def _revocations(store: Store) -> tuple[str, int, bytes, bytes] | None:
    from harmonicd.services import enrollment

    rl, carried = enrollment.known_list(store), enrollment.carried_list(store)
    if rl is None or carried is None:
        return None
    return rl.master, rl.seq, carried[0], carried[1]


def _get_object(store: Store, oid: bytes) -> tuple[int, bytes] | None:
    if not store.objects.has(oid):
        return None
    kind, payload = store.objects.get(oid)  # verified against its id
    if object_id(kind, payload) != oid:
        raise IntegrityError(f"object {oid.hex()} does not match its id")
    return kind, payload


def _latest(store: Store, name: str, master: bool) -> tuple[int, bytes, bytes, bytes] | None:
    """The latest release of a collection for everyone, signed by the master: the
    master's own (owned), or on a school or relay the replica of one."""
    c = store.db.collection(name)
    if c is None or c.target is not None or c.root is None or c.mode != ("owned" if master else "replica"):
        return None
    row = store.db.release(name, c.seq)
    if row is None:
        return None
    return row.seq, row.root, row.body, row.sig


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


Chunks = Callable[[int, int], Any]  # (start, end) -> async iterator of bytes


async def _serve_file(request: web.Request, path: str, etag: str, cache: str, missing: str) -> web.StreamResponse:
    """A pack file with Range (a cut download resumes where it stopped). Not aiohttp's
    FileResponse: the download limit sends the response inside its slot, and
    FileResponse then fails when aiohttp prepares it a second time."""
    try:
        f = await asyncio.to_thread(open, path, "rb")
    except OSError:
        return _error(404, missing)
    try:
        return await _ranged(request, os.fstat(f.fileno()).st_size, etag, cache, _file_chunks(f))
    finally:
        f.close()


def _file_chunks(f: Any) -> Chunks:
    async def chunks(start: int, end: int) -> Any:
        await asyncio.to_thread(f.seek, start)
        left = end - start
        while left > 0:
            data = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data

    return chunks


_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


async def _ranged(request: web.Request, size: int, digest: str, cache: str, chunks: Chunks) -> web.StreamResponse:
    """Bytes named by a hash: strong ETag (the hash), If-None-Match (304), one
    Range (206; If-Range honoured; several ranges get the whole body, as RFC 9110 allows)."""
    etag = f'"{digest}"'
    headers = {"ETag": etag, "Cache-Control": cache, "Accept-Ranges": "bytes"}
    if _etag_matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=headers)
    start, end, status = 0, size, 200
    rng = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    m = _RANGE.match(rng.strip()) if rng else None
    if m is not None and (m[1] or m[2]) and (if_range is None or if_range.strip() == etag):
        if m[1]:
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
        else:
            start = max(size - int(m[2]), 0)
        if start >= size or (m[1] and m[2] and int(m[2]) < start) or (not m[1] and int(m[2]) == 0):
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = end - start
    await resp.prepare(request)
    sent = 0
    try:
        if request.method != "HEAD":
            async for data in chunks(start, end):
                await resp.write(data)
                sent += len(data)
        await resp.write_eof()
    except ConnectionError:
        # The link dropped (or the school gave up on a drip): an everyday event,
        # one line; the school continues from its last byte with Range.
        log.info("%s: the client went away at byte %d of %d", request.path, start + sent, size)
    return resp


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)

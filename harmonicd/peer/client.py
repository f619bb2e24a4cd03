"""The peer HTTP API's client side: a school's sync job, in a worker thread.

Blocking http.client with connect/read timeouts; a download cut short is
resumed from where it stopped with a Range request.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import errno
import functools
import http.client
import json
import logging
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from harmonicd.core import trust
from harmonicd.core.objects import KIND_NAMES, MAX_OBJECT, object_id
from harmonicd.core.release import SignedRelease, decode
from harmonicd.errors import HarmonicError
from harmonicd.peer import API, CHUNK, HEX64, PACK_NAME, UpstreamError
from harmonicd.services.shared import file_digest

log = logging.getLogger("harmonicd")

CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0  # seconds without a byte before a transfer is given up (and resumed next time)
MIN_RATE = 1024  # bytes/s: a transfer slower than this for longer than its timeout is given up

class Throttle:
    """At most ``rate`` bytes per second on average (0: no cap), by sleeping: the
    link a school shares with its classrooms is not the sync's alone."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class _ThrottledFile:
    def __init__(self, f: Any, throttle: Throttle) -> None:
        self.f = f
        self.throttle = throttle

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(min(n, CHUNK) if n and n > 0 else CHUNK)
        self.throttle.take(len(data))
        return data


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str, _changed: int) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The context https upstreams are checked with: the certificate must verify
    (always) against upstream.ca_file if set (a private CA, or the master's
    self-signed certificate), else the system's CA store; the host name must match.
    Built once per file version (loading the system store costs milliseconds)."""
    try:
        changed = os.stat(ca_file).st_mtime_ns if ca_file else 0
        return _tls_context(ca_file, changed)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"upstream.ca_file {ca_file}: cannot be used ({exc})", False, "tls") from None


def _connection(url: urllib.parse.SplitResult, tls: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    host = url.hostname or ""
    if url.scheme == "https":
        return http.client.HTTPSConnection(host, url.port or 443, timeout=CONNECT_TIMEOUT,
                                           context=tls or tls_context())
    if url.scheme == "http":
        return http.client.HTTPConnection(host, url.port or 80, timeout=CONNECT_TIMEOUT)
    raise UpstreamError(f"upstream.url {url.geturl()}: only http:// and https:// are supported", False)


def _request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = READ_TIMEOUT, tls: ssl.SSLContext | None = None,
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urllib.parse.urlsplit(base)
    conn = _connection(url, tls)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.request(method, url.path.rstrip("/") + path, body=body, headers=headers or {})
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise classify(base, exc, timeout) from None


def classify(base: str, exc: BaseException, timeout: float) -> UpstreamError:
    """Why the upstream could not be asked, in words and as a reason code
    (peer.REASONS): the order matters, the classes nest (SSLError and
    gaierror are OSErrors, RemoteDisconnected is both a reset and an HTTP error)."""
    host = urllib.parse.urlsplit(base).hostname or base
    if isinstance(exc, socket.gaierror):
        return UpstreamError(f"{base}: cannot resolve {host} ({exc.strerror or exc}; DNS, or no network yet)",
                             False, "dns")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamError(f"{base}: TLS certificate not accepted ({exc.verify_message or exc.reason}); "
                             "a captive portal or a wrong upstream.url?", False, "tls")
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"{base}: TLS failed ({exc.reason or exc})", False, "tls")
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"{base}: no answer within {timeout:g} s (upstream.timeout_seconds)", False,
                             "timeout")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(f"{base}: cannot reach the upstream (connection refused: nothing listens "
                             f"at {host}:{urllib.parse.urlsplit(base).port or 'its port'})", False, "refused")
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return UpstreamError(f"{base}: the connection was cut ({exc})", False, "cut")
    if isinstance(exc, OSError):
        why = exc.strerror or str(exc) or type(exc).__name__
        code = "network" if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL) else "cut"
        return UpstreamError(f"{base}: cannot reach the upstream ({why})", False, code)
    return UpstreamError(f"{base}: the upstream's answer is not HTTP ({exc!r})", True, "http")


def _read_body(resp: http.client.HTTPResponse, base: str, limit: int, timeout: float) -> bytes:
    """A small answer, whole: bounded in size (an endless body) and in time (a drip)."""
    started = time.monotonic()
    parts: list[bytes] = []
    n = 0
    while True:
        try:
            chunk = resp.read1(65536)
        except TimeoutError:
            raise UpstreamError(f"{base}: no answer within {timeout:g} s (upstream.timeout_seconds)", False,
                                "timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamError(f"{base}: the answer was cut off ({exc})", False, "cut") from None
        if not chunk:
            if resp.length:  # http.client counts down Content-Length: bytes still owed
                raise UpstreamError(f"{base}: the answer was cut off after {n} bytes", False, "cut")
            return b"".join(parts)
        n += len(chunk)
        parts.append(chunk)
        if n > limit:
            raise UpstreamError(f"{base}: the answer is larger than {limit} bytes", True, "http")
        if time.monotonic() - started > timeout:
            raise UpstreamError(f"{base}: the answer took longer than {timeout:g} s", False, "timeout")


def _ask(base: str, method: str, path: str, timeout: float = READ_TIMEOUT, tls: ssl.SSLContext | None = None,
         body: Any = None, headers: dict[str, str] | None = None,
         ) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    """One request whose answer is a small JSON object, read whole; the connection closed."""
    conn, resp = _request(base, method, path, body=body, headers=headers, timeout=timeout, tls=tls)
    try:
        return resp, _json(resp, base, timeout)
    finally:
        conn.close()


def _json(resp: http.client.HTTPResponse, base: str, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    raw = _read_body(resp, base, 1 << 20, timeout)
    ctype = resp.getheader("Content-Type", "")
    if "json" not in ctype:
        # A captive portal answers whatever is asked with its login page (or a
        # redirect to it): HTML where JSON was expected is the sign.
        portal = "html" in ctype or raw.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
        hint = " (a captive portal's login page?)" if portal else ""
        raise UpstreamError(f"{base}: answered {resp.status} with {ctype or 'no type'}, not JSON{hint}", True,
                            "portal" if portal else "http")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpstreamError(f"{base}: answered {resp.status} with broken JSON", True, "http") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"{base}: answered {resp.status} with JSON that is not an object", True, "http")
    return data


def retry_after(resp: http.client.HTTPResponse) -> float | None:
    """Retry-After (429, 503) in seconds (the date form too), bounded to a day."""
    value = (resp.getheader("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(min(int(value), 86400))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - time.time(), 86400.0))


def refused(base: str, resp: http.client.HTTPResponse, data: dict[str, Any], what: str) -> UpstreamError:
    """The upstream said no: rate-limited (429, with when to come back), refused
    by the server (401/403/413: the server's sentence), or any other status."""
    why = str(data.get("error", "no reason given"))[:500]
    if resp.status == 429:
        wait = retry_after(resp)
        later = f"; next try in {wait:.0f} s or later" if wait is not None else ""
        return UpstreamError(f"{base}: {what} refused (429 rate-limited): {why}{later}", True, "rate-limited", wait)
    if resp.status == 503 and resp.getheader("Retry-After"):
        wait = retry_after(resp)
        later = f"; next try in {wait:.0f} s or later" if wait is not None else ""
        return UpstreamError(f"{base}: {what} refused (503 busy): {why}{later}", True, "busy", wait)
    if resp.status in (401, 403, 413):
        return UpstreamError(f"{base}: {what} refused ({resp.status}): {why}", True, "refused-by-server")
    return UpstreamError(f"{base}: {what} refused ({resp.status}): {why}", True, "http")


def post_request(base: str, path: str, rate: int = 0, timeout: float = READ_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> list[dict[str, Any]]:
    """POST a request pack; the answer's pack files (name, size, url, shared[, sha256])."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        body = _ThrottledFile(f, Throttle(rate)) if rate else f
        resp, data = _ask(base, "POST", f"{API}/sync", timeout, tls, body,
                          {"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if resp.status != 200:
        raise refused(base, resp, data, "sync")
    packs = data.get("packs")
    if not isinstance(packs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and PACK_NAME.match(p["name"])
            and isinstance(p.get("size"), int) and isinstance(p.get("url"), str)
            and (p.get("sha256") is None or (isinstance(p["sha256"], str) and HEX64.match(p["sha256"])))
            for p in packs):
        raise UpstreamError(f"{base}: the sync answer does not list packs as expected", True)
    return packs


def download(base: str, pack: dict[str, Any], folder: str, progress: Callable[[int], None] | None = None,
             rate: int = 0, timeout: float = READ_TIMEOUT, tls: ssl.SSLContext | None = None) -> str:
    """Fetch one answer pack into folder, continuing a partial file with Range. A
    shared pack (its sha256 given: the hash its URL names) is checked against it,
    so a cache that kept broken bytes is named as such."""
    throttle = Throttle(rate)
    started = time.monotonic()
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, pack["name"])
    part = final + ".part"
    want = int(pack["size"])
    # Where it comes from, for the next sync to continue it if this one is cut.
    with open(final + ".json", "w") as f:
        json.dump({k: pack[k] for k in ("name", "size", "url", "shared", "sha256") if k in pack}, f)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > want:
        os.unlink(part)
        have = 0
    start_at = have
    if have < want:
        headers = {"Range": f"bytes={have}-"} if have else {}
        conn, resp = _request(base, "GET", pack["url"], headers=headers, timeout=timeout, tls=tls)
        try:
            if resp.status == 200 and have:
                have = start_at = 0  # the server ignored the Range: start again
            elif resp.status == 429:
                raise refused(base, resp, {"error": "too many downloads at once"}, pack["name"])
            elif resp.status not in (200, 206):
                raise UpstreamError(f"{base}: {pack['name']}: {resp.status} {resp.reason}", True)
            with open(part, "ab" if have else "wb") as f:
                while True:
                    try:
                        chunk = resp.read1(CHUNK)  # what has arrived: a drip must not stall the pace check
                    except (OSError, http.client.HTTPException) as exc:
                        raise UpstreamError(f"{base}: {pack['name']} cut off at {have} of {want} bytes "
                                            f"({exc}); the next sync continues from there", False) from None
                    if not chunk:
                        break
                    if have + len(chunk) > want:
                        raise UpstreamError(f"{base}: {pack['name']} is longer than announced", True)
                    f.write(chunk)
                    have += len(chunk)
                    throttle.take(len(chunk))
                    _check_pace(base, pack["name"], have - start_at, started, timeout, have, want)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            conn.close()
        if have != want:
            raise UpstreamError(f"{base}: {pack['name']} cut off at {have} of {want} bytes; "
                                "the next sync continues from there", False)
    digest = pack.get("sha256")
    if isinstance(digest, str) and file_digest(part) != digest:
        for p in (part, final + ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise UpstreamError(f"{base}: {pack['name']} does not match the sha256 its URL names (a cache or proxy "
                            "between here and the master kept broken bytes?); dropped", True, "http")
    os.replace(part, final)
    os.unlink(final + ".json")
    return final


def _check_pace(base: str, name: str, got: int, started: float, timeout: float, have: int, want: int) -> None:
    """A link that drips (a byte now and then, so the read timeout never fires)
    is given up once it has been slower than MIN_RATE for longer than the timeout."""
    elapsed = time.monotonic() - started
    if elapsed > timeout and got < MIN_RATE * elapsed:
        raise UpstreamError(f"{base}: {name} arrives at {got / elapsed:.0f} B/s, under {MIN_RATE} B/s for "
                            f"{elapsed:.0f} s; stopped at {have} of {want} bytes, the next sync continues "
                            "from there", False)


def resume_pending(base: str, folder: str, progress: Callable[[int], None] | None = None,
                   rate: int = 0, timeout: float = READ_TIMEOUT, tls: ssl.SSLContext | None = None) -> list[str]:
    """Finish the downloads an earlier sync left cut short (before asking again,
    which would make the server replace them). Returns the completed files (and
    whole downloads a cut sync did not get to apply); a pack the server no
    longer has is dropped."""
    done: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return done
    for n in names:
        if n.endswith(".hpk") and n + ".json" not in names and PACK_NAME.match(n):
            done.append(os.path.join(folder, n))  # downloaded whole; the sync stopped before applying it
            continue
        if not n.endswith(".hpk.json"):
            continue
        meta_path = os.path.join(folder, n)
        try:
            with open(meta_path) as f:
                pack = json.load(f)
            ok = isinstance(pack, dict) and PACK_NAME.match(str(pack.get("name"))) and isinstance(pack.get("size"), int)
        except (OSError, ValueError):
            ok = False
        if not ok:
            os.unlink(meta_path)
            continue
        try:
            done.append(download(base, pack, folder, progress, rate, timeout, tls))
        except UpstreamError as exc:
            if "404" not in str(exc):
                raise
            log.info("%s is no longer on the server; asking again", pack["name"])
            for leftover in (meta_path, meta_path[: -len(".json")] + ".part"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
    return done


def health(base: str, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    return _ask(base, "GET", f"{API}/health", tls=tls)[1]


def fetch_object(base: str, oid: bytes, timeout: float = READ_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One object by its id (GET /v1/objects/<hex id>): the body is the kind byte
    and the payload, whose BLAKE3 hash is the id; checked here, so whoever
    served it (the master, a relay, a cache) cannot change it."""
    conn, resp = _request(base, "GET", f"{API}/objects/{oid.hex()}", timeout=timeout, tls=tls)
    try:
        if resp.status != 200:
            raise UpstreamError(f"{base}: object {oid.hex()[:12]}: {resp.status} {resp.reason}", True, "http")
        body = _read_body(resp, base, MAX_OBJECT + 1, timeout)
    finally:
        conn.close()
    if not body or body[0] not in KIND_NAMES or object_id(body[0], body[1:]) != oid:
        raise UpstreamError(f"{base}: object {oid.hex()[:12]}: what arrived does not match its id", True, "http")
    return body[0], body[1:]


def fetch_release(base: str, collection: str, master_key: bytes, timeout: float = READ_TIMEOUT,
                  tls: ssl.SSLContext | None = None) -> SignedRelease:
    """The latest release of a collection for everyone (GET /v1/releases/<name>),
    its signature checked against the master's key: a relay or cache cannot forge
    one (it can only serve an older one, which the caller compares by seq)."""
    resp, data = _ask(base, "GET", f"{API}/releases/{urllib.parse.quote(collection, safe='')}", timeout, tls)
    if resp.status != 200:
        raise UpstreamError(f"{base}: release of {collection}: {resp.status} {data.get('error', resp.reason)}",
                            True, "http")
    try:
        sr = decode(base64.b64decode(str(data["body"]), validate=True), base64.b64decode(str(data["sig"]),
                                                                                          validate=True))
        sr.verify(master_key)
    except (KeyError, ValueError, HarmonicError) as exc:
        raise UpstreamError(f"{base}: release of {collection}: not a release signed by the master ({exc})",
                            True, "http") from None
    r = sr.release
    if r.collection != collection or data.get("seq") != r.seq or data.get("root") != r.root.hex():
        raise UpstreamError(f"{base}: release of {collection}: the signed release says {r.label()}, "
                            "not what the answer names", True, "http")
    return sr


def fetch_trust(base: str, anchor: bytes, timeout: float = READ_TIMEOUT,
                tls: ssl.SSLContext | None = None) -> trust.ChainState:
    """The master's key chain as a server serves it (GET /v1/trust), followed from
    the anchor key (a school's upstream.master_key): a relay or a cache can serve an
    older chain, never a forged one. A school needs it only to look: every pack the
    master or a relay writes carries the chain too (services/trust.py)."""
    resp, data = _ask(base, "GET", f"{API}/trust", timeout, tls)
    if resp.status != 200:
        raise UpstreamError(f"{base}: key chain: {resp.status} {data.get('error', resp.reason)}", True, "http")
    try:
        links = data["chain"]
        raw = [[base64.b64decode(str(x), validate=True) for x in link] for link in links[:trust.MAX_RECORDS + 1]]
        state, _new = trust.advance(trust.genesis(anchor), trust.decode_chain(raw))
    except (KeyError, TypeError, ValueError, HarmonicError) as exc:
        raise UpstreamError(f"{base}: key chain refused: {exc}", True, "http") from None
    return state

"""Who may sync, how often, and why not: the master's refusals (docs/http-api.md).

Every refusal is one JSON body ``{"error": "<one line>", "reason": "<code>"}``
so that a school's status can show both the sentence and a code a program
can act on:

    401 bad-signature   the request pack's signature does not verify against the
                        key of the school it names (a forgery, or a school whose
                        key was replaced without enrolling it again)
    403 unenrolled      the sender is not an enrolled school server
    403 revoked         the school's enrollment was revoked (its key is refused for ever)
    403 enrollment-refused  a first contact whose bundle's token is refused: unknown,
                        expired, withdrawn, used by another key, or its proof wrong
    403 misaddressed    the request is addressed to another server
    403 replayed        this request pack was answered before (a copy, sent again)
    403 stale           the request was made more than server.max_request_age_seconds
                        before or after the server's clock (only when that is set:
                        the default 0 refuses no request for its time, as a school's
                        clock is often wrong); sticks are not held to this
    403 refused         any other trust refusal (a release that must not be accepted)
    400 bad-request     not a pack, or a damaged one
    413 too-large       larger than server.max_request
    429 rate-limited    too many syncs per minute from this address or this school,
                        or too many downloads at once from this address
                        (with Retry-After: seconds)
    503 busy            the answers already queued would keep this request waiting
                        longer than server.max_answer_wait_seconds (with Retry-After:
                        about when the queue has drained, spread over 0.5-1.5x of that)

Rates are kept in memory (a restart forgets them, which only ever lets more
through): a sliding minute of sync attempts per remote address (every
attempt counts, refused ones too) and per school (counted once the school's
signature verified, so nobody can use up another school's budget by naming
it), and a count of downloads in flight per address.

Replays: a school makes a fresh request pack (a new random pack id) for
every sync, so a retry after a cut connection is a new request and is
answered; the same pack id twice is a copy, refused by services/online.py
(the master's database records every pack id it took, for ever, so a
replay is caught whatever its age). Where server.max_request_age_seconds is
set, a request older than that is refused before the store is asked.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web

from harmonicd.core.pack import Header, PackReader
from harmonicd.errors import (
    BadSignature,
    CorruptPack,
    EnrollmentRefused,
    HarmonicError,
    Misaddressed,
    PackError,
    ReplayedRequest,
    TruncatedPack,
    TrustError,
    UntrustedPack,
)
from harmonicd.peer import API

WINDOW = 60.0  # seconds: the rates are per minute
PRUNE_AT = 4096  # addresses remembered before the idle ones are forgotten


@dataclass(frozen=True)
class Settings:
    syncs_per_minute: int = 6  # per school; 0: no limit
    address_syncs_per_minute: int = 60  # per remote address (many schools may share one NAT); 0: no limit
    downloads_per_address: int = 4  # pack downloads in flight per remote address; 0: no limit
    max_request_age: float = 0.0  # seconds a request's creation time may differ from our clock; 0: any
    max_answer_wait: float = 30.0  # seconds of answers already queued before a new sync hears "busy"; 0: never


class Refused(HarmonicError):
    """An HTTP refusal with a machine-readable reason."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.json_response({"error": str(self), "reason": self.reason}, status=self.status,
                                 headers=headers)


def refusal(exc: PackError | TrustError) -> Refused:
    """The status and reason code for a request the store refused (services/exchange.py's
    trust check, or services/online.py). The classes say the family; UntrustedPack
    covers three cases that the school must tell apart, so its sentence decides."""
    msg = f"request refused: {exc}"
    text = str(exc)
    if isinstance(exc, ReplayedRequest):
        return Refused(403, "replayed", msg)
    if isinstance(exc, Misaddressed):
        return Refused(403, "misaddressed", msg)
    if isinstance(exc, EnrollmentRefused):
        return Refused(403, "enrollment-refused", msg)
    if isinstance(exc, BadSignature) or (isinstance(exc, UntrustedPack) and (
            "signed by another key" in text or "signature does not verify" in text)):
        return Refused(401, "bad-signature", msg)
    if "revoked" in text:
        return Refused(403, "revoked", msg)
    if isinstance(exc, UntrustedPack) or "not from an enrolled school" in text:
        return Refused(403, "unenrolled", msg)
    if isinstance(exc, CorruptPack | TruncatedPack):
        return Refused(400, "bad-request", msg)
    return Refused(403, "refused", msg)


def read_header(path: str) -> Header:
    """The request's header, for the checks that come before the store is asked.
    Nothing is trusted from it yet: it only ever leads to a refusal, and the
    signature is checked when the store takes the pack."""
    with open(path, "rb") as f:
        try:
            return PackReader(f, "request", lambda h: h.sender_key).header
        except PackError as exc:
            raise Refused(400, "bad-request", f"request refused: {exc}") from None


def check_age(header: Header, max_age: float, now: float | None = None) -> None:
    """An online request is made just before it is sent: one made long ago is a copy
    (or the school's clock is wrong, which it should hear about)."""
    now = time.time() if now is None else now
    off = header.created - now
    if abs(off) > max_age:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header.created))
        side = "ahead of" if off > 0 else "behind"
        raise Refused(403, "stale", f"request refused: made at {when}, {abs(off) / 3600:.1f} h {side} the "
                      f"server's clock (limit {max_age:g} s, server.max_request_age_seconds); "
                      "is the school's clock right?")


class Limits:
    """The master's rates, on the event loop (no locks: only the loop touches them)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._by_address: dict[str, deque[float]] = {}
        self._by_school: dict[str, deque[float]] = {}
        self._downloads: dict[str, int] = {}
        # Answers are one job at a time (the store's lock): how many wait, and
        # how long one takes (a moving average of the job time alone, not of
        # its wait in the queue).
        # The first guess is low on purpose: a cold start accepts the stampede
        # rather than send schools away on a guess (a no-op answer takes
        # milliseconds); the estimate follows the real answers within a few.
        self._answering = 0
        self._answer_seconds = 0.1
        self._last_done = 0.0

    def _window(self, table: dict[str, deque[float]], key: str, limit: int, who: str, setting: str,
                count: bool) -> None:
        now = self.clock()
        if len(table) > PRUNE_AT:
            for k in [k for k, q in table.items() if not q or q[-1] <= now - WINDOW]:
                del table[k]
        q = table.setdefault(key, deque())
        while q and q[0] <= now - WINDOW:
            q.popleft()
        if len(q) >= limit:
            wait = q[0] + WINDOW - now
            raise Refused(429, "rate-limited", f"too many syncs from {who}: at most {limit} a minute "
                          f"(server.{setting}); "
                          f"try again in {math.ceil(wait)} s", retry_after=wait)
        if count:
            q.append(now)

    def sync_from(self, address: str) -> None:
        """A sync request arrives from address: counted, or refused (429)."""
        if self.settings.address_syncs_per_minute > 0:
            self._window(self._by_address, address, self.settings.address_syncs_per_minute,
                         f"address {address}", "max_address_syncs_per_minute", True)

    def school_may_sync(self, school: str) -> None:
        """Before the store is asked: has this school had its syncs for this minute?"""
        if self.settings.syncs_per_minute > 0:
            self._window(self._by_school, school, self.settings.syncs_per_minute, f"school {school}",
                         "max_syncs_per_minute", False)

    def school_synced(self, school: str) -> None:
        """A request whose signature verified: it counts against the school."""
        if self.settings.syncs_per_minute > 0:
            self._by_school.setdefault(school, deque()).append(self.clock())

    def may_queue(self) -> None:
        """Before a request's body is read: when the answers already queued would
        keep this one waiting longer than server.max_answer_wait_seconds, say
        busy (503) and when to come back, spread out, rather than let it wait
        past the school's timeout (a stampede after an outage: every school at
        once). The school waits out Retry-After as for a 429."""
        budget = self.settings.max_answer_wait
        ahead = self._answering * self._answer_seconds
        if budget <= 0 or ahead <= budget:
            return
        # Back about when the queue has drained, spread over 0.5-1.5x of it so
        # that those sent away do not all return at one moment.
        wait = min(900.0, max(2.0, ahead * random.uniform(0.5, 1.5)))
        raise Refused(503, "busy", f"the server is busy: {self._answering} syncs ahead of this one (about "
                      f"{ahead:.0f} s of work, server.max_answer_wait_seconds {budget:g}); "
                      f"try again in {math.ceil(wait)} s", retry_after=wait)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Around one request's wait for its answer job."""
        self._answering += 1
        start = self.clock()
        try:
            yield
        finally:
            self._answering -= 1
            done = self.clock()
            # FIFO, one at a time: a job started when it arrived or when the one before it ended.
            took = done - max(start, self._last_done)
            self._last_done = done
            self._answer_seconds = 0.7 * self._answer_seconds + 0.3 * max(took, 0.001)

    @contextlib.asynccontextmanager
    async def download(self, address: str) -> AsyncIterator[None]:
        limit = self.settings.downloads_per_address
        n = self._downloads.get(address, 0)
        if limit > 0 and n >= limit:
            raise Refused(429, "rate-limited", f"too many downloads at once from address {address}: at most "
                          f"{limit} (server.max_downloads_per_address); try again in a few seconds",
                          retry_after=5)
        self._downloads[address] = n + 1
        try:
            yield
        finally:
            left = self._downloads[address] - 1
            if left:
                self._downloads[address] = left
            else:
                del self._downloads[address]

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Sync attempts are counted per address before the body is read; a pack
        download holds its slot until the last byte is sent (prepare() sends it)."""
        address = request.remote or "?"
        try:
            if request.method == "POST" and request.path == f"{API}/sync":
                self.sync_from(address)
                return await handler(request)
            if request.method in ("GET", "HEAD") and request.path.startswith((f"{API}/packs/", f"{API}/shared/")):
                async with self.download(address):
                    resp = await handler(request)
                    await resp.prepare(request)
                    return resp
        except Refused as exc:
            return exc.response()
        return await handler(request)

"""The peer HTTP API (docs/http-api.md): packs over HTTP instead of a stick.

Server (a master, or any server with ``server.listen``), aiohttp on TCP:

    POST /v1/sync                     body: a school's request pack; answer: JSON naming
                                      the answer's pack files
    GET  /v1/packs/<school>/<name>    one answer pack file (Range requests: resumable)
    GET  /v1/health                   who answers

Who may sync is decided by the request pack itself: it must be signed by an
enrolled school and addressed to this server, exactly as on a stick
(services/exchange.py); its pack id is recorded, so a replayed request
changes nothing. Answer files are named by a random pack id the school only
learns from the master's answer.

Client (a school's sync job, in a worker thread): blocking http.client with
connect/read timeouts; a download cut short is resumed from where it
stopped with a Range request.

This package: ``server`` (aiohttp, on the daemon's loop), ``client`` (blocking
http.client, in the sync job's worker thread) and what both must agree on.
"""

from __future__ import annotations

import re

from harmonicd.errors import HarmonicError

API = "/v1"
MAX_REQUEST = 4_000_000_000  # a request pack carries a school's new statistics and backups
CHUNK = 256 << 10
PACK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,80}-\d{8}T\d{6}-[0-9a-f]{12}-v\d{3}\.hpk\Z")
SERVER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
HEX64 = re.compile(r"[0-9a-f]{64}\Z")  # an object id, or the sha256 naming a shared pack


# Why a sync with the upstream failed, as status's upstream.reason shows it
# (docs/control-api.md): the one-line error says it in words, this for programs.
REASONS = ("dns", "network", "refused", "timeout", "tls", "http", "portal", "refused-by-server", "rate-limited",
           "cut", "untrusted", "busy")


class UpstreamError(HarmonicError):
    """The upstream could not be reached or refused the sync.

    ``reason``: one of REASONS (None: not classified, shown as "http" when the
    upstream answered and "cut" when it did not); ``retry_after``: seconds the
    upstream asked us to wait (429's Retry-After), honoured by the sync timer."""

    def __init__(self, message: str, reachable: bool, reason: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reachable = reachable
        self.reason = reason or ("http" if reachable else "cut")
        self.retry_after = retry_after

"""The control socket's client side: a few blocking calls over http.client.

Kept apart from the server (harmonicd/control.py, which needs aiohttp) because
harmonicctl imports it on every command: importing aiohttp alone costs more
than a no-op sync (docs/benchmarks.md), and the CLI should start fast and
needs no event loop.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from harmonicd.errors import DaemonNotRunning, HarmonicError

API = "/v1"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _open(path: str, method: str, url: str, body: dict[str, Any] | None,
          timeout: float | None) -> tuple[_UnixConnection, http.client.HTTPResponse]:
    conn = _UnixConnection(path, timeout)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        conn.request(method, url, body=data, headers=headers)
        return conn, conn.getresponse()
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        raise DaemonNotRunning(f"the daemon is not running (no one answers on {path})") from None
    except PermissionError:
        conn.close()
        raise HarmonicError(f"{path}: permission denied (reading needs the socket's group, "
                            "changing needs root or the admin group)") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        conn.close()
        raise HarmonicError(f"{path}: the daemon did not answer ({exc})") from None


def call(path: str, method: str, url: str, body: dict[str, Any] | None = None,
         timeout: float | None = 10.0) -> tuple[int, dict[str, Any]]:
    """One request; (HTTP status, decoded JSON body)."""
    conn, resp = _open(path, method, url, body, timeout)
    try:
        raw = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise HarmonicError(f"{path}: the daemon answered something that is not JSON") from None
    return resp.status, data if isinstance(data, dict) else {"value": data}


def events(path: str, recent: bool = False) -> Iterator[dict[str, Any]]:
    """The event stream, one decoded event at a time, until the daemon ends it."""
    conn, resp = _open(path, "GET", f"{API}/events" + ("?recent=1" if recent else ""), None, None)
    try:
        if resp.status != 200:
            raise HarmonicError(f"{path}: events refused ({resp.status})")
        for line in resp:
            if line.strip():
                yield json.loads(line)
    finally:
        conn.close()

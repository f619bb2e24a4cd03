"""The control socket against callers it must refuse, and inputs it must survive.

Real daemons (tests/daemon/conftest.py). Three parts:

- permissions, checked as an unprivileged user (uid nobody, with and without
  the socket and admin groups) when the tests run as root;
- bad inputs: oversized, malformed, slow and too many connections; each is
  refused or closed and the daemon keeps answering;
- the socket path at start: anything but our own dead socket there makes
  the daemon exit 78 and leaves it untouched.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harmonicd import control
from harmonicd.errors import HarmonicError
from tests.conftest import Server, make_master, make_school
from tests.daemon.conftest import DaemonProc, wait_for

EX_CONFIG = 78
NOBODY = 65534
MB10 = 10 * 1024 * 1024
Start = Callable[..., DaemonProc]


# --------------------------------------------------------------------------- helpers


def healthy(d: DaemonProc) -> float:
    """The daemon is alive and answers status; the answer's latency in seconds."""
    assert d.proc.poll() is None, f"harmonicd exited {d.proc.returncode}:\n{d.output()}"
    t0 = time.monotonic()
    code, st = d.call("GET", "/v1/status", timeout=5)
    took = time.monotonic() - t0
    assert code == 200, (code, st)
    assert st.get("daemon") is True, (code, st)
    return took


def connect(path: str, timeout: float = 30) -> socket.socket:
    """A connected socket; a full listen backlog (EAGAIN) is waited out, as a blocking client would."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except BaseException:
            s.close()
            raise


def exchange_raw(path: str, payload: bytes, timeout: float = 30) -> tuple[int, bytes] | None:
    """Send `payload` (from a thread, so a large one cannot block reading the answer) and
    read one HTTP response: (status, body), or None when the daemon closed the connection
    without one (a write into a closed connection counts as closed, too)."""
    s = connect(path, timeout)

    def send() -> None:
        try:
            s.sendall(payload)
        except OSError:
            pass  # the daemon stopped reading and closed: what the caller checks for

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        resp = http.client.HTTPResponse(s)  # type: ignore[arg-type]
        try:
            resp.begin()
            return resp.status, resp.read()
        except (http.client.HTTPException, ConnectionError):
            return None
    finally:
        try:
            s.shutdown(socket.SHUT_RDWR)  # wakes a sender still blocked in sendall
        except OSError:
            pass
        sender.join(timeout)
        s.close()
        assert not sender.is_alive()


def request(path: str, method: str, url: str, body: bytes | None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One well-framed request with a body of any bytes; (status, decoded JSON answer)."""
    head = [f"{method} {url} HTTP/1.1", "Host: localhost", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    got = exchange_raw(path, ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
    assert got is not None, f"{method} {url}: the daemon closed without answering"
    status, raw = got
    data = json.loads(raw)
    assert isinstance(data, dict), raw
    return status, data


def closed_by_peer(s: socket.socket, wait: float) -> bool:
    """True when the daemon has closed this connection (EOF or reset) within `wait` s."""
    r, _, _ = select.select([s], [], [], wait)
    if not r:
        return False
    try:
        return s.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def one_error_line(out: str, *names: str) -> str:
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, f"expected one error line:\n{out}"
    for n in names:
        assert n in errors[0], f"{n!r} not named in: {errors[0]}"
    return errors[0]


def refused_start(start_daemon: Start, server: Server, *names: str) -> str:
    d = start_daemon(server, wait=False)
    try:
        rc = d.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"harmonicd started anyway:\n{d.output()}") from None
    assert rc == EX_CONFIG, f"exit {rc}:\n{d.output()}"
    return one_error_line(d.output(), *names)


@pytest.fixture
def master(tmp_path: Path) -> Server:
    return make_master(tmp_path)[0]


# --------------------------------------------------------------------------- permissions


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder every user can traverse (pytest's own tmp is 0700 under root)."""
    d = Path(tempfile.mkdtemp(prefix="harmonicd-sock-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# A client in a subprocess with other credentials: the standard library only, so it
# runs under any interpreter the unprivileged user can execute.
CLIENT = r"""
import http.client, json, socket, sys
path, method, url, body = sys.argv[1:5]
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
c = C("localhost", timeout=60)
try:
    c.request(method, url, body=body or None, headers={"Content-Type": "application/json"} if body else {})
except OSError as e:
    print(json.dumps({"errno": e.errno}))
    sys.exit(0)
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
"""


def _interpreter_for(uid: int, gid: int) -> str:
    """This environment's Python if `uid` may run it, else the system's."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            p = subprocess.run([exe, "-I", "-c", "import http.client"], user=uid, group=gid, extra_groups=[],
                               capture_output=True, timeout=60, check=False)
        except OSError:
            continue
        if p.returncode == 0:
            return exe
    pytest.skip(f"no Python interpreter that uid {uid} may run")


def _group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pytest.skip(f"this system has no group {name!r}")


def _set_server(server: Server, key: str, value: str) -> None:
    text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value)}", server.config.read_text())
    assert n == 1, f"no {key} in {server.config}"
    server.config.write_text(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as another user")
def test_permissions_as_unprivileged_user(tmp_path: Path, open_tmp: Path, start_daemon: Start) -> None:
    readers, admins = _group("users"), _group("staff")
    sock = open_tmp / "run" / "control.sock"
    m, _ = make_master(tmp_path, "master-1", "--socket", str(sock))
    _set_server(m, "socket_group", "users")
    _set_server(m, "admin_group", "staff")
    d = start_daemon(m)
    python = _interpreter_for(NOBODY, NOBODY)

    folder = os.stat(sock.parent)
    assert stat.S_IMODE(folder.st_mode) == 0o750, oct(folder.st_mode)
    assert folder.st_gid == readers, oct(folder.st_mode)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_gid == readers, oct(st.st_mode)

    def as_nobody(groups: list[int], method: str, url: str, body: str = "") -> dict[str, Any]:
        p = subprocess.run([python, "-I", "-c", CLIENT, str(sock), method, url, body], user=NOBODY, group=NOBODY,
                           extra_groups=groups, capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 0, p.stderr
        out: dict[str, Any] = json.loads(p.stdout)
        return out

    # Outside the socket's group: the kernel refuses the connection itself.
    assert as_nobody([], "GET", "/v1/status") == {"errno": 13}
    # The socket's group may read...
    got = as_nobody([readers], "GET", "/v1/status")
    assert got["status"] == 200, got
    assert got["body"]["id"] == "master-1", got
    # ...but not change anything; the refusal is logged with the caller's uid.
    got = as_nobody([readers], "POST", "/v1/gc", '{"wait": true}')
    assert got["status"] == 403, got
    assert "staff" in got["body"]["error"], got
    wait_for(lambda: re.search(rf"WARNING control: refused gc for uid {NOBODY}\b", d.output()), 10,
             what="the refusal in the log")
    assert "asked for gc" not in d.output()
    # The admin group may change things.
    got = as_nobody([readers, admins], "POST", "/v1/gc", '{"wait": true}')
    assert got["status"] == 200, got
    assert got["body"]["ok"] is True, got
    assert re.search(rf"control: uid {NOBODY} asked for gc", d.output()), d.output()
    # And root may.
    code, body = d.call("POST", "/v1/gc", {"wait": True}, timeout=60)
    assert code == 200, body
    assert body["ok"] is True, body
    healthy(d)


# --------------------------------------------------------------------------- bad inputs


def test_oversized_requests(master: Server, start_daemon: Start) -> None:
    d = start_daemon(master)
    sock = d.socket

    # A 10 MB body: 413 (as JSON) or closed, never read into memory.
    head = (f"POST /v1/exchange HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MB10}\r\nConnection: close\r\n\r\n").encode()
    got = exchange_raw(sock, head + b'{"dir": "' + b"a" * (MB10 - 12) + b'"}')
    if got is not None:
        assert got[0] == 413, got[:1]
        assert "larger than" in json.loads(got[1])["error"]
    healthy(d)

    # The same body sent chunked, with no length announced.
    chunk = b"a" * (1 << 20)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    head = (b"POST /v1/exchange HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    got = exchange_raw(sock, head + body)
    assert got is None or got[0] == 413, got and got[:1]
    healthy(d)

    # A 10 MB request line, and a 10 MB header.
    got = exchange_raw(sock, b"GET /v1/status?" + b"a" * MB10 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert got is None or got[0] in (400, 414, 431), got and got[:1]
    healthy(d)
    got = exchange_raw(sock, b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * MB10 + b"\r\n\r\n")
    assert got is None or got[0] in (400, 431), got and got[:1]
    healthy(d)
    # Many headers, each small.
    got = exchange_raw(sock, b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n"
                       + b"".join(b"X-%d: a\r\n" % i for i in range(100_000)) + b"\r\n")
    assert got is None or got[0] in (400, 431), got and got[:1]
    healthy(d)
    assert "Traceback" not in d.output()


def test_malformed_requests(master: Server, start_daemon: Start) -> None:
    d = start_daemon(master)
    sock = d.socket
    json_type = {"Content-Type": "application/json"}

    code, body = request(sock, "POST", "/v1/exchange", b'{"dir": ', json_type)
    assert code == 400, body
    assert "not valid JSON" in body["error"], body
    code, body = request(sock, "POST", "/v1/exchange", b'\xff\xfe{"dir"}', json_type)
    assert code == 400, body
    assert "error" in body, body
    for not_object in (b"[1, 2]", b'"text"', b"42", b"null"):
        code, body = request(sock, "POST", "/v1/publish", not_object, json_type)
        assert code == 400, (not_object, body)
        assert "must be a JSON object" in body["error"], (not_object, body)
    healthy(d)

    code, body = request(sock, "GET", "/v1/nothing-here", None)
    assert code == 404, body
    assert "error" in body, body
    code, body = request(sock, "GET", "/v2/status", None)
    assert code == 404, body
    assert "error" in body, body
    code, body = request(sock, "GET", "/v1/gc", None)
    assert code == 405, body
    assert "error" in body, body
    code, body = request(sock, "DELETE", "/v1/status", None)
    assert code == 405, body
    assert "error" in body, body
    healthy(d)

    # Missing or empty fields: 400 and one line naming the field.
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("exchange", {}, "'dir'"),
        ("exchange", {"dir": ""}, "'dir'"),
        ("exchange", {"dir": 7}, "'dir'"),
        ("exchange", {"dir": "relative/stick"}, "absolute"),
        ("publish", {}, "'collection'"),
        ("publish", {"collection": "content"}, "'dir'"),
        ("publish", {"collection": "", "dir": "/tmp"}, "'collection'"),
        ("publish", {"collection": "content", "dir": "/tmp", "for": ""}, "'for'"),
    ]
    for name, args, field in cases:
        code, body = d.call("POST", f"/v1/{name}", args)
        assert code == 400, (name, args, code, body)
        assert field in body["error"], (name, args, body)
        assert "\n" not in body["error"], (name, args, body)
    # An empty body is an empty object: the same clear error.
    code, body = request(sock, "POST", "/v1/exchange", b"", json_type)
    assert code == 400, body
    assert "'dir'" in body["error"], body
    healthy(d)
    assert d.status()["queued"] == [], "a refused request queued a job"
    assert d.status()["activity"] in (None, {}), "a refused request queued a job"
    assert "Traceback" not in d.output()


def test_slow_clients_are_cut_off(master: Server, start_daemon: Start) -> None:
    """One byte every second or so, in the request's head or in its body: both are cut off by
    the request deadline (or earlier), while other callers are served meanwhile."""
    d = start_daemon(master)
    head = b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    body = b'{"dir": "/' + b"a" * 200 + b'"}'
    post = (f"POST /v1/exchange HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    t0 = time.monotonic()
    # name -> [socket, bytes still to send one at a time, seconds until cut off]
    slow: dict[str, list[Any]] = {"head": [connect(d.socket), head, None], "body": [connect(d.socket), body, None]}
    slow["body"][0].sendall(post)  # the head at once, so the daemon is inside the handler, reading the body
    latencies: list[float] = []
    try:
        while any(cut is None for _, _, cut in slow.values()) and time.monotonic() - t0 < control.REQUEST_DEADLINE + 15:
            for entry in slow.values():
                s, rest, cut = entry
                if cut is not None:
                    continue
                try:
                    s.sendall(rest[:1])
                    entry[1] = rest[1:]
                except ConnectionError:
                    entry[2] = time.monotonic() - t0
                    continue
                if closed_by_peer(s, 0.5):
                    entry[2] = time.monotonic() - t0
            latencies.append(healthy(d))
            time.sleep(0.5)
    finally:
        for s, _, _ in slow.values():
            s.close()
    for name, (_, rest, cut) in slow.items():
        assert cut is not None, f"a client trickling its request's {name} was never cut off"
        assert cut < control.REQUEST_DEADLINE + 8, (name, cut)
        assert rest, f"the {name} was sent in full before the cut: too fast to test anything"
    assert max(latencies) < 5, latencies
    healthy(d)
    assert "Traceback" not in d.output(), d.output()
    assert "asked for exchange" not in d.output()


def test_many_connections_at_once(master: Server, start_daemon: Start) -> None:
    d = start_daemon(master)
    healthy(d)
    before = fd_count(d.proc.pid)

    conns: list[socket.socket] = []
    try:
        for _ in range(500):
            conns.append(connect(d.socket))
        # At most the limit stays open: the rest is closed at once (oldest idle first).
        wait_for(lambda: sum(closed_by_peer(c, 0) for c in conns) >= 500 - control.MAX_CONNECTIONS,
                 control.REQUEST_DEADLINE, what=f"all but {control.MAX_CONNECTIONS} connections closed")
        # While the clients hold all 500 open, an admin's status is still answered.
        healthy(d)
        # Held idle, they are cut off (aiohttp's idle timeout, at the latest the request deadline).
        wait_for(lambda: all(closed_by_peer(c, 0) for c in conns), control.REQUEST_DEADLINE + 10,
                 every=0.5, what="the idle connections cut off")
        healthy(d)
    finally:
        for c in conns:
            c.close()
    assert "more than 64 connections" in d.output()
    healthy(d)
    wait_for(lambda: fd_count(d.proc.pid) <= before, 20, what=f"the daemon's fds back to {before} "
             f"(now {fd_count(d.proc.pid)})")


def test_busy_connections_at_the_limit(master: Server, start_daemon: Start) -> None:
    """Event streams get at most MAX_STREAMS connections; busy ones are never closed to make
    room, so with the limit reached by streams and slow requests, new ones are refused."""
    d = start_daemon(master)
    streams: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        answers = []
        for _ in range(control.MAX_STREAMS + 3):
            s = connect(d.socket)
            s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answers.append(s.recv(64).split(b" ", 2)[1])
            streams.append(s)
        assert answers.count(b"200") == control.MAX_STREAMS, answers
        assert answers.count(b"503") == 3, answers
        healthy(d)
        # Requests stuck in their body are busy: the limit is then really full.
        # (The daemon's "100 Continue" says it is handling the request.)
        body_head = (b"POST /v1/exchange HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        for _ in range(control.MAX_CONNECTIONS - control.MAX_STREAMS):
            s = connect(d.socket)
            s.sendall(body_head)
            assert s.recv(64).startswith(b"HTTP/1.1 100"), "no 100 Continue"
            s.sendall(b"{")
            slow.append(s)
        with pytest.raises(HarmonicError):
            d.call("GET", "/v1/status", timeout=5)
        assert all(not closed_by_peer(s, 0) for s in streams[:control.MAX_STREAMS]), "a stream was closed"
        # The slow ones reach the request deadline; then status is answered again.
        wait_for(lambda: all(closed_by_peer(s, 0) for s in slow), control.REQUEST_DEADLINE + 10, every=0.5,
                 what="the slow requests cut off at the deadline")
        healthy(d)
        assert all(not closed_by_peer(s, 0) for s in streams[:control.MAX_STREAMS]), "a stream was cut off"
    finally:
        for s in streams + slow:
            s.close()
    healthy(d)


def test_connections_that_close_at_once(master: Server, start_daemon: Start) -> None:
    """Clients that connect and hang up (or reset) at once leave nothing behind."""
    d = start_daemon(master)
    healthy(d)
    before = fd_count(d.proc.pid)
    for i in range(300):
        s = connect(d.socket)
        if i % 2:
            s.sendall(b"GET /v1/sta")
        s.close()
    healthy(d)
    wait_for(lambda: fd_count(d.proc.pid) <= before, 20, what=f"the daemon's fds back to {before}")


# --------------------------------------------------------------------------- the socket path at start


@pytest.mark.parametrize("kind", ["file", "folder", "fifo"])
def test_something_else_at_the_socket_path(master: Server, start_daemon: Start, kind: str) -> None:
    path = Path(master.cfg().socket)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_text("someone's file\n")
    elif kind == "folder":
        path.mkdir()
        (path / "inside").write_text("kept\n")
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    refused_start(start_daemon, master, str(path), "refusing")
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode, before.st_mtime_ns)
    if kind == "file":
        assert path.read_text() == "someone's file\n"
    elif kind == "folder":
        assert (path / "inside").read_text() == "kept\n"


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_the_socket_path(tmp_path: Path, master: Server, start_daemon: Start, dangling: bool) -> None:
    path = Path(master.cfg().socket)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "precious"
    if not dangling:
        target.write_text("do not touch\n")
        os.chmod(target, 0o600)
    path.symlink_to(target)
    refused_start(start_daemon, master, str(path), "symlink")
    assert path.is_symlink()
    assert os.readlink(path) == str(target)
    if dangling:
        assert not target.exists()
        assert not target.is_symlink()
    else:
        assert target.read_text() == "do not touch\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket owned by another user")
def test_dead_socket_of_another_user(master: Server, start_daemon: Start) -> None:
    path = Path(master.cfg().socket)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    os.chown(path, NOBODY, NOBODY)
    ino = os.lstat(path).st_ino
    refused_start(start_daemon, master, str(path), f"uid {NOBODY}")
    assert os.lstat(path).st_ino == ino


def test_second_daemon_on_a_live_socket(tmp_path: Path, start_daemon: Start) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    first = start_daemon(s)
    ino = os.lstat(first.socket).st_ino
    refused_start(start_daemon, s, first.socket, "another harmonicd")
    assert os.lstat(first.socket).st_ino == ino
    st = first.status()
    assert st["pid"] == first.proc.pid


def test_stale_socket_after_sigkill(master: Server, start_daemon: Start) -> None:
    first = start_daemon(master)
    first.kill()
    assert first.proc.returncode == -9
    assert stat.S_ISSOCK(os.lstat(first.socket).st_mode), "the killed daemon's socket should still be there"
    with pytest.raises(HarmonicError):
        control.call(first.socket, "GET", "/v1/status", timeout=5)
    second = start_daemon(master)
    assert second.status()["pid"] == second.proc.pid
    assert " ERROR " not in second.output(), second.output()
    assert " WARNING " not in second.output(), second.output()
    assert second.stop() == 0
    assert not os.path.lexists(second.socket), "a clean stop removes the socket"

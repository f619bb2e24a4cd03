"""Connectivity: why the upstream cannot be reached (status upstream.reason),
and a school that syncs by itself the moment its network comes up.

The classification is checked against real sockets on loopback: a closed
port, a name that cannot resolve, a server that never answers, a captive
portal's HTML, a TLS server whose certificate nobody signed, a 429. The
network coming up is real too: the school daemon runs in a network
namespace of its own whose only link is a veth pair to the master's
namespace, down and without an address at first (root and `ip` needed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harmonicd.peer import UpstreamError, client
from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import free_port, no_auto_sync

# --------------------------------------------------------------------------- classification


class OneShotServer:
    """A TCP server on loopback answering every connection with ``reply(conn)``."""

    def __init__(self, reply: Callable[[socket.socket], None], wrap: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.wrap = wrap
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> OneShotServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            try:
                if self.wrap is not None:
                    conn = self.wrap.wrap_socket(conn, server_side=True)
                    self.conns.append(conn)
                self.reply(conn)
            except (OSError, ssl.SSLError):
                pass


def _answer(status: str, ctype: str, body: bytes, extra: str = "") -> Callable[[socket.socket], None]:
    def reply(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                     "Connection: close\r\n\r\n".encode() + body)
        conn.close()
    return reply


def _reason(call: Callable[[], object]) -> UpstreamError:
    with pytest.raises(UpstreamError) as err:
        call()
    assert "\n" not in str(err.value)
    return err.value


def test_refused_port_is_refused() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    e = _reason(lambda: client.health(base))
    assert (e.reason, e.reachable) == ("refused", False)
    assert "connection refused" in str(e)


def test_unresolvable_name_is_dns() -> None:
    e = _reason(lambda: client.health("http://nonexistent.invalid:8080"))
    assert (e.reason, e.reachable) == ("dns", False)
    assert "cannot resolve nonexistent.invalid" in str(e)


def test_silent_server_is_timeout() -> None:
    with OneShotServer(lambda conn: time.sleep(5)) as srv:
        e = _reason(lambda: client._request(f"http://127.0.0.1:{srv.port}", "GET", "/v1/health", timeout=0.5))
    assert (e.reason, e.reachable) == ("timeout", False)
    assert "no answer within 0.5 s" in str(e)


def test_html_instead_of_json_is_a_portal(tmp_path: Path) -> None:
    page = b"<!DOCTYPE html><html><body>Welcome to the hotel wifi, please log in</body></html>"
    req = tmp_path / "request.hpk"
    req.write_bytes(b"x" * 100)
    # Some portals even call their page text/plain: the HTML itself is the sign.
    for ctype in ("text/html; charset=utf-8", "text/plain"):
        with OneShotServer(_answer("200 OK", ctype, page)) as srv:
            e = _reason(lambda: client.post_request(f"http://127.0.0.1:{srv.port}", str(req)))
        assert (e.reason, e.reachable) == ("portal", True), ctype
        assert "captive portal" in str(e)
    with OneShotServer(_answer("200 OK", "text/plain", b"hello")) as srv:
        e = _reason(lambda: client.health(f"http://127.0.0.1:{srv.port}"))
    assert e.reason == "http"


def test_429_is_rate_limited_with_retry_after(tmp_path: Path) -> None:
    req = tmp_path / "request.hpk"
    req.write_bytes(b"x" * 100)
    body = b'{"error": "too many syncs from school school-1", "reason": "rate-limited"}'
    with OneShotServer(_answer("429 Too Many Requests", "application/json", body, "Retry-After: 42\r\n")) as srv:
        e = _reason(lambda: client.post_request(f"http://127.0.0.1:{srv.port}", str(req)))
    assert (e.reason, e.retry_after) == ("rate-limited", 42)
    assert "too many syncs" in str(e)
    with OneShotServer(_answer("403 Forbidden", "application/json", b'{"error": "no", "reason": "revoked"}')) as srv:
        e = _reason(lambda: client.post_request(f"http://127.0.0.1:{srv.port}", str(req)))
    assert e.reason == "refused-by-server"


def test_cut_answer_is_cut() -> None:
    def half(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\"")
        conn.close()
    with OneShotServer(half) as srv:
        e = _reason(lambda: client.health(f"http://127.0.0.1:{srv.port}"))
    assert (e.reason, e.reachable) == ("cut", False)


def _self_signed(tmp: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_unknown_certificate_is_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    body = b'{"id": "master-1"}'
    with OneShotServer(_answer("200 OK", "application/json", body), wrap=ctx) as srv:
        e = _reason(lambda: client.health(f"https://localhost:{srv.port}"))
        assert (e.reason, e.reachable) == ("tls", False)
        assert "certificate not accepted" in str(e)
        # The same server with its certificate trusted answers: it was the certificate.
        trusting = ssl.create_default_context(cafile=cert)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                trusting.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200 OK")
    # Plain HTTP spoken to a TLS port: also a TLS failure, not a hang.
    with OneShotServer(_answer("200 OK", "application/json", body)) as srv:
        e = _reason(lambda: client.health(f"https://localhost:{srv.port}"))
    assert e.reason == "tls"


def test_status_shows_the_reason(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{free_port()}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{free_port()}")
    no_auto_sync(s)
    d = start_daemon(s)
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 1
    up = d.status()["upstream"]
    assert (up["reachable"], up["reason"]) == (False, "refused")
    assert "connection refused" in up["last_error"]
    text = s.ctl("status").stdout
    assert "unreachable" in text, text
    assert "last error [refused]" in text, text


# --------------------------------------------------------------------------- the network coming up


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str, str]]:
    """A namespace for the school with one veth link to this namespace: the school's
    end down and without an address. Yields (namespace, school link, master address,
    school address)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` (iproute2)")
    pid = os.getpid()
    ns, here, there = f"hm-conn-{pid}", f"hmc{pid % 100000}a", f"hmc{pid % 100000}b"
    b = (pid % 16000) * 4  # a /30 of 10.213.0.0/16 of our own: tests run in parallel
    master_ip, school_ip = f"10.213.{b // 256}.{b % 256 + 1}", f"10.213.{b // 256}.{b % 256 + 2}"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{master_ip}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("link", "set", "lo", "up", ns=ns)
        yield ns, there, master_ip, school_ip
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_school_syncs_when_its_network_comes_up(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                                              netns: tuple[str, str, str, str]) -> None:
    ns, link, master_ip, school_ip = netns
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"{master_ip}:{port}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://{master_ip}:{port}")
    # Syncs by itself (interval > 0), but the next timed one is a day away: a sync
    # soon after the link comes up is the network watch's (the log says so).
    s.config.write_text(s.config.read_text().replace("interval_seconds = 3600", "interval_seconds = 86400"))
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"hello\n", "b.bin": os.urandom(100_000)})
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    d = start_daemon(s, prefix=["ip", "netns", "exec", ns])
    wait_for(lambda: d.status()["upstream"]["network_watch"], 10, what="the school watching netlink")
    # Down, no address: unreachable, and why.
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 1, p.stdout
    up = d.status()["upstream"]
    assert up["reachable"] is False
    assert up["reason"] == "network", up
    assert "unreachable" in up["last_error"].lower(), up["last_error"]
    time.sleep(3)
    assert d.status()["upstream"]["last_sync"] is None, "nothing may sync by itself while the network is down"
    # The link comes up and gets its address: the school syncs without being asked.
    t0 = time.monotonic()
    _ip("link", "set", link, "up", ns=ns)
    _ip("addr", "add", f"{school_ip}/30", "dev", link, ns=ns)
    wait_for(lambda: d.status()["upstream"]["last_sync"] is not None, 20, every=0.1,
             what="a sync by itself after the network came up")
    took = time.monotonic() - t0
    up = d.status()["upstream"]
    assert (up["reachable"], up["reason"], up["last_error"]) == (True, None, None), up
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    # The backoff after the failed start-up sync (uniform up to 30 s) may win the race
    # with the watch's 2 s debounce; either way the watch must have seen the link.
    wait_for(lambda: "the network came up" in d.output(), 10, what="the network watch's log line")
    print(f"synced {took:.1f} s after the link came up")
    assert took < 15

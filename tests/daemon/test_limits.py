"""The master's refusals, against real daemons (peer/limits.py, docs/http-api.md).

Each refusal: the school's sync fails with one line naming why, its status
says so (upstream.reason and last_error), nothing of the trusted state on
either side changes, and the next sync succeeds once the fault is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harmonicd.peer.limits import Limits, Settings
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import free_port, no_auto_sync


def _master_config(m: Server, **keys: object) -> None:
    """Add [server] keys to the master's config (before `listen`, inside [server])."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    m.config.write_text(m.config.read_text().replace('listen = "', lines + 'listen = "', 1))


def _pair(tmp_path: Path, **master_keys: object) -> tuple[Server, str, Server, int, Path]:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    if master_keys:
        _master_config(m, **master_keys)
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{port}")
    no_auto_sync(s)
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"hello\n", "b.bin": os.urandom(50_000)})
    m.ctl("publish", "content", str(src))
    write_tree(s.source("stats"), {"day.json": b'{"logins": 1}\n'})
    return m, key, s, port, src


def _sync(s: Server) -> tuple[int, str]:
    p = s.ctl("sync", "--wait", check=False)
    return p.returncode, p.stdout + p.stderr


def _unchanged(m: Server, s: Server, d: DaemonProc) -> None:
    """Nothing the refused sync carried was taken, on either side."""
    st = d.status()
    assert not (s.deploy / "content").exists(), "the school applied something from a refused sync"
    stats = next(c for c in st["collections"] if c["name"] == "stats")
    assert stats["acked_seq"] < stats["seq"], "the school's statistics must still wait for their acknowledgement"
    assert not (m.deploy / "school-1").exists(), "the master took the school's statistics from a refused sync"
    mst = json.loads(m.ctl("status", "--json").stdout)
    for row in mst.get("schools", []):
        if row["id"] == "school-1":
            assert row["last_seen"] is None, row


def _fixed(s: Server, d: DaemonProc, src: Path) -> None:
    rc, out = _sync(s)
    assert rc == 0, out
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    up = d.status()["upstream"]
    assert (up["reachable"], up["reason"], up["last_error"]) == (True, None, None)


def _refused(s: Server, d: DaemonProc, code: int, says: str, reason: str = "refused-by-server") -> None:
    rc, out = _sync(s)
    assert rc == 1, out
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1, out
    assert f"refused ({code}" in lines[0], lines[0]
    assert says in lines[0], lines[0]
    up = d.status()["upstream"]
    assert up["reachable"] is True
    assert up["reason"] == reason, up
    assert says in up["last_error"]
    text = s.ctl("status").stdout
    assert f"last error [{reason}]" in text, text


def test_unenrolled_school_gets_403(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    s = Server("school-1", tmp_path / "school-1.toml", tmp_path / "school-1")
    school_key = s.ctl("init", "node", "--id", "school-1", "--state-dir", str(s.state), "--master-key", key,
                       "--socket", str(tmp_path / "s1-run" / "control.sock"),
                       "--upstream", f"http://127.0.0.1:{port}").stdout.strip()
    no_auto_sync(s)
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"hello\n"})
    m.ctl("publish", "content", str(src))
    write_tree(s.source("stats"), {"day.json": b"{}\n"})
    start_daemon(m)
    d = start_daemon(s)
    _refused(s, d, 403, "not an enrolled school server")
    _unchanged(m, s, d)
    m.ctl("enroll", "school-1", school_key)  # the fault gone: enrolled
    _fixed(s, d, src)


def test_revoked_school_gets_403(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, _key, s, _port, src = _pair(tmp_path)
    # No command revokes yet (an enrollment is revoked in the master's database).
    with sqlite3.connect(m.state / "state.db") as db:
        db.execute("UPDATE peers SET revoked = 1 WHERE id = 'school-1'")
    start_daemon(m)
    d = start_daemon(s)
    _refused(s, d, 403, "enrollment was revoked")
    _unchanged(m, s, d)
    with sqlite3.connect(m.state / "state.db") as db:
        db.execute("UPDATE peers SET revoked = 0 WHERE id = 'school-1'")
    _fixed(s, d, src)


def test_misaddressed_request_gets_403(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, key, s, _port, src = _pair(tmp_path)
    _other, other_key = make_master(tmp_path, "master-2")
    good = s.config.read_text()
    s.config.write_text(good.replace(key, other_key))  # the school believes in another master
    start_daemon(m)
    d = start_daemon(s)
    _refused(s, d, 403, "addressed to")
    _unchanged(m, s, d)
    s.config.write_text(good)
    d.proc.send_signal(1)  # SIGHUP: the right master key
    wait_for(lambda: "configuration reloaded" in d.output(), 10, what="the reload")
    _fixed(s, d, src)


def test_request_signed_by_another_key_gets_401(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, key, s, _port, src = _pair(tmp_path)
    right = s.ctl("key").stdout.strip()
    imposter = Server("school-x", tmp_path / "school-x.toml", tmp_path / "school-x")
    wrong = imposter.ctl("init", "node", "--id", "school-x", "--state-dir", str(imposter.state), "--master-key",
                         key, "--socket", str(tmp_path / "sx-run" / "control.sock")).stdout.strip()
    m.ctl("enroll", "school-1", wrong)  # the master holds another key for school-1
    start_daemon(m)
    d = start_daemon(s)
    _refused(s, d, 401, "signed by another key")
    _unchanged(m, s, d)
    m.ctl("enroll", "school-1", right)
    _fixed(s, d, src)


def _stick_request(s: Server, tmp: Path, clock_shift: float = 0) -> Path:
    """The school's request pack as a stick would carry it (made with its clock shifted)."""
    stick = tmp / f"stick-{time.monotonic_ns()}"
    stick.mkdir()
    code = (f"import sys, time\nreal = time.time\ntime.time = lambda: real() + {clock_shift!r}\n"
            "from harmonicd.cli import main\nsys.exit(main())")
    subprocess.run([sys.executable, "-c", code, "--config", str(s.config), "exchange", str(stick)],
                   check=True, capture_output=True, timeout=120)
    packs = sorted((stick / "HARMONIC" / "to-master").glob("*.hpk"))
    assert len(packs) == 1, packs
    return packs[0]


def _post(port: int, pack: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/sync", body=pack.read_bytes(), headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def test_replayed_and_stale_requests_are_refused(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, _key, s, port, src = _pair(tmp_path, max_request_age_seconds=86400)
    req = _stick_request(s, tmp_path)
    start_daemon(m)
    code, body, _ = _post(port, req)
    assert code == 200, body
    outbox = m.state / "outbox" / "school-1"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in outbox.iterdir())
    seen = json.loads(m.ctl("status", "--json").stdout)["schools"][0]["last_seen"]
    # The same request again (someone who copied it off the wire): refused, not answered.
    code, body, _ = _post(port, req)
    assert (code, body["reason"]) == (403, "replayed"), body
    assert "answered before" in body["error"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outbox.iterdir()) == before, "a replay was answered"
    assert json.loads(m.ctl("status", "--json").stdout)["schools"][0]["last_seen"] == seen
    # A request made two days ago (or by a school whose clock is two days behind).
    old = _stick_request(s, tmp_path, clock_shift=-2 * 86400)
    code, body, _ = _post(port, old)
    assert (code, body["reason"]) == (403, "stale"), body
    assert "behind the server's clock" in body["error"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outbox.iterdir()) == before
    # The school's own sync makes a fresh request each time: it is answered.
    d = start_daemon(s)
    _fixed(s, d, src)
    rc, out = _sync(s)  # and again: a retry is never a replay
    assert rc == 0, out


class LostAnswerProxy:
    """Forwards to the master; the first sync POST reaches the master whole, and
    its answer is dropped on the way back (the link cut at the worst moment)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.target))
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        if head.startswith(b"POST /v1/sync") and not self.dropped:
            self.dropped = 1
            head, _, body = head.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length: (\d+)", head)
            assert m is not None
            while len(body) < int(m.group(1)):
                body += conn.recv(65536)
            up.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
            while up.recv(65536):  # the master's whole answer, thrown away
                pass
            conn.close()
            up.close()
            return
        up.sendall(head)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                b.close()
                a.close()

        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        pipe(up, conn)

    def close(self) -> None:
        self.sock.close()


def test_a_retry_after_a_lost_answer_is_answered(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """The master took the request and answered; the answer never arrived. The
    school's next sync makes a new request: answered, not refused as a replay."""
    port = free_port()
    proxy = LostAnswerProxy(port)
    try:
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
        s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{proxy.port}")
        no_auto_sync(s)
        src = tmp_path / "content"
        write_tree(src, {"a.txt": b"hello\n"})
        m.ctl("publish", "content", str(src))
        start_daemon(m)
        d = start_daemon(s)
        rc, out = _sync(s)
        assert rc == 1, out
        assert proxy.dropped == 1
        assert d.status()["upstream"]["reason"] == "cut", out
        assert (m.state / "outbox" / "school-1").is_dir(), "the master should have answered the first request"
        _fixed(s, d, src)
    finally:
        proxy.close()


def test_too_many_syncs_gets_429_and_the_school_waits(tmp_path: Path,
                                                    start_daemon: Callable[..., DaemonProc]) -> None:
    m, _key, s, _port, src = _pair(tmp_path, max_syncs_per_minute=2)
    dm = start_daemon(m)
    d = start_daemon(s)
    for _ in range(2):
        rc, out = _sync(s)
        assert rc == 0, out
    rc, out = _sync(s)
    assert rc == 1
    assert "refused (429 rate-limited)" in out, out
    assert "server.max_syncs_per_minute" in out, out
    up = d.status()["upstream"]
    assert (up["reachable"], up["reason"]) == (True, "rate-limited")
    assert re.search(r"try again in \d+ s", up["last_error"]), up["last_error"]
    assert "last error [rate-limited]" in s.ctl("status").stdout
    # The school's own timer honours Retry-After (about a minute here), not its 1 s interval.
    d.stop()
    s.config.write_text(s.config.read_text().replace("interval_seconds = 0", "interval_seconds = 1"))
    d = start_daemon(s)
    line = wait_for(lambda: re.search(r"next online sync try in (\d+) s", d.output()), 30,
                    what="the school's timer backing off")
    assert int(line.group(1)) >= 30, line.group(0)
    assert "429" in d.output()
    # Rates are kept in memory: a restarted master has forgotten them.
    d.stop()
    s.config.write_text(s.config.read_text().replace("interval_seconds = 1", "interval_seconds = 0"))
    d = start_daemon(s)
    dm.stop()
    start_daemon(m)
    _fixed(s, d, src)


def test_too_many_downloads_at_once_gets_429(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    _master_config(m, max_downloads_per_address=1)
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{port}")
    other = make_school(tmp_path, m, key, "school-2", "--upstream", f"http://127.0.0.1:{port}")
    no_auto_sync(s)
    src = tmp_path / "content"
    write_tree(src, {"big.bin": os.urandom(24 << 20)})  # more than the socket buffers hold
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    d = start_daemon(s)
    # school-2 starts a download and does not read it: the one slot of 127.0.0.1 is taken.
    code, body, _ = _post(port, _stick_request(other, tmp_path))
    assert code == 200, body
    big = max(body["packs"], key=lambda p: p["size"])
    slow = socket.create_connection(("127.0.0.1", port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(f"GET {big['url']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        assert slow.recv(12).startswith(b"HTTP/1.1 200")
        rc, out = _sync(s)
        assert rc == 1, out
        assert "429 rate-limited" in out, out
        assert "too many downloads" in out, out
        assert d.status()["upstream"]["reason"] == "rate-limited"
        assert not (s.deploy / "content").exists()
    finally:
        slow.close()
    time.sleep(0.5)  # the master notices the closed connection and frees the slot
    _fixed_content = tree_digest(src)
    rc, out = _sync(s)
    assert rc == 0, out
    assert tree_digest(s.deploy / "content") == _fixed_content


def test_limit_windows() -> None:
    """The sliding minute, per address and per school, on a clock we move."""
    now = [1000.0]
    lim = Limits(Settings(syncs_per_minute=2, address_syncs_per_minute=3), clock=lambda: now[0])
    for _ in range(3):
        lim.sync_from("10.0.0.1")
    with pytest.raises(Exception, match="at most 3 a minute") as err:
        lim.sync_from("10.0.0.1")
    assert getattr(err.value, "status", None) == 429
    lim.sync_from("10.0.0.2")  # another address has its own minute
    lim.school_may_sync("school-1")
    lim.school_synced("school-1")
    lim.school_synced("school-1")
    with pytest.raises(Exception, match="school school-1") as err:
        lim.school_may_sync("school-1")
    assert 59 <= (getattr(err.value, "retry_after", 0) or 0) <= 60
    now[0] += 61
    lim.sync_from("10.0.0.1")
    lim.school_may_sync("school-1")


def test_answer_queue_estimate() -> None:
    """Busy (503) once the queued answers would keep a new sync waiting longer than the
    budget; the estimate is each job's own time, not its wait in the queue."""
    now = [0.0]
    lim = Limits(Settings(max_answer_wait=5.0), clock=lambda: now[0])
    lim.may_queue()  # nothing queued
    # A cold start takes a stampede: the first guess (0.1 s an answer) is low on purpose.
    queued = [lim.answering() for _ in range(10)]
    for q in queued:
        q.__enter__()
    lim.may_queue()
    # The ten take 2 s each, one after another.
    for q in queued:
        now[0] += 2.0
        q.__exit__(None, None, None)
    lim.may_queue()  # all answered
    # The estimate learned 2 s per job (not the 2-20 s each waited in the queue).
    assert 1.9 < lim._answer_seconds < 2.01
    two = [lim.answering(), lim.answering()]
    for q in two:
        q.__enter__()
    lim.may_queue()  # 2 x 2 s <= 5 s: still fine
    third = lim.answering()
    third.__enter__()
    with pytest.raises(Exception, match="busy: 3 syncs ahead") as err:
        lim.may_queue()
    assert getattr(err.value, "status", None) == 503
    assert 2.8 <= (getattr(err.value, "retry_after", 0) or 0) <= 9.1, "0.5-1.5x the ~6 s of work ahead"
    assert Limits(Settings(max_answer_wait=0)).may_queue() is None  # 0: never busy


def test_busy_master_says_when_to_come_back(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """While the master answers a big request, a sync that would wait longer than
    server.max_answer_wait_seconds gets 503 busy with Retry-After; the school's
    status says busy; once the queue is gone the next sync works."""
    m, key, s, port, src = _pair(tmp_path, max_answer_wait_seconds=0.001, max_syncs_per_minute=0)
    big = make_school(tmp_path, m, key, "school-2", "--upstream", f"http://127.0.0.1:{port}")
    write_tree(big.source("backup"), {f"work-{i}.bin": os.urandom(16 << 20) for i in range(12)})
    slow = _stick_request(big, tmp_path)  # 192 MiB of backups: seconds to take in
    md = start_daemon(m)
    d = start_daemon(s)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(big=_post(port, slow)))
    t.start()
    try:
        wait_for(lambda: (md.status().get("activity") or {}).get("kind") == "serve", 60, every=0.02,
                 what="the master answering school-2")
        code, body, headers = _post(port, _stick_request(s, tmp_path))
        assert (code, body["reason"]) == (503, "busy"), body
        assert "busy: 1 syncs ahead" in body["error"]
        assert 1 <= int(headers["Retry-After"]) <= 900
        busy = (md.status().get("activity") or {}).get("kind") == "serve"
        rc, out = _sync(s)
        if busy and (md.status().get("activity") or {}).get("kind") == "serve":
            # Still answering school-2 after the school's whole sync: it must have heard "busy".
            print("the school's own sync met the busy master")
            assert rc == 1, out
            assert "503 busy" in out, out
            up = d.status()["upstream"]
            assert up["reason"] == "busy", up
    finally:
        t.join(120)
    assert result["big"][0] == 200, result
    rc, out = _sync(s)
    assert rc == 0, out
    assert tree_digest(s.deploy / "content") == tree_digest(src)

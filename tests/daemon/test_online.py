"""Online sync through real daemons over loopback HTTP (the first slice of issue 4).

A master daemon listens on a free loopback port; a school daemon has it as
upstream. The same packs as on a stick go up and down. A small fault proxy
of our own sits between them where a test needs the link to break.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for


def no_auto_sync(server: Server) -> None:
    """Online syncs only when the test asks (upstream.interval_seconds = 0)."""
    text = server.config.read_text()
    server.config.write_text(text.replace("interval_seconds = 3600", "interval_seconds = 0"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CuttingProxy:
    """TCP proxy on loopback between a school and its master. ``fault`` (used
    once, by the first request it applies to, then cleared):

    - ``("cut", N)``: a pack download is cut after N body bytes;
    - ``("hang",)``: any request is read and never answered;
    - ``("html",)``: the sync POST gets a 200 HTML page (a captive portal);
    - ``("500",)``: the sync POST gets an HTTP 500;
    - ``("longer",)``: a pack download claims and sends 100 bytes more than the pack;
    - ``("drip",)``: a pack download comes at two bytes a second;
    - ``("404",)``: a pack download gets an HTTP 404 (a cache or proxy that lost it);
    - ``("endless",)``: the sync POST gets a 200 JSON answer that never ends.

    It records every request head it forwards."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.fault: tuple[object, ...] | None = None
        self.heads: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cut_after(self) -> int | None:
        return int(self.fault[1]) if self.fault and self.fault[0] == "cut" else None  # type: ignore[call-overload]

    @cut_after.setter
    def cut_after(self, n: int) -> None:
        self.fault = ("cut", n)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()
        # End every connection still open, inside the loop, before it closes.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _take(self, head: bytes) -> tuple[object, ...] | None:
        f = self.fault
        if f is None:
            return None
        kind = f[0]
        is_pack = head.startswith((b"GET /v1/packs/", b"GET /v1/shared/"))
        is_sync = head.startswith(b"POST /v1/sync")
        if kind in ("cut", "longer", "drip", "404") and not is_pack:
            return None
        if kind in ("html", "500", "endless") and not is_sync:
            return None
        self.fault = None
        return f

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head.decode("latin-1"))
        fault = self._take(head)
        if fault is not None and fault[0] == "hang":
            await asyncio.sleep(3600)
        if fault is not None and fault[0] == "endless":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                         b'{"packs": [')
            with contextlib.suppress(ConnectionError):
                while True:  # until the school hangs up
                    writer.write(b'{"name": "x", "size": 1, "url": "/"}, ' * 1000)
                    await writer.drain()
            writer.close()
            return
        if fault is not None and fault[0] in ("html", "500", "404"):
            body = b"<html><body>Please log in to the hotspot</body></html>" if fault[0] == "html" else b"oops"
            status = {"html": b"200 OK", "500": b"500 Internal Server Error", "404": b"404 Not Found"}[str(fault[0])]
            ctype = b"text/html" if fault[0] == "html" else b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        up_w.write(head)
        cut = int(fault[1]) if fault is not None and fault[0] == "cut" else None  # type: ignore[call-overload]

        async def upstream() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    up_w.write(data)
                    await up_w.drain()

        pump = asyncio.create_task(upstream())
        try:
            resp_head = await up_r.readuntil(b"\r\n\r\n")
            real = re.search(rb"(?i)content-length: (\d+)", resp_head)
            if fault is not None and fault[0] == "longer" and real is not None:
                lie = b"Content-Length: " + str(int(real.group(1)) + 100).encode()
                resp_head = resp_head.replace(real.group(0), lie)
            writer.write(resp_head)
            sent = 0
            while data := await up_r.read(65536):
                if fault is not None and fault[0] == "drip":
                    for i in range(len(data)):  # a byte at a time: the read timeout never fires
                        writer.write(data[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(0.5)
                    continue
                if fault is not None and fault[0] == "longer" and real is not None:
                    writer.write(data)
                    sent += len(data)
                    if sent >= int(real.group(1)):
                        writer.write(b"x" * 100)  # the lie: more than the pack
                        await writer.drain()
                        await asyncio.sleep(5)
                        return
                    continue
                if cut is not None and sent + len(data) >= cut:
                    writer.write(data[: cut - sent])
                    await writer.drain()
                    return  # the link drops mid-pack
                writer.write(data)
                sent += len(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            pump.cancel()
            writer.close()
            up_w.close()


@pytest.fixture
def online(tmp_path: Path) -> Callable[..., tuple[Server, Server, int]]:
    def make(upstream_port: int | None = None) -> tuple[Server, Server, int]:
        port = free_port()
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
        s = make_school(tmp_path, m, key, "school-1", "--upstream",
                        f"http://127.0.0.1:{upstream_port or port}")
        no_auto_sync(s)
        return m, s, port

    return make


def _sync(s: Server) -> tuple[int, str, str]:
    p = s.ctl("sync", "--wait", check=False)
    return p.returncode, p.stdout, p.stderr


def test_online_round_trip(tmp_path: Path, online: Callable[..., tuple[Server, Server, int]],
                           start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, _port = online()
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"hello\n", "lessons/one.html": b"<p>one</p>\n" * 100,
                     "video.bin": os.urandom(600_000)})
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    d = start_daemon(s)
    write_tree(s.source("stats"), {"day1.json": b'{"logins": 3}\n'})
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert "content release 1" in out
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    # The statistics went up in the same round trip and are deployed at the master.
    assert (m.deploy / "school-1" / "stats" / "day1.json").read_bytes() == b'{"logins": 3}\n'
    st = d.status()
    assert st["upstream"]["reachable"] is True
    assert st["upstream"]["last_sync"]
    assert st["upstream"]["last_error"] is None
    assert st["master"]["how"] == "online"
    # Nothing changed: one round trip, nothing applied.
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert "nothing new" in out
    s.ctl("verify")
    m.ctl("verify")


def test_cut_download_resumes_with_range(tmp_path: Path, online: Callable[..., tuple[Server, Server, int]],
                                         start_daemon: Callable[..., DaemonProc]) -> None:
    master_port = free_port()
    with CuttingProxy(master_port) as proxy:
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{master_port}")
        s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{proxy.port}")
        no_auto_sync(s)
        src = tmp_path / "content"
        write_tree(src, {f"pic{i}.jpg": os.urandom(200_000) for i in range(10)})
        m.ctl("publish", "content", str(src))
        start_daemon(m)
        start_daemon(s)
        proxy.cut_after = 700_000
        rc, _out, err = _sync(s)
        assert rc == 1
        assert "cut off at" in err, err
        assert "continues from there" in err, err
        parts = list((s.state / "online").glob("*.part"))
        assert len(parts) == 1
        have = parts[0].stat().st_size
        assert 0 < have <= 700_000
        assert not (s.deploy / "content").exists(), "nothing is applied from a pack cut short"
        rc, _out, err = _sync(s)
        assert rc == 0, err
        ranges = [h for h in proxy.heads
                  if h.startswith(("GET /v1/packs/", "GET /v1/shared/")) and f"range: bytes={have}-" in h.lower()]
        assert ranges, "the second download did not continue with a Range request"
        assert tree_digest(s.deploy / "content") == tree_digest(src)
        assert not list((s.state / "online").iterdir())


def test_unenrolled_school_is_refused_and_says_why(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    stranger = Server("school-9", tmp_path / "school-9.toml", tmp_path / "school-9")
    stranger.ctl("init", "node", "--id", "school-9", "--state-dir", str(stranger.state), "--master-key", key,
                 "--socket", str(tmp_path / "s9-run" / "control.sock"), "--upstream", f"http://127.0.0.1:{port}")
    no_auto_sync(stranger)
    start_daemon(m)
    d = start_daemon(stranger)
    rc, _out, err = _sync(stranger)
    assert rc == 1
    assert "refused (403)" in err, err
    st = d.status()
    assert st["upstream"]["reachable"] is True
    assert "refused" in st["upstream"]["last_error"]


def test_unreachable_upstream_is_shown(tmp_path: Path, online: Callable[..., tuple[Server, Server, int]],
                                       start_daemon: Callable[..., DaemonProc]) -> None:
    _m, s, _port = online(upstream_port=free_port())  # nobody listens there
    d = start_daemon(s)
    rc, _out, err = _sync(s)
    assert rc == 1
    assert "cannot reach the upstream" in err, err
    st = d.status()
    assert st["upstream"]["reachable"] is False
    assert json.dumps(st["upstream"]["last_error"]).count("refused") >= 1


def test_school_syncs_by_itself_and_backs_off(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """Without being asked: a sync soon after start, then every interval; a failing
    upstream is tried again later (backoff), and the next try after it comes back works."""
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{port}")
    s.config.write_text(s.config.read_text().replace("interval_seconds = 3600", "interval_seconds = 2"))
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"one\n"})
    m.ctl("publish", "content", str(src))
    d = start_daemon(s)  # the master is not running yet: the first tries fail
    wait_for(lambda: (d.status()["upstream"] or {}).get("reachable") is False, 30, what="a failed first sync")
    start_daemon(m)
    wait_for(lambda: next(c for c in d.status()["collections"] if c["name"] == "content")["seq"] == 1,
             60, what="content release 1 fetched without being asked")
    write_tree(src, {"a.txt": b"two\n"})
    m.ctl("publish", "content", str(src))
    wait_for(lambda: (s.deploy / "content" / "a.txt").read_bytes() == b"two\n", 30,
             what="release 2 fetched at the next interval")
    assert d.status()["upstream"]["last_error"] is None


def test_rate_limit_caps_the_download(tmp_path: Path, online: Callable[..., tuple[Server, Server, int]],
                                      start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, _port = online()
    s.config.write_text(s.config.read_text().replace("rate_limit = 0", 'rate_limit = "256KiB"'))
    src = tmp_path / "content"
    write_tree(src, {"big.bin": os.urandom(1_200_000)})  # incompressible: the pack is as big
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    start_daemon(s)
    t0 = time.monotonic()
    rc, _out, err = _sync(s)
    took = time.monotonic() - t0
    assert rc == 0, err
    assert took >= 1_200_000 / (256 << 10) * 0.8, f"1.2 MB at 256 KiB/s took only {took:.1f} s"
    assert tree_digest(s.deploy / "content") == tree_digest(src)


@pytest.mark.parametrize(("fault", "says"), [
    (("hang",), "no answer within 2 s"),
    (("drip",), "under 1024 B/s"),
    (("html",), "captive portal"),
    (("500",), "500"),
    (("longer",), "longer than announced"),
    (("404",), "404"),
    (("endless",), "larger than 1048576 bytes"),
])
def test_link_faults_are_clear_and_the_next_sync_works(
        tmp_path: Path, start_daemon: Callable[..., DaemonProc], fault: tuple[object, ...], says: str) -> None:
    """Each fault: one clear line, status shows it, nothing unverified applied, the
    school's own data still waiting for its acknowledgement; once the fault is
    gone the next sync completes."""
    master_port = free_port()
    with CuttingProxy(master_port) as proxy:
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{master_port}")
        s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{proxy.port}")
        no_auto_sync(s)
        s.config.write_text(s.config.read_text().replace("timeout_seconds = 60", "timeout_seconds = 2"))
        src = tmp_path / "content"
        write_tree(src, {"a.bin": os.urandom(300_000)})
        m.ctl("publish", "content", str(src))
        start_daemon(m)
        d = start_daemon(s)
        write_tree(s.source("stats"), {"day.json": b"{}\n"})
        proxy.fault = fault
        rc, _out, err = _sync(s)
        assert rc == 1
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, err
        assert says in lines[0], lines[0]
        assert "Traceback" not in d.output()
        st = d.status()
        assert says in (st["upstream"]["last_error"] or "")
        assert not (s.deploy / "content").exists(), "something was applied from a faulty transfer"
        stats = next(c for c in st["collections"] if c["name"] == "stats")
        assert stats["acked_seq"] < stats["seq"], "the school's statistics must wait for their acknowledgement"
        rc, _out, err = _sync(s)
        assert rc == 0, err
        assert tree_digest(s.deploy / "content") == tree_digest(src)
        assert d.status()["upstream"]["last_error"] is None


def test_request_over_the_servers_limit_is_refused(tmp_path: Path, online: Callable[..., tuple[Server, Server, int]],
                                                  start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, _port = online()
    text = m.config.read_text()
    m.config.write_text(text.replace('listen = "', 'max_request = "2KiB"\nlisten = "', 1))
    start_daemon(m)
    d = start_daemon(s)
    write_tree(s.source("backup"), {"work.bin": os.urandom(50_000)})  # the request carries it: > 2 KiB
    rc, _out, err = _sync(s)
    assert rc == 1
    assert "sync refused (413)" in err, err
    assert "server.max_request" in err, err
    backup = next(c for c in d.status()["collections"] if c["name"] == "backup")
    assert backup["acked_seq"] < backup["seq"], "the backup must still wait for its acknowledgement"
    m.config.write_text(text)  # the limit lifted (a restart applies it)

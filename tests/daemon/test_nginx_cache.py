"""Real nginx (the Debian package) as a caching reverse proxy in front of the master.

    school-1, school-2 --> nginx (proxy_cache) --> counting proxy --> master's harmonicd

Two schools sync the same release through nginx: the shared pack reaches the
master once (the counting proxy sees one GET of it, nginx's access log says
MISS then HIT), while every POST /v1/sync and every per-school pack goes
through to the master each time.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc
from tests.daemon.test_online import CuttingProxy, free_port, no_auto_sync


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format cache '$request_method $uri $status $upstream_cache_status';
    access_log {d}/access.log cache;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=harmonic:1m max_size=1g inactive=7d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location /v1/ {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_cache harmonic;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int], tuple[int, Path]]]:
    """nginx in front of a port: returns (its port, its access log)."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx, in the Makefile's TEST_DEBS)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: int) -> tuple[int, Path]:
        d = tmp_path / "nginx"
        d.mkdir()
        port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(CONF.format(d=d, port=port, upstream=upstream))
        p = subprocess.Popen([binary, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    err = p.stderr.read().decode() if p.stderr else ""
                    log = (d / "error.log").read_text() if (d / "error.log").exists() else ""
                    raise AssertionError(f"nginx did not start: {err}{log}") from None
                time.sleep(0.05)
        return port, d / "access.log"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def access_lines(log: Path, prefix: str) -> list[list[str]]:
    # nginx writes its access log line by line as requests end; give it a moment.
    time.sleep(0.2)
    return [ln.split() for ln in log.read_text().splitlines() if ln.split()[1].startswith(prefix)]


def get_via(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_second_school_gets_the_release_from_nginx(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                                                    nginx: Callable[[int], tuple[int, Path]]) -> None:
    master_port = free_port()
    with CuttingProxy(master_port) as counter:
        cache_port, log = nginx(counter.port)
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{master_port}")
        schools = [make_school(tmp_path, m, key, name, "--upstream", f"http://127.0.0.1:{cache_port}")
                   for name in ("school-1", "school-2")]
        for s in schools:
            no_auto_sync(s)
        src = tmp_path / "content"
        write_tree(src, {**{f"pic{i}.jpg": os.urandom(100_000) for i in range(8)}, "index.html": b"<p>hi</p>\n"})
        m.ctl("publish", "content", str(src))
        start_daemon(m)
        for s in schools:
            start_daemon(s)
            p = s.ctl("sync", "--wait", check=False)
            assert p.returncode == 0, p.stderr
            assert "content release 1" in p.stdout
        assert tree_digest(schools[0].deploy / "content") == tree_digest(src) \
            == tree_digest(schools[1].deploy / "content")

        reached = [h.split(" ")[:2] for h in counter.heads]
        shared = [path for method, path in reached if path.startswith("/v1/shared/")]
        assert len(shared) == 1, f"the shared pack reached the master {len(shared)} times: {reached}"
        assert [method for method, path in reached if path == "/v1/sync"] == ["POST", "POST"]
        private = [path for _m, path in reached if path.startswith("/v1/packs/")]
        assert sorted(p.split("/")[3] for p in private) == ["school-1", "school-2"]

        # nginx's own account: the shared pack a MISS, then a HIT; nothing else ever a HIT.
        lines = access_lines(log, "/v1/")
        assert [ln[3] for ln in lines if ln[1] == shared[0]] == ["MISS", "HIT"], lines
        assert all(ln[3] != "HIT" for ln in lines if not ln[1].startswith("/v1/shared/")), lines

        # Asked again through nginx, a per-school pack goes to the master again (private,
        # no-store), the shared one does not (and carries the master's headers).
        before = len(counter.heads)
        status, h, _body = get_via(cache_port, private[0])
        assert status in (200, 404)
        assert h.get("x-cache-status") != "HIT"
        status, h, body = get_via(cache_port, shared[0])
        assert status == 200
        assert h["x-cache-status"] == "HIT"
        assert h["cache-control"] == "public, max-age=31536000, immutable"
        assert h["etag"] == f'"{shared[0].split("/")[3]}"'
        assert [x.split(" ")[1] for x in counter.heads[before:]] == [private[0]]
        # A cut download resumes through the cache: Range is answered from it.
        conn = http.client.HTTPConnection("127.0.0.1", cache_port, timeout=30)
        try:
            conn.request("GET", shared[0], headers={"Range": "bytes=1000-"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (206, body[1000:])
        finally:
            conn.close()
        assert len(counter.heads) == before + 1

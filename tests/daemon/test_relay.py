"""Relays through real daemons over loopback HTTP (issue 4, item 5).

master-1 <- relay-1 (a school server with server.listen) <- school-2. The
relay serves school-2 from its replica and forwards school-2's request to the
master; school-2 trusts only what the master signed. Where a relay must
misbehave, a small HTTP server of the test's own stands in front of the real
relay and serves a pack the test made with the relay's real key.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bad_input.helpers import header_for, public_key, sign_release, signing_key, write_pack
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc
from tests.daemon.test_online import free_port, no_auto_sync


@dataclass
class Chain:
    master: Server
    relay: Server
    school: Server
    content: Path
    master_port: int
    relay_port: int


def _sync(s: Server) -> tuple[int, str, str]:
    p = s.ctl("sync", "--wait", check=False)
    return p.returncode, p.stdout, p.stderr


def _coll(d: DaemonProc, name: str) -> dict[str, Any]:
    return next(c for c in d.status()["collections"] if c["name"] == name)


def make_chain(tmp_path: Path, school_upstream: str | None = None) -> Chain:
    mport, rport = free_port(), free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{mport}")
    r = make_school(tmp_path, m, key, "relay-1", "--upstream", f"http://127.0.0.1:{mport}",
                    "--listen", f"127.0.0.1:{rport}")
    s = make_school(tmp_path, m, key, "school-2", "--upstream", school_upstream or f"http://127.0.0.1:{rport}")
    for x in (r, s):
        no_auto_sync(x)
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>one</h1>\n", "video.bin": os.urandom(300_000)})
    m.ctl("publish", "content", str(content))
    return Chain(m, r, s, content, mport, rport)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return make_chain(tmp_path)


def test_downstream_syncs_through_the_relay_end_to_end(chain: Chain, start_daemon: Callable[..., DaemonProc]) -> None:
    m, r, s = chain.master, chain.relay, chain.school
    md = start_daemon(m)
    rd = start_daemon(r)
    sd = start_daemon(s)
    rc, out, err = _sync(r)
    assert rc == 0, err
    assert "content release 1" in out
    # The master goes away: the relay serves from its replica (a laptop in a classroom).
    assert md.stop() == 0
    write_tree(s.source("backup"), {"work.txt": b"essay\n"})
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert re.search(r"content release 1 \(\w+\) from relay-1", out), out
    assert tree_digest(s.deploy / "content") == tree_digest(chain.content)
    backup = _coll(sd, "backup")
    assert backup["seq"] >= 1
    assert backup["acked_seq"] < backup["seq"], "acked before the master had it"
    queued = list((r.state / "relay" / "up" / "school-2").glob("*.hpk"))
    assert len(queued) == 1, "the relay keeps school-2's request for the master"
    # The relay cannot reach the master: its sync fails, the request stays queued.
    rc, _out, err = _sync(r)
    assert rc == 1
    assert "cannot reach the upstream" in err, err
    assert list((r.state / "relay" / "up" / "school-2").glob("*.hpk")) == queued
    # school-2 again, still offline: served, its backup still waits.
    rc, _out, err = _sync(s)
    assert rc == 0, err
    assert _coll(sd, "backup")["acked_seq"] < backup["seq"]
    # The master is back; the relay's sync forwards school-2's request.
    md = start_daemon(m)
    assert not (m.deploy / "school-2" / "backup").exists()
    rc, out, err = _sync(r)
    assert rc == 0, err
    assert "forwarded 1 downstream request(s): school-2" in out, out
    assert (m.deploy / "school-2" / "backup" / "work.txt").read_bytes() == b"essay\n"
    assert not list((r.state / "relay" / "up" / "school-2").glob("*.hpk")), "answered: out of the queue"
    assert list((r.state / "relay" / "down" / "school-2").glob("*.hpk")), "the master's answer for school-2"
    assert _coll(sd, "backup")["acked_seq"] < backup["seq"], "acked before school-2 heard from the master"
    # school-2's next sync takes the master's answer (signed by the master) through the relay.
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert f"master-1 confirmed backup release {_coll(sd, 'backup')['seq']}" in out, out
    assert _coll(sd, "backup")["acked_seq"] == _coll(sd, "backup")["seq"]
    assert rd.status()["upstream"]["last_error"] is None
    # A new release at the master reaches school-2 once the relay has it.
    (chain.content / "index.html").write_bytes(b"<h1>two</h1>\n")
    m.ctl("publish", "content", str(chain.content))
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert "content release 2" not in out
    assert _sync(r)[0] == 0
    rc, out, err = _sync(s)
    assert rc == 0, err
    # From the relay's replica, or (when the master's answer to the forwarded request
    # carried it, before shared packs split it off) in that answer: either way through the relay.
    assert re.search(r"content release 2 \(\w+\) from (relay-1|master-1)", out), out
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>\n"
    s.ctl("verify")
    r.ctl("verify")


def test_relay_refuses_a_request_not_for_its_master(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """A school of another master (another key) asks the relay: 403 with the reason, nothing queued."""
    c = make_chain(tmp_path)
    other, okey = make_master(tmp_path, "master-9")
    stranger = make_school(tmp_path, other, okey, "school-9", "--upstream", f"http://127.0.0.1:{c.relay_port}")
    no_auto_sync(stranger)
    start_daemon(c.relay)
    sd = start_daemon(stranger)
    rc, _out, err = _sync(stranger)
    assert rc == 1
    assert "refused (403)" in err, err
    assert "not to the master relay-1 relays for" in err, err
    assert "relays for" in (sd.status()["upstream"]["last_error"] or "")
    assert not (c.relay.state / "relay" / "up" / "school-9").exists()


def test_relay_queue_quota(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    c = make_chain(tmp_path)
    c.relay.config.write_text(c.relay.config.read_text() + '\n[relay]\nqueue_quota = "4KiB"\n')
    start_daemon(c.relay)
    sd = start_daemon(c.school)
    write_tree(c.school.source("backup"), {"big.bin": os.urandom(20_000)})  # the request is > 4 KiB
    rc, _out, err = _sync(c.school)
    assert rc == 1
    assert "503" in err, err
    assert "queue_quota" in err, err
    assert not list((c.relay.state / "relay" / "up").glob("*/*.hpk"))
    backup = _coll(sd, "backup")
    assert backup["acked_seq"] < backup["seq"]


# --------------------------------------------------------------------------- a relay that misbehaves


class HostileRelay:
    """In front of the real relay: passes requests through, or (``serve``) answers
    the sync with the given pack files instead. Counts what it served."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.serve: list[Path] | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.serve is not None:
                    packs = [{"name": p.name, "size": p.stat().st_size, "url": f"/v1/packs/school-2/{p.name}",
                              "shared": False} for p in outer.serve]
                    self._reply(200, json.dumps({"server": "relay-1", "school": "school-2", "packs": packs}).encode(),
                                "application/json")
                    return
                self._pass("POST", body)

            def do_GET(self) -> None:
                if outer.serve is not None:
                    for p in outer.serve:
                        if self.path.endswith("/" + p.name):
                            self._reply(200, p.read_bytes(), "application/octet-stream")
                            return
                self._pass("GET", None)

            def _pass(self, method: str, body: bytes | None) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", outer.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "range")}
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "content-range", "accept-ranges"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> Iterator[tuple[Chain, HostileRelay,
                                                                                       DaemonProc]]:
    """The chain with school-2 behind a HostileRelay in front of relay-1; school-2
    has synced once through it (content release 1, its backup sent up)."""
    with HostileRelay(0) as hr:
        c = make_chain(tmp_path, school_upstream=f"http://127.0.0.1:{hr.port}")
        # make_chain picked the relay's port itself: point the proxy at it.
        hr.target_port = c.relay_port
        start_daemon(c.master)
        start_daemon(c.relay)
        sd = start_daemon(c.school)
        assert _sync(c.relay)[0] == 0
        write_tree(c.school.source("backup"), {"work.txt": b"essay\n"})
        rc, _out, err = _sync(c.school)
        assert rc == 0, err
        assert (c.school.deploy / "content" / "index.html").read_bytes() == b"<h1>one</h1>\n"
        yield c, hr, sd


def _trusted(s: Server) -> dict[str, Any]:
    """What a refused pack must leave as it was (status meta aside)."""
    with s.store(lock=False) as st:
        colls = [(c.name, c.seq, c.root, c.acked_seq, c.deployed) for c in st.db.collections()]
        rels = [(r.name, r.seq, r.state) for r in st.db.releases()]
    return {"deploy": tree_digest(s.deploy), "objects": tree_digest(s.state / "objects"),
            "collections": colls, "releases": rels}


def _refused(s: Server, sd: DaemonProc, says: str) -> None:
    rc, _out, err = _sync(s)
    assert rc == 1, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert says in lines[0], err
    up = sd.status()["upstream"]
    assert says in (up["last_error"] or "")
    assert up["reason"] == "untrusted", up
    assert "Traceback" not in sd.output()


def test_forged_release_from_a_relay_is_refused(hostile: tuple[Chain, HostileRelay, DaemonProc],
                                                tmp_path: Path) -> None:
    c, hr, sd = hostile
    from harmonicd.core.objects import BLOB, T_BLOB, TREE, Entry, encode_tree, object_id

    data = b"<h1>the relay's own content</h1>"
    tree = encode_tree([Entry("index.html", T_BLOB, 0, object_id(BLOB, data), len(data))])
    rkey = signing_key(c.relay)
    rel = sign_release(rkey, object_id(TREE, tree), seq=2)  # signed by the relay, owner master-1
    forged = write_pack(tmp_path / "relay-1-20261127T000000-000000000001-v001.hpk", rkey,
                        header_for(c.relay, rkey, "school-2", public_key(c.school), [rel]),
                        [(BLOB, data), (TREE, tree)])
    before = _trusted(c.school)
    hr.serve = [forged]
    _refused(c.school, sd, "is not signed by the master")
    assert _trusted(c.school) == before
    assert not list((c.school.state / "online").glob("*.hpk")), "the refused pack is not kept"
    hr.serve = None
    assert _sync(c.school)[0] == 0, "the next sync through an honest relay works"


def test_rollback_by_a_relay_is_refused(hostile: tuple[Chain, HostileRelay, DaemonProc], tmp_path: Path) -> None:
    """The relay serves release 1 (genuinely signed by the master) to a school that holds 2."""
    c, hr, sd = hostile
    from harmonicd.services.exchange import Outgoing, write_packs

    old_dir = tmp_path / "old"
    old_dir.mkdir()
    with c.relay.store() as st:  # release 1 as the relay holds it now, addressed to school-2
        coll = st.db.collection("content")
        assert coll is not None
        assert coll.seq == 1
        row = st.db.release("content", 1)
        assert row is not None
        out = Outgoing("school-2", public_key(c.school), [row], [(row.root, None)], set(), set(), [], {})
        old = [Path(p) for p in write_packs(st, out, str(old_dir)).files]
    (c.content / "index.html").write_bytes(b"<h1>two</h1>\n")
    c.master.ctl("publish", "content", str(c.content))
    assert _sync(c.relay)[0] == 0
    rc, _out, err = _sync(c.school)
    assert rc == 0, err
    assert (c.school.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>\n"
    before = _trusted(c.school)
    hr.serve = old
    _refused(c.school, sd, "upstream relay-1 offered content release 1, older than release 2 held; kept 2")
    assert _trusted(c.school) == before
    assert (c.school.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>\n"


def test_acknowledgement_from_a_relay_is_refused(hostile: tuple[Chain, HostileRelay, DaemonProc],
                                                 tmp_path: Path) -> None:
    """The relay claims the master holds school-2's backup (it does not yet)."""
    c, hr, sd = hostile
    with c.school.store(lock=False) as st:
        b = st.db.collection("backup")
        assert b is not None
        assert b.root is not None
        assert b.acked_seq < b.seq
        ack = {"collection": "backup", "seq": b.seq, "root": b.root}
    rkey = signing_key(c.relay)
    acks = write_pack(tmp_path / "relay-1-20261127T000000-000000000002-v001.hpk", rkey,
                      header_for(c.relay, rkey, "school-2", public_key(c.school), [], acks=[ack]), [])
    before = _trusted(c.school)
    hr.serve = [acks]
    _refused(c.school, sd, "carries acknowledgements but is signed by relay-1, not the master")
    assert _trusted(c.school) == before
    backup = _coll(sd, "backup")
    assert backup["acked_seq"] < backup["seq"], "the backup must wait for the master's own acknowledgement"

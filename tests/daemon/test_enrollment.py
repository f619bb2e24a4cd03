"""Bundles, enrollment at first contact and revocation online, through real
daemons on loopback (issue 6, items 2 and 3): `harmonicctl bundle` on the
master, `init --bundle` on the school, the first `sync` enrolls it; a region
bundle for two servers; a revoked school refused by the master (403 revoked
in its status) and by a relay; a refused token (403 enrollment-refused)."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from harmonicd.core import bundle, keys
from tests.bad_input.helpers import snapshot
from tests.conftest import Server, make_master, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc
from tests.daemon.test_online import free_port, no_auto_sync
from tests.daemon.test_relay import make_chain


def _sync(s: Server) -> tuple[int, str, str]:
    p = s.ctl("sync", "--wait", check=False)
    return p.returncode, p.stdout, p.stderr


def _init(tmp: Path, name: str, bundle_file: Path, *extra: str, check: bool = True) -> Server:
    s = Server(name, tmp / f"{name}.toml", tmp / name)
    s.ctl("init", "--bundle", str(bundle_file), "--state-dir", str(s.state),
          "--socket", str(tmp / f"{name}-run" / "control.sock"), *extra, check=check)
    if s.config.exists():
        no_auto_sync(s)
    return s


def _master(tmp: Path) -> tuple[Server, int, Path]:
    port = free_port()
    m, _key = make_master(tmp, "master-1", "--listen", f"127.0.0.1:{port}")
    # The address schools reach it at: what its bundles name by default.
    m.config.write_text(m.config.read_text().replace('public_url = ""', f'public_url = "http://127.0.0.1:{port}"'))
    content = tmp / "content"
    write_tree(content, {"index.html": b"<h1>hello</h1>\n", "video.bin": os.urandom(200_000)})
    m.ctl("publish", "content", str(content))
    return m, port, content


def test_bundle_init_and_first_sync_enrolls_online(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, port, content = _master(tmp_path)
    b = tmp_path / "school-1.hbundle"
    out = m.ctl("bundle", "school-1", "--out", str(b)).stdout
    assert f"http://127.0.0.1:{port}" in out
    s = _init(tmp_path, "school-1", b)
    assert s.cfg().upstream_url == f"http://127.0.0.1:{port}"
    start_daemon(m)
    d = start_daemon(s)
    write_tree(s.source("stats"), {"day1.json": b'{"logins": 3}\n'})
    rc, out, err = _sync(s)
    assert rc == 0, err
    assert tree_digest(s.deploy / "content") == tree_digest(content)
    assert (m.deploy / "school-1" / "stats" / "day1.json").read_bytes() == b'{"logins": 3}\n'
    st = d.status()
    assert st["upstream"]["last_error"] is None
    assert st["master"]["id"] == "master-1"
    with s.store(lock=False) as sst:
        assert sst.db.get_meta("enroll.token") == "", "enrolled: the proof no longer travels"
    schools = m.ctl("status", "--json").stdout
    assert any(x["id"] == "school-1" and x["how"] == "online" for x in json.loads(schools)["schools"])
    rc, out, err = _sync(s)
    assert rc == 0, err


def test_region_bundle_two_servers_and_no_third(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, _port, content = _master(tmp_path)
    b = tmp_path / "north.hbundle"
    m.ctl("bundle", "--region", "north-", "--count", "2", "--out", str(b))
    one = _init(tmp_path, "one", b, "--id", "lab1")
    two = _init(tmp_path, "two", b)  # no --id: this machine's host name, or the key's fingerprint
    assert one.cfg().id == "north-lab1"
    assert two.cfg().id.startswith("north-")
    assert two.cfg().id != one.cfg().id
    three = _init(tmp_path, "three", b, "--id", "lab3")
    start_daemon(m)
    for s in (one, two):
        start_daemon(s)
        rc, _out, err = _sync(s)
        assert rc == 0, err
        assert tree_digest(s.deploy / "content") == tree_digest(content)
    before = snapshot(m)
    d3 = start_daemon(three)
    rc, _out, err = _sync(three)
    assert rc == 1
    assert "refused (403)" in err, err
    assert "was used already by its 2 servers" in err, err
    assert "enroll" in d3.status()["upstream"]["last_error"]
    after = snapshot(m)
    for t in ("peers", "tokens", "token_uses"):
        assert after.rows[t] == before.rows[t], t


def test_revoked_school_is_refused_online(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, port, _content = _master(tmp_path)
    b = tmp_path / "school-1.hbundle"
    m.ctl("bundle", "school-1", "--out", str(b))
    s = _init(tmp_path, "school-1", b)
    start_daemon(m)
    d = start_daemon(s)
    rc, _out, err = _sync(s)
    assert rc == 0, err
    assert "revoked school-1" in m.ctl("revoke", "school-1").stdout
    before = snapshot(m)
    school_before = (s.config.read_bytes(), (s.state / "key").read_bytes())
    write_tree(s.source("stats"), {"later.json": b"{}\n"})
    rc, _out, err = _sync(s)
    assert rc == 1
    assert "refused (403)" in err, err
    assert "whose enrollment was revoked" in err, err
    st = d.status()["upstream"]
    assert st["reason"] == "refused-by-server"
    assert "revoked" in st["last_error"]
    after = snapshot(m)
    for t in ("peers", "tokens", "token_uses", "revoked_keys", "releases", "collections"):
        assert after.rows[t] == before.rows[t], t
    assert not list((m.state / "outbox" / "school-1").glob("*.hpk")), "no answer kept or written for it"
    assert (s.config.read_bytes(), (s.state / "key").read_bytes()) == school_before
    # The list is served, signed by the master.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/revocations", timeout=10) as r:
        served = json.load(r)
    rl, _, _ = bundle.read_revocations([base64.b64decode(served["body"]), base64.b64decode(served["sig"])],
                                       keys.parse_key(m.ctl("key").stdout), "GET /v1/revocations")
    assert served["seq"] == rl.seq == 1
    assert [e.school for e in rl.entries] == ["school-1"]


def test_relay_refuses_a_revoked_school(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    ch = make_chain(tmp_path)  # master-1 <- relay-1 (serves downstream) <- school-2
    start_daemon(ch.master)
    start_daemon(ch.relay)
    d2 = start_daemon(ch.school)
    rc, _out, err = _sync(ch.school)
    assert rc == 0, err
    ch.master.ctl("revoke", "school-2")
    rc, _out, err = _sync(ch.relay)  # the relay hears of it from the master
    assert rc == 0, err
    with ch.relay.store(lock=False) as st:
        got = st.db.revocation_list()
        assert got is not None
        assert got[1] == 1
    queue = ch.relay.state / "relay" / "up" / "school-2"
    queued_before = sorted(p.name for p in queue.glob("*.hpk")) if queue.exists() else []
    write_tree(ch.school.source("stats"), {"more.json": b"{}\n"})
    rc, _out, err = _sync(ch.school)
    assert rc == 1
    assert "refused (403)" in err, err
    assert "whose enrollment was revoked by the master master-1" in err, err
    assert "revoked" in d2.status()["upstream"]["last_error"]
    queued_after = sorted(p.name for p in queue.glob("*.hpk")) if queue.exists() else []
    assert queued_after == queued_before, "a revoked school's request is not queued for the master"

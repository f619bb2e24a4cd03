"""upstream.url = "auto": a school finds its upstream on the LAN by mDNS (issue 4, item 5).

Multicast does not work on the loopback interface, so the LAN is real: two
network namespaces joined by a veth pair (root and `ip` needed; skipped
otherwise). The master and a relay run in one ("the school office"), the
school server in the other; the daemons announce themselves, the school's
sync browses and picks one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harmonicd.peer.mdns import Found, choose, fingerprint
from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import no_auto_sync


def test_choose_prefers_the_master_then_a_relay_never_itself() -> None:
    fp = fingerprint(b"k" * 32)
    relay = ({"id": "relay-1", "role": "relay", "fp": fp}, ["10.0.0.2"], 8471)
    master = ({"id": "master-1", "role": "master", "fp": fp}, ["fe80::1%eth0", "10.0.0.1"], 8470)
    other = ({"id": "master-9", "role": "master", "fp": fingerprint(b"x" * 32)}, ["10.0.0.9"], 8470)
    me = ({"id": "school-2", "role": "relay", "fp": fp}, ["10.0.0.3"], 8470)
    assert choose([relay, master, other, me], "school-2", fp) == Found("master-1", "master", "http://10.0.0.1:8470")
    assert choose([relay, other, me], "school-2", fp) == Found("relay-1", "relay", "http://10.0.0.2:8471")
    assert choose([other, me], "school-2", fp) is None
    relay2 = ({"id": "relay-0", "role": "relay", "fp": fp, "scheme": "https"}, ["10.0.0.4"], 443)
    assert choose([relay, relay2], "school-2", fp).id == "relay-0"  # type: ignore[union-attr]
    assert choose([relay, relay2], "school-2", fp, remembered="relay-1").id == "relay-1"  # type: ignore[union-attr]
    assert choose([relay2], "school-2", fp).url == "https://10.0.0.4:443"  # type: ignore[union-attr]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[tuple[list[str], list[str], str]]:
    """Two namespaces on one veth link: (prefix for the office, prefix for the
    school, the office's address)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2)")
    tag = f"{os.getpid() % 100000}"
    office, school = f"hmo{tag}", f"hms{tag}"
    va, vb = f"hmva{tag}", f"hmvb{tag}"
    made: list[str] = []
    try:
        for ns in (office, school):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", office)
        _ip("link", "set", vb, "netns", school)
        _ip("-n", office, "addr", "add", "10.199.0.1/24", "dev", va)
        _ip("-n", school, "addr", "add", "10.199.0.2/24", "dev", vb)
        for ns, dev in ((office, va), (school, vb)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
    except subprocess.CalledProcessError as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield ["ip", "netns", "exec", office], ["ip", "netns", "exec", school], "10.199.0.1"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_auto_upstream_finds_the_master_then_a_relay(tmp_path: Path, lan: tuple[list[str], list[str], str],
                                                     start_daemon: Callable[..., DaemonProc]) -> None:
    office, school_ns, addr = lan
    m, key = make_master(tmp_path, "master-1", "--listen", f"{addr}:8470")
    r = make_school(tmp_path, m, key, "relay-1", "--upstream", f"http://{addr}:8470", "--listen", f"{addr}:8471")
    s = make_school(tmp_path, m, key, "school-2", "--upstream", "auto")
    for x in (r, s):
        no_auto_sync(x)
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>found</h1>\n"})
    m.ctl("publish", "content", str(content))
    md = start_daemon(m, prefix=office)
    start_daemon(r, prefix=office)
    sd = start_daemon(s, prefix=school_ns)
    assert r.ctl("sync", "--wait", check=False).returncode == 0
    # Both announce (the announcement is made in the background after start).
    wait_for(lambda: "mDNS: announced" in md.output(), 20, what="the master's announcement")
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 0, p.stderr
    assert f"synced with http://{addr}:8470" in p.stdout, p.stdout
    assert tree_digest(s.deploy / "content") == tree_digest(content)
    up = sd.status()["upstream"]
    assert up["url"] == "auto"
    assert up["found"].startswith(f"http://{addr}:8470 (master-1, master)"), up
    assert f"upstream:  auto, found http://{addr}:8470 (master-1, master)" in s.ctl("status").stdout
    # The master stops (its announcement goes with it): the relay is found instead.
    assert md.stop() == 0
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 0, p.stderr
    assert f"synced with http://{addr}:8471" in p.stdout, p.stdout
    assert sd.status()["upstream"]["found"].startswith(f"http://{addr}:8471 (relay-1, relay)")
    assert list((r.state / "relay" / "up" / "school-2").glob("*.hpk")), "the relay queued school-2's request"


def test_auto_upstream_with_nobody_announcing_says_so(tmp_path: Path, lan: tuple[list[str], list[str], str],
                                                      start_daemon: Callable[..., DaemonProc]) -> None:
    _office, school_ns, _addr = lan
    m, key = make_master(tmp_path, "master-1")
    s = make_school(tmp_path, m, key, "school-2", "--upstream", "auto")
    no_auto_sync(s)
    sd = start_daemon(s, prefix=school_ns)
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 1
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    assert "no Harmonic server for this master key" in lines[0], p.stderr
    up = sd.status()["upstream"]
    assert up["reachable"] is False
    assert "no Harmonic server" in up["last_error"]

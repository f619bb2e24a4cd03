"""Online sync over a slow link of its own (issue 4): a school daemon in a network
namespace, joined to the master's (the root namespace) by a veth pair shaped
with tc tbf to 4 Mbit/s each way, as a school's DSL line.

Two faults in the middle of a download of some tens of MiB: the school's
daemon is killed (SIGKILL) and restarted; the link is cut (`ip link set
down`) and comes back. Either way the next sync must finish the download
from where it stopped, not start over: what the master sent over the veth in
all (its interface's tx_bytes, TCP/IP headers and retransmissions included)
stays under 1.15 times the answer's size, and the school's deployed tree is
the master's.

Needs root and iproute2 (`ip`, `tc` with the tbf qdisc); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import HARMONICCTL, Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import no_auto_sync

pytestmark = pytest.mark.long

RATE = "4mbit"
PACK_MIB = 24  # incompressible: the answer is as big; ~50 s at 4 Mbit/s
KILL_AT = 0.4  # share of the pack downloaded when the fault comes
BOUND = 1.15  # bytes the master may send in all, as a multiple of the answer's size
HTTP_TIMEOUT = 15  # school's upstream.timeout_seconds in the cut-link test (the master builds a 24 MiB answer first)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)


def _must(*cmd: str) -> None:
    p = _run(*cmd)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")


class SlowLink:
    """A network namespace for the school, a veth pair to the root namespace with a
    /30 of private addresses, and tbf on both ends (each end shapes what it sends:
    the master's downloads on the root end, the school's uploads on the other)."""

    _made = 0

    def __init__(self) -> None:
        SlowLink._made += 1
        tag = f"{os.getpid()}{SlowLink._made}"[-9:]
        self.ns = f"harmonic-slow-{os.getpid()}-{SlowLink._made}"
        self.root_dev, self.school_dev = f"hsr{tag}", f"hss{tag}"  # interface names: at most 15 bytes
        self.root_ip = self.school_ip = ""
        self.up_done = False

    @property
    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def _free_subnet(self) -> ipaddress.IPv4Network:
        # Others' tests make namespaces at the same time: a random /30 not already on this host.
        used = _run("ip", "-4", "-o", "addr", "show").stdout
        rng = random.Random(os.getpid() * 1000 + SlowLink._made)
        for _ in range(100):
            net = ipaddress.IPv4Network(f"10.{rng.randrange(64, 128)}.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
            if not any(f" {h}/" in used for h in net):
                return net
        raise RuntimeError("no free /30 in 10.64.0.0/10")

    def open(self) -> None:
        _must("ip", "netns", "add", self.ns)
        self.up_done = True
        _must("ip", "link", "add", self.root_dev, "type", "veth", "peer", "name", self.school_dev, "netns", self.ns)
        net = self._free_subnet()
        a, b = list(net.hosts())
        self.root_ip, self.school_ip = str(a), str(b)
        _must("ip", "addr", "add", f"{a}/30", "dev", self.root_dev)
        _must("ip", "link", "set", self.root_dev, "up")
        _must("ip", "-n", self.ns, "addr", "add", f"{b}/30", "dev", self.school_dev)
        _must("ip", "-n", self.ns, "link", "set", self.school_dev, "up")
        _must("ip", "-n", self.ns, "link", "set", "lo", "up")
        for where, dev in (([], self.root_dev), (["-n", self.ns], self.school_dev)):
            _must("tc", *where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "32kbit",
                  "latency", "400ms")

    def close(self) -> None:
        # Deleting one end of a veth deletes both; the namespace goes with its last process.
        _run("ip", "link", "del", self.root_dev)
        if self.up_done:
            _run("ip", "netns", "del", self.ns)

    def tx_bytes(self) -> int:
        """Bytes the root end has sent to the school (frames: TCP/IP headers and resends included)."""
        return int(Path(f"/sys/class/net/{self.root_dev}/statistics/tx_bytes").read_text())

    def set(self, state: str) -> None:
        _must("ip", "-n", self.ns, "link", "set", self.school_dev, state)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((self.root_ip, 0))
            return int(s.getsockname()[1])


@pytest.fixture
def slow_link() -> Iterator[SlowLink]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, veth, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (Debian package iproute2)")
    link = SlowLink()
    try:
        try:
            link.open()
        except RuntimeError as exc:
            pytest.skip(f"cannot make a shaped veth link here: {exc}")
        yield link
    finally:
        link.close()


def _pair(tmp_path: Path, link: SlowLink, start_daemon: Callable[..., DaemonProc],
          timeout: int | None = None) -> tuple[Server, Server, Path, DaemonProc]:
    port = link.free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"{link.root_ip}:{port}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://{link.root_ip}:{port}")
    no_auto_sync(s)
    if timeout is not None:
        s.config.write_text(s.config.read_text().replace("timeout_seconds = 60", f"timeout_seconds = {timeout}"))
    src = tmp_path / "content"
    write_tree(src, {f"video/{i:02}.mp4": os.urandom(1 << 20) for i in range(PACK_MIB)})
    write_tree(src, {"index.html": b"<h1>lessons</h1>\n"})
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    d = start_daemon(s, prefix=link.exec)
    return m, s, src, d


def _answer_size(s: Server) -> int:
    """The answer's bytes as the school knows them: the packs being fetched (each has a
    .hpk.json beside it naming its size) and those already whole."""
    folder = s.state / "online"
    total = 0
    for p in folder.iterdir() if folder.exists() else ():
        if p.name.endswith(".hpk.json"):
            with contextlib.suppress(ValueError, OSError):
                total += int(json.loads(p.read_text())["size"])
        elif p.name.endswith(".hpk"):
            total += p.stat().st_size
    return total


def _big_part_progress(s: Server) -> float:
    """Share downloaded of the largest pack in progress (0 when none is)."""
    best = 0.0
    folder = s.state / "online"
    for meta in folder.glob("*.hpk.json") if folder.exists() else ():
        with contextlib.suppress(ValueError, OSError, KeyError):
            size = int(json.loads(meta.read_text())["size"])
            part = meta.with_name(meta.name[: -len(".json")] + ".part")
            if size > (PACK_MIB << 20) // 2 and part.exists():
                best = max(best, part.stat().st_size / size)
    return best


def _start_sync(s: Server) -> subprocess.Popen[str]:
    """`harmonicctl sync --wait`, running while the test does something to the link."""
    return subprocess.Popen([*HARMONICCTL, "--config", str(s.config), "sync", "--wait"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_progress(s: Server, sync: subprocess.Popen[str]) -> None:
    def far_enough() -> bool:
        if sync.poll() is not None:
            out, err = sync.communicate()
            raise AssertionError(f"the sync ended (exit {sync.returncode}) before the fault: {out} {err}")
        return _big_part_progress(s) >= KILL_AT

    wait_for(far_enough, 180, 0.1, f"{KILL_AT:.0%} of the pack downloaded")


def _content_seq(d: DaemonProc) -> int:
    return int(next(c["seq"] for c in d.status()["collections"] if c["name"] == "content"))


def test_killed_school_finishes_its_download_without_starting_over(
        tmp_path: Path, slow_link: SlowLink, start_daemon: Callable[..., DaemonProc]) -> None:
    _m, s, src, d = _pair(tmp_path, slow_link, start_daemon)
    sent_before = slow_link.tx_bytes()
    sync = _start_sync(s)
    try:
        _wait_for_progress(s, sync)
        size = _answer_size(s)
        d.kill()
    finally:
        sync.wait(30)
    had = _big_part_progress(s)
    assert KILL_AT <= had < 1, f"the download was at {had:.0%} when the daemon was killed"
    assert not (s.deploy / "content").exists(), "nothing is applied from a pack cut short"
    d = start_daemon(s, prefix=slow_link.exec)
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 0, p.stderr
    sent = slow_link.tx_bytes() - sent_before
    print(f"the master sent {sent:,} B for an answer of {size:,} B ({sent / size:.3f}x)")
    assert sent < BOUND * size, (f"the master sent {sent:,} bytes for an answer of {size:,} "
                                 f"(killed at {had:.0%}): the download started over")
    assert _content_seq(d) == 1
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    assert not list((s.state / "online").iterdir())
    s.ctl("verify")


def test_cut_link_is_explained_and_the_next_sync_continues(
        tmp_path: Path, slow_link: SlowLink, start_daemon: Callable[..., DaemonProc]) -> None:
    _m, s, src, d = _pair(tmp_path, slow_link, start_daemon, timeout=HTTP_TIMEOUT)
    sent_before = slow_link.tx_bytes()
    sync = _start_sync(s)
    try:
        _wait_for_progress(s, sync)
        size = _answer_size(s)
        slow_link.set("down")
        t_cut = time.monotonic()
        _out, err = sync.communicate(timeout=HTTP_TIMEOUT * 6)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.wait(10)
    assert sync.returncode == 1, err
    assert time.monotonic() - t_cut < HTTP_TIMEOUT * 4, "the cut was noticed only long after the timeout"
    up = d.status()["upstream"]
    assert up["reachable"] is False, up
    assert up["reason"] == "cut", up
    why = up["last_error"] or ""
    assert "cut off at" in why, why
    assert "the next sync continues from there" in why, why
    assert why in err, err
    had = _big_part_progress(s)
    assert KILL_AT <= had < 1, f"the download was at {had:.0%} when the link was cut"
    assert not (s.deploy / "content").exists(), "nothing is applied from a pack cut short"
    slow_link.set("up")
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 0, p.stderr
    sent = slow_link.tx_bytes() - sent_before
    print(f"the master sent {sent:,} B for an answer of {size:,} B ({sent / size:.3f}x)")
    assert sent < BOUND * size, (f"the master sent {sent:,} bytes for an answer of {size:,} "
                                 f"(cut at {had:.0%}): the download started over")
    up = d.status()["upstream"]
    assert up["reachable"] is True, up
    assert up["last_error"] is None, up
    assert tree_digest(s.deploy / "content") == tree_digest(src)

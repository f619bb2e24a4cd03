"""The daemon's life as a process: start, status over the socket, SIGTERM,
restart, SIGKILL in the middle of an import, SIGTERM during one, SIGHUP, and
command-line jobs that wait for the daemon's lock.

The imports are real: a master makes a pack of a few tens of MiB through the
command line and leaves it in a folder standing for a stick; the school's
daemon imports it (POST /v1/exchange) and is killed at chosen moments.
``ImportWorld`` builds that once per module and puts the school and the stick
back before each test; ``EventReader`` follows the daemon's event stream;
``set_option`` edits a server's TOML. The other daemon tests import them.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import (
    assert_old_or_new,
    assert_stick_clean,
    clear,
    ctl_popen,
    incoming_batches,
    part_files,
)
from tests.daemon.conftest import DaemonProc, wait_for

MiB = 1 << 20
MARGIN = 10.0  # seconds a stopping daemon may take beyond its grace (a busy 2-core machine)


# --------------------------------------------------------------------------- helpers


def set_option(config: Path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (a TOML literal) in ``[section]`` of a config file."""
    out: list[str] = []
    current, done = "", False
    for line in config.read_text().splitlines():
        head = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if head:
            if current == section and not done:
                out.append(f"{key} = {value}")
                done = True
            current = head.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            line = f"{key} = {value}"
            done = True
        out.append(line)
    if not done:
        if current != section:
            out.append(f"[{section}]")
        out.append(f"{key} = {value}")
    config.write_text("\n".join(out) + "\n")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=None)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.unix_path)
        self.sock = s


class EventReader:
    """GET /v1/events, read in a thread. The stream is connected when the
    constructor returns, so nothing that happens afterwards is missed
    (``recent``: the daemon's recent events first, those before too)."""

    def __init__(self, socket_path: str, recent: bool = False) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []  # (monotonic time received, event)
        self.ended = False
        self._cond = threading.Condition()
        self._conn = _UnixHTTP(socket_path)
        self._conn.request("GET", "/v1/events" + ("?recent=1" if recent else ""))
        self._resp = self._conn.getresponse()
        assert self._resp.status == 200, self._resp.read()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._resp:
                if line.strip():
                    ev = json.loads(line)
                    with self._cond:
                        self.events.append((time.monotonic(), ev))
                        self._cond.notify_all()
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the daemon went away (killed): the stream simply ends
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60, what: str = "an event",
             start: int = 0) -> tuple[float, dict[str, Any]]:
        """The first event from the ``start``-th on that pred accepts (and when it came)."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.events):
                    t, ev = self.events[i]
                    i += 1
                    if pred(ev):
                        return t, ev
                if self.ended:
                    raise AssertionError(f"the event stream ended before {what}: {self.kinds()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self.kinds()}")
                self._cond.wait(left)

    def count(self) -> int:
        with self._cond:
            return len(self.events)

    def seen(self, pred: Callable[[dict[str, Any]], bool]) -> bool:
        with self._cond:
            return any(pred(ev) for _t, ev in self.events)

    def kinds(self) -> list[str]:
        return [f"{ev['event']}:{ev.get('kind', '')}" for _t, ev in self.events]

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._conn.close()


def is_event(event: str, kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev.get("event") == event and ev.get("kind") == kind


def job_ended(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev.get("event") in ("done", "failed") and ev.get("kind") == kind


class ImportWorld:
    """A master and a school; the school holds content release 1 (small) and
    the stick carries the master's answer with release 2: ``big_mib`` MiB of
    random data in 4 MiB files and ``small`` small files. ``reset`` puts the
    school's state, its config and the stick back to that moment."""

    def __init__(self, base: Path, big_mib: int, small: int, seed: int = 3) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.m, key = make_master(base)
        self.s = make_school(base, self.m, key)
        m, s = self.m, self.s
        self.stick = base / "stick"
        self.stick.mkdir()
        self.src = base / "content"
        rng = random.Random(seed)
        write_tree(self.src, {f"first/{i}.txt": rng.randbytes(1000) for i in range(10)})
        m.ctl("publish", "content", str(self.src))
        s.ctl("exchange", str(self.stick))
        m.ctl("exchange", str(self.stick))
        s.ctl("exchange", str(self.stick))
        self.old = tree_digest(s.deploy / "content")
        assert self.old == tree_digest(self.src)
        files = {f"big/b{i:03d}.bin": rng.randbytes(4 * MiB) for i in range(big_mib // 4)}
        files.update({f"small/d{i % 50:02d}/f{i:05d}.dat": rng.randbytes(rng.randint(200, 16000))
                      for i in range(small)})
        write_tree(self.src, files)
        m.ctl("publish", "content", str(self.src))
        self.new = tree_digest(self.src)
        m.ctl("exchange", str(self.stick))  # answers the school's last request with release 2
        packs = list((self.stick / "HARMONIC" / "to-school-1").glob("*.hpk"))
        assert packs, "the master wrote no pack for the school"
        self.snap = base / "snapshot"
        shutil.copytree(s.state, self.snap / "school", symlinks=True)
        shutil.copytree(self.stick, self.snap / "stick", symlinks=True)
        shutil.copy2(s.config, self.snap / "school.toml")

    def reset(self) -> None:
        clear(self.s.state)
        shutil.copytree(self.snap / "school", self.s.state, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(self.stick)
        shutil.copytree(self.snap / "stick", self.stick, symlinks=True)
        shutil.copy2(self.snap / "school.toml", self.s.config)

    def import_in(self, d: DaemonProc) -> None:
        code, out = d.call("POST", "/v1/exchange", {"dir": str(self.stick), "wait": False})
        assert code == 202, out

    def carries_on(self, d: DaemonProc) -> str:
        """After a crash or stop, with a daemon running again: the deployed content is
        the old or the new release, verify passes, and an exchange completes the job.
        Returns which release the crash left ("old" or "new")."""
        which = assert_old_or_new(self.s, self.old, self.new)
        v = self.s.ctl("verify", check=False)  # waits for the daemon's lock if it is busy
        assert v.returncode == 0, f"verify failed after the restart:\n{v.stdout}{v.stderr}"
        code, out = d.call("POST", "/v1/exchange", {"dir": str(self.stick), "wait": True}, timeout=300)
        assert code == 200, out
        assert out["ok"], out
        assert tree_digest(self.s.deploy / "content") == self.new
        assert not incoming_batches(self.s)
        assert not part_files(self.stick)
        assert_stick_clean(self.stick)
        self.s.ctl("verify")
        return which


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ImportWorld:
    return ImportWorld(tmp_path_factory.mktemp("import-world"), big_mib=48, small=3000)


@pytest.fixture
def fresh(world: ImportWorld) -> ImportWorld:
    world.reset()
    return world


def _status_json(server: Server) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(server.ctl("status", "--json").stdout)
    return out


# --------------------------------------------------------------------------- start, status, stop


def test_start_status_sigterm_restart(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    d = start_daemon(s)
    sock = d.socket

    st = _status_json(s)
    assert st["daemon"] is True
    assert st["pid"] == d.proc.pid
    assert st["id"] == "school-1"
    assert st["role"] == "node"
    assert {c["name"] for c in st["collections"]} >= {"content", "stats", "backup"}
    assert oct(os.stat(sock).st_mode & 0o777) == oct(0o660)

    human = s.ctl("status").stdout
    assert "school-1  node" in human
    assert "daemon running" in human
    assert re.search(r"^collection\s+owner\s+seq\s+released\s+size\s+pending\s+path$", human, re.M), human
    for name in ("content", "stats", "backup"):
        assert re.search(rf"^{name}\s+\S+\s+\d+\s", human, re.M), f"no row for {name}:\n{human}"
    assert re.search(r"^now:\s+(idle|publish)", human, re.M), human

    # The master's table has a row per school.
    dm = start_daemon(m)
    mh = m.ctl("status").stdout
    assert "daemon running" in mh
    assert re.search(r"^school\s+last seen\s+how\s+waiting\s+holds$", mh, re.M), mh
    assert re.search(r"^school-1\s", mh, re.M), mh
    assert dm.stop() == 0

    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < MARGIN
    assert not os.path.lexists(sock), "the control socket is still there after a clean stop"
    log = d.output()
    assert "stopping (SIGTERM)" in log
    assert "stopped" in log.splitlines()[-1]
    assert "Traceback" not in log
    assert _status_json(s)["daemon"] is False
    assert "daemon not running" in s.ctl("status").stdout

    d2 = start_daemon(s)
    assert d2.status()["pid"] == d2.proc.pid != d.proc.pid
    assert _status_json(s)["daemon"] is True
    assert d2.stop(signal.SIGINT) == 0
    assert not os.path.lexists(sock)


# --------------------------------------------------------------------------- SIGKILL mid-import


def _kill_when(moment: str, w: ImportWorld, d: DaemonProc, ev: EventReader, delay: float = 0.0) -> bool:
    """SIGKILL the daemon at ``moment`` of the import; True if its job was still running."""
    if moment == "first-progress":
        ev.wait(is_event("progress", "exchange"), what="the import's first progress event")
    elif moment == "data-read":
        # Most of the pack read and staged; then come the checks, the commit and the deployment.
        def far() -> bool:
            act = d.status()["activity"]
            if act is None or ev.seen(job_ended("exchange")):
                raise AssertionError("the import ended before 90% of the pack was read")
            return bool(act["kind"] == "exchange" and act["total_bytes"]
                        and act["done_bytes"] >= 0.9 * act["total_bytes"])
        wait_for(far, 60, every=0.01, what="90% of the pack read")
    elif moment == "near-end":
        t, _ = ev.wait(is_event("started", "exchange"), what="the import to start")
        while time.monotonic() < t + delay and not ev.seen(job_ended("exchange")):
            time.sleep(0.005)
    running = not ev.seen(job_ended("exchange"))
    d.kill()
    return running


@pytest.mark.parametrize("moment", ["right-away", "first-progress", "data-read", "near-end"])
def test_sigkill_during_import(fresh: ImportWorld, start_daemon: Callable[..., DaemonProc], moment: str) -> None:
    w = fresh
    delay = 0.0
    if moment == "near-end":
        # How long an undisturbed import takes here and now, to kill it shortly before its end.
        d = start_daemon(w.s)
        ev = EventReader(d.socket)
        w.import_in(d)
        t0, _ = ev.wait(is_event("started", "exchange"), what="the import to start")
        t1, done = ev.wait(job_ended("exchange"), 300, what="the import to end")
        assert done["event"] == "done", done
        ev.close()
        assert d.stop() == 0
        delay = 0.85 * (t1 - t0)
        w.reset()
    for _attempt in range(4):
        d = start_daemon(w.s)
        ev = EventReader(d.socket)
        w.import_in(d)
        running = _kill_when(moment, w, d, ev, delay)
        ev.close()
        assert d.proc.returncode == -signal.SIGKILL
        if running:
            break
        # The import was faster than measured: kill earlier.
        assert moment == "near-end", f"the import ended before the kill at {moment}"
        delay *= 0.7
        w.reset()
    else:
        raise AssertionError("the import always ended before the kill")

    d2 = start_daemon(w.s)  # READY: the socket answers, after recovery
    w.carries_on(d2)
    assert d2.stop() == 0
    assert "Traceback" not in d2.output()


# --------------------------------------------------------------------------- SIGTERM mid-import


@pytest.mark.parametrize(("grace", "expect"), [(0, "abandoned"), (2, "either"), (60, "finished")])
def test_sigterm_during_import(fresh: ImportWorld, start_daemon: Callable[..., DaemonProc],
                               grace: float, expect: str) -> None:
    w = fresh
    set_option(w.s.config, "server", "stop_grace_seconds", str(grace))
    d = start_daemon(w.s)
    ev = EventReader(d.socket)
    w.import_in(d)
    ev.wait(is_event("progress", "exchange"), what="the import's first progress event")
    assert not ev.seen(job_ended("exchange"))
    t0 = time.monotonic()
    code = d.stop(signal.SIGTERM, timeout=grace + 120)
    took = time.monotonic() - t0
    ev.close()
    log = d.output()
    assert code == 0, log
    assert took < grace + MARGIN, f"stopping took {took:.1f} s with stop_grace_seconds = {grace}"
    assert "stopping (SIGTERM)" in log
    assert not os.path.lexists(d.socket)
    abandoned = "did not finish" in log
    if expect == "abandoned":
        assert abandoned, log
        # Abandoned means the process ends there, not after the job (which has seconds of work left).
        assert "deployed content" not in log.split("did not finish", 1)[1], log
    elif expect == "finished":
        assert not abandoned, log
        # Finished before the exit (event streams end when the stop begins; the log tells):
        # the new release is deployed already.
        assert re.search(r" INFO exchange: received master-1/content release 2", log), log
        assert tree_digest(w.s.deploy / "content") == w.new

    d2 = start_daemon(w.s)
    w.carries_on(d2)
    assert d2.stop() == 0


# --------------------------------------------------------------------------- SIGHUP


def _published_stats_seq(d: DaemonProc) -> int:
    return int(next(c["seq"] for c in d.status()["collections"] if c["name"] == "stats"))


def test_sighup_reloads_and_survives_a_broken_config(tmp_path: Path,
                                                     start_daemon: Callable[..., DaemonProc]) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    set_option(s.config, "publish", "quiet_seconds", "120")
    s.ctl("publish", "stats", str(s.source("stats")))
    d = start_daemon(s)
    seq = _published_stats_seq(d)

    # A quiet period of 120 s would hold this file back for two minutes; the reload makes it 0.5 s.
    set_option(s.config, "publish", "quiet_seconds", "0.5")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in d.output(), 30, what="the reload in the log")
    (s.source("stats") / "one.json").write_bytes(b'{"n": 1}')
    wait_for(lambda: _published_stats_seq(d) == seq + 1, 60, what="stats published with the new quiet period")

    # A file that is not TOML: logged, and the running configuration stays.
    good = s.config.read_text()
    s.config.write_text(good + "\n[publish\nquiet_seconds = = 3\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.output(), 30, what="the refused reload in the log")
    line = next(ln for ln in d.output().splitlines() if "reload refused" in ln)
    assert " ERROR " in line, line
    assert str(s.config) in line, line
    # An unknown key: refused the same way, naming the key.
    s.config.write_text(good.replace("[publish]", "[publish]\nquiet_secs = 1"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "publish.quiet_secs" in d.output(), 30, what="the unknown key in the log")
    assert d.proc.poll() is None
    assert d.status()["daemon"] is True
    (s.source("stats") / "two.json").write_bytes(b'{"n": 2}')
    wait_for(lambda: _published_stats_seq(d) == seq + 2, 60, what="stats published with the kept quiet period")
    assert d.stop() == 0
    assert "Traceback" not in d.output()


# --------------------------------------------------------------------------- the command line waits


def _blocked_on_lock(state: Path, pids: set[int]) -> set[int]:
    """Which of pids wait in flock() for the state folder's lock (/proc/locks '->' lines)."""
    ino = os.stat(state / "lock").st_ino
    waiting: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) >= 7 and f[1] == "->" and f[2] == "FLOCK" and f[6].rsplit(":", 1)[-1] == str(ino):
            waiting.add(int(f[5]))
    return waiting & pids


def test_cli_waits_for_the_daemons_job(fresh: ImportWorld, start_daemon: Callable[..., DaemonProc],
                                       tmp_path: Path) -> None:
    w = fresh
    s = w.s
    other = tmp_path / "other-stick"
    other.mkdir()
    (s.source("stats") / "cli.json").write_bytes(b'{"cli": true}')
    d = start_daemon(s)
    ev = EventReader(d.socket)
    w.import_in(d)
    code, _ = d.call("POST", "/v1/verify", {"wait": False})  # keeps the daemon busy a while longer
    assert code == 202
    ev.wait(is_event("started", "exchange"), what="the import to start")
    procs = [ctl_popen(s, "publish", "stats", str(s.source("stats"))), ctl_popen(s, "exchange", str(other))]
    pids = {p.pid for p in procs}

    def blocked() -> set[int]:
        if all(p.poll() is not None for p in procs):
            raise AssertionError("the commands ended without ever waiting for the daemon's lock: "
                                 + " | ".join(p.communicate()[1] for p in procs))
        return _blocked_on_lock(s.state, pids)

    # Seen in flock() behind the daemon's job: they wait rather than fail.
    wait_for(blocked, 60, every=0.01, what="the commands to wait for the lock")
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "busy" not in (out + err).lower()
    ev.wait(is_event("done", "exchange"), 300, what="the daemon's import")
    ev.close()
    assert (other / "HARMONIC" / "to-master").is_dir()
    assert tree_digest(s.deploy / "content") == w.new
    s.ctl("verify")
    assert d.stop() == 0

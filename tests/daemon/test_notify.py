"""sd_notify with a fake NOTIFY_SOCKET (RELIABILITY.md §6.3): READY=1 only
once the control socket accepts connections, STATUS= lines, WATCHDOG=1 at a
steady rate that stops while the event loop is blocked, STOPPING=1 and exit
code 0 on SIGTERM. Plus the Notifier on its own (abstract addresses,
WATCHDOG_PID, a receiver that stopped reading).

The daemon without NOTIFY_SOCKET is what every other daemon test runs
(tests/daemon/conftest.py removes it), so it has no test of its own here.
"""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harmonicd import systemd
from harmonicd.systemd import Notifier
from tests.conftest import make_master, make_school
from tests.daemon.conftest import DaemonProc

WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s


@dataclass
class Message:
    at: float  # time.monotonic() when received
    fields: dict[str, str]
    socket_answered: bool | None = None  # READY=1 only: did a connect() right after receipt succeed?


class NotifyReceiver:
    """The systemd side: an AF_UNIX datagram socket read by a thread.

    On READY=1 the thread itself connects to the control socket at once,
    before doing anything else, so the check happens at the moment READY
    arrives rather than whenever the test gets round to it."""

    def __init__(self, path: str, control_socket: str) -> None:
        self.path = path
        self.control_socket = control_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="notify-receiver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            msg = Message(at, fields)
            if fields.get("READY") == "1":
                msg.socket_answered = self._connects()
            with self.cond:
                self.messages.append(msg)
                self.cond.notify_all()

    def _connects(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(self.control_socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def wait_for(self, pred: Callable[[Message], bool], timeout: float = 30, what: str = "a message",
                 after: int = 0) -> Message:
        """The first message at index >= after for which pred holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages[after:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s; got {[m.fields for m in self.messages]}")
                self.cond.wait(left)

    def snapshot(self) -> list[Message]:
        with self.cond:
            return list(self.messages)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="hd-notify-") as d:
        yield Path(d)


def _start(tmp_path: Path, short_dir: Path, start_daemon: Callable[..., DaemonProc],
           **env: str) -> tuple[DaemonProc, NotifyReceiver]:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    rx = NotifyReceiver(str(short_dir / "notify"), s.cfg().socket)
    d = start_daemon(s, env={"NOTIFY_SOCKET": rx.path, "HARMONICD_DEBUG_HOOKS": "1", **env}, wait=False)
    return d, rx


def watchdogs(msgs: list[Message]) -> list[float]:
    return [m.at for m in msgs if m.fields.get("WATCHDOG") == "1"]


def test_ready_after_socket_status_and_stopping(tmp_path: Path, short_dir: Path,
                                                start_daemon: Callable[..., DaemonProc]) -> None:
    d, rx = _start(tmp_path, short_dir, start_daemon)
    try:
        ready = rx.wait_for(lambda m: m.fields.get("READY") == "1", 60, "READY=1")
        assert ready.socket_answered, f"READY=1 came before the control socket accepted connections:\n{d.output()}"
        assert ready.fields.get("MAINPID") == str(d.proc.pid)
        assert ready.fields.get("STATUS", "").endswith("school-1: idle"), ready.fields
        assert d.status()["daemon"] is True
        first = rx.snapshot().index(ready)
        assert not any(m.fields.get("READY") for m in rx.snapshot()[:first]), "more than one READY"
        assert not any(m.fields.get("STOPPING") for m in rx.snapshot()), "STOPPING before any stop"

        # A job shows in STATUS= while it runs, and idle again afterwards.
        n = len(rx.snapshot())
        code, res = d.call("POST", "/v1/verify", {"wait": True}, timeout=120)
        assert code == 200, res
        job = rx.wait_for(lambda m: "verify" in m.fields.get("STATUS", ""), 30, "STATUS= naming verify", n)
        rx.wait_for(lambda m: m.fields.get("STATUS", "").endswith(": idle"), 30, "STATUS= back to idle",
                    rx.snapshot().index(job) + 1)

        assert d.stop() == 0, d.output()
        stopping = rx.wait_for(lambda m: m.fields.get("STOPPING") == "1", 10, "STOPPING=1")
        assert "SIGTERM" in stopping.fields.get("STATUS", ""), stopping.fields
        # No watchdog was asked for, so none was sent.
        assert watchdogs(rx.snapshot()) == []
    finally:
        rx.close()


def test_watchdog_steady_stops_while_loop_blocked(tmp_path: Path, short_dir: Path,
                                                  start_daemon: Callable[..., DaemonProc]) -> None:
    d, rx = _start(tmp_path, short_dir, start_daemon, WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        ready = rx.wait_for(lambda m: m.fields.get("READY") == "1", 60, "READY=1")
        assert ready.socket_answered, d.output()

        # Steady: at 0.2 s intervals, 3 s give about 15 pings; ask for a third of that.
        rx.wait_for(lambda m: m.fields.get("WATCHDOG") == "1", 10, "a first WATCHDOG=1")
        t = time.monotonic()
        time.sleep(3)  # observation window, not an assertion
        pings = [a for a in watchdogs(rx.snapshot()) if t <= a <= t + 3]
        assert len(pings) >= 5, f"only {len(pings)} WATCHDOG=1 in 3 s (every {WATCHDOG_USEC / 2e6} s expected)"
        steady_gap = max(b - a for a, b in itertools.pairwise(pings))
        assert steady_gap < 1.0, f"a {steady_gap:.2f} s gap between pings while the loop was idle"

        # Blocked: the loop sleeps 2 s inside the request; no ping may come for most of that.
        t0 = time.monotonic()
        code, res = d.call("POST", "/v1/debug/block-loop?seconds=2", {}, timeout=60)
        t1 = time.monotonic()
        assert code == 200, res
        assert t1 - t0 >= 2
        # Then the pings resume.
        after = rx.wait_for(lambda m: m.fields.get("WATCHDOG") == "1" and m.at > t1, 10, "WATCHDOG=1 after the block")
        rx.wait_for(lambda m: m.fields.get("WATCHDOG") == "1" and m.at > after.at + 0.05, 10,
                    "a second WATCHDOG=1 after the block")
        around = [a for a in watchdogs(rx.snapshot()) if t0 - 1 <= a <= after.at]
        gap = max(b - a for a, b in itertools.pairwise(around))
        assert gap >= 1.5, f"pings kept coming while the loop was blocked for 2 s (longest gap {gap:.2f} s)"
        inside = [a for a in around if t0 + 0.3 < a < t1 - 0.3]
        assert len(inside) <= 1, f"{len(inside)} WATCHDOG=1 during the 2 s block"

        assert d.stop() == 0, d.output()
        rx.wait_for(lambda m: m.fields.get("STOPPING") == "1", 10, "STOPPING=1")
    finally:
        rx.close()


# --------------------------------------------------------------------------- the Notifier on its own


def test_notifier_without_socket_does_nothing() -> None:
    n = Notifier({"WATCHDOG_USEC": "400000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready("x")
    n.watchdog()
    n.stopping("x")
    n.close()


def test_notifier_abstract_address_and_watchdog_pid() -> None:
    name = f"harmonicd-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(b"\0" + name.encode())
    rx.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == pytest.approx(0.2)
        n.status("hello")
        assert rx.recv(4096) == b"STATUS=hello"
        n.close()
        # Pings meant for another process (a wrapper's) are not ours to send.
        other = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"})
        assert other.enabled
        assert other.watchdog_interval is None
    finally:
        rx.close()


def test_notifier_survives_a_receiver_that_stopped_reading(short_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "SEND_TIMEOUT", 0.2)
    path = str(short_dir / "full")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path})
        waited: list[float] = []

        def flood() -> None:
            # Never read: the receiver's queue fills up (net.unix.max_dgram_qlen, 10 to 512 datagrams).
            for _ in range(600):
                t = time.monotonic()
                n.watchdog()
                if time.monotonic() - t > 0.1:
                    break  # that send waited: the queue is full
            t = time.monotonic()
            n.status("still here")  # dropped after SEND_TIMEOUT, not blocked for ever
            waited.append(time.monotonic() - t)

        th = threading.Thread(target=flood, daemon=True)
        th.start()
        th.join(20)
        assert not th.is_alive(), "a notification to a receiver that stopped reading blocked for ever"
        assert waited
        assert waited[0] < 5
        n.close()
        # A missing socket is no reason to fail either.
        gone = Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody-here")})
        gone.ready("x")
        gone.close()
    finally:
        rx.close()

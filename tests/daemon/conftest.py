"""Real harmonicd processes for the daemon's tests.

``start_daemon(server)`` runs the real `harmonicd` (the console script of
this environment) on the server's config, waits until its control socket
answers, and returns a ``DaemonProc``; every daemon a test started is
killed at teardown. The socket is the one the server's config names (each
test server has its own, see tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harmonicd import control
from harmonicd.errors import DaemonNotRunning, HarmonicError
from tests.conftest import Server

_SCRIPT = Path(sys.executable).parent / "harmonicd"
HARMONICD = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from harmonicd.daemon import main; sys.exit(main())"]


@dataclass
class DaemonProc:
    server: Server
    proc: subprocess.Popen[bytes]
    log: Path
    socket: str
    extra_env: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = 10) -> tuple[int, dict[str, Any]]:
        return control.call(self.socket, method, path, body, timeout)

    def status(self) -> dict[str, Any]:
        code, st = self.call("GET", "/v1/status")
        assert code == 200, st
        return st

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(cond: Callable[[], Any], timeout: float = 20, every: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    started: list[DaemonProc] = []

    def start(server: Server, env: dict[str, str] | None = None, wait: bool = True,
              timeout: float = 30, prefix: Sequence[str] = ()) -> DaemonProc:
        e = {k: v for k, v in os.environ.items()
             if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "HARMONICD_CRASH_AT", "JOURNAL_STREAM")}
        e.update(env or {})
        log = tmp_path / f"{server.name}-daemon-{len(started)}.log"
        with open(log, "wb") as out:
            # prefix: e.g. `ip netns exec NAME`, which execs the daemon (same pid, so kill() reaches it)
            proc = subprocess.Popen([*prefix, *HARMONICD, "--config", str(server.config)], stdout=out,
                                    stderr=subprocess.STDOUT, env=e)
        d = DaemonProc(server, proc, log, server.cfg().socket, env or {})
        started.append(d)
        if wait:
            def answers() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"harmonicd exited {proc.returncode} at start:\n{d.output()}")
                try:
                    code, _ = d.call("GET", "/v1/status", timeout=5)
                except (DaemonNotRunning, HarmonicError):
                    return False
                return code == 200
            wait_for(answers, timeout, what=f"{server.name}'s control socket")
        return d

    yield start
    for d in started:
        d.kill()
    # A daemon logs a traceback only for a bug (every expected failure is one
    # line): any test whose daemons logged one fails, whatever it checked.
    bad = [d for d in started if "Traceback (most recent call last)" in d.output()]
    assert not bad, "a daemon logged a traceback:\n" + "\n".join(f"{d.log}:\n{d.output()[-3000:]}" for d in bad)

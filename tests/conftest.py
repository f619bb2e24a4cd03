"""Shared fixtures: real servers made with the real command line, in tmp folders.

``Server`` wraps one server's config file; ``server.ctl(...)`` runs
``harmonicctl`` in a subprocess (the way admins and scripts run it) and
returns the CompletedProcess; ``server.store()`` opens its store in-process
for white-box checks. ``trusted_state(server)`` is the byte-for-byte digest
of everything a bad input must leave untouched (RELIABILITY.md rule 1).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from harmonicd import config as config_mod
from harmonicd.store.store import Store

HARMONICCTL = [sys.executable, "-m", "harmonicd"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HARMONICD_CONFIG", "HARMONICD_CRASH_AT", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                "JOURNAL_STREAM", "HARMONICD_DEBUG_HOOKS", "HARMONICD_TEST_CLOCK_OFFSET"):
        monkeypatch.delenv(var, raising=False)


@dataclass
class Server:
    name: str
    config: Path
    state: Path

    def ctl(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        e = {k: v for k, v in os.environ.items() if k != "HARMONICD_CRASH_AT"}
        if env:
            e.update(env)
        p = subprocess.run([*HARMONICCTL, "--config", str(self.config), *args], capture_output=True,
                           text=True, env=e, timeout=timeout, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"harmonicctl {' '.join(args)} exited {p.returncode}:\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def cfg(self) -> config_mod.Config:
        return config_mod.load(str(self.config))

    def store(self, lock: bool = True) -> Store:
        return Store(self.cfg(), lock=lock)

    @property
    def deploy(self) -> Path:
        return self.state / "deploy"

    def source(self, name: str) -> Path:
        return self.state / "sources" / name


def _socket_args(tmp: Path, name: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    # Each test server gets its own control socket: never the machine's /run/harmonicd.
    return () if "--socket" in extra else ("--socket", str(tmp / f"{name}-run" / "control.sock"))


def make_master(tmp: Path, name: str = "master-1", *extra: str) -> tuple[Server, str]:
    s = Server(name, tmp / f"{name}.toml", tmp / name)
    key = s.ctl("init", "master", "--id", name, "--state-dir", str(s.state), *_socket_args(tmp, name, extra),
                *extra).stdout.strip()
    return s, key


def make_school(tmp: Path, master: Server, master_key: str, name: str = "school-1",
                *extra: str) -> Server:
    s = Server(name, tmp / f"{name}.toml", tmp / name)
    key = s.ctl("init", "node", "--id", name, "--state-dir", str(s.state), "--master-key", master_key,
                *_socket_args(tmp, name, extra), *extra).stdout.strip()
    master.ctl("enroll", name, key)
    return s


@pytest.fixture
def master(tmp_path: Path) -> tuple[Server, str]:
    return make_master(tmp_path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Server, Server, Path]:
    """A master and one enrolled school, and an empty folder standing for a stick."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    stick = tmp_path / "stick"
    stick.mkdir()
    return m, s, stick


def tree_digest(root: Path) -> str:
    """Digest of a folder: every path, type, mode bits and content, links not followed."""
    h = hashlib.blake2b()
    if not root.exists() and not root.is_symlink():
        return "absent"
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"D {rel}\n".encode())
        for fn in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, fn)
            st = os.lstat(p)
            if os.path.islink(p):
                h.update(f"L {rel}/{fn} -> {os.readlink(p)}\n".encode())
                continue
            h.update(f"F {rel}/{fn} {st.st_mode:o} {st.st_size}\n".encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def trusted_state(server: Server) -> dict[str, str]:
    """What must not change when a bad input is refused: database rows, object files,
    deployments (the lock file and SQLite's WAL/shm scratch files are not state)."""
    out = {"objects": tree_digest(server.state / "objects"), "deploy": tree_digest(server.deploy)}
    with server.store(lock=False) as st:
        dump = "\n".join(st.db.conn.iterdump())
    out["db"] = hashlib.blake2b(dump.encode()).hexdigest()
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

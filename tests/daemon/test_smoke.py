"""The daemon starts, answers on its socket, and stops cleanly on SIGTERM."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import Server, make_master, make_school
from tests.daemon.conftest import DaemonProc


def test_start_status_sigterm(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, key = make_master(tmp_path)
    s: Server = make_school(tmp_path, m, key)
    d = start_daemon(s)
    st = d.status()
    assert st["daemon"] is True
    assert st["id"] == "school-1"
    assert {c["name"] for c in st["collections"]} >= {"content", "stats", "backup"}
    out = s.ctl("status", "--json")
    assert '"daemon": true' in out.stdout
    assert d.stop() == 0
    assert "stopping (SIGTERM)" in d.output()
    assert '"daemon": false' in s.ctl("status", "--json").stdout

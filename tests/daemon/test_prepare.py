"""The master's daemon builds ahead, after a publish (even one typed in another process),
the shared packs its schools will ask for; the next school's sync then only copies."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import free_port, no_auto_sync


def test_packs_built_ahead_after_a_publish(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    s = make_school(tmp_path, m, key, "school-1", "--upstream", f"http://127.0.0.1:{port}")
    no_auto_sync(s)
    src = tmp_path / "content"
    write_tree(src, {"a.html": b"<p>one</p>\n" * 100, "video.bin": os.urandom(300_000)})
    m.ctl("publish", "content", str(src))
    md = start_daemon(m)
    start_daemon(s)
    assert s.ctl("sync", "--wait").returncode == 0

    def index() -> dict[str, dict[str, object]]:
        path = m.state / "shared" / "index.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # A new release, published by a command in its own process: the daemon notices it.
    write_tree(src, {"b.html": b"<p>two</p>\n" * 100})
    m.ctl("publish", "content", str(src))
    wait_for(lambda: any(e["seq"] == 2 and e["from"] is not None for e in index().values()), 30,
             what="the delta from release 1 to 2 built ahead")
    assert any(e["seq"] == 2 and e["from"] is None for e in index().values()), "and the whole release"
    assert "prepare: built" in md.output()
    built = set(index())
    out = s.ctl("sync", "--wait").stdout
    assert "content release 2" in out, out
    assert set(index()) == built, "the school's answer copied what was built ahead, building nothing"
    assert tree_digest(s.deploy / "content") == tree_digest(src)

"""The smallest full round trip: content down and statistics up through a folder."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Server, tree_digest, write_tree


def test_content_down_stats_up(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    m, s, stick = pair
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>hi</h1>", "img/a.bin": bytes(range(256)) * 400})
    assert m.ctl("publish", "content", str(content)).stdout.strip() == "1"
    write_tree(s.source("stats"), {"2026-11-27.json": b'{"logins": 12}'})

    s.ctl("exchange", str(stick))  # the school's request and its statistics go up
    m.ctl("exchange", str(stick))  # the master answers with content
    s.ctl("exchange", str(stick))  # the school takes the content

    assert tree_digest(s.deploy / "content") == tree_digest(content)
    assert (m.deploy / "school-1" / "stats" / "2026-11-27.json").read_bytes() == b'{"logins": 12}'
    s.ctl("verify")
    m.ctl("verify")

"""Exit codes and one-line errors of the command line (INTERFACE.md)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Server, make_master


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_exit_codes(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    # 2: wrong usage
    p = m.ctl("publish", check=False)
    assert p.returncode == 2
    p = m.ctl("enroll", "school-1", "not-a-key", check=False)
    assert p.returncode == 2
    assert "school-1" in _one_line(p.stderr)
    p = m.ctl("enroll", "master", key, check=False)
    assert p.returncode == 2
    # 3: needs the daemon
    p = m.ctl("sync", check=False)
    assert p.returncode == 3
    assert "daemon" in _one_line(p.stderr)
    # 1: failed, one line saying what and why
    p = m.ctl("init", "master", "--id", "master-1", "--state-dir", str(tmp_path / "other"), check=False)
    assert p.returncode == 1
    assert "never overwrites" in _one_line(p.stderr)
    p = m.ctl("publish", "content", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2
    assert "not a folder" in _one_line(p.stderr)
    p = m.ctl("publish", "stats", str(tmp_path), check=False)
    assert p.returncode == 2
    assert "school server's own collection" in _one_line(p.stderr)


def test_config_before_or_after_command(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    after = Server(m.name, m.config, m.state)
    assert after.ctl("key").stdout.strip() == key
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "harmonicd", "key", "--config", str(m.config)],
                       capture_output=True, text=True, check=False)
    assert p.stdout.strip() == key


def test_no_config(tmp_path: Path) -> None:
    s = Server("x", tmp_path / "none.toml", tmp_path / "x")
    p = s.ctl("status", check=False)
    assert p.returncode == 1
    assert "none.toml" in _one_line(p.stderr)


def test_publish_unchanged_prints_current_seq(tmp_path: Path) -> None:
    m, _key = make_master(tmp_path)
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text("a")
    assert m.ctl("publish", "content", str(src)).stdout.strip() == "1"
    assert m.ctl("publish", "content", str(src)).stdout.strip() == "1"
    (src / "a.txt").write_text("b")
    assert m.ctl("publish", "content", str(src)).stdout.strip() == "2"

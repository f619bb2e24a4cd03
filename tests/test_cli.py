"""Exit codes and one-line errors of the command line (INTERFACE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_stick_prepare(tmp_path: Path) -> None:
    m, _key = make_master(tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "homework.odt").write_bytes(b"mine")
    p = m.ctl("stick", "prepare", str(stick))
    assert p.stdout.strip() == f"prepared {stick}: Harmonic will use it (HARMONIC/)"
    assert "Harmonic sync folder" in (stick / "HARMONIC" / "README.txt").read_text()
    assert sorted(x.name for x in stick.iterdir()) == ["HARMONIC", "homework.odt"]
    assert (stick / "homework.odt").read_bytes() == b"mine"
    assert m.ctl("stick", "prepare", str(stick)).stdout.strip() == f"{stick} is already a Harmonic stick"
    p = m.ctl("stick", "prepare", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2
    assert "not a folder" in _one_line(p.stderr)
    p = m.ctl("stick", check=False)
    assert p.returncode == 2


def test_unprepared_stick_is_not_written_without_consent(tmp_path: Path) -> None:
    """The daemon's visit of a stick with no HARMONIC/ (adopt_blank off): one clear
    error, nothing written to the stick, nothing changed here. Typed by a person,
    `exchange DIR` is consent."""
    from harmonicd.errors import NotPrepared
    from harmonicd.services.stick import visit
    from tests.bad_input.helpers import assert_unchanged, snapshot
    from tests.conftest import make_school, write_tree

    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    write_tree(s.source("stats"), {"day.json": b"{}"})
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "photos").mkdir()
    (stick / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(s)
    with s.store() as st, pytest.raises(NotPrepared) as err:
        visit(st, str(stick), None, consent=False)
    assert str(err.value) == (f"{stick}: not prepared for Harmonic; nothing written "
                              f"(`harmonicctl stick prepare {stick}`, or [media] adopt_blank = true)")
    assert sorted(str(x.relative_to(stick)) for x in stick.rglob("*")) == ["photos", "photos/cat.jpg"]
    assert_unchanged(s, before)
    p = s.ctl("exchange", str(stick))
    assert "wrote 1 pack file(s) for master" in p.stdout
    assert (stick / "HARMONIC" / "README.txt").exists()
    assert (stick / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_init_master_public_url(tmp_path: Path) -> None:
    """`init master --public-url` is what its bundles give schools by default."""
    m = Server("m", tmp_path / "m.toml", tmp_path / "m")
    m.ctl("init", "master", "--id", "master-1", "--state-dir", str(m.state), "--listen", "0.0.0.0:8750",
          "--public-url", "https://harmonic.example.org", "--socket", str(tmp_path / "m.sock"))
    assert m.cfg().public_url == "https://harmonic.example.org"
    out = m.ctl("bundle", "school-1", "--out", str(tmp_path / "s1.hbundle")).stdout
    assert "https://harmonic.example.org" in out
    for args, code, says in ((("node", "--id", "s", "--master-key", m.ctl("key").stdout.strip(),
                               "--public-url", "https://x.org"), 2, "--public-url is for `init master`"),
                             (("master", "--id", "m2", "--public-url", "ftp://x"), 1,
                              "is not an http:// or https://")):
        p = Server("x", tmp_path / "x.toml", tmp_path / "x").ctl(
            "init", *args, "--state-dir", str(tmp_path / "x"), check=False)
        assert p.returncode == code, p.stderr
        assert says in p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
        assert not (tmp_path / "x.toml").exists()

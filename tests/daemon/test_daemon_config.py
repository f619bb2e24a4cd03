"""harmonicd refuses to start on a bad configuration or state: exit 78, one line.

Each case runs the real daemon on a server made by `harmonicctl init`, then
broken in one way. The daemon must exit 78 (EX_CONFIG, which the unit's
RestartPreventExitStatus keeps systemd from restarting in a loop) and
print exactly one line: an error naming the file and the key or path, and
no traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harmonicd import control
from harmonicd.errors import HarmonicError
from tests.conftest import Server, make_master, make_school
from tests.daemon.conftest import HARMONICD, wait_for

EX_CONFIG = 78


def run_daemon(config: Path | str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The daemon in the foreground; a bad start ends it at once (a good one would time out here)."""
    try:
        return subprocess.run([*HARMONICD, "--config", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False, **kw)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"harmonicd did not exit within {timeout} s: it started on a bad input\n"
                             f"{exc.output!r}") from None


def refused(p: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 78 and exactly one error line that names every one of `names`; that line."""
    out = p.stdout
    assert p.returncode == EX_CONFIG, f"exit {p.returncode}, not {EX_CONFIG}:\n{out}"
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{out}"
    line = lines[0]
    assert " ERROR " in line, line
    for n in names:
        assert n in line, f"{n!r} not named in: {line}"
    return line


def edit(server: Server, section: str, key: str, value: str) -> None:
    """Set `key = value` (TOML text) in [section] of the server's config, adding it if absent."""
    text = server.config.read_text()
    head = f"[{section}]\n"
    if head not in text:
        text += f"\n{head}"
    lines = text.splitlines(keepends=True)
    start = lines.index(head)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        if re.match(rf"{re.escape(key)}\s*=", lines[i]):
            lines[i] = f"{key} = {value}\n"
            break
    else:
        lines.insert(start + 1, f"{key} = {value}\n")
    server.config.write_text("".join(lines))


@pytest.fixture
def school(tmp_path: Path) -> Server:
    m, key = make_master(tmp_path)
    return make_school(tmp_path, m, key)


def test_unknown_key(school: Server) -> None:
    edit(school, "server", "colour", '"red"')
    refused(run_daemon(school.config), str(school.config), "server.colour", "unknown key")


def test_unknown_section(school: Server) -> None:
    edit(school, "colours", "sky", '"blue"')
    refused(run_daemon(school.config), str(school.config), "colours", "unknown section")


@pytest.mark.parametrize(("section", "key", "value", "why"), [
    ("publish", "quiet_seconds", '"soon"', "must be a number"),
    ("server", "stop_grace_seconds", "-1", "between"),
    ("server", "socket_group", "100", "must be a string"),
    ("server", "socket", '"relative/control.sock"', "absolute path"),
    ("packs", "volume_size", '"huge"', "is not a size"),
])
def test_wrong_type_or_value(school: Server, section: str, key: str, value: str, why: str) -> None:
    edit(school, section, key, value)
    refused(run_daemon(school.config), str(school.config), f"{section}.{key}", why)


def test_wrong_type_on_a_master_without_a_publish_table(tmp_path: Path) -> None:
    m, _ = make_master(tmp_path)
    edit(m, "publish", "quiet_seconds", '"soon"')
    refused(run_daemon(m.config), str(m.config), "publish.quiet_seconds")


def test_missing_state_folder(school: Server) -> None:
    shutil.rmtree(school.state)
    refused(run_daemon(school.config), str(school.state), "does not exist")
    assert not school.state.exists()  # refused, not created


def test_state_folder_that_is_a_file(school: Server) -> None:
    shutil.rmtree(school.state)
    school.state.write_text("not a folder\n")
    refused(run_daemon(school.config), str(school.state))  # (the line says "does not exist": a nit)
    assert school.state.read_text() == "not a folder\n"


def test_not_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "harmonicd.toml"
    cfg.write_text("[server\nid = master-1\n")
    refused(run_daemon(cfg), str(cfg), "not valid TOML")


def test_missing_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "nowhere" / "harmonicd.toml"
    refused(run_daemon(cfg), str(cfg), "no configuration file")
    assert not cfg.parent.exists()


def test_config_file_is_a_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "harmonicd.toml"
    cfg.mkdir()
    refused(run_daemon(cfg), str(cfg))


def test_config_from_environment_variable(tmp_path: Path) -> None:
    # Without --config, $HARMONICD_CONFIG names the file, and the error names that one.
    cfg = tmp_path / "env.toml"
    cfg.write_text("[server]\nid = 3\n")
    env = {**os.environ, "HARMONICD_CONFIG": str(cfg)}
    p = subprocess.run(HARMONICD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                       check=False, env=env)
    refused(p, str(cfg), "server.id")


def test_server_id_of_the_wrong_type_named_once(school: Server) -> None:
    edit(school, "server", "id", "3")
    line = refused(run_daemon(school.config), str(school.config), "server.id")
    assert line.count("server.id") == 1, line


# --------------------------------------------------------------------------- the key


@pytest.mark.parametrize(("damage", "why"), [
    ("short", "32 bytes"),
    ("not-hex", "non-hexadecimal"),
    ("folder", "Is a directory"),
    ("missing", "No such file"),
])
def test_damaged_key(school: Server, damage: str, why: str) -> None:
    key = school.state / "key"
    if damage == "short":
        key.write_text("abcd\n")
    elif damage == "not-hex":
        key.write_text("this is not a key\n")
    elif damage == "folder":
        key.unlink()
        key.mkdir()
    else:
        key.unlink()
    refused(run_daemon(school.config), str(key), "key", why)


def _without_dac_override() -> list[str]:
    """A prefix that runs a command as root but without the capabilities that read through
    file modes (the unit's CapabilityBoundingSet= drops them too); [] when not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_key(school: Server) -> None:
    """chmod 000 on the key. Root reads through any mode, so as root the daemon runs
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; and starts that way once the key is
    readable again (so the key, and nothing else, was the reason)."""
    prefix = _without_dac_override()
    key = school.state / "key"
    os.chmod(key, 0)
    cmd = [*prefix, *HARMONICD, "--config", str(school.config)]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                           check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError("harmonicd started with an unreadable key") from None
    refused(p, str(key), "Permission denied")

    os.chmod(key, 0o600)
    sock = school.cfg().socket
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"harmonicd exited {proc.returncode}")
            try:
                return control.call(sock, "GET", "/v1/status", timeout=5)[0] == 200
            except HarmonicError:
                return False
        wait_for(answers, 30, what="the daemon started with a readable key")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()

"""The systemd unit and its sysusers/tmpfiles snippets (RELIABILITY.md §6).

``systemd-analyze verify`` exits 0 even on unknown keys and unparsable
values (it only prints warnings), so the check fails on *any* output; a
deliberately broken copy of the unit proves the check can fail. The
security exposure is gated with ``systemd-analyze security --offline=true
--threshold=25`` and the printed score; a bare unit proves the threshold
gates. The consistency tests tie the unit, the snippets and the daemon's
defaults together, so one cannot drift from the others unnoticed. The stick helper's
template unit gets the same verify check, a looser security gate (it must mount, as root,
in the host's mount namespace) and checks against harmonicd-mount and the udev rule.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harmonicd import config as config_mod
from harmonicd.daemon import EX_CONFIG
from harmonicd.media.helper import UNMOUNT_PAUSE, UNMOUNT_TRIES

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "harmonicd.service"
SYSUSERS = SYSTEMD_DIR / "harmonicd.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "harmonicd.tmpfiles.conf"
MAX_EXPOSURE = 2.5  # the ceiling; --threshold takes ten times it
THRESHOLD = 25

_SCRIPT = Path(sys.executable).parent / "harmonicd"
# verify insists that the ExecStart binary exists: use this environment's.
HARMONICD_BIN = _SCRIPT if _SCRIPT.exists() else Path(sys.executable)

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian package systemd)")


# --------------------------------------------------------------------------- helpers


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (keys such as SystemCallFilter repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"key outside a section: {line!r}"
        assert not line.endswith("\\"), f"continuation lines are not expected: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times"
    return values[0]


def snippet_lines(path: Path) -> list[list[str]]:
    """Non-comment lines of a sysusers/tmpfiles snippet, split on blanks (quoted GECOS kept whole)."""
    rows = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rows.append([m.group(1) or m.group(2) for m in re.finditer(r'"([^"]*)"|(\S+)', line)])
    return rows


def unit_for_this_machine(tmp: Path, text: str | None = None, name: str = "harmonicd.service") -> Path:
    """The unit with only its ExecStart binary replaced by this environment's harmonicd."""
    text = UNIT.read_text() if text is None else text
    new, n = re.subn(r"(?m)^ExecStart=/usr/bin/harmonicd\b", f"ExecStart={HARMONICD_BIN}", text)
    assert n == 1, "the unit's ExecStart=/usr/bin/harmonicd line was not found"
    path = tmp / name
    path.write_text(new)
    return path


def verify_problems(unit: Path) -> str:
    """Everything `systemd-analyze verify` objects to; "" when the unit is clean."""
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=120, check=False)
    problems = (p.stdout + p.stderr).strip()
    if p.returncode != 0:
        problems = f"exit code {p.returncode}\n{problems}"
    return problems


def security(unit: Path, threshold: int = THRESHOLD) -> tuple[int, float, str]:
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--threshold={threshold}",
                        "--no-pager", str(unit)], capture_output=True, text=True, timeout=120, check=False)
    out = p.stdout + p.stderr
    m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", out)
    assert m, f"no exposure score in the output of systemd-analyze security:\n{out}"
    return p.returncode, float(m.group(1)), out


@pytest.fixture(scope="module")
def offline_security() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    p = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True, timeout=60,
                       check=False)
    if "--offline" not in p.stdout + p.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd older than 250)")


# --------------------------------------------------------------------------- systemd-analyze verify


@needs_analyze
def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    problems = verify_problems(unit_for_this_machine(tmp_path))
    assert problems == "", f"systemd-analyze verify objects to systemd/harmonicd.service:\n{problems}"


@needs_analyze
@pytest.mark.parametrize(("broken", "why"), [
    (("WatchdogSec=60s", "WatchdogSex=60s"), "misspelt key (exit code 0, a warning only)"),
    (("ProtectSystem=strict", "ProtectSystem=bogus"), "unparsable value (exit code 0, a warning only)"),
    (("ReadWritePaths=", "ReadWritePath="), "misspelt key of a list"),
    (("TimeoutStopSec=30s", "TimeoutStopSec=thirty"), "bad time span"),
])
def test_verify_check_catches_a_broken_unit(tmp_path: Path, broken: tuple[str, str], why: str) -> None:
    old, new = broken
    text, n = re.subn(rf"(?m)^{re.escape(old)}", new, UNIT.read_text(), count=1)
    assert n == 1, f"test out of date: no line starts with {old!r} in the unit"
    problems = verify_problems(unit_for_this_machine(tmp_path, text))
    assert problems, f"the verify check missed a {why}: {new!r}"


@needs_analyze
def test_verify_check_catches_a_missing_binary(tmp_path: Path) -> None:
    # The unit as shipped names /usr/bin/harmonicd, which a development machine lacks.
    if Path("/usr/bin/harmonicd").exists():
        pytest.skip("/usr/bin/harmonicd exists here")
    unit = tmp_path / "harmonicd.service"
    shutil.copy(UNIT, unit)
    assert "/usr/bin/harmonicd" in verify_problems(unit)


# --------------------------------------------------------------------------- systemd-analyze security


@pytest.mark.usefixtures("offline_security")
def test_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    code, score, out = security(unit_for_this_machine(tmp_path))
    assert code == 0, f"systemd-analyze security --threshold={THRESHOLD} failed (exit {code}):\n{out}"
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{out}"


@pytest.mark.usefixtures("offline_security")
def test_security_threshold_really_gates(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nExecStart={HARMONICD_BIN}\n")
    code, score, out = security(bare)
    assert score > MAX_EXPOSURE, out
    assert code != 0, f"--threshold={THRESHOLD} let a unit scoring {score} pass:\n{out}"
    # And it is our hardening that passes, not any unit: dropping it fails the gate.
    weakened = "\n".join(line for line in UNIT.read_text().splitlines()
                         if not line.startswith(("SystemCallFilter=", "CapabilityBoundingSet=",
                                                 "ProtectSystem=", "RestrictAddressFamilies=",
                                                 "PrivateDevices=", "ProtectHome=")))
    code, score, out = security(unit_for_this_machine(tmp_path, weakened, "weakened.service"))
    assert score > MAX_EXPOSURE, f"a weakened unit still scores {score}:\n{out}"
    assert code != 0, f"a weakened unit passed the gate with {score}:\n{out}"


# --------------------------------------------------------------------------- consistency


def test_unit_matches_the_daemon() -> None:
    u = parse_unit(UNIT.read_text())
    s = "Service"
    assert one(u, s, "Type") == "notify"
    assert one(u, s, "NotifyAccess") == "main"
    assert one(u, s, "ExecStart") == "/usr/bin/harmonicd"
    assert one(u, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(u, s, "WatchdogSec") == "60s"
    assert one(u, s, "Restart") == "on-failure"
    assert one(u, s, "RestartPreventExitStatus") == str(EX_CONFIG)
    assert "StartLimitIntervalSec" in u["Unit"]
    assert "StartLimitBurst" in u["Unit"]
    stop = re.fullmatch(r"(\d+)s", one(u, s, "TimeoutStopSec"))
    assert stop, "TimeoutStopSec is expected in whole seconds"
    assert int(stop.group(1)) >= config_mod.DEFAULT_STOP_GRACE + 5, "no room for the daemon's stop grace"
    # The default control socket lives in the unit's runtime folder; the state folder is StateDirectory.
    assert os.path.dirname(config_mod.DEFAULT_SOCKET) == "/run/" + one(u, s, "RuntimeDirectory")
    assert one(u, s, "RuntimeDirectoryMode") == "0750"
    assert one(u, s, "StateDirectory") == "harmonicd"
    # Hardening the issue names.
    assert one(u, s, "ProtectSystem") == "strict"
    assert one(u, s, "NoNewPrivileges") == "yes"
    assert one(u, s, "CapabilityBoundingSet") == ""
    assert one(u, s, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert u[s]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_users_groups_and_folders_agree() -> None:
    u = parse_unit(UNIT.read_text())
    user, group = one(u, "Service", "User"), one(u, "Service", "Group")
    cfg = config_mod.Config(path="x", id="x", role="node", state_dir="/x")
    users = {r[1]: r for r in snippet_lines(SYSUSERS) if r[0] == "u"}
    groups = {r[1] for r in snippet_lines(SYSUSERS) if r[0] == "g"}
    assert user in users
    assert group in groups
    assert users[user][2] == f"-:{group}", "the user's primary group is the unit's Group="
    assert users[user][4] == "/var/lib/" + one(u, "Service", "StateDirectory")
    assert {cfg.socket_group, cfg.admin_group} <= groups
    dirs = {r[1]: r for r in snippet_lines(TMPFILES) if r[0] == "d"}
    writable = [p.removeprefix("-") for v in u["Service"]["ReadWritePaths"] for p in v.split()]
    # /etc/harmonicd: a server installed unconfigured writes its configuration from a bundle.
    assert sorted(writable) == ["/etc/harmonicd", "/media/harmonicd", "/srv/harmonic"]
    for path in writable:
        assert path in dirs, f"{path} is in ReadWritePaths= but tmpfiles does not create it"
        assert dirs[path][3] == user, f"{path} must belong to {user}"
    assert os.path.dirname(config_mod.DEFAULT_PATH) in dirs
    assert dirs[os.path.dirname(config_mod.DEFAULT_PATH)][4] == group, "the daemon must read its configuration"
    # StateDirectory= and RuntimeDirectory= make these; tmpfiles making the state
    # folder would stop StateDirectory= from handing over a folder root's init made.
    assert "/var/lib/harmonicd" not in dirs
    assert "/run/harmonicd" not in dirs


@pytest.mark.skipif(os.geteuid() != 0, reason="creating files owned by another user needs root")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles are not installed (Debian package systemd)")
def test_snippets_apply_to_an_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    p = subprocess.run(["systemd-sysusers", f"--root={root}", "-"], input=SYSUSERS.read_text(),
                       capture_output=True, text=True, timeout=60, check=False)
    noise = [ln for ln in (p.stdout + p.stderr).splitlines() if not ln.startswith("Creating ")]
    assert p.returncode == 0, f"systemd-sysusers: exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert not noise, f"systemd-sysusers warned:\n{p.stdout}{p.stderr}"
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    group = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    assert {"harmonicd", "harmonicd-admin"} <= set(group)
    uid, gid = int(passwd["harmonicd"][2]), int(passwd["harmonicd"][3])
    assert gid == int(group["harmonicd"][2])
    assert passwd["harmonicd"][6].endswith("nologin")

    p = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", "-"], input=TMPFILES.read_text(),
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, f"systemd-tmpfiles: exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert not (p.stdout + p.stderr).strip(), f"systemd-tmpfiles warned:\n{p.stdout}{p.stderr}"
    expect = {"etc/harmonicd": (uid, gid, 0o2750), "srv/harmonic": (uid, gid, 0o755),
              "media/harmonicd": (uid, gid, 0o750)}
    for rel, (want_uid, want_gid, want_mode) in expect.items():
        st = (root / rel).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (want_uid, want_gid, want_mode), rel


# --------------------------------------------------------------------------- the stick helper's unit and udev rule

STICK_UNIT = SYSTEMD_DIR / "harmonicd-stick@.service"
STICK_RULES = SYSTEMD_DIR / "90-harmonicd-stick.rules"
_MOUNT_SCRIPT = Path(sys.executable).parent / "harmonicd-mount"
MOUNT_BIN = _MOUNT_SCRIPT if _MOUNT_SCRIPT.exists() else Path(sys.executable)
# Root with CAP_SYS_ADMIN in the host's mount namespace is what mounting takes (3.8 on systemd 252).
STICK_MAX_EXPOSURE = 4.5
# Each of these gives the unit a mount namespace of its own, where a mount stays invisible to harmonicd.
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
               "PrivateUsers", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
               "BindPaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
               "ProtectControlGroups", "ProtectProc", "ProcSubset", "RootDirectory", "MountFlags")


def stick_unit_for_this_machine(tmp: Path, text: str | None = None,
                                name: str = "harmonicd-stick@sdb1.service") -> Path:
    text = STICK_UNIT.read_text() if text is None else text
    new, n = re.subn(r"(?m)^ExecStart=/usr/bin/harmonicd-mount\b", f"ExecStart={MOUNT_BIN}", text)
    assert n == 1, "the stick unit's ExecStart=/usr/bin/harmonicd-mount line was not found"
    path = tmp / name
    path.write_text(new)
    return path


@needs_analyze
@pytest.mark.parametrize("name", ["harmonicd-stick@.service", "harmonicd-stick@sdb1.service"])
def test_stick_unit_verifies_without_any_warning(tmp_path: Path, name: str) -> None:
    problems = verify_problems(stick_unit_for_this_machine(tmp_path, name=name))
    assert problems == "", f"systemd-analyze verify objects to systemd/harmonicd-stick@.service ({name}):\n{problems}"


@needs_analyze
@pytest.mark.parametrize(("old", "new"), [("KillMode=mixed", "KillMode=mixd"),
                                          ("CapabilityBoundingSet=", "CapabilitiesBoundingSet="),
                                          ("TimeoutStopSec=30s", "TimeoutStopSec=thirty")])
def test_verify_check_catches_a_broken_stick_unit(tmp_path: Path, old: str, new: str) -> None:
    text, n = re.subn(rf"(?m)^{re.escape(old)}", new, STICK_UNIT.read_text(), count=1)
    assert n == 1, f"test out of date: no line starts with {old!r} in the stick unit"
    assert verify_problems(stick_unit_for_this_machine(tmp_path, text)), f"the verify check missed {new!r}"


@pytest.mark.usefixtures("offline_security")
def test_stick_unit_security_exposure(tmp_path: Path) -> None:
    code, score, out = security(stick_unit_for_this_machine(tmp_path), threshold=int(STICK_MAX_EXPOSURE * 10))
    assert code == 0, f"systemd-analyze security failed (exit {code}):\n{out}"
    assert score <= STICK_MAX_EXPOSURE, f"exposure {score} > {STICK_MAX_EXPOSURE}:\n{out}"


def test_stick_unit_matches_the_helper() -> None:
    u = parse_unit(STICK_UNIT.read_text())
    s = "Service"
    assert one(u, s, "Type") == "simple"
    assert one(u, s, "ExecStart") == "/usr/bin/harmonicd-mount /dev/%I"
    assert one(u, "Unit", "BindsTo") == "dev-%i.device", "a pulled stick must stop the helper"
    assert one(u, "Unit", "After") == "dev-%i.device"
    assert one(u, s, "KillMode") == "mixed", "SIGTERM to the helper only: FUSE must outlive the unmount"
    assert "User" not in u[s], "mounting needs root"
    assert "Install" not in u, "udev starts it, nothing enables it"
    present = [k for k in NAMESPACING if k in u[s]]
    assert not present, f"these give the unit its own mount namespace, hiding the mount from harmonicd: {present}"
    assert set(one(u, s, "CapabilityBoundingSet").split()) == {"CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_CHOWN"}
    assert one(u, s, "RestrictAddressFamilies") == "AF_UNIX"
    assert "/dev/fuse rw" in u[s]["DeviceAllow"]
    stop = re.fullmatch(r"(\d+)s", one(u, s, "TimeoutStopSec"))
    assert stop, "TimeoutStopSec is expected in whole seconds"
    assert int(stop.group(1)) >= UNMOUNT_TRIES * UNMOUNT_PAUSE + 10, "no room for the unmount's retries"


def test_mount_command_is_the_units() -> None:
    scripts = tomllib.loads((SYSTEMD_DIR.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["harmonicd-mount"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_udev_rule_wants_the_stick_unit() -> None:
    lines = [ln.strip() for ln in STICK_RULES.read_text().splitlines() if ln.strip()]
    active = [ln for ln in lines if not ln.startswith("#")]
    sd_card = [ln.removeprefix("#") for ln in lines if ln.startswith("#ACTION")]
    assert len(active) == 1, active
    assert len(sd_card) == 1, "the commented SD-card variant is missing"
    want = {("ACTION", "==", "add"), ("SUBSYSTEM", "==", "block"), ("ENV{ID_FS_USAGE}", "==", "filesystem"),
            ("TAG", "+=", "systemd"), ("ENV{SYSTEMD_WANTS}", "+=", "harmonicd-stick@%k.service")}
    for rule, own in ((active[0], ("ENV{ID_BUS}", "==", "usb")), (sd_card[0], ("KERNEL", "==", "mmcblk[0-9]*"))):
        pairs = re.findall(r'([A-Z_]+(?:\{[A-Z_]+\})?)(==|\+=|=)"([^"]*)"', rule)
        assert len(pairs) == rule.count('"') // 2, f"cannot read every key of {rule!r}"
        assert set(pairs) == want | {own}, rule
    # udev's %k is the kernel name the unit's %i/%I expect (dev-sdb1.device, /dev/sdb1).
    assert "harmonicd-stick@%k.service".replace("%k", "") == STICK_UNIT.name

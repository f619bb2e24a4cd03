"""What the built .deb holds, read with dpkg-deb (-I, -c, -e): no installing.

The files the units and the docs promise, in the places systemd/README.md and
docs/packaging.md name; the units and snippets byte-for-byte those in systemd/;
the maintainer scripts doing what docs/packaging.md says; the dependencies.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.package.conftest import REPO, current_version

pytestmark = pytest.mark.long

SYSTEMD = REPO / "systemd"
VENV = "/usr/lib/harmonicd/venv"
# installed path -> the repository file it must be, byte for byte
SHIPPED = {
    "/lib/systemd/system/harmonicd.service": SYSTEMD / "harmonicd.service",
    "/lib/systemd/system/harmonicd-stick@.service": SYSTEMD / "harmonicd-stick@.service",
    "/lib/udev/rules.d/90-harmonicd-stick.rules": SYSTEMD / "90-harmonicd-stick.rules",
    "/usr/lib/sysusers.d/harmonicd.conf": SYSTEMD / "harmonicd.sysusers.conf",
    "/usr/lib/tmpfiles.d/harmonicd.conf": SYSTEMD / "harmonicd.tmpfiles.conf",
    "/usr/share/doc/harmonicd/harmonicd.example.toml": REPO / "docs" / "harmonicd.example.toml",
    "/usr/lib/harmonicd/requirements.lock": REPO / "requirements.lock",
}


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-R", str(deb), str(where)], check=True)
    return where


def _field(deb: Path, name: str) -> str:
    return _dpkg_deb("-f", str(deb), name).strip()


def test_name_version_and_architecture(deb: Path) -> None:
    assert deb.name.startswith(f"harmonicd_{current_version()}_"), deb.name
    assert _field(deb, "Package") == "harmonicd"
    assert _field(deb, "Version") == current_version()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert _field(deb, "Architecture") == arch
    assert deb.name == f"harmonicd_{current_version()}_{arch}.deb"


def test_depends_on_the_interpreter_it_was_built_for_and_systemd(deb: Path) -> None:
    depends = [d.strip().split(" ")[0] for d in _field(deb, "Depends").split(",")]
    pyver = Path("/usr/bin/python3").resolve().name  # python3.11 on bookworm
    for need in (pyver, "systemd", "procps", "mount", "libudev1", "libc6"):
        assert need in depends, f"Depends lacks {need}: {depends}"
    assert "python3-blake3" not in depends  # shipped inside, not in Debian


def test_files_where_the_units_expect_them(deb: Path, unpacked: Path) -> None:
    listing = _dpkg_deb("-c", str(deb))
    paths = {line.split()[-1].lstrip(".") if " -> " not in line else line.split()[-3].lstrip(".")
             for line in listing.splitlines()}
    for want in (*SHIPPED, "/usr/bin/harmonicd", "/usr/bin/harmonicctl", "/usr/bin/harmonicd-mount",
                 f"{VENV}/bin/python3", f"{VENV}/pyvenv.cfg", "/usr/share/doc/harmonicd/copyright"):
        assert want in paths, f"{want} is not in the package"
    # Nothing in /etc: no conffiles, the configuration is the admin's (harmonicctl init).
    assert not [p for p in paths if p.startswith("/etc/")]
    assert not (unpacked / "DEBIAN" / "conffiles").exists()
    # The commands are the private environment's console scripts.
    for cmd in ("harmonicd", "harmonicctl", "harmonicd-mount"):
        link = unpacked / "usr" / "bin" / cmd
        assert link.is_symlink()
        assert (link.parent / link.readlink()).resolve() == (unpacked / VENV.lstrip("/") / "bin" / cmd).resolve()
        script = (unpacked / VENV.lstrip("/") / "bin" / cmd).read_text()
        assert script.startswith(f"#!{VENV}/bin/python"), f"{cmd}: {script.splitlines()[0]}"


def test_units_rule_and_snippets_are_the_repositorys(unpacked: Path) -> None:
    for installed, source in SHIPPED.items():
        got = unpacked / installed.lstrip("/")
        assert got.read_bytes() == source.read_bytes(), f"{installed} differs from {source.relative_to(REPO)}"


def test_environment_holds_the_pinned_versions_and_no_build_paths(unpacked: Path) -> None:
    site = next((unpacked / VENV.lstrip("/") / "lib").glob("python3.*/site-packages"))
    have = {}
    for d in site.glob("*.dist-info"):
        name, _, version = d.name.removesuffix(".dist-info").rpartition("-")
        have[name.lower().replace("_", "-")] = version
    from tests.package.test_versions import lock_pins

    for name, version in lock_pins().items():
        assert have.get(name) == version, f"{name}: {have.get(name)} in the package, {version} in requirements.lock"
    assert have.get("harmonicd") == current_version()
    # Nothing to install with at run time.
    assert "pip" not in have
    assert "setuptools" not in have
    cfg = (unpacked / VENV.lstrip("/") / "pyvenv.cfg").read_text()
    assert "/debian/harmonicd" not in cfg, cfg
    assert "home = /usr/bin" in cfg, cfg
    # Compiled ahead, checked by hash (valid whatever the files' times).
    pycs = list(site.glob("harmonicd/__pycache__/*.pyc"))
    assert pycs
    flags = int.from_bytes(pycs[0].read_bytes()[4:8], "little")
    assert flags == 0b01, f"{pycs[0].name}: pyc flags {flags:#b}, want unchecked-hash (0b01)"


def test_maintainer_scripts(unpacked: Path) -> None:
    control = unpacked / "DEBIAN"
    postinst = (control / "postinst").read_text()
    # Users before the folders that belong to them, then the unit enabled and started: with no
    # configuration the daemon waits for a bootstrap bundle (harmonicd/firstboot.py).
    steps = ("systemd-sysusers", "systemd-tmpfiles", "deb-systemd-helper enable 'harmonicd.service'",
             "deb-systemd-invoke $_dh_action 'harmonicd.service'")
    for step in steps:
        assert step in postinst, f"postinst does not run {step}"
    order = [postinst.index(s) for s in steps]
    assert order == sorted(order), "postinst must run sysusers, tmpfiles, enable, start, in that order"
    assert "harmonicd.conf" in postinst.split("systemd-sysusers", 1)[1].splitlines()[0]
    assert "_dh_action=restart" in postinst  # an upgrade restarts the daemon after unpacking
    # ... and nothing stops it before the upgrade.
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()
    prerm = (control / "prerm").read_text()
    assert "deb-systemd-invoke stop 'harmonicd.service'" in prerm
    assert "harmonicd-stick@*.service" in prerm
    postrm = (control / "postrm").read_text()
    assert "deb-systemd-helper purge 'harmonicd.service'" in postrm
    # Purge keeps state and users.
    assert "rm -r" not in postrm
    assert "userdel" not in postrm

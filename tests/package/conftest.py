"""Fixtures of the package tests: the .deb built once per session, fresh Debian roots.

Everything here needs root (dpkg-buildpackage may run as anyone, but chroot,
mount and installing into a root do not) and Debian's tools; without them the
tests skip, naming what is missing. `make test-long` installs the tools.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.package.debroot import DebianRoot, Unreachable

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / "scripts" / "build-deb.sh"
OLD_VERSION = "0.0.9"  # the "older version" the upgrade test installs first

# tool -> the Debian package that brings it
BUILD_TOOLS = {"dpkg-buildpackage": "dpkg-dev", "dh": "debhelper", "dpkg-deb": "dpkg"}
ROOT_TOOLS = {"debootstrap": "debootstrap", "chroot": "coreutils", "mount": "mount"}


def current_version() -> str:
    text = (REPO / "harmonicd" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert m, "harmonicd/__init__.py has no __version__ line"
    return m.group(1)


def _missing(tools: dict[str, str]) -> list[str]:
    return [f"{tool} (Debian package {pkg})" for tool, pkg in tools.items() if shutil.which(tool) is None]


def _needs(tools: dict[str, str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (dpkg-buildpackage's tools, chroot and mounts)")
    missing = _missing(tools)
    if subprocess.run(["/usr/bin/python3", "-m", "pip", "--version"], capture_output=True,
                      check=False).returncode != 0:
        missing.append("pip for /usr/bin/python3 (Debian package python3-pip)")
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True,
                      check=False).returncode != 0:
        missing.append("venv for /usr/bin/python3 (Debian package python3-venv)")
    if missing:
        pytest.skip("missing: " + ", ".join(missing) + " (make test-long installs them)")


def build(tmp: Path, version: str | None = None) -> Path:
    """Build the package with scripts/build-deb.sh (as `make deb` does) into ``tmp``."""
    cmd = ["sh", str(BUILD_DEB), "--out", str(tmp)]
    if version:
        cmd += ["--version", version]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONICD_", "VIRTUAL_ENV"))}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False, env=env)
    assert p.returncode == 0, f"build-deb.sh exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    deb = Path(p.stdout.strip().splitlines()[-1])
    assert deb.is_file(), f"no .deb where build-deb.sh said: {p.stdout}"
    assert deb.parent == tmp, f"build-deb.sh wrote {deb}, not into {tmp}"
    return deb


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree's package (harmonicd_<__version__>_<arch>.deb), built once per session."""
    _needs(BUILD_TOOLS)
    return build(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def old_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree built as version OLD_VERSION: what an upgrade starts from."""
    _needs(BUILD_TOOLS)
    return build(tmp_path_factory.mktemp("olddeb"), OLD_VERSION)


@pytest.fixture
def debroot(tmp_path: Path) -> Iterator[DebianRoot]:
    """A fresh bookworm minbase root with up-to-date package lists."""
    _needs(ROOT_TOOLS)
    try:
        with DebianRoot.fresh(tmp_path) as root:
            root.apt_update()
            yield root
    except Unreachable as exc:
        pytest.skip(str(exc))

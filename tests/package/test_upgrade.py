"""Upgrade, remove, purge, re-install: the server's data is never the package's.

In a fresh Debian: the same tree built as an older version (OLD_VERSION) is
installed and a master set up with it (`harmonicctl init master`, a publish);
then this version is installed over it. The state folder and the configuration
must come through byte for byte (every file's content, mode and owner), and the
new commands work on them. `apt-get remove` and then `apt-get purge` take the
programs away and leave the data (docs/packaging.md says why); installing again
finds it as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.package.conftest import OLD_VERSION, current_version
from tests.package.debroot import DebianRoot, tree_state

pytestmark = pytest.mark.long

DATA = ("/var/lib/harmonicd", "/etc/harmonicd")


def data_state(root: DebianRoot) -> dict[str, dict[str, str]]:
    return {d: tree_state(root.host(d)) for d in DATA}


def changed(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> list[str]:
    """The paths whose entry differs (or that came or went): empty when nothing changed."""
    out = []
    for top in DATA:
        a, b = before[top], after[top]
        out += [f"{top}/{rel}: {a.get(rel)} -> {b.get(rel)}" for rel in sorted(a.keys() | b.keys())
                if a.get(rel) != b.get(rel)]
    return out


def version(root: DebianRoot) -> str:
    return root.run("dpkg-query -W -f '${Version}' harmonicd").stdout


def test_upgrade_keeps_state_and_remove_purge_keep_data(deb: Path, old_deb: Path, debroot: DebianRoot) -> None:
    old, new = debroot.copy_in(old_deb), debroot.copy_in(deb)
    debroot.run(f"apt-get install -y {old}")
    assert version(debroot) == OLD_VERSION
    assert debroot.run("harmonicctl --version").stdout.strip() == f"harmonicctl {OLD_VERSION}"

    # A master set up and used with the old version.
    debroot.run("harmonicctl init master --id master-1 --state-dir /var/lib/harmonicd")
    debroot.run("mkdir -p /root/content && echo 'lesson 1' > /root/content/a.txt")
    assert debroot.run("harmonicctl publish content /root/content").stdout.strip() == "1"
    key = debroot.run("harmonicctl key").stdout.strip()
    before = data_state(debroot)
    assert "state.db" in before["/var/lib/harmonicd"]
    assert "key" in before["/var/lib/harmonicd"]
    assert "harmonicd.toml" in before["/etc/harmonicd"]

    # The upgrade: byte for byte the same data, and the new version working on it.
    out = debroot.run(f"apt-get install -y {new}")
    assert f"Unpacking harmonicd ({current_version()}) over ({OLD_VERSION})" in out.stdout, out.stdout
    assert version(debroot) == current_version()
    assert not changed(before, data_state(debroot)), "the upgrade changed the data"
    assert debroot.run("harmonicctl --version").stdout.strip() == f"harmonicctl {current_version()}"
    status = debroot.run("harmonicctl status").stdout
    assert status.startswith(f"master-1  master  harmonicd {current_version()}"), status
    assert debroot.run("harmonicctl key").stdout.strip() == key
    debroot.run("echo 'lesson 2' > /root/content/b.txt")
    assert debroot.run("harmonicctl publish content /root/content").stdout.strip() == "2"
    assert debroot.host("/etc/systemd/system/multi-user.target.wants/harmonicd.service").is_symlink()
    used = data_state(debroot)

    # Remove: the programs go, the data and the users stay.
    debroot.run("apt-get remove -y harmonicd")
    assert not debroot.host("/usr/lib/harmonicd").exists()
    assert debroot.run("command -v harmonicctl", check=False).returncode != 0
    assert not changed(used, data_state(debroot)), "remove touched the data"
    assert debroot.run("getent passwd harmonicd", check=False).returncode == 0

    # Purge: still the data (and the users); the unit's enablement is gone.
    out = debroot.run("apt-get purge -y harmonicd")
    assert "harmonicd: kept /var/lib/harmonicd" in out.stdout, out.stdout
    assert not changed(used, data_state(debroot)), "purge touched the data"
    assert debroot.run("getent passwd harmonicd", check=False).returncode == 0
    assert not debroot.host("/etc/systemd/system/multi-user.target.wants/harmonicd.service").is_symlink()
    assert not debroot.host("/srv/harmonic").exists()  # the empty deploy folder the package made

    # Installed again: the same server, as it was.
    debroot.run(f"apt-get install -y {new}")
    assert not changed(used, data_state(debroot)), "installing again touched the data"
    assert debroot.run("harmonicctl key").stdout.strip() == key
    assert debroot.run("harmonicctl publish content /root/content").stdout.strip() == "2"

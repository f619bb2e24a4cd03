"""The package installed into a fresh Debian (a debootstrap'ed bookworm minbase).

One command from a fresh Debian to an installed server: `apt-get install
./harmonicd_<version>_<arch>.deb`, which brings everything it depends on. Then:
the files are where the units expect them, the users and groups of the sysusers
snippet exist, the folders of the tmpfiles snippet are made with their owners,
harmonicd.service is enabled (in a chroot nothing starts), the commands run,
every compiled module of the private environment imports (a stripped or
mislinked .so would fail here), `systemd-analyze verify` finds nothing. Then the
bootstrap step with the installed commands: one `harmonicctl init --bundle FILE`
makes it a school server, enrolled and synced at its first stick exchange.
Measured: the installed size (dpkg's Installed-Size, and du of the files).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.package.conftest import REPO, current_version
from tests.package.debroot import DebianRoot

pytestmark = pytest.mark.long

VENV = "/usr/lib/harmonicd/venv"


def unit_value(text: str, key: str) -> str:
    values = [line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{key}=")]
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def tmpfiles_folders() -> list[tuple[str, str, str, str]]:
    """The `d` lines of systemd/harmonicd.tmpfiles.conf: path, mode, user, group."""
    rows = [line.split() for line in (REPO / "systemd" / "harmonicd.tmpfiles.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert rows, "no folders in harmonicd.tmpfiles.conf"
    return [(r[1], r[2], r[3], r[4]) for r in rows if r[0] == "d"]


def installed_bytes(root: DebianRoot) -> int:
    """du of the package's own files (the disk blocks they take)."""
    total = 0
    for line in root.run("dpkg -L harmonicd").stdout.splitlines():
        p = root.host(line)
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode):
            total += st.st_blocks * 512
    return total


def test_one_command_installs_a_working_server(deb: Path, debroot: DebianRoot,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    inside = debroot.copy_in(deb)
    commands = [f"apt-get install -y {inside}"]  # everything a fresh Debian needs, and nothing else
    for command in commands:
        debroot.run(command)

    status = debroot.run("dpkg-query -W -f '${Status} ${Version} ${Installed-Size}' harmonicd").stdout.split()
    assert status[:4] == ["install", "ok", "installed", current_version()], status
    installed_kib = int(status[4])

    # The commands, on PATH, from the private environment.
    assert debroot.run("harmonicctl --version").stdout.strip() == f"harmonicctl {current_version()}"
    assert debroot.run("harmonicd --version").stdout.strip() == f"harmonicd {current_version()}"
    assert "DEVICE" in debroot.run("harmonicd-mount --help").stdout
    assert debroot.run("command -v harmonicctl").stdout.strip() == "/usr/bin/harmonicctl"

    # Users and groups of the sysusers snippet.
    passwd = debroot.run("getent passwd harmonicd").stdout.strip().split(":")
    assert passwd[5] == "/var/lib/harmonicd", passwd
    assert passwd[6].endswith("nologin"), passwd
    group = {line.split(":")[0]: line for line in debroot.run("getent group harmonicd harmonicd-admin").stdout.split()}
    assert set(group) == {"harmonicd", "harmonicd-admin"}, group
    uid, gid = int(passwd[2]), int(passwd[3])
    assert int(group["harmonicd"].split(":")[2]) == gid

    # Folders of the tmpfiles snippet, with the modes and owners it gives them.
    ids = {"root": 0, "harmonicd": uid}
    gids = {"root": 0, "harmonicd": gid}
    for path, mode, user, grp in tmpfiles_folders():
        st = os.stat(debroot.host(path))
        got = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        assert got == (int(mode, 8), ids[user], gids[grp]), f"{path}: {oct(got[0])} {got[1]}:{got[2]}"
    # No configuration (that is the bootstrap step's) and no state (the unit makes it at its first start).
    assert not os.listdir(debroot.host("/etc/harmonicd"))
    assert not debroot.host("/var/lib/harmonicd").exists()

    # Units where systemd looks, enabled; the programs where the units say.
    unit = debroot.host("/usr/lib/systemd/system/harmonicd.service").read_text()
    stick = debroot.host("/usr/lib/systemd/system/harmonicd-stick@.service").read_text()
    for text in (unit, stick):
        program = unit_value(text, "ExecStart").split()[0]
        assert debroot.run(f"test -x {program}", check=False).returncode == 0, f"{program} is not executable"
    assert unit_value(unit, "ExecStart") == "/usr/bin/harmonicd"
    wants = debroot.host("/etc/systemd/system/multi-user.target.wants/harmonicd.service")
    assert wants.is_symlink(), "harmonicd.service is not enabled"
    assert os.readlink(wants).endswith("/systemd/system/harmonicd.service")
    assert debroot.host("/usr/lib/udev/rules.d/90-harmonicd-stick.rules").is_file()
    assert debroot.host("/usr/share/doc/harmonicd/harmonicd.example.toml").is_file()
    verify = debroot.run("systemd-analyze verify harmonicd.service harmonicd-stick@sdb1.service", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr

    # Every compiled module of the environment loads, and harmonicd's own modules import.
    imports = debroot.run(f"""{VENV}/bin/python - <<'EOF'
import importlib, pathlib, pkgutil, site, harmonicd
base = pathlib.Path(site.getsitepackages()[0])
names = [".".join(p.relative_to(base).with_suffix("").with_suffix("").parts).removesuffix(".__init__")
         for p in base.rglob("*.so")]
names += [m.name for m in pkgutil.walk_packages(harmonicd.__path__, "harmonicd.") if m.name != "harmonicd.__main__"]
for name in names:
    importlib.import_module(name)
print(len(names))
EOF""")
    assert int(imports.stdout.strip()) > 50

    # The bootstrap step, with the installed commands: a master (set up beside it in the same
    # root, not counted) makes a bundle, and one command makes this a school server.
    master = "harmonicctl --config /root/master/harmonicd.toml"
    debroot.run(f"{master} init master --id master-1 --state-dir /root/master/state "
                "--socket /root/master/control.sock")
    debroot.run(f"mkdir -p /root/content && echo 'lesson 1' > /root/content/a.txt && {master} publish content "
                f"/root/content && {master} bundle school-042 --out /root/school-042.hbundle")
    bootstrap = ["harmonicctl init --bundle /root/school-042.hbundle"]
    for command in bootstrap:
        debroot.run(command)
    school = json.loads(debroot.run("harmonicctl status --json").stdout)
    assert (school["id"], school["role"], school["enrolling"]) == ("school-042", "node", True), school
    # Enrolled and synced by a stick (the daemon's visits, typed here): the school's request with its
    # proof, the master's answer, the school takes it.
    debroot.run(f"mkdir /root/stick && harmonicctl exchange /root/stick && {master} exchange /root/stick && "
                "harmonicctl exchange /root/stick")
    school = json.loads(debroot.run("harmonicctl status --json").stdout)
    content = next(c for c in school["collections"] if c["name"] == "content")
    assert (school["enrolling"], school["master"]["id"], content["seq"]) == (False, "master-1", 1), school
    assert debroot.host(content["path"]).joinpath("a.txt").read_text() == "lesson 1\n"

    used = installed_bytes(debroot)
    with capsys.disabled():
        print(f"\n[package] commands from a fresh Debian to installed: {len(commands)} ({commands[0]})"
              f"\n[package] then to an enrolled school server: {len(bootstrap)} ({bootstrap[0]})"
              f"\n[package] installed size: Installed-Size {installed_kib} KiB; du of its files "
              f"{used / 2**20:.1f} MiB; .deb {deb.stat().st_size / 2**20:.1f} MiB")
    assert installed_kib * 1024 >= used * 0.8  # dpkg's figure is the files' size, not a guess

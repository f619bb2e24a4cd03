"""The issue's measure, end to end: from a fresh Debian to a school server that is
enrolled and synced, with the daemon running as the packaged unit runs it.

In a debootstrap'ed bookworm: `apt-get install ./harmonicd_*.deb` (command 1).
The unit would start harmonicd at once; systemd is not PID 1 here, so the test
starts it as the unit does (user harmonicd, the folders StateDirectory= and
RuntimeDirectory= make, no configuration): it waits, unconfigured. Then
`harmonicctl init --bundle FILE` (command 2). Nothing else is typed at the
school: the waiting daemon notices its configuration, syncs online with the
master (a real daemon in the same root, listening on loopback, set up
beforehand and not counted), proves its bundle's token, is enrolled, and
deploys the content.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.test_online import free_port
from tests.package.debroot import CHROOT_ENV, DebianRoot

pytestmark = pytest.mark.long


class ChrootDaemon:
    def __init__(self, root: DebianRoot, log: Path, *args: str, user: str | None = None) -> None:
        self.log = log
        spec = [f"--userspec={user}:{user}"] if user else []
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["chroot", *spec, str(root.path), "/usr/bin/harmonicd", *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=CHROOT_ENV)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[ChrootDaemon]]:
    started: list[ChrootDaemon] = []
    try:
        yield started
    finally:  # before the root's mounts go
        for d in started:
            d.stop()


def status(root: DebianRoot, config: str = "") -> dict[str, Any] | None:
    p = root.run(f"harmonicctl {config} status --json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def wait(what: str, cond: Any, timeout: float, logs: list[ChrootDaemon]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s\n" + "\n".join(d.output()[-3000:] for d in logs))


def test_install_and_one_command_give_an_enrolled_synced_school(
        deb: Path, debroot: DebianRoot, daemons: list[ChrootDaemon], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    inside = debroot.copy_in(deb)

    # The master, beside it in the same root (its own machine in real life; not counted).
    port = free_port()
    master = "harmonicctl --config /root/master/harmonicd.toml"
    debroot.run(f"apt-get install -y {inside} >/dev/null")  # command 1 (the master needs it here too)
    debroot.run(f"{master} init master --id master-1 --state-dir /root/master/state "
                f"--socket /root/master/control.sock --listen 127.0.0.1:{port}")
    debroot.run(f"mkdir -p /root/content && echo 'lesson 1' > /root/content/a.txt && "
                f"{master} publish content /root/content && {master} bundle school-042 --out /root/school-042.hbundle")
    daemons.append(ChrootDaemon(debroot, tmp_path / "master.log", "--config", "/root/master/harmonicd.toml"))
    wait("the master's daemon", lambda: (status(debroot, "--config /root/master/harmonicd.toml") or {})
         .get("daemon"), 60, daemons)

    # harmonicd.service, as systemd would start it right after the install: its StateDirectory=
    # and RuntimeDirectory= (0750, the unit's user), then the daemon as that user, no configuration.
    debroot.run("install -d -o harmonicd -g harmonicd -m 0750 /var/lib/harmonicd /run/harmonicd")
    school_log = tmp_path / "school.log"
    daemons.append(ChrootDaemon(debroot, school_log, user="harmonicd"))
    st = wait("the school's daemon, unconfigured", lambda: status(debroot), 60, daemons)
    assert st["configured"] is False, st

    commands = ["harmonicctl init --bundle /root/school-042.hbundle"]  # command 2, as root
    for command in commands:
        debroot.run(command)
    t0 = time.monotonic()

    def synced() -> dict[str, Any] | None:
        s = status(debroot)
        if not s or s.get("enrolling") is not False:
            return None
        content = next((c for c in s.get("collections", []) if c["name"] == "content"), None)
        return s if content and content["seq"] == 1 else None

    st = wait("the school enrolled and synced", synced, 120, daemons)
    took = time.monotonic() - t0
    assert (st["id"], st["role"], st["daemon"], st["master"]["id"]) == ("school-042", "node", True, "master-1")
    content = next(c for c in st["collections"] if c["name"] == "content")
    assert debroot.host(content["path"]).joinpath("a.txt").read_text() == "lesson 1\n"
    # The master enrolled it by its token, online, and its key is the one the school made.
    m = status(debroot, "--config /root/master/harmonicd.toml")
    assert m is not None
    row = next(r for r in m["schools"] if r["id"] == "school-042")
    assert row["how"] == "online", row
    assert debroot.run("harmonicctl key").stdout.strip().startswith("ed25519:")
    # Everything in the state folder belongs to the daemon's user (root's init handed it over).
    owners = {os.lstat(os.path.join(d, n)).st_uid
              for d, dirs, files in os.walk(debroot.host("/var/lib/harmonicd")) for n in dirs + files}
    uid = int(debroot.run("id -u harmonicd").stdout)
    assert owners == {uid}, owners
    assert "Traceback" not in school_log.read_text()
    with capsys.disabled():
        print(f"\n[package] fresh Debian -> enrolled and synced school: 2 commands "
              f"(apt-get install ./{deb.name}; {commands[0]}); enrolled and synced {took:.1f} s after the second")

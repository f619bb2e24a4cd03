"""First boot (harmonicd/firstboot.py): the real daemon started with no
configuration waits, unconfigured, says so in status over its control socket,
and configures itself from the first bundle that verifies: one a disk image
carries next to the configuration file, or one on a stick (a real loop
device mounted by harmonicd-mount, as udev and systemd would run it; root)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harmonicd import control
from harmonicd.errors import DaemonNotRunning, HarmonicError
from tests.conftest import Server, make_master, tree_digest, write_tree
from tests.daemon.conftest import HARMONICD, wait_for
from tests.media.helpers import MiB, StickLab, needs_root, require, sh


class FirstBootDaemon:
    def __init__(self, config: Path, socket: Path, log: Path) -> None:
        self.config, self.socket, self.log = config, socket, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*HARMONICD, "--config", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"harmonicd exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            code, st = control.call(str(self.socket), "GET", "/v1/status", timeout=5)
        except (DaemonNotRunning, HarmonicError):
            return None
        return st if code == 200 else None

    def wait(self, test: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            st = self.status()
            return st if st is not None and test(st) else None
        try:
            return wait_for(ok, timeout, every=0.1, what=what)  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"{what}: {self.status()}\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def first_boot(tmp_path: Path) -> Iterator[list[FirstBootDaemon]]:
    started: list[FirstBootDaemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        assert "Traceback" not in d.log.read_text(), d.log.read_text()


def first_boot_config(folder: Path, media: str = "watch = []\n") -> Path:
    """What a packaged server could carry before its bundle: no [server] id."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "harmonicd.toml"
    cfg.write_text(f'[server]\nstate_dir = "{folder / "state"}"\nsocket = "{folder / "control.sock"}"\n\n'
                   f"[media]\n{media}")
    return cfg


def test_unconfigured_daemon_takes_the_image_bundle(tmp_path: Path, first_boot: list[FirstBootDaemon]) -> None:
    m, _key = make_master(tmp_path, "master-1")
    etc = tmp_path / "etc"
    cfg = first_boot_config(etc)
    d = FirstBootDaemon(cfg, etc / "control.sock", tmp_path / "daemon.log")
    first_boot.append(d)
    st = d.wait(lambda s: s.get("configured") is False, "the unconfigured status")
    assert st["id"] is None
    assert "bundle" in st["waiting_for"]
    # `harmonicctl status` asks the waiting daemon.
    shown = json.loads(Server("unset", cfg, etc / "state").ctl("status", "--json").stdout)
    assert shown["configured"] is False
    assert "not configured" in Server("unset", cfg, etc / "state").ctl("status").stdout
    # A bundle that is expired is named in status, and nothing is set up.
    expired = tmp_path / "expired.hbundle"
    m.ctl("bundle", "school-7", "--out", str(expired), "--sticks-only", "--expires-days", "0.00002")
    time.sleep(3)
    (etc / "bundle.hbundle").write_bytes(expired.read_bytes())
    st = d.wait(lambda s: s.get("last_error"), "the refused bundle in status")
    assert "expired at" in st["last_error"]
    assert not (etc / "state" / "state.db").exists()
    assert "id" not in cfg.read_text().split("[media]")[0].replace("socket_group", "")
    # A good one: configured, and the same process goes on as the school server.
    good = tmp_path / "good.hbundle"
    m.ctl("bundle", "school-7", "--out", str(good), "--sticks-only")
    (etc / "bundle.hbundle").write_bytes(good.read_bytes())
    st = d.wait(lambda s: s.get("id") == "school-7", "the configured daemon")
    assert st["role"] == "node"
    school = Server("school-7", cfg, etc / "state")
    assert school.cfg().media_watch == (), "the first-boot [media] settings are kept"
    out = school.ctl("status", "--json").stdout
    assert json.loads(out)["daemon"] is True
    assert d.stop() == 0


@needs_root
@pytest.mark.timeout(240)
def test_first_boot_from_a_stick(tmp_path: Path, first_boot: list[FirstBootDaemon]) -> None:
    require("losetup", "blkid", "mount", "mkfs.ext4")
    m, _key = make_master(tmp_path, "master-1")
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>from the master</h1>\n"})
    m.ctl("publish", "content", str(content))
    with StickLab(tmp_path / "lab") as lab:
        etc = tmp_path / "etc"
        cfg = first_boot_config(etc, f'devices = ["loop"]\nmount_base = "{lab.base}"\nwatch = []\n')
        d = FirstBootDaemon(cfg, etc / "control.sock", tmp_path / "daemon.log")
        first_boot.append(d)
        d.wait(lambda s: s.get("configured") is False, "the unconfigured status")
        # The stick as the admin prepared it: HARMONIC/bundle-*.hbundle on an ext4 file system.
        tree = tmp_path / "stick-tree"
        (tree / "HARMONIC").mkdir(parents=True)
        m.ctl("bundle", "school-8", "--out", str(tree / "HARMONIC" / "bundle-school-8.hbundle"), "--sticks-only")
        image = tmp_path / "stick.img"
        with image.open("wb") as f:
            f.truncate(32 * MiB)
        sh("mkfs.ext4", "-q", "-F", "-d", str(tree), str(image))
        name = lab.attach(image)
        run = lab.helper(name, config=cfg)  # harmonicd-mount reads the first-boot [media] too
        run.wait_mounted()
        st = d.wait(lambda s: s.get("id") == "school-8", "configured from the stick", timeout=60)
        assert st["role"] == "node"
        # Configured, it visits the stick as any stick, then asks for the unmount.
        assert run.wait_exit(60) == 0, run.output()
    # On the stick: its first request, with its proof, for the master. The stick goes
    # to the master and comes back: enrolled, content deployed.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "loop", str(image), str(mnt))
    try:
        assert list((mnt / "HARMONIC" / "to-master").glob("school-8-*.hpk")), "no request on the stick"
        m.ctl("exchange", str(mnt))
        school = Server("school-8", cfg, etc / "state")
        assert d.stop() == 0
        school.ctl("exchange", str(mnt))
    finally:
        sh("umount", str(mnt), check=False)
    assert tree_digest(school.deploy / "content") == tree_digest(content)
    with m.store(lock=False) as st:
        assert st.db.peer("school-8") is not None


def test_init_by_hand_while_the_daemon_waits(tmp_path: Path, first_boot: list[FirstBootDaemon]) -> None:
    """The package's install plus one command: the unit's daemon waits unconfigured, the
    admin types `harmonicctl init --bundle FILE` (state folder and socket from the
    first-boot configuration), and the daemon goes on as that school."""
    m, _key = make_master(tmp_path, "master-1")
    etc = tmp_path / "etc"
    cfg = first_boot_config(etc)
    d = FirstBootDaemon(cfg, etc / "control.sock", tmp_path / "daemon.log")
    first_boot.append(d)
    d.wait(lambda s: s.get("configured") is False, "the unconfigured status")
    b = tmp_path / "school-9.hbundle"
    m.ctl("bundle", "school-9", "--out", str(b), "--sticks-only")
    Server("school-9", cfg, etc / "state").ctl("init", "--bundle", str(b))
    st = d.wait(lambda s: s.get("id") == "school-9", "the daemon configured by init --bundle")
    assert st["enrolling"] is True
    school = Server("school-9", cfg, etc / "state")
    assert school.cfg().state_dir == str(etc / "state")
    assert d.stop() == 0


def test_a_first_boot_configuration_that_names_its_master_takes_no_other_bundle(
        tmp_path: Path, first_boot: list[FirstBootDaemon]) -> None:
    """A region's image may name its deployment's master ([upstream] master_key, its
    anchor): a bundle of any other master (a stick from elsewhere, someone hostile)
    is refused, and the server waits on, unconfigured, for its own."""
    m, key = make_master(tmp_path, "master-1")
    other, _ = make_master(tmp_path, "master-x")
    etc = tmp_path / "etc"
    cfg = first_boot_config(etc)
    cfg.write_text(cfg.read_text() + f'\n[upstream]\nmaster_key = "{key}"\n')
    before = cfg.read_bytes()
    d = FirstBootDaemon(cfg, etc / "control.sock", tmp_path / "daemon.log")
    first_boot.append(d)
    d.wait(lambda s: s.get("configured") is False, "the unconfigured status")
    foreign = tmp_path / "foreign.hbundle"
    other.ctl("bundle", "school-9", "--out", str(foreign), "--sticks-only")
    (etc / "bundle.hbundle").write_bytes(foreign.read_bytes())
    st = d.wait(lambda s: s.get("last_error"), "the refused bundle in status")
    assert "not the master this server was prepared for" in st["last_error"], st
    assert "\n" not in st["last_error"]
    assert cfg.read_bytes() == before
    assert not (etc / "state" / "state.db").exists()
    good = tmp_path / "good.hbundle"
    m.ctl("bundle", "school-9", "--out", str(good), "--sticks-only")
    (etc / "bundle.hbundle").write_bytes(good.read_bytes())
    st = d.wait(lambda s: s.get("id") == "school-9", "the configured daemon")
    assert Server("school-9", cfg, etc / "state").cfg().master_key is not None
    assert d.stop() == 0

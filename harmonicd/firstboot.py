"""First boot: a server installed from the package (or a disk image) with no
configuration yet, waiting for its bundle (docs/design.md, "Enrollment").

``harmonicd`` finds no configuration file, or one with no ``[server] id``
(only [media] and [server] state_dir/socket: config.load(first_boot=True)),
and instead of exiting it waits here, "unconfigured":

- the control socket answers; `harmonicctl status` shows ``"configured": false``
  and what it waits for (and why the last bundle it found was refused);
- every few seconds it looks for a bundle: ``HARMONIC/bundle*.hbundle`` on any
  stick mounted where the daemon takes sticks ([media] mount_base, where
  harmonicd-mount puts them, and [media] watch), then ``bundle.hbundle`` next
  to the configuration file (a region's disk image may carry it there);
- the first bundle that verifies runs ``init --bundle`` (its state in
  [server] state_dir, default /var/lib/harmonicd; the configuration at the
  configuration path, replacing a first-boot one) and the daemon goes on as
  configured, in the same process. The stick it came from is then visited as
  any stick: the school's first request, with its enrollment proof, goes onto
  it for the master.

A bundle refused (expired, tampered with, for another use) is named in status
and in the log once; it is tried again only if the file changes.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - a shell of the daemon, as daemon.py (pyproject per-file-ignores)
import logging
import os
import signal
import socket
from typing import Any

from harmonicd import __version__
from harmonicd.activity import Activity
from harmonicd.config import Config
from harmonicd.control import ControlServer, prepare_socket_path
from harmonicd.errors import HarmonicError, UsageError
from harmonicd.systemd import Notifier

log = logging.getLogger("harmonicd")

LOOK_EVERY = 2.0  # seconds between looks for a bundle
IMAGE_BUNDLE = "bundle.hbundle"  # next to the configuration file: a disk image's bundle


class FirstBoot:
    """The control API's backend while unconfigured."""

    def __init__(self, cfg: Config, notifier: Notifier) -> None:
        self.cfg = cfg
        self.notifier = notifier
        self.activity = Activity()
        self.control = ControlServer(self, cfg.socket, cfg.socket_group, cfg.admin_group)
        self.last_error: str | None = None
        self._tried: dict[str, tuple[int, int]] = {}  # bundle path -> (mtime_ns, size) refused
        self._stop = asyncio.Event()
        self.configured = False

    async def run(self) -> bool:
        """Wait for a bundle. True once configured; False if stopped first."""
        loop = asyncio.get_running_loop()
        self.activity.bind(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        prepare_socket_path(self.cfg.socket, self.cfg.socket_group)
        await self.control.start()
        self.notifier.ready("unconfigured: waiting for a bundle")
        beat = asyncio.create_task(self._heartbeat(), name="watchdog")
        log.warning("no configuration at %s: waiting for a bundle (HARMONIC/bundle*.hbundle on a stick, or %s)",
                    self.cfg.path, self.image_bundle())
        try:
            while not self._stop.is_set():
                if await loop.run_in_executor(None, self.set_up_meanwhile):
                    self.configured = True
                    break
                path = await loop.run_in_executor(None, self.find)
                if path is not None and await loop.run_in_executor(None, self.take, path):
                    self.configured = True
                    break
                try:
                    await asyncio.wait_for(self._stop.wait(), LOOK_EVERY)
                except TimeoutError:
                    pass
        finally:
            beat.cancel()
            self.activity.close_streams()
            await self.control.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.configured

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 as the configured daemon sends it (the unit's WatchdogSec holds while waiting too)."""
        every = self.notifier.watchdog_interval
        while every:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    def set_up_meanwhile(self) -> bool:
        """An admin ran `harmonicctl init` (with --bundle, say) while this waited."""
        from harmonicd import config as config_mod

        try:
            return config_mod.load(self.cfg.path, first_boot=True).configured
        except HarmonicError:
            return False

    def image_bundle(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.cfg.path)), IMAGE_BUNDLE)

    def mountpoints(self) -> list[str]:
        from harmonicd.media.devices import read_mounts, stick_mounts

        cfg = self.cfg
        try:
            mounts = stick_mounts(read_mounts(), [cfg.media_mount_base, *cfg.media_watch], cfg.media_devices)
        except OSError as exc:
            log.warning("first boot: cannot read the mount table: %s", exc)
            return []
        return [m.mountpoint for m in mounts]

    def find(self) -> str | None:
        """The first bundle not yet refused as it is."""
        from harmonicd.services.enrollment import find_stick_bundle

        candidates = []
        on_stick = find_stick_bundle(self.mountpoints())
        if on_stick is not None:
            candidates.append(on_stick)
        if os.path.isfile(self.image_bundle()):
            candidates.append(self.image_bundle())
        for p in candidates:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if self._tried.get(p) != (st.st_mtime_ns, st.st_size):
                return p
        return None

    def take(self, path: str) -> bool:
        from harmonicd.services.enrollment import init_from_bundle

        cfg = self.cfg
        try:
            st = os.stat(path)
        except OSError:
            return False  # gone since it was found (the stick pulled)
        try:
            sid, b, key = init_from_bundle(cfg.path, path, cfg.state_dir, socket=cfg.socket,
                                           hostname=socket.gethostname(), media=cfg,
                                           replace_config=os.path.exists(cfg.path))
        except (HarmonicError, OSError) as exc:
            self._tried[path] = (st.st_mtime_ns, st.st_size)
            self.last_error = f"{path}: {exc}" if not str(exc).startswith(path) else str(exc)
            log.error("first boot: bundle refused: %s", self.last_error)
            self.activity.emit("first-boot", ok=False, message=self.last_error)
            return False
        log.warning("first boot: configured as %s from %s (key %s); enrolls with the master %s at its first "
                    "contact", sid, path, key, b.master)
        self.activity.emit("first-boot", ok=True, message=f"configured as {sid} from {path}")
        return True

    # -- the control API
    async def status(self) -> dict[str, Any]:
        return {
            "id": None, "role": None, "version": __version__, "daemon": True, "configured": False,
            "waiting_for": (f"a bundle: HARMONIC/bundle*.hbundle on a stick, or {self.image_bundle()}; "
                            "or `harmonicctl init --bundle FILE`"),
            "last_error": self.last_error, "collections": [], "upstream": None, "activity": None,
            "pid": os.getpid(),
        }

    def command(self, name: str, args: dict[str, Any]) -> asyncio.Future[Any]:
        raise UsageError(f"{name}: this server is not configured yet (it waits for a bundle; see status)")


async def wait_for_bundle(cfg: Config, notifier: Notifier) -> bool:
    return await FirstBoot(cfg, notifier).run()

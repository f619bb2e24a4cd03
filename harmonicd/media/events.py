"""The one bridge of pyudev and the kernel's mount table into the event loop (STYLE.md rule 10).

Both watches put a file descriptor on the loop with ``add_reader`` and drain it without
blocking, so no thread is involved and a callback always runs on the loop. What reaches the
daemon are our own frozen dataclasses, never pyudev objects; anything with the same
``start``/``stop`` shape can stand in for :class:`UeventSource` in tests.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyudev

from harmonicd.media.devices import block_device, kind_of

ACTIONS = ("add", "change", "remove")  # the rest (bind, move, online, ...) say nothing about a medium


@dataclass(frozen=True)
class BlockEvent:
    action: str  # "add" | "change" | "remove"
    name: str  # kernel name: "sdb1", "loop3"
    kind: str  # "usb" | "mmc" | "loop" | "other"
    present: bool  # has a medium now (see below)


class UeventSource:
    """Block device uevents, from udevd when it runs, else straight from the kernel.

    ``present`` is read from sysfs when the event is handled, not when it was sent: a loop
    device's attach and detach are both "change", and only its size tells them apart, so
    a burst of events ends with the device's state as it is, whatever came in between.
    """

    def __init__(self, source: str = "udev") -> None:
        if source not in ("udev", "kernel"):
            raise ValueError(f"uevent source must be 'udev' or 'kernel', not {source!r}")
        self.source = source
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[BlockEvent], None]) -> None:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
        monitor.filter_by("block")  # disks and partitions; libudev applies it to kernel messages too
        monitor.start()  # binds the socket and makes it non-blocking

        def drain() -> None:
            while (device := monitor.poll(timeout=0)) is not None:
                event = _block_event(device)
                if event is not None:
                    on_event(event)

        loop.add_reader(monitor.fileno(), drain)
        self._monitor, self._loop = monitor, loop

    def stop(self) -> None:
        if self._monitor is None or self._loop is None:
            return
        self._loop.remove_reader(self._monitor.fileno())
        # pyudev has no close(): dropping the last reference unrefs the libudev monitor, closing its socket.
        self._monitor = self._loop = None


def _block_event(device: Any) -> BlockEvent | None:
    action, name = device.action, device.sys_name
    if action not in ACTIONS or device.device_type not in ("disk", "partition"):
        return None
    now = block_device(name) if action != "remove" else None
    kind = now.kind if now is not None else kind_of(device.device_path, name)
    return BlockEvent(action=action, name=name, kind=kind, present=now is not None and now.present)


def choose_source() -> UeventSource:
    """udevd's events where it runs (they come after its rules ran); else the kernel's, as on our test machines."""
    return UeventSource("udev" if os.path.exists("/run/udev/control") else "kernel")


class MountWatch:
    """Calls ``on_change`` after the mount table changed (a mount or an unmount anywhere).

    The kernel flags ``/proc/self/mountinfo`` with POLLPRI on every change of the mount
    namespace and clears the flag for that open file once polled, so an epoll set holding
    it turns readable exactly when there is news: no timer, no re-reading to re-arm. The
    loop's own poll of that epoll set already clears the flag (checked: our ``poll(0)``
    then returns nothing), so every wake-up counts as a change.
    """

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self.path = path
        self._file: Any = None
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for as long as the watch runs)
        self._epoll = select.epoll()
        self._epoll.register(self._file.fileno(), select.EPOLLPRI | select.EPOLLERR)
        epoll = self._epoll

        def fired() -> None:
            epoll.poll(0)  # takes the mountinfo file off the ready list if the loop's poll has not
            on_change()

        loop.add_reader(epoll.fileno(), fired)
        self._loop = loop

    def stop(self) -> None:
        if self._epoll is not None and self._loop is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._file.close()
        self._epoll = self._file = self._loop = None

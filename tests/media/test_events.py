"""harmonicd.media.events on a real event loop: real kernel uevents from loop devices, real mounts.

No udevd runs on the test machines, so the kernel source is what these use; a loop device's
attach and detach are both "change" events, told apart by ``present``.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 (the bridge under test hands events to a loop)
import gc
import os
from pathlib import Path

import pytest

from harmonicd.media.events import BlockEvent, MountWatch, UeventSource, choose_source
from tests.media.helpers import StickLab, mount_of, sh


async def next_event(queue: asyncio.Queue[BlockEvent], name: str, present: bool, within: float = 10) -> BlockEvent:
    """The first event for NAME with the given presence (other tests' loop devices may speak too)."""
    async with asyncio.timeout(within):
        while True:
            event = await queue.get()
            if event.name == name and event.present == present:
                return event


async def watch_uevents(lab: StickLab, image: Path) -> tuple[BlockEvent, BlockEvent, list[BlockEvent]]:
    queue: asyncio.Queue[BlockEvent] = asyncio.Queue()
    seen: list[BlockEvent] = []

    def on_event(event: BlockEvent) -> None:
        seen.append(event)
        queue.put_nowait(event)

    source = UeventSource("kernel")
    source.start(asyncio.get_running_loop(), on_event)
    try:
        name = await asyncio.to_thread(lab.attach, image)
        attached = await next_event(queue, name, present=True)
        await asyncio.to_thread(lab.detach, name)
        detached = await next_event(queue, name, present=False)
    finally:
        source.stop()
    return attached, detached, [e for e in seen if e.name == name]


def test_kernel_uevents_of_a_loop_attach_and_detach(stick_lab: StickLab) -> None:
    attached, detached, all_of_it = asyncio.run(watch_uevents(stick_lab, stick_lab.image("ext4")))
    assert attached == BlockEvent(action="change", name=attached.name, kind="loop", present=True)
    assert detached == BlockEvent(action="change", name=attached.name, kind="loop", present=False)
    assert {e.action for e in all_of_it} == {"change"}


def test_uevents_of_partitions_come_and_go(stick_lab: StickLab) -> None:
    image = stick_lab.image("ext4", partitioned=True)

    async def main() -> list[BlockEvent]:
        seen: list[BlockEvent] = []
        source = UeventSource("kernel")
        source.start(asyncio.get_running_loop(), seen.append)
        try:
            name = await asyncio.to_thread(stick_lab.attach, image, partitions=True)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(stick_lab.detach, name)
            await asyncio.sleep(0.5)
        finally:
            source.stop()
        return [e for e in seen if e.name == f"{name}p1"]

    events = asyncio.run(main())
    assert BlockEvent("add", events[0].name, "loop", True) in events
    # Gone from sysfs when handled: the kind comes from the event's own device path.
    assert events[-1] == BlockEvent("remove", events[0].name, "loop", False)


def test_stop_stops_and_leaks_nothing(stick_lab: StickLab) -> None:
    async def main() -> tuple[int, int, list[BlockEvent]]:
        loop = asyncio.get_running_loop()
        seen: list[BlockEvent] = []
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            source = UeventSource("kernel")
            source.start(loop, seen.append)
            source.stop()
            source.stop()  # twice is harmless
        del source
        gc.collect()
        after = len(os.listdir("/proc/self/fd"))
        name = await asyncio.to_thread(stick_lab.attach, stick_lab.image("blank"))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(stick_lab.detach, name)
        return before, after, seen

    before, after, seen = asyncio.run(main())
    assert after == before, "a stopped UeventSource kept its netlink socket"
    assert seen == []


def test_the_source_is_chosen_by_whether_udevd_runs() -> None:
    assert choose_source().source == ("udev" if os.path.exists("/run/udev/control") else "kernel")

    async def start_and_stop() -> None:
        source = UeventSource("udev")  # binds udevd's multicast group, whether or not udevd runs
        source.start(asyncio.get_running_loop(), lambda e: None)
        source.stop()

    asyncio.run(start_and_stop())
    with pytest.raises(ValueError, match="'udev' or 'kernel'"):
        UeventSource("netlink")


def test_mount_watch_fires_on_real_mounts_and_unmounts(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    where = tmp_path / "mnt"
    where.mkdir()

    async def main() -> list[bool]:
        # What each call saw in the mount table (other programs on this machine may mount too).
        seen: list[bool] = []
        news = asyncio.Event()

        def on_change() -> None:
            seen.append(mount_of(str(where)) is not None)
            news.set()

        async def until(mounted: bool) -> None:
            async with asyncio.timeout(5):
                while not seen or seen[-1] != mounted:
                    news.clear()
                    await news.wait()

        watch = MountWatch()
        watch.start(asyncio.get_running_loop(), on_change)
        try:
            await asyncio.to_thread(sh, "mount", "-t", "tmpfs", "-o", "size=1m", "lab", str(where))
            await until(mounted=True)
            await asyncio.to_thread(sh, "umount", str(where))
            await until(mounted=False)
        finally:
            watch.stop()
            watch.stop()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        sh("umount", str(where), check=False)
    assert True in seen
    assert seen[-1] is False


def test_ten_insertions_in_a_burst_end_in_the_true_state(stick_lab: StickLab) -> None:
    image = stick_lab.image("blank")

    def ten_times() -> set[str]:
        names = set()
        for _ in range(10):
            name = stick_lab.attach(image)
            stick_lab.detach(name)
            names.add(name)
        return names

    async def main() -> tuple[set[str], dict[str, BlockEvent]]:
        last: dict[str, BlockEvent] = {}
        source = UeventSource("kernel")
        source.start(asyncio.get_running_loop(), lambda e: last.__setitem__(e.name, e))
        try:
            names = await asyncio.to_thread(ten_times)
            await asyncio.sleep(0.5)
        finally:
            source.stop()
        return names, last

    names, last = asyncio.run(main())
    # However the events interleaved, the last word on each device is that it is empty.
    assert names <= set(last)
    assert all(not last[n].present and last[n].kind == "loop" for n in names), [last[n] for n in names]

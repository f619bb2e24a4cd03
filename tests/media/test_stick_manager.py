"""The daemon's stick state machine fed by an injected event source (RELIABILITY.md B5):
add then remove before any mount, a duplicate add, a kind not taken, a burst. The
mount table, the jobs and the store are the real ones; only the uevents are made up,
through the same callback the pyudev bridge calls."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

from harmonicd.activity import Activity
from harmonicd.jobs import JobRunner
from harmonicd.media.events import BlockEvent
from harmonicd.media.sticks import StickManager
from tests.conftest import make_master, make_school


class FakeSource:
    source = "fake"

    def __init__(self) -> None:
        self.on_event: Callable[[BlockEvent], None] | None = None
        self.stopped = False

    def start(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[BlockEvent], None]) -> None:
        self.on_event = on_event

    def stop(self) -> None:
        self.stopped = True

    def send(self, action: str, name: str, kind: str = "usb", present: bool = True) -> None:
        assert self.on_event is not None
        self.on_event(BlockEvent(action, name, kind, present))


def run_manager(tmp_path: Path, script: Callable[[StickManager, FakeSource, Activity], None]) -> StickManager:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    cfg = dataclasses.replace(s.cfg(), media_devices=("usb",), media_mount_base=str(tmp_path / "media"),
                              media_watch=())
    (tmp_path / "media").mkdir()

    async def main() -> StickManager:
        activity = Activity()
        activity.bind(asyncio.get_running_loop())
        jobs = JobRunner(activity, lambda: cfg)
        source = FakeSource()
        mgr = StickManager(lambda: cfg, jobs, activity, source=source)
        task = asyncio.create_task(mgr.run())
        await asyncio.sleep(0.1)
        script(mgr, source, activity)
        await asyncio.sleep(0.1)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert source.stopped, "the event source is stopped with the manager"
        jobs.close()
        return mgr

    return asyncio.run(main())


def test_add_then_remove_before_mounting_and_duplicates(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def script(mgr: StickManager, src: FakeSource, activity: Activity) -> None:
        q = activity.subscribe()
        src.send("add", "sdb1")
        src.send("add", "sdb1")  # a duplicate add: one stick, one "inserted"
        src.send("change", "sdb1")
        assert mgr.sticks["sdb1"].state == "inserted"
        src.send("remove", "sdb1")  # pulled before anything mounted it
        assert mgr.sticks["sdb1"].state == "gone"
        src.send("remove", "sdb1")  # and a duplicate remove changes nothing
        src.send("add", "sda1", kind="other")  # an internal disk: not ours
        src.send("add", "loop0", kind="loop")  # a kind this server does not take
        while not q.empty():
            ev = q.get_nowait()
            if ev is not None and ev["event"] == "stick":
                seen.append((ev["device"], ev["state"]))

    mgr = run_manager(tmp_path, script)
    assert seen == [("sdb1", "inserted"), ("sdb1", "gone")]
    assert set(mgr.sticks) == {"sdb1"}
    st = mgr.status()
    assert st["events"] == "fake"
    assert [s["state"] for s in st["sticks"]] == ["gone"]


def test_a_burst_ends_in_the_last_state(tmp_path: Path) -> None:
    def script(mgr: StickManager, src: FakeSource, activity: Activity) -> None:
        for i in range(50):
            src.send("add", "sdc1")
            src.send("change", "sdc1", present=i % 2 == 0)
        assert mgr.sticks["sdc1"].state == "gone"  # the last event said: no medium
        src.send("add", "sdc1")
        assert mgr.sticks["sdc1"].state == "inserted"

    mgr = run_manager(tmp_path, script)
    assert mgr.sticks["sdc1"].state == "inserted"
    assert mgr.status()["sticks"][0]["message"].startswith("inserted")


def test_no_uevents_still_finds_mounts(tmp_path: Path) -> None:
    """A source that cannot start (no netlink in a container): said in status, the
    manager carries on with the mount table."""
    class Broken(FakeSource):
        def start(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[BlockEvent], None]) -> None:
            raise OSError("netlink: permission denied")

    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key)
    cfg = dataclasses.replace(s.cfg(), media_mount_base=str(tmp_path / "media"), media_watch=())

    async def main() -> StickManager:
        activity = Activity()
        jobs = JobRunner(activity, lambda: cfg)
        mgr = StickManager(lambda: cfg, jobs, activity, source=Broken())
        task = asyncio.create_task(mgr.run())
        await asyncio.sleep(0.1)
        assert not task.done(), "the manager keeps running without uevents"
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        jobs.close()
        return mgr

    mgr = asyncio.run(main())
    st = mgr.status()
    assert st["events"] is None
    assert "netlink: permission denied" in st["error"]

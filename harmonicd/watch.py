"""Watching the source folders of a school's own collections (watchdog bridge).

watchdog calls us from its observer thread; the only thing that happens
there is handing the collection's name to the event loop. Debouncing, the
quiet period and the publishing itself live in the daemon. Events our own
reading causes (a file opened, closed without writing) are ignored, or every
publish would trigger the next. A watched folder that is removed, or replaced
by another one, is watched again once it is there: ``refresh`` runs before
each publishing round and at each periodic rescan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger("harmonicd")

_IGNORED = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


class _Handler(FileSystemEventHandler):
    def __init__(self, name: str, root: str, loop: asyncio.AbstractEventLoop, changed: Callable[[str], None],
                 lost: Callable[[str, _Handler], None]) -> None:
        self.name = name
        self.root = root.rstrip("/")
        self.loop = loop
        self.changed = changed
        self.lost = lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED:
            return
        try:
            if (event.event_type == EVENT_TYPE_DELETED and event.is_directory
                    and os.fsdecode(event.src_path).rstrip("/") == self.root):
                # The watched folder itself is gone, and watchdog ends this watch.
                self.loop.call_soon_threadsafe(self.lost, self.name, self)
            self.loop.call_soon_threadsafe(self.changed, self.name)
        except RuntimeError:
            pass  # the loop is closing: the next start rescans anyway


class FolderWatcher:
    """Watches {collection: folder}; ``changed(collection)`` runs on the loop."""

    def __init__(self, sources: dict[str, str], changed: Callable[[str], None]) -> None:
        self.sources = dict(sources)
        self.changed = changed
        # Replaced, never changed in place: status reads it from another thread.
        self.watching: frozenset[str] = frozenset()
        # name -> the watch, (st_dev, st_ino) of the folder it was put on, its handler
        self._watches: dict[str, tuple[ObservedWatch, tuple[int, int], _Handler]] = {}
        self._observer: BaseObserver | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._loop = loop
        self.refresh()
        self._observer.start()

    def refresh(self) -> None:
        """Watch folders that have appeared since, and watch again a folder that was
        removed or replaced (a missing source folder is not an error). Cheap: a stat
        per source folder."""
        if self._observer is None:
            return
        for name, path in self.sources.items():
            ident = _folder_identity(path)
            held = self._watches.get(name)
            if held is not None:
                if held[1] == ident:
                    continue
                # Replaced by another folder (an inotify watch follows the old one
                # wherever it was moved), or removed.
                self._drop(name)
            if ident is None:
                continue
            handler = _Handler(name, path, self._loop, self.changed, self._lost)
            try:
                watch = self._observer.schedule(handler, path, recursive=True)
            except OSError as exc:
                # Out of inotify watches, say: the periodic rescan still publishes changes.
                log.warning("cannot watch %s (%s); changes are found by the periodic rescan", path, exc)
                continue
            self._watches[name] = (watch, ident, handler)
            self.watching = self.watching | {name}
            log.info("watching %s for %s", path, name)

    def _lost(self, name: str, handler: _Handler) -> None:
        # Only if that handler's watch is still the current one (a late report of
        # an old folder must not end the watch of its successor).
        held = self._watches.get(name)
        if held is not None and held[2] is handler:
            self._drop(name)

    def _drop(self, name: str) -> None:
        watch, _ident, _handler = self._watches.pop(name)
        self.watching = self.watching - {name}
        if self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass
        log.info("%s: its folder %s was removed or replaced; watching it again once it is there",
                 name, self.sources[name])

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self.watching = frozenset()
        self._watches.clear()


def _folder_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

"""Watching the source folders of a school's own collections (watchdog bridge).

watchdog calls us from its observer thread; the only thing that happens
there is handing the collection's name to the event loop. Debouncing, the
quiet period and the publishing itself live in the daemon. Events our own
reading causes (a file opened, closed without writing) are ignored, or every
publish would trigger the next.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger("harmonicd")

_IGNORED = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


class _Handler(FileSystemEventHandler):
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, changed: Callable[[str], None]) -> None:
        self.name = name
        self.loop = loop
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED:
            return
        try:
            self.loop.call_soon_threadsafe(self.changed, self.name)
        except RuntimeError:
            pass  # the loop is closing: the next start rescans anyway


class FolderWatcher:
    """Watches {collection: folder}; ``changed(collection)`` runs on the loop."""

    def __init__(self, sources: dict[str, str], changed: Callable[[str], None]) -> None:
        self.sources = dict(sources)
        self.changed = changed
        self.watching: set[str] = set()
        self._observer: BaseObserver | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._loop = loop
        self.refresh()
        self._observer.start()

    def refresh(self) -> None:
        """Watch folders that have appeared since (a missing source folder is not an error)."""
        if self._observer is None:
            return
        for name, path in self.sources.items():
            if name in self.watching or not os.path.isdir(path):
                continue
            try:
                self._observer.schedule(_Handler(name, self._loop, self.changed), path, recursive=True)
            except OSError as exc:
                # Out of inotify watches, say: the periodic rescan still publishes changes.
                log.warning("cannot watch %s (%s); changes are found by the periodic rescan", path, exc)
                continue
            self.watching.add(name)
            log.info("watching %s for %s", path, name)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self.watching.clear()

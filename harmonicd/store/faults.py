"""Named crash points for the crash tests (RELIABILITY.md §3.5), and named
hooks for in-process fault tests.

``HARMONICD_CRASH_AT=name`` (or ``name:N`` for the N-th time the point is
reached) makes the process SIGKILL itself there, so a test can stop an
import or a publish exactly between two durable steps. Without the variable
this is one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

_spec = os.environ.get("HARMONICD_CRASH_AT", "")
_name, _, _nth = _spec.partition(":")
_count = int(_nth) if _nth.isdigit() else 1
_seen = 0

POINTS = (
    "batch-staged",       # objects written to a batch's new segments, before their fsync
    "batch-indexing",     # segments durable, before the transaction that indexes them
    "batch-committed",    # objects durable and indexed, before the release's database commit
    "db-committed",       # release live in the database, before deployment
    "deploy-tree-written",  # new tree folder complete, before the link switch
    "deploy-switched",    # link switched, before old trees are removed
    "pack-part-written",  # pack volume written as .part, before the rename
    "pack-imported",      # pack applied, before it is removed from the stick
)


def crash_point(name: str) -> None:
    global _seen
    if name != _name:
        return
    _seen += 1
    if _seen == _count:
        os.kill(os.getpid(), signal.SIGKILL)


HOOKS = (
    "stick-room",    # a visit measured the stick's free space, before it writes (arg: the mailbox path)
    "stick-synced",  # a visit wrote and flushed its packs, before it reads them back (arg: their paths)
)
_hooks: dict[str, Callable[[object], None]] = {}


@contextlib.contextmanager
def hooked(name: str, fn: Callable[[object], None]) -> Iterator[None]:
    """For a test in the same process: while in the block, call fn(arg) when the
    code reaches the hook (damage a stick between write and read-back, fill it up
    after its free space was measured)."""
    if name not in HOOKS:
        raise ValueError(f"unknown hook {name!r}")
    _hooks[name] = fn
    try:
        yield
    finally:
        _hooks.pop(name, None)


def fault_hook(name: str, arg: object) -> None:
    fn = _hooks.get(name)
    if fn is not None:
        fn(arg)

"""Fixtures of the crash tests: loop devices and mounts, always undone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.crash.helpers import Mounts


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()

"""Fixtures of the bad-input tests: a master and a school already in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_input.helpers import Synced, make_synced
from tests.conftest import Server


@pytest.fixture
def synced(pair: tuple[Server, Server, Path], tmp_path: Path) -> Synced:
    """Release 1 of the master's content published and deployed at the school."""
    m, s, stick = pair
    return make_synced(m, s, stick, tmp_path)

"""The ``stick_lab`` fixture (tests/media/helpers.py) for every test of this folder."""

from tests.media.helpers import stick_lab

__all__ = ["stick_lab"]

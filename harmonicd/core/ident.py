"""Server ids and collection names: short, safe in file names and URLs."""

from __future__ import annotations

import re

from harmonicd.errors import HarmonicError, UsageError

_SERVER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_COLLECTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")

RESERVED = {"master", "tmp", "objects", "HARMONIC"}


def check_server_id(text: str, *, exc: type[HarmonicError] = UsageError) -> str:
    if not _SERVER_ID.match(text) or text in RESERVED or ".." in text:
        raise exc(
            f"server id {text[:70]!r} is not valid: use 1-63 lower-case letters, digits, '.', '-', '_'"
        )
    return text


def check_collection(text: str, *, exc: type[HarmonicError] = UsageError) -> str:
    if not _COLLECTION.match(text):
        raise exc(
            f"collection name {text[:70]!r} is not valid: use 1-63 lower-case letters, digits, '-', '_'"
        )
    return text

"""Server ids and collection names: short, safe in file names and URLs."""

from __future__ import annotations

import re

from harmonicd.errors import HarmonicError, UsageError

_SERVER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_COLLECTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")

# A school may not be called "master": its stick folder would be to-master.
RESERVED_FOR_SCHOOLS = {"master"}


def check_server_id(text: str, *, exc: type[HarmonicError] = UsageError) -> str:
    if not _SERVER_ID.match(text) or ".." in text:
        raise exc(
            f"server id {text[:70]!r} is not valid: use 1-63 lower-case letters, digits, '.', '-', '_'"
        )
    return text


def check_school_id(text: str, *, exc: type[HarmonicError] = UsageError) -> str:
    check_server_id(text, exc=exc)
    if text in RESERVED_FOR_SCHOOLS:
        raise exc(f"server id {text!r} is reserved for the master; choose another id for a school server")
    return text


def check_collection(text: str, *, exc: type[HarmonicError] = UsageError) -> str:
    if not _COLLECTION.match(text):
        raise exc(
            f"collection name {text[:70]!r} is not valid: use 1-63 lower-case letters, digits, '-', '_'"
        )
    return text

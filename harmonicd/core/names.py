"""The grammar of names inside a tree, checked before any file system call.

A name is one path component. It must be valid UTF-8 in NFC form, 1..255
bytes, with no NUL, '/', '\\' or control characters, and not '.' or '..'.
A directory may not hold two names that are equal after case folding or
Unicode normalisation, because on FAT, exFAT, NTFS or macOS they would be
one file and one would silently overwrite the other.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from harmonicd.errors import UnsafeName

MAX_NAME_BYTES = 255
MAX_DEPTH = 64
MAX_PATH_BYTES = 4096

_FORBIDDEN = {"\x00", "/", "\\"}
_PLAIN = re.compile(r"[A-Za-z0-9._ -]{1,255}")


def check_name(name: str, where: str = "") -> str:
    """Return ``name`` if it is a safe single component, else raise UnsafeName."""
    if _PLAIN.fullmatch(name) and name not in (".", ".."):
        return name  # the common case, checked in one regex match
    label = f"{where}/{name!r}" if where else repr(name)
    if not name:
        raise UnsafeName(f"empty file name in {where or 'tree'}")
    if name in (".", ".."):
        raise UnsafeName(f"file name {label} would escape the tree")
    try:
        encoded = name.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:
        raise UnsafeName(f"file name {label} is not valid UTF-8") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise UnsafeName(f"file name {label[:80]}… is {len(encoded)} bytes (limit {MAX_NAME_BYTES})")
    for ch in name:
        if ch in _FORBIDDEN or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise UnsafeName(f"file name {label} contains {ch!r}, which could escape or is not allowed")
    if unicodedata.normalize("NFC", name) != name:
        raise UnsafeName(f"file name {label} is not in Unicode NFC form")
    return name


def fold(name: str) -> str:
    """The key under which case-insensitive, normalising file systems see a name
    (FAT and Windows also drop trailing dots and spaces: "a." is "a" there)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold()).rstrip(". ") or name


def check_siblings(names: Iterable[str], where: str = "") -> None:
    """Refuse two names in one directory that a FAT/exFAT/macOS file system would merge."""
    seen: dict[str, str] = {}
    for name in names:
        key = fold(name)
        other = seen.get(key)
        if other is not None:
            raise UnsafeName(
                f"file names {other!r} and {name!r} in {where or 'the top folder'} collide on "
                "case-insensitive file systems"
            )
        seen[key] = name


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def check_path(path: str) -> list[str]:
    """Split and check a relative path made of safe components."""
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafeName(f"path {path[:80]!r}… is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise UnsafeName(f"path {path!r} is absolute")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeName(f"path {path[:80]!r} is nested deeper than {MAX_DEPTH} folders")
    for p in parts:
        check_name(p)
    return parts

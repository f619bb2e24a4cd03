"""Every rule of core/names.py, and trees that break them (RELIABILITY.md C5)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core import names
from harmonicd.core.codec import pack_msg
from harmonicd.core.objects import BLOB, T_BLOB, T_DIR, Entry, decode_tree, encode_tree, object_id
from harmonicd.errors import CorruptPack, UnsafeName
from tests.core.helpers import FAST

GOOD = ["a", "index.html", "A.TXT", "-dash", "_", ".hidden", "...", "a..b", "école", "日本語.txt", "x" * 255,
        "é" * 127, "name with spaces", "~tilde", "emoji-\U0001f600"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert names.check_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"),
    (".", "escape"),
    ("..", "escape"),
    ("a/b", "'/'"),
    ("/", "'/'"),
    ("/etc", "'/'"),
    ("..\\x", "'\\\\\\\\'"),
    ("a\\b", "'\\\\\\\\'"),
    ("a\x00b", "'\\\\x00'"),
    ("\x00", "'\\\\x00'"),
    ("tab\there", "'\\\\t'"),
    ("new\nline", "'\\\\n'"),
    ("bell\x07", "'\\\\x07'"),
    ("esc\x1b[31m", "'\\\\x1b'"),
    ("del\x7f", "'\\\\x7f'"),
    ("x" * 256, "256 bytes"),
    ("é" * 128, "256 bytes"),
    ("e\u0301", "NFC"),
    ("A\u030a", "NFC"),
    ("\ud800", "UTF-8"),
])
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(UnsafeName, match=why):
        names.check_name(name, "some/folder")


def test_message_names_the_folder() -> None:
    with pytest.raises(UnsafeName, match=r"docs/'\.\.'"):
        names.check_name("..", "docs")


@pytest.mark.parametrize("pair", [
    ("A.txt", "a.txt"),
    ("README", "readme"),
    ("\u00e9", "\u00c9"),  # é / É
    ("Stra\u00dfe", "STRASSE"),  # ß folds to ss
    ("\u212b", "\u00e5"),  # Angstrom sign / å (equal after normalisation)
    ("\u00e9", "e\u0301"),  # NFC / NFD
    ("\ufb01le", "file"),  # ligature fi folds to fi
])
def test_colliding_siblings_are_refused(pair: tuple[str, str]) -> None:
    with pytest.raises(UnsafeName, match="collide"):
        names.check_siblings(pair, "docs")
    names.check_siblings([pair[0]], "docs")


def test_distinct_siblings_pass() -> None:
    names.check_siblings(["a", "b", "a.txt", "a.TXT.bak", "é", "e"])


@FAST
@given(st.lists(st.text(min_size=1, max_size=12), max_size=12))
def test_siblings_pass_iff_fold_is_unique(ns: list[str]) -> None:
    folded = [names.fold(n) for n in ns]
    if len(set(folded)) == len(folded):
        names.check_siblings(ns)
    else:
        with pytest.raises(UnsafeName):
            names.check_siblings(ns)


@FAST
@given(st.text(max_size=40))
def test_check_name_accepts_exactly_the_grammar(name: str) -> None:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        encoded = None
    ok = (encoded is not None and 0 < len(encoded) <= 255 and name not in (".", "..")
          and not any(c in "\x00/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in name)
          and unicodedata.normalize("NFC", name) == name)
    if ok:
        assert names.check_name(name) == name
    else:
        with pytest.raises(UnsafeName):
            names.check_name(name)


@pytest.mark.parametrize("path", ["a", "a/b", "docs/img/x.png", "/".join(["d"] * 64)])
def test_good_paths(path: str) -> None:
    assert names.check_path(path) == path.split("/")


@pytest.mark.parametrize(("path", "why"), [
    ("/etc/passwd", "absolute"),
    ("../x", "escape"),
    ("a/../../x", "escape"),
    ("a/./b", "escape"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("", "empty"),
    ("a\\..\\..\\x", "contains"),
    ("a/b\x00/c", "contains"),
    ("/".join(["d"] * 65), "deeper"),
    ("x" * 4097, "longer"),
    ("/".join(["x" * 200] * 21), "longer"),
])
def test_bad_paths(path: str, why: str) -> None:
    with pytest.raises(UnsafeName, match=why):
        names.check_path(path)


def test_join() -> None:
    assert names.join("", "a") == "a"
    assert names.join("a/b", "c") == "a/b/c"


# --------------------------------------------------------------------------- trees from hostile bytes


def _raw_tree(entries: list[list[object]]) -> bytes:
    """A tree built by hand, bypassing every check (and the sort)."""
    return pack_msg(entries)


def _e(name: str, typ: int = T_BLOB) -> list[object]:
    return [name, typ, 0, object_id(BLOB, b"x"), 1]


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc/passwd", "a\x00b", "a\\b", "x" * 300, "e\u0301",
                                  "ctl\x01"])
def test_decode_tree_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(UnsafeName):
        decode_tree(_raw_tree([_e(name)]), "top")


@pytest.mark.parametrize("pair", [("A.txt", "a.txt"), ("\u00e9", "e\u0301"), ("Docs", "docs")])
def test_decode_tree_refuses_collisions(pair: tuple[str, str]) -> None:
    entries = sorted([_e(pair[0]), _e(pair[1], T_DIR)], key=lambda e: str(e[0]).encode())
    with pytest.raises((UnsafeName,)):
        decode_tree(_raw_tree(entries))


def test_decode_tree_refuses_duplicates_and_disorder() -> None:
    with pytest.raises(CorruptPack, match="sorted or duplicated"):
        decode_tree(_raw_tree([_e("a"), _e("a")]))
    with pytest.raises(CorruptPack, match="sorted or duplicated"):
        decode_tree(_raw_tree([_e("b"), _e("a")]))


@pytest.mark.parametrize("entry", [
    ["a", 7, 0, object_id(BLOB, b"x"), 1],  # unknown type
    ["a", True, 0, object_id(BLOB, b"x"), 1],  # bool is not a type
    ["a", 1, 2, object_id(BLOB, b"x"), 1],  # unknown flag
    ["a", 1, 0, b"short", 1],  # bad id
    ["a", 1, 0, "text id" * 5, 1],
    ["a", 1, 0, object_id(BLOB, b"x"), -1],  # bad size
    ["a", 1, 0, object_id(BLOB, b"x"), 1 << 53],
    ["a", 1, 0, object_id(BLOB, b"x"), 1.5],
    [b"bytes name", 1, 0, object_id(BLOB, b"x"), 1],
    ["a", 1, 0, object_id(BLOB, b"x")],  # four fields
    "not a list",
])
def test_decode_tree_refuses_malformed_entries(entry: object) -> None:
    with pytest.raises(CorruptPack):
        decode_tree(pack_msg([entry]))


def test_decode_tree_refuses_non_lists() -> None:
    for raw in (pack_msg({"a": 1}), pack_msg(3), b"\xc1", b""):
        with pytest.raises(CorruptPack):
            decode_tree(raw)


def test_encode_decode_tree_round_trip() -> None:
    entries = [Entry(n, T_BLOB, 0, object_id(BLOB, n.encode()), len(n)) for n in ["b", "a", "é", "Z"]]
    out = decode_tree(encode_tree(entries))
    assert [e.name for e in out] == sorted((e.name for e in entries), key=lambda n: n.encode())
    assert set(out) == set(entries)

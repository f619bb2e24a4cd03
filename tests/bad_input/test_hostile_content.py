"""Validly signed packs with hostile content: tree names that escape or collide,
zstd frames that claim or expand to huge sizes, msgpack that claims huge lengths
or nests deep (RELIABILITY.md C3, C4, C5), through `harmonicctl exchange`."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import zstandard

from harmonicd.core.codec import pack_msg
from harmonicd.core.objects import BLOB, T_BLOB, T_DIR, TREE, object_id
from harmonicd.core.pack import F_ZSTD, MAX_FRAME_RAW, MAX_HEADER, REC_PLAIN
from tests.bad_input.helpers import (
    MASTER_ID,
    SCHOOL_ID,
    Synced,
    assert_unchanged,
    exchange,
    header_for,
    hostile_tree,
    inbox,
    pack_file_name,
    public_key,
    raw_tree,
    refusal,
    sign_release,
    signing_key,
    snapshot,
    write_pack,
)
from tests.core.helpers import raw_pack

MEM_LIMIT = 1 << 30  # the exchange runs with RLIMIT_AS at 1 GiB: bounded memory, proven

# name(s) in one folder -> the reason the refusal must give
HOSTILE_NAMES: dict[str, tuple[list[str], str | None, str]] = {
    "dotdot": ([".."], None, r"escape"),
    "dot": (["."], None, r"escape"),
    "dotdot-nested": ([".."], "docs", r"docs.*escape"),
    "slash": (["a/b"], None, r"contains '/'"),
    "absolute": (["/etc/passwd"], None, r"contains '/'"),
    "absolute-nested": (["/etc/cron.d"], "docs", r"contains '/'"),
    "backslash": (["..\\..\\x"], None, r"contains '\\\\', which could escape"),
    "nul": (["a\x00b"], None, r"contains '\\x00', which could escape"),
    "empty": ([""], None, r"empty file name"),
    "overlong": (["x" * 300], None, r"300 bytes"),
    "overlong-utf8": (["\u00e9" * 200], None, r"400 bytes"),
    "control": (["\x1b[2Jevil"], None, r"contains '\\x1b', which could escape"),
    "case": (["A.txt", "a.txt"], None, r"collide"),
    "case-nested": (["README", "readme"], "docs", r"collide"),
    "casefold": (["Stra\u00dfe", "STRASSE"], None, r"collide"),
    "nfd": (["e\u0301t\u00e9"], None, r"NFC"),
    "nfc-nfd": (["\u00e9", "e\u0301"], None, r"NFC|collide"),
}


def _pack_with_tree(sy: Synced, tag: str, root: bytes, objs: list[tuple[int, bytes]], seq: int = 2) -> Path:
    m, s = sy.master, sy.school
    key = signing_key(m)
    rel = sign_release(key, root, seq=seq, size=6, files=1)
    return write_pack(inbox(s, sy.stick, empty=False) / pack_file_name(MASTER_ID, tag), key,
                      header_for(m, key, SCHOOL_ID, public_key(s), [rel]), objs)


def _no_file_with(root: Path, marker: bytes, skip: list[Path]) -> None:
    for dirpath, _dirs, files in os.walk(root):
        if any(Path(dirpath).is_relative_to(sk) for sk in skip):
            continue
        for fn in files:
            p = Path(dirpath) / fn
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 20:
                assert marker not in p.read_bytes(), f"{p} was written from a hostile pack"


def test_tree_names_that_escape_or_collide(synced: Synced) -> None:
    packs = {}
    for tag, (names, nest, why) in HOSTILE_NAMES.items():
        root, objs = hostile_tree(names, nest=nest)
        packs[tag] = (_pack_with_tree(synced, tag, root, objs), why)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f, why in packs.values():
        refusal(p, f, why)
    assert_unchanged(synced.school, before)
    _no_file_with(synced.tmp, b"pwned\n", [synced.stick, synced.school.state / "objects",
                                           synced.master.state])
    assert not Path("/etc/cron.d/pwned").exists()


def test_malformed_trees_inside_a_signed_pack(synced: Synced) -> None:
    blob = b"pwned\n"
    bid = object_id(BLOB, blob)
    cases = {
        "bytes-name": (pack_msg([[b"name", T_BLOB, 0, bid, 6]]), r"not text"),
        "unknown-type": (raw_tree([("a", 7, bid, 6)]), r"unknown type"),
        "unsorted": (raw_tree([("b", T_BLOB, bid, 6), ("a", T_BLOB, bid, 6)]), r"not sorted"),
        "duplicate": (raw_tree([("a", T_BLOB, bid, 6), ("a", T_BLOB, bid, 6)]), r"duplicated"),
        "huge-array": (b"\xdd\xff\xff\xff\xff" + b"\xc0" * 100, r"malformed msgpack|exceeds"),
        "deep": (b"\x91" * 10_000 + b"\xc0", r"malformed msgpack"),
        "ext": (b"\x91\xd4\x05\x00", r"extension|malformed"),
        "bad-utf8": (b"\x91\x95\xa2\xff\xfe\x01\x00\xc4\x20" + bid + b"\x06", r"malformed msgpack"),
        "trailing": (raw_tree([("a", T_BLOB, bid, 6)]) + b"\xc0", r"trailing bytes"),
        "not-a-list": (pack_msg({"a": 1}), r"not a list"),
    }
    packs = {}
    for tag, (tree, why) in cases.items():
        packs[tag] = (_pack_with_tree(synced, tag, object_id(TREE, tree), [(BLOB, blob), (TREE, tree)]), why)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f, why in packs.values():
        refusal(p, f, why)
    assert_unchanged(synced.school, before)


def _streamed(data_chunks: int, chunk: bytes, window_log: int | None = None) -> bytes:
    if window_log is None:
        c = zstandard.ZstdCompressor(level=3).compressobj()
    else:
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
        c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return b"".join(c.compress(chunk) for _ in range(data_chunks)) + c.flush()


def test_zstd_frames_that_claim_or_expand_to_huge_sizes(synced: Synced) -> None:
    m, s = synced.master, synced.school
    key = signing_key(m)
    box = inbox(s, synced.stick)
    rec = REC_PLAIN.pack(BLOB, object_id(BLOB, b"x"), 1) + b"x"
    claim_2_40 = b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 1 << 40) + b"\x09\x00\x00x"
    bomb = _streamed(1024, bytes(1 << 20))  # 1 GiB of zeros in about 32 KiB
    assert len(bomb) < 64 << 10
    cases = {
        "claims-2-40": ([(F_ZSTD, len(rec), claim_2_40)], r"declares"),
        "bomb": ([(F_ZSTD, MAX_FRAME_RAW, bomb)], r"damaged|expands"),
        "bomb-small-raw": ([(F_ZSTD, len(rec), bomb)], r"damaged|expands"),
        "window-128mib": ([(F_ZSTD, len(rec), _streamed(1, rec, window_log=27))], r"window"),
        "trailing": ([(F_ZSTD, len(rec), _streamed(1, rec) + b"junk")], r"damaged"),
    }
    files = {}
    for tag, (frames, _why) in cases.items():
        hdr = header_for(m, key, SCHOOL_ID, public_key(s))
        files[tag] = box / pack_file_name(MASTER_ID, tag)
        files[tag].write_bytes(raw_pack(key, hdr, frames, objects=1, raw_bytes=1))
    before = snapshot(s)
    p = exchange(s, synced.stick, mem_bytes=MEM_LIMIT, timeout=120)
    for tag, (_frames, why) in cases.items():
        refusal(p, files[tag], why)
    assert_unchanged(s, before)


def _nested(total: int, item: bytes, per: int) -> bytes:
    n = (total - 5) // (5 + per * len(item))
    one = b"\xdd" + struct.pack(">I", per) + item * per
    return b"\xdd" + struct.pack(">I", n) + one * n


HOSTILE_HEADERS: dict[str, bytes] = {
    "array-2-32": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64,
    "map-2-32": b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64,
    "str-4gib": b"\xdb\xff\xff\xff\xff" + b"x" * 64,
    "deep-arrays": b"\x91" * 10_000 + b"\xc0",
    "deep-maps": b"\x81\xa1k" * 10_000 + b"\xc0",
    "int-key": b"\x81\x01\x02",
    "tuple-key": b"\x81\x92\x01\x02\x03",
    "ext": b"\x81\xa1v\xd4\x05\x00",
    "bad-utf8": b"\x81\xa2\xff\xfe\x01",
    "trailing": pack_msg({"v": 1}) + b"\xc0",
    "wrong-types": pack_msg({"v": 1, "pack": bytes(16), "sender": "master-1", "sender_key": bytes(32),
                             "recipient": None, "recipient_key": None, "created": 0, "volume": "1",
                             "have": {}, "releases": [], "acks": [], "plan": {}, "extra": {}}),
    "not-a-map": pack_msg([1, 2, 3]),
}


@pytest.mark.parametrize("where", ["school", "master"])
def test_msgpack_headers_with_huge_lengths_or_deep_nesting(synced: Synced, where: str) -> None:
    server = synced.school if where == "school" else synced.master
    sender = MASTER_ID if where == "school" else SCHOOL_ID
    key = signing_key(synced.master if where == "school" else synced.school)
    box = inbox(server, synced.stick)
    files = {}
    for tag, raw in HOSTILE_HEADERS.items():
        files[tag] = box / pack_file_name(sender, f"hdr-{tag}")
        files[tag].write_bytes(raw_pack(key, raw, []))
    if where == "school":
        # The largest header the format allows, of the objects that cost the most
        # memory to decode: 16 MiB of empty arrays (some 70 bytes each in Python).
        files["empty-arrays"] = box / pack_file_name(sender, "hdr-empty-arrays")
        files["empty-arrays"].write_bytes(raw_pack(key, _nested(MAX_HEADER, b"\x90", 1_000_000), []))
        files["empty-maps"] = box / pack_file_name(sender, "hdr-empty-maps")
        files["empty-maps"].write_bytes(raw_pack(key, _nested(MAX_HEADER, b"\x80", 1_000_000), []))
    before = snapshot(server)
    p = exchange(server, synced.stick, mem_bytes=MEM_LIMIT, timeout=180)
    for f in files.values():
        refusal(p, f, r"header")
    assert_unchanged(server, before)


def test_hostile_release_records(synced: Synced) -> None:
    m, s = synced.master, synced.school
    key = signing_key(m)
    box = inbox(s, synced.stick)
    good_root = object_id(TREE, b"\x90")
    bodies = {
        "deep": b"\x91" * 10_000 + b"\xc0",
        "huge-map": b"\xdf\xff\xff\xff\xff",
        "too-big": pack_msg({"v": 1, "pad": "x" * 5000}),
        "bad-collection": pack_msg({"v": 1, "collection": "../../etc", "owner": MASTER_ID, "seq": 2,
                                    "root": good_root, "created": 0, "size": 0, "files": 0, "for": None}),
        "seq-2-64": pack_msg({"v": 1, "collection": "content", "owner": MASTER_ID, "seq": 1 << 63,
                              "root": good_root, "created": 0, "size": 0, "files": 0, "for": None}),
    }
    files = {}
    for tag, body in bodies.items():
        hdr = header_for(m, key, SCHOOL_ID, public_key(s), [(body, key.sign(b"harmonic/release/v1\x00", body))])
        files[tag] = write_pack(box / pack_file_name(MASTER_ID, f"rel-{tag}"), key, hdr, [])
    before = snapshot(s)
    p = exchange(s, synced.stick)
    for f in files.values():
        refusal(p, f, r"release record|collection name '\.\./\.\./etc' is not valid")
    assert_unchanged(s, before)


def _chain(names: list[str], leaf: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Folders nested as names[0]/names[1]/.../leaf; returns (top id, objects)."""
    objs: list[tuple[int, bytes]] = []
    cur = leaf
    for n in reversed(names):
        t = raw_tree([(n, T_DIR, cur, 6)])
        objs.append((TREE, t))
        cur = object_id(TREE, t)
    return cur, objs


def _deep_cases() -> dict[str, tuple[bytes, list[tuple[int, bytes]], str]]:
    blob = b"pwned\n"
    leaf = raw_tree([("f.txt", T_BLOB, object_id(BLOB, blob), 6)])
    base: list[tuple[int, bytes]] = [(BLOB, blob), (TREE, leaf)]
    lid = object_id(TREE, leaf)
    out = {}
    # Straight: 70 folders; 17 names of 250 bytes.
    top, objs = _chain(["d"] * 70, lid)
    out["deep"] = (top, base + objs, r"deeper")
    top, objs = _chain([chr(97 + i) * 250 for i in range(17)], lid)
    out["long"] = (top, base + objs, r"longer than 4096")
    # Through a shared subtree: T is reached directly at the top ("b") and again
    # below two more folders ("a/..."), where it is too deep or too long. A check
    # that walks each subtree once, where it first meets it, misses the second.
    for tag, names, prefix in (("shared-long", [chr(97 + i) * 250 for i in range(15)], ["z" * 250, "y" * 250]),
                               ("shared-deep", ["d"] * 60, ["p"] * 10)):
        t_id, t_objs = _chain(names, lid)
        a_id, a_objs = _chain(prefix, t_id)
        root = raw_tree([("a", T_DIR, a_id, 6), ("b", T_DIR, t_id, 6)])
        out[tag] = (object_id(TREE, root), base + t_objs + a_objs + [(TREE, root)],
                    r"longer than 4096|deeper")
    return out


def test_paths_too_deep_or_too_long(synced: Synced) -> None:
    """A validly signed tree whose paths pass MAX_DEPTH or MAX_PATH_BYTES is refused
    before anything is applied (else the release goes live, its deployment fails
    with "File name too long", and every later command stumbles on it)."""
    files = {}
    for i, (tag, (root, objs, why)) in enumerate(_deep_cases().items()):
        files[tag] = (_pack_with_tree(synced, tag, root, objs, seq=2 + i), why)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f, why in files.values():
        refusal(p, f, why)
    assert_unchanged(synced.school, before)
    v = synced.school.ctl("verify", check=False)
    assert v.returncode == 0, v.stderr


def test_file_sizes_that_lie(synced: Synced) -> None:
    """A tree entry or a recipe that gives a file another length than its data has
    (C7: a length that differs from the manifest) is refused; else it is deployed,
    and `verify` then calls the deployed file damaged."""
    from harmonicd.core.objects import RECIPE, T_RECIPE, encode_recipe

    blob = b"short\n"
    bid = object_id(BLOB, blob)
    rec_ok = encode_recipe([(bid, 6), (bid, 6)])
    rec_lying = encode_recipe([(bid, 10), (bid, 6)])
    cases = {
        "blob-size": ([("a.txt", T_BLOB, bid, 100)], [(BLOB, blob)], r"size|bytes|length"),
        "recipe-total": ([("b.txt", T_RECIPE, object_id(RECIPE, rec_ok), 16)], [(BLOB, blob), (RECIPE, rec_ok)],
                         r"size|bytes|length"),
        "chunk-length": ([("c.txt", T_RECIPE, object_id(RECIPE, rec_lying), 16)],
                         [(BLOB, blob), (RECIPE, rec_lying)], r"size|bytes|length"),
    }
    files = {}
    for i, (tag, (entries, objs, why)) in enumerate(cases.items()):
        tree = raw_tree(entries)
        files[tag] = (_pack_with_tree(synced, tag, object_id(TREE, tree), [*objs, (TREE, tree)], seq=2 + i), why)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f, why in files.values():
        refusal(p, f, why)
    assert_unchanged(synced.school, before)
    v = synced.school.ctl("verify", check=False)
    assert v.returncode == 0, v.stderr


def test_hostile_names_from_a_school(synced: Synced) -> None:
    """The master is as strict with a school's statistics as a school is with content."""
    m, s, stick = synced.master, synced.school, synced.stick
    skey = signing_key(s)
    mkey = public_key(m)
    box = inbox(m, stick)

    class School:
        name = SCHOOL_ID

    files = {}
    for i, (tag, names, why) in enumerate([("dotdot", [".."], r"escape"), ("case", ["A.json", "a.json"], r"collide"),
                                           ("slash", ["../../etc/cron.d/x"], r"contains '/'")]):
        root, objs = hostile_tree(names)
        rel = sign_release(skey, root, seq=2 + i, collection="stats", owner=SCHOOL_ID, size=6, files=1)
        files[tag] = (write_pack(box / pack_file_name(SCHOOL_ID, tag), skey,
                                 header_for(School(), skey, MASTER_ID, mkey, [rel]), objs), why)
    before = snapshot(m)
    p = exchange(m, stick)
    for f, why in files.values():
        refusal(p, f, why)
    assert_unchanged(m, before)
    _no_file_with(synced.tmp, b"pwned\n", [stick, m.state / "objects", s.state])

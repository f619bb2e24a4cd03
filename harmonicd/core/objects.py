"""Content-addressed objects: blobs, file recipes and trees.

An object is a kind byte and a payload. Its id is BLAKE3-256 over
``kind || payload``, so a blob can never be mistaken for a tree that happens
to have the same bytes. A small file is one blob; a larger file is cut by
FastCDC into blobs listed by a *recipe*; a folder is a *tree* listing names,
types and ids. Equal subtrees have equal ids, so comparing two releases is
O(changed folders), and a no-op sync compares one root.

Encodings (byte for byte in docs/pack-format.md):

* blob: the bytes.
* recipe: ``n * (id[32] || u32be length)``, at least two entries.
* tree: msgpack array of ``[name, type, flags, id, size]`` sorted by the
  UTF-8 bytes of name; type 0 = folder, 1 = file in one blob, 2 = file by
  recipe; flags bit 0 = executable; size = file size, or total file bytes
  below a folder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3
import pyfastcdc

from harmonicd.core import names
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.errors import CorruptPack

ObjectId = bytes  # 32 bytes

BLOB = 1
RECIPE = 2
TREE = 3
KIND_NAMES = {BLOB: "blob", RECIPE: "recipe", TREE: "tree"}

T_DIR = 0
T_BLOB = 1
T_RECIPE = 2
FLAG_EXEC = 1

ID_LEN = 32
# Largest object we accept in any form; chunks are far smaller. Bounds every
# allocation made while reading a pack (trees of huge folders, long recipes).
MAX_OBJECT = 16 << 20
MAX_TREE_ENTRIES = 200_000
MAX_SIZE = 1 << 53

# FastCDC parameters, chosen by measurement (docs/chunking.md).
CHUNK_MIN = 16 << 10
CHUNK_AVG = 64 << 10
CHUNK_MAX = 256 << 10

_RECIPE_ENTRY = struct.Struct(">32sI")


def object_id(kind: int, payload: bytes | bytearray | memoryview) -> ObjectId:
    h = blake3.blake3(bytes((kind,)))
    h.update(payload)
    return h.digest()


def hexid(oid: ObjectId) -> str:
    return oid.hex()


def short(oid: ObjectId | None) -> str:
    return oid.hex()[:12] if oid else "-"


def parse_hexid(text: str) -> ObjectId:
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a hex object id") from exc
    if len(raw) != ID_LEN:
        raise ValueError(f"{text!r} is not a 32-byte object id")
    return raw


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    type: int
    flags: int
    id: ObjectId
    size: int

    @property
    def is_dir(self) -> bool:
        return self.type == T_DIR


def encode_tree(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: e.name.encode("utf-8"))
    return pack_msg([[e.name, e.type, e.flags, e.id, e.size] for e in ordered])


def decode_tree(payload: bytes, where: str = "") -> list[Entry]:
    """Parse and check a tree from untrusted bytes (names, order, types, sizes)."""
    raw = unpack_msg(payload, max_items=MAX_TREE_ENTRIES, what=f"tree {where or '/'}")
    if not isinstance(raw, list):
        raise CorruptPack(f"tree {where or '/'}: not a list")
    out: list[Entry] = []
    prev: bytes | None = None
    for item in raw:
        if not (isinstance(item, list) and len(item) == 5):
            raise CorruptPack(f"tree {where or '/'}: malformed entry")
        name, typ, flags, oid, size = item
        if not isinstance(name, str):
            raise CorruptPack(f"tree {where or '/'}: name is not text")
        names.check_name(name, where)
        if typ not in (T_DIR, T_BLOB, T_RECIPE) or type(typ) is not int:
            raise CorruptPack(f"tree {where or '/'}: entry {name!r} has unknown type {typ!r}")
        if type(flags) is not int or flags not in (0, FLAG_EXEC):
            raise CorruptPack(f"tree {where or '/'}: entry {name!r} has bad flags")
        if not isinstance(oid, bytes) or len(oid) != ID_LEN:
            raise CorruptPack(f"tree {where or '/'}: entry {name!r} has a bad id")
        if type(size) is not int or not 0 <= size < MAX_SIZE:
            raise CorruptPack(f"tree {where or '/'}: entry {name!r} has a bad size")
        key = name.encode("utf-8")
        if prev is not None and key <= prev:
            raise CorruptPack(f"tree {where or '/'}: entries not sorted or duplicated at {name!r}")
        prev = key
        out.append(Entry(name, typ, flags, oid, size))
    names.check_siblings((e.name for e in out), where)
    return out


def encode_recipe(chunks: list[tuple[ObjectId, int]]) -> bytes:
    return b"".join(_RECIPE_ENTRY.pack(cid, n) for cid, n in chunks)


def decode_recipe(payload: bytes, where: str = "") -> list[tuple[ObjectId, int]]:
    if len(payload) % _RECIPE_ENTRY.size or len(payload) < 2 * _RECIPE_ENTRY.size:
        raise CorruptPack(f"file recipe {where}: length {len(payload)} is not a list of chunks")
    out = []
    for cid, n in _RECIPE_ENTRY.iter_unpack(payload):
        if not 0 < n <= MAX_OBJECT:
            raise CorruptPack(f"file recipe {where}: chunk length {n} out of range")
        out.append((cid, n))
    return out


def check_object(kind: int, payload: bytes, where: str = "") -> None:
    """Structural check of an object's payload (the hash is checked separately)."""
    if kind == TREE:
        decode_tree(payload, where)
    elif kind == RECIPE:
        decode_recipe(payload, where)
    elif kind != BLOB:
        raise CorruptPack(f"object {where}: unknown kind {kind}")


class Chunker:
    """FastCDC over a stream in bounded memory; yields (chunk bytes) in order."""

    def __init__(self) -> None:
        self._cdc = pyfastcdc.FastCDC(CHUNK_AVG - CHUNK_MIN, min_size=CHUNK_MIN, max_size=CHUNK_MAX)

    def chunks(self, stream: BinaryIO) -> Iterator[memoryview]:
        for c in self._cdc.cut_stream(stream):
            # The memoryview is only valid until the next chunk: callers hash
            # and store it before asking for more.
            yield c.data

    def cut(self, data: bytes) -> Iterator[memoryview]:
        for c in self._cdc.cut_buf(data):
            yield c.data

"""Helpers for the pure-core tests: an in-memory object store, tree builders,
pack writing/reading in memory, and deterministic hypothesis settings."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable
from typing import Any, Union

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from harmonicd.core import keys
from harmonicd.core.objects import (
    BLOB,
    RECIPE,
    T_BLOB,
    T_DIR,
    T_RECIPE,
    TREE,
    Entry,
    ObjectId,
    decode_recipe,
    decode_tree,
    encode_recipe,
    encode_tree,
    object_id,
)
from harmonicd.core.pack import Header, PackReader, PackWriter, Record
from harmonicd.errors import IntegrityError, UntrustedPack

# Deterministic and modest: the whole tests/core folder must run in well under a minute.
FAST = settings(derandomize=True, max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOWER = settings(FAST, max_examples=15)

# Fixed keys: tests are reproducible byte for byte.
SENDER = keys.SigningKey(bytes(range(32)))
RECEIVER = keys.SigningKey(bytes(range(1, 33)))
STRANGER = keys.SigningKey(bytes(range(2, 34)))


# --------------------------------------------------------------------------- an in-memory store


class MemoryStore:
    """A TreeSource (core.diff) that keeps objects by id, encoded with core.objects."""

    def __init__(self, objects: dict[ObjectId, tuple[int, bytes]] | None = None) -> None:
        self.objects: dict[ObjectId, tuple[int, bytes]] = dict(objects or {})

    def put(self, kind: int, payload: bytes) -> ObjectId:
        oid = object_id(kind, payload)
        self.objects[oid] = (kind, payload)
        return oid

    def get(self, oid: ObjectId) -> tuple[int, bytes]:
        try:
            return self.objects[oid]
        except KeyError:
            raise IntegrityError(f"object {oid.hex()[:12]} is missing") from None

    def _kind(self, oid: ObjectId, kind: int) -> bytes:
        k, payload = self.get(oid)
        if k != kind:
            raise IntegrityError(f"object {oid.hex()[:12]} has kind {k}, expected {kind}")
        return payload

    def tree(self, oid: ObjectId, where: str = "") -> list[Entry]:
        return decode_tree(self._kind(oid, TREE), where)

    def recipe(self, oid: ObjectId, where: str = "") -> list[tuple[ObjectId, int]]:
        return decode_recipe(self._kind(oid, RECIPE), where)

    def has(self, oid: ObjectId) -> bool:
        return oid in self.objects

    def copy_of(self, ids: Iterable[ObjectId]) -> MemoryStore:
        return MemoryStore({i: self.objects[i] for i in ids})


# A tree spec: name -> bytes (a one-blob file), list of >= 2 chunks (a file by
# recipe) or a nested spec (a folder).
Spec = dict[str, Union[bytes, list[bytes], "Spec"]]


def build(store: MemoryStore, spec: Spec) -> ObjectId:
    """Store the tree described by spec and return its root id."""
    return _build(store, spec)[0]


def _build(store: MemoryStore, spec: Spec) -> tuple[ObjectId, int]:
    entries = []
    total = 0
    for name, v in spec.items():
        if isinstance(v, dict):
            oid, size = _build(store, v)
            entries.append(Entry(name, T_DIR, 0, oid, size))
        elif isinstance(v, list):
            chunks = [(store.put(BLOB, c), len(c)) for c in v]
            oid = store.put(RECIPE, encode_recipe(chunks))
            size = sum(len(c) for c in v)
            entries.append(Entry(name, T_RECIPE, 0, oid, size))
        else:
            oid = store.put(BLOB, v)
            size = len(v)
            entries.append(Entry(name, T_BLOB, 0, oid, size))
        total += size
    return store.put(TREE, encode_tree(entries)), total


# Chunks come from a small pool so that trees share blobs, files and folders.
_chunk = st.sampled_from([b"", b"a", b"hello", b"hello world", bytes(range(200)), b"x" * 500,
                          b"y" * 300 + b"z", b"second version of a file"])
_file = st.one_of(_chunk, st.lists(_chunk.filter(bool), min_size=2, max_size=4))
_names = st.sampled_from(["a", "b", "c", "docs", "img", "index.html", "z.bin", "\u00e9t\u00e9"])
specs: st.SearchStrategy[Spec] = st.recursive(
    st.dictionaries(_names, _file, max_size=4),
    lambda inner: st.dictionaries(_names, st.one_of(_file, inner), max_size=4),
    max_leaves=12,
)


def mutate_spec(draw: Callable[..., Any], spec: Spec) -> Spec:
    """A related tree: some entries kept, some changed, some added or removed."""
    out: Spec = {}
    for name, v in spec.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "change"]))
        if action == "keep":
            out[name] = v
        elif action == "change":
            out[name] = mutate_spec(draw, v) if isinstance(v, dict) else draw(_file)
    extra = draw(st.dictionaries(_names, _file, max_size=2))
    for k, v in extra.items():
        out.setdefault(k, v)
    return out


@st.composite
def spec_pairs(draw: Callable[..., Any]) -> tuple[Spec, Spec]:
    a = draw(specs)
    b = mutate_spec(draw, a) if draw(st.booleans()) else draw(specs)
    return a, b


# --------------------------------------------------------------------------- packs in memory


def header(*, recipient_key: bytes | None = None, **kw: Any) -> Header:
    fields: dict[str, Any] = dict(pack_id=bytes(16), sender="master-1", sender_key=SENDER.public,
                                  recipient="school-1",
                                  recipient_key=RECEIVER.public if recipient_key is None else recipient_key,
                                  created=1_800_000_000, volume=1, plan={"objects": 0, "bytes": 0})
    fields.update(kw)
    return Header(**fields)


# One item to write: ("plain", kind, oid, payload) or ("delta", kind, oid, base, target_len, patch),
# or ("flush",) to end a frame there.
Item = tuple[Any, ...]


def write_pack(items: Iterable[Item], *, key: keys.SigningKey = SENDER, hdr: Header | None = None,
               last: bool = True) -> tuple[bytes, bytes]:
    """The pack's bytes and the digest close() returned."""
    buf = io.BytesIO()
    w = PackWriter(buf, key, hdr or header())
    for it in items:
        if it[0] == "plain":
            w.add(it[1], it[2], it[3])
        elif it[0] == "delta":
            w.add_delta(it[1], it[2], it[3], it[4], it[5])
        else:
            w.flush_frame()
    digest = w.close(last=last)
    data = buf.getvalue()
    assert w.written == len(data)
    return data, digest


def trust_only(key: bytes) -> Callable[[Header], bytes]:
    def check(h: Header) -> bytes:
        if h.sender_key != key:
            raise UntrustedPack("pack is signed by a key this server does not trust")
        return key
    return check


def read_pack(data: bytes, *, key: bytes = SENDER.public,
              base: Callable[[ObjectId], bytes | None] = lambda _b: None) -> tuple[PackReader, list[Record]]:
    r = PackReader(io.BytesIO(data), "test.hpk", trust_only(key))
    recs = list(r.records(base))
    return r, recs


# --------------------------------------------------------------------------- bounded subprocesses


def run_limited(code: str, *, mem_bytes: int = 1 << 30, timeout: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run python code in a child with RLIMIT_AS set: proves a bounded allocation."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({mem_bytes}, {mem_bytes}))
    """)
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=e, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def raw_pack(key: keys.SigningKey, hdr: Header | bytes, frames: Iterable[tuple[int, int, bytes]], *,
             trailer: Any = None, objects: int = 0, raw_bytes: int = 0) -> bytes:
    """A pack built frame by frame, with a true digest and a valid signature:
    how a sender holding the key (or a bug in one) could damage a pack.
    ``hdr`` and ``trailer`` may be raw bytes (hostile msgpack)."""
    import blake3

    from harmonicd.core.codec import pack_msg
    from harmonicd.core.pack import END_MAGIC, F_END, FRAME_HEAD, MAGIC, PREAMBLE, VERSION

    raw = hdr if isinstance(hdr, bytes) else hdr.encode()
    out = bytearray(PREAMBLE.pack(MAGIC, VERSION, 0, len(raw)) + raw)
    n = 0
    for typ, raw_len, stored in frames:
        out += FRAME_HEAD.pack(typ, raw_len, len(stored)) + stored
        n += 1
    if isinstance(trailer, bytes):
        t = trailer
    else:
        t = pack_msg(trailer if trailer is not None else
                     {"frames": n, "objects": objects, "raw_bytes": raw_bytes, "last": True})
    out += FRAME_HEAD.pack(F_END, 0, len(t)) + t
    digest = blake3.blake3(bytes(out)).digest()
    return bytes(out) + digest + key.sign(keys.TAG_PACK, digest) + END_MAGIC

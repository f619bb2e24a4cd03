"""Sync packs: the one format Harmonic moves, on a stick or as an HTTP body.

Layout (byte for byte in docs/pack-format.md)::

    preamble  "HRMNPACK" | u16 version | u16 flags (0) | u32 header_len
    header    msgpack map, header_len bytes (<= MAX_HEADER)
    frame*    u8 type | u32 raw_len | u32 stored_len | stored bytes
    end       u8 0xFF   | u32 0       | u32 trailer_len | msgpack trailer
    footer    digest[32] | signature[64] | "HRMNEND\\0"

``digest`` is BLAKE3-256 of every byte before the footer and the signature
is the sender's ed25519 over it, so a pack proves by itself that it is
complete and unaltered: a file name or a file's presence proves nothing on a
FAT stick that was pulled out early. Every length is checked against a fixed
limit before anything is read or allocated for it, and every object is
checked against its id as it is decoded.

The reader and writer work on binary streams, in bounded memory whatever the
pack size: at most a few frames are held at a time.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from harmonicd.core import keys
from harmonicd.core.codec import Compressor, Decompressor, delta_decompress, pack_msg, unpack_msg
from harmonicd.core.objects import BLOB, ID_LEN, KIND_NAMES, MAX_OBJECT, ObjectId, object_id, short
from harmonicd.errors import CorruptPack, PackError, TruncatedPack, UntrustedPack

MAGIC = b"HRMNPACK"
END_MAGIC = b"HRMNEND\x00"
VERSION = 1
SUPPORTED_VERSIONS = {1}

PREAMBLE = struct.Struct(">8sHHI")
FRAME_HEAD = struct.Struct(">BII")
FOOTER_LEN = 32 + keys.SIG_LEN + len(END_MAGIC)

F_ZSTD = 1  # records, zstd-compressed
F_STORED = 2  # records, stored as they are (when compression would not help)
F_END = 0xFF

REC_PLAIN = struct.Struct(">B32sI")  # kind, id, length; then the payload
REC_DELTA = struct.Struct(">B32s32sII")  # kind|0x80, id, base id, target length, patch length
DELTA_BIT = 0x80
SKIPPED = 0  # not an object kind: marks a delta passed over by records(skip_unresolved=True)

MAX_HEADER = 16 << 20
MAX_TRAILER = 64 << 10
MAX_HEADER_ITEMS = 100_000
MAX_FRAME_RAW = MAX_OBJECT + 4096
MAX_FRAME_STORED = MAX_FRAME_RAW + (64 << 10)
FRAME_TARGET = 4 << 20  # raw bytes gathered before a frame is compressed
MAX_TRAILER_EST = 256  # what our own trailer takes at most
PROBE = 64 << 10  # sample size for the incompressible-frame check

# The smallest pack: preamble, empty-ish header, end frame, footer.
OVERHEAD = PREAMBLE.size + FRAME_HEAD.size + FOOTER_LEN


@dataclass
class Header:
    pack_id: bytes
    sender: str
    sender_key: bytes
    recipient: str | None
    recipient_key: bytes | None
    created: int
    volume: int
    have: dict[str, Any] = field(default_factory=dict)
    releases: list[tuple[bytes, bytes]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return pack_msg(
            {
                "v": VERSION,
                "pack": self.pack_id,
                "sender": self.sender,
                "sender_key": self.sender_key,
                "recipient": self.recipient,
                "recipient_key": self.recipient_key,
                "created": self.created,
                "volume": self.volume,
                "have": self.have,
                "releases": [[b, s] for b, s in self.releases],
                "acks": self.acks,
                "plan": self.plan,
                "extra": self.extra,
            }
        )

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Header:
        # A header holds a few maps and one entry per release: 100,000 containers
        # is far beyond any real one and bounds what a hostile one can allocate.
        d = unpack_msg(raw, max_items=MAX_HEADER_ITEMS, what=f"{where}: header")
        if not isinstance(d, dict) or d.get("v") != VERSION:
            raise CorruptPack(f"{where}: header has an unknown version")

        def need(k: str, typ: type | tuple[type, ...]) -> Any:
            v = d.get(k)
            if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
                raise CorruptPack(f"{where}: header field {k!r} is missing or of the wrong type")
            return v

        pack_id = need("pack", bytes)
        sender_key = need("sender_key", bytes)
        rkey = d.get("recipient_key")
        if len(pack_id) != 16 or len(sender_key) != keys.KEY_LEN:
            raise CorruptPack(f"{where}: header has a bad pack id or sender key")
        if rkey is not None and (not isinstance(rkey, bytes) or len(rkey) != keys.KEY_LEN):
            raise CorruptPack(f"{where}: header has a bad recipient key")
        rels = need("releases", list)
        releases: list[tuple[bytes, bytes]] = []
        for r in rels:
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, bytes) for x in r)):
                raise CorruptPack(f"{where}: header has a malformed release")
            releases.append((r[0], r[1]))
        recipient = d.get("recipient")
        if recipient is not None and not isinstance(recipient, str):
            raise CorruptPack(f"{where}: header field 'recipient' is not text")
        volume = need("volume", int)
        if volume < 1:
            raise CorruptPack(f"{where}: header has a bad volume number")
        plan = need("plan", dict)
        acks = need("acks", list)
        for a in acks:
            if not isinstance(a, dict):
                raise CorruptPack(f"{where}: header has a malformed acknowledgement")
        return cls(
            pack_id=pack_id,
            sender=need("sender", str),
            sender_key=sender_key,
            recipient=recipient,
            recipient_key=rkey,
            created=need("created", int),
            volume=volume,
            have=need("have", dict),
            releases=releases,
            acks=acks,
            plan={k: v for k, v in plan.items() if isinstance(k, str) and type(v) is int},
            extra=need("extra", dict),
        )


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    id: ObjectId
    data: bytes
    stored_size: int  # bytes this record took in the pack (for progress and accounting)


# --------------------------------------------------------------------------- writing


class _Local(threading.local):
    compressor: Compressor | None = None


class Sink(Protocol):
    """Where a pack is written: a binary file, or anything with its write()."""

    def write(self, data: bytes | bytearray | memoryview, /) -> Any: ...


class PackWriter:
    """Writes one pack (one volume) to a binary stream.

    Frames are compressed on a small thread pool while the next one is being
    filled, so export runs at the speed of zstd on two cores; output order is
    preserved and at most ``depth`` frames are in memory.
    """

    def __init__(self, out: Sink, key: keys.SigningKey, header: Header,
                 pool: ThreadPoolExecutor | None = None, depth: int = 3) -> None:
        self._out = out
        self._key = key
        self._hash = blake3.blake3()
        # Records of the frame being filled, joined once when it is flushed.
        self._parts: list[bytes | bytearray | memoryview] = []
        self._buf_len = 0
        # Frames being compressed, each with its raw length: a frame is never
        # stored larger than raw (F_STORED), which bounds what it will take.
        self._pending: deque[tuple[Future[tuple[int, int, bytes]], int]] = deque()
        self._pool = pool
        self._depth = depth
        self._local = _Local()
        self.objects = 0
        self.raw_bytes = 0
        self.frames = 0
        self.written = 0
        raw = header.encode()
        if len(raw) > MAX_HEADER:
            raise CorruptPack("pack header would be larger than the format allows")
        self._emit(PREAMBLE.pack(MAGIC, VERSION, 0, len(raw)) + raw)

    # Upper bound of the final size if the pack were closed after adding
    # `extra` more raw bytes: used to split volumes without ever overshooting.
    # A bound that is also tight enough to fill a small stick: frames in flight
    # count at their raw length, never more than they can take.
    def worst_case_size(self, extra: int = 0) -> int:
        inflight = sum(raw + FRAME_HEAD.size for _fut, raw in self._pending)
        buffered = self._buf_len + extra
        frame = FRAME_HEAD.size if buffered else 0
        return self.written + inflight + buffered + frame + closing_size()

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self._out.write(data)
        self.written += len(data)

    def _room(self, n: int) -> None:
        # Close the frame before a record that would take it past the target,
        # so a frame is never larger than one record plus FRAME_TARGET, and a
        # record of up to MAX_OBJECT bytes always fits in MAX_FRAME_RAW.
        if self._buf_len and self._buf_len + n > FRAME_TARGET:
            self.flush_frame()

    def add(self, kind: int, oid: ObjectId, data: bytes | bytearray | memoryview) -> None:
        if len(data) > MAX_OBJECT:
            raise ValueError(f"object {short(oid)} is {len(data)} bytes, over the format's {MAX_OBJECT}")
        self._room(REC_PLAIN.size + len(data))
        self._parts += (REC_PLAIN.pack(kind, oid, len(data)), data)
        self._buf_len += REC_PLAIN.size + len(data)
        self._added(len(data))

    def add_delta(self, kind: int, oid: ObjectId, base: ObjectId, target_len: int, patch: bytes) -> None:
        if len(patch) > MAX_OBJECT or target_len > MAX_OBJECT:
            raise ValueError(f"delta for {short(oid)} is over the format's {MAX_OBJECT} bytes")
        self._room(REC_DELTA.size + len(patch))
        self._parts += (REC_DELTA.pack(kind | DELTA_BIT, oid, base, target_len, len(patch)), patch)
        self._buf_len += REC_DELTA.size + len(patch)
        self._added(target_len)

    def _added(self, n: int) -> None:
        self.objects += 1
        self.raw_bytes += n
        if self._buf_len >= FRAME_TARGET:
            self.flush_frame()

    def _compress(self, raw: bytes) -> tuple[int, int, bytes]:
        if self._local.compressor is None:
            self._local.compressor = Compressor()
        c = self._local.compressor
        if len(raw) >= 4 * PROBE:
            # Most bytes a school server moves are photos, audio and video, which
            # zstd cannot shrink; three samples tell us so for a fraction of the cost.
            step = (len(raw) - PROBE) // 2
            if all(len(c.compress(raw[i:i + PROBE])) > PROBE * 0.97 for i in (0, step, 2 * step)):
                return F_STORED, len(raw), raw
        comp = c.compress(raw)
        if len(comp) >= len(raw):
            return F_STORED, len(raw), raw
        return F_ZSTD, len(raw), comp

    def flush_frame(self) -> None:
        if not self._parts:
            return
        raw = b"".join(self._parts)
        self._parts = []
        self._buf_len = 0
        if self._pool is None:
            fut: Future[tuple[int, int, bytes]] = Future()
            fut.set_result(self._compress(raw))
        else:
            fut = self._pool.submit(self._compress, raw)
        self._pending.append((fut, len(raw)))
        while len(self._pending) >= self._depth:
            self._write_frame(self._pending.popleft()[0].result())

    def _write_frame(self, frame: tuple[int, int, bytes]) -> None:
        typ, raw_len, stored = frame
        self._emit(FRAME_HEAD.pack(typ, raw_len, len(stored)))
        self._emit(stored)
        self.frames += 1

    def close(self, *, last: bool) -> bytes:
        """Finish the pack: end frame, digest and signature. Returns the digest."""
        self.flush_frame()
        while self._pending:
            self._write_frame(self._pending.popleft()[0].result())
        trailer = pack_msg({"frames": self.frames, "objects": self.objects,
                            "raw_bytes": self.raw_bytes, "last": last})
        self._emit(FRAME_HEAD.pack(F_END, 0, len(trailer)))
        self._emit(trailer)
        digest: bytes = self._hash.digest()
        sig = self._key.sign(keys.TAG_PACK, digest)
        self._out.write(digest + sig + END_MAGIC)
        self.written += FOOTER_LEN
        return digest


def closing_size() -> int:
    """What closing a pack adds at most: the end frame, its trailer and the footer."""
    return FRAME_HEAD.size + MAX_TRAILER_EST + FOOTER_LEN


def empty_size(header: Header) -> int:
    """The size of a pack with this header and no records (what it takes at least)."""
    return PREAMBLE.size + len(header.encode()) + closing_size()


class Hashed:
    """A sink that hashes every byte on its way to the file, so what a stick
    returns on read-back can be checked against what was handed to it."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self.hash = blake3.blake3()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> Any:
        self.hash.update(data)
        self.size += len(data)
        return self._out.write(data)


def file_hash(f: Source, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """The hash Hashed computes, of a file read to its end, and its length."""
    h = blake3.blake3()
    n = 0
    while True:
        b = f.read(chunk)
        if not b:
            return h.digest(), n
        h.update(b)
        n += len(b)


def footer_matches(src: Source, chunk: int = 1 << 20) -> tuple[bool, int]:
    """Whether a whole pack file's bytes match the digest in its own footer (and
    its length): what a copy of a pack can be checked by when no hash was taken
    while it was written. Not a trust check: the signature is not looked at."""
    h = blake3.blake3()
    tail = b""
    n = 0
    while True:
        b = src.read(chunk)
        if not b:
            break
        n += len(b)
        tail += b
        if len(tail) > FOOTER_LEN:
            h.update(tail[:-FOOTER_LEN])
            tail = tail[-FOOTER_LEN:]
    ok = len(tail) == FOOTER_LEN and tail.endswith(END_MAGIC) and tail[:32] == h.digest()
    return ok, n


# --------------------------------------------------------------------------- reading


class Source(Protocol):
    """Where a pack is read from: a binary file, or anything with its read()."""

    def read(self, size: int = -1, /) -> bytes: ...


class _Stream:
    """Reads exactly n bytes or raises TruncatedPack; hashes what it reads."""

    def __init__(self, src: Source, where: str) -> None:
        self._src = src
        self._where = where
        self.hash = blake3.blake3()
        self.offset = 0

    def read(self, n: int, what: str, *, hashed: bool = True) -> bytes:
        parts = []
        got = 0
        while got < n:
            b = self._src.read(n - got)
            if not b:
                raise TruncatedPack(
                    f"{self._where}: pack is incomplete (ends at byte {self.offset + got} inside the "
                    f"{what}); was the stick pulled out while it was written?"
                )
            parts.append(b)
            got += len(b)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if hashed:
            self.hash.update(data)
        self.offset += n
        return data

    def read_extra(self) -> bool:
        """True if anything follows the footer (a pack must end there)."""
        return bool(self._src.read(1))


BaseLookup = Callable[[ObjectId], bytes | None]


class PackReader:
    """Streams a pack: ``header`` first, then ``records()``, which verifies the
    footer (digest and signature) after the last record. Callers must treat
    records as unconfirmed until ``records()`` finishes without raising."""

    def __init__(self, src: Source, where: str, trust: Callable[[Header], bytes]) -> None:
        """``trust`` returns the key that must have signed this pack, or raises UntrustedPack."""
        self._s = _Stream(src, where)
        self.where = where
        pre = self._s.read(PREAMBLE.size, "preamble")
        magic, version, flags, hlen = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise CorruptPack(f"{where}: not a Harmonic pack (bad magic)")
        if version not in SUPPORTED_VERSIONS:
            raise CorruptPack(f"{where}: pack format version {version} is not supported "
                              f"(this server reads {sorted(SUPPORTED_VERSIONS)})")
        if flags != 0:
            raise CorruptPack(f"{where}: pack needs features this server lacks (flags {flags:#x})")
        if hlen > MAX_HEADER:
            raise CorruptPack(f"{where}: header claims {hlen} bytes (limit {MAX_HEADER})")
        self.header = Header.decode(self._s.read(hlen, "header"), where)
        try:
            self.signer_key = trust(self.header)
        except PackError as exc:
            # Every refusal names the pack it refuses (the one line on stderr).
            if str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {exc}") from exc
        self.trailer: dict[str, Any] = {}
        self._dec = Decompressor()
        self.stored_bytes = 0

    @property
    def offset(self) -> int:
        return self._s.offset

    def records(self, base: BaseLookup, *, skip_unresolved: bool = False) -> Iterator[Record]:
        """Yield every record, verified against its id; finally check the footer.

        ``skip_unresolved``: a delta whose base this server lacks is passed over
        instead of refused (for a pack read only to confirm its signature, when
        nothing in it is needed any more: an old stick)."""
        frames = objects = raw_total = 0
        w = self.where
        while True:
            typ, raw_len, stored_len = FRAME_HEAD.unpack(self._s.read(FRAME_HEAD.size, "frame header"))
            if typ == F_END:
                if raw_len != 0 or stored_len > MAX_TRAILER:
                    raise CorruptPack(f"{w}: end frame is malformed")
                trailer = unpack_msg(self._s.read(stored_len, "trailer"), max_items=64, what=f"{w}: trailer")
                if not isinstance(trailer, dict):
                    raise CorruptPack(f"{w}: trailer is malformed")
                counts = (trailer.get("frames"), trailer.get("objects"), trailer.get("raw_bytes"))
                if counts != (frames, objects, raw_total):
                    raise CorruptPack(f"{w}: trailer counts do not match the frames read")
                self.trailer = trailer
                break
            if typ not in (F_ZSTD, F_STORED):
                raise CorruptPack(f"{w}: unknown frame type {typ} at byte {self._s.offset - FRAME_HEAD.size}")
            if raw_len > MAX_FRAME_RAW or stored_len > MAX_FRAME_STORED or raw_len == 0:
                raise CorruptPack(f"{w}: frame at byte {self._s.offset - FRAME_HEAD.size} claims {raw_len} bytes "
                                  f"(limit {MAX_FRAME_RAW})")
            if typ == F_STORED and stored_len != raw_len:
                raise CorruptPack(f"{w}: stored frame sizes disagree")
            stored = self._s.read(stored_len, "frame")
            where = f"{w}: frame {frames + 1}"
            raw = stored if typ == F_STORED else self._dec.decompress(stored, raw_len, what=where)
            frames += 1
            share = stored_len + FRAME_HEAD.size
            for rec in self._parse(raw, where, base, skip_unresolved):
                objects += 1
                raw_total += rec.stored_size
                if rec.kind != SKIPPED:
                    yield Record(rec.kind, rec.id, rec.data, share * len(rec.data) // max(raw_len, 1))
        footer = self._s.read(FOOTER_LEN, "footer", hashed=False)
        digest, sig, end = footer[:32], footer[32:96], footer[96:]
        if end != END_MAGIC:
            raise CorruptPack(f"{w}: footer is damaged (bad end marker)")
        if digest != self._s.hash.digest():
            raise CorruptPack(f"{w}: pack checksum does not match its content (damaged in transit or on the stick)")
        if not keys.verify(self.signer_key, keys.TAG_PACK, digest, sig):
            raise UntrustedPack(f"{w}: pack signature does not verify against {self.header.sender}'s key")
        if self._s.read_extra():
            raise CorruptPack(f"{w}: unexpected bytes after the end of the pack")

    def _parse(self, raw: bytes, where: str, base: BaseLookup, skip_unresolved: bool) -> Iterator[Record]:
        """Records of one frame; ``stored_size`` here carries the object's length
        (a skipped delta is yielded with empty data and its target length)."""
        mv = memoryview(raw)
        pos = 0
        end = len(raw)
        while pos < end:
            kind = raw[pos]
            if kind & DELTA_BIT:
                if pos + REC_DELTA.size > end:
                    raise CorruptPack(f"{where}: record header cut short")
                k, oid, bid, tlen, plen = REC_DELTA.unpack_from(raw, pos)
                kind = k & ~DELTA_BIT
                pos += REC_DELTA.size
                if kind not in KIND_NAMES or plen > end - pos or tlen > MAX_OBJECT:
                    raise CorruptPack(f"{where}: delta record for {short(oid)} is malformed")
                basedata = base(bid)
                if basedata is None and skip_unresolved:
                    pos += plen
                    yield Record(SKIPPED, oid, b"", tlen)
                    continue
                if basedata is None:
                    raise CorruptPack(f"{where}: delta for {short(oid)} needs {short(bid)}, "
                                      "which this server does not hold")
                data = delta_decompress(basedata, bytes(mv[pos:pos + plen]), tlen, what=f"{where}: delta {short(oid)}")
                pos += plen
            else:
                if pos + REC_PLAIN.size > end:
                    raise CorruptPack(f"{where}: record header cut short")
                kind, oid, n = REC_PLAIN.unpack_from(raw, pos)
                pos += REC_PLAIN.size
                if kind not in KIND_NAMES or n > end - pos or n > MAX_OBJECT:
                    raise CorruptPack(f"{where}: record for {short(oid)} is malformed")
                data = bytes(mv[pos:pos + n])
                pos += n
            if object_id(kind, data) != oid:
                raise CorruptPack(f"{where}: {KIND_NAMES[kind]} {short(oid)} does not match its id (damaged)")
            yield Record(kind, oid, data, len(data))


def new_pack_id() -> bytes:
    return os.urandom(16)


__all__ = [
    "BLOB", "ID_LEN", "Hashed", "Header", "PackReader", "PackWriter", "Record", "empty_size", "file_hash",
    "footer_matches",
    "new_pack_id",
]

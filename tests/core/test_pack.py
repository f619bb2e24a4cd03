"""Packs: what PackWriter writes, PackReader reads back identically, and any
damage is refused with a PackError subclass (RELIABILITY.md C1, C2, C7, C8)."""

from __future__ import annotations

import io
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core import keys
from harmonicd.core.codec import delta_compress, pack_msg
from harmonicd.core.objects import BLOB, RECIPE, T_BLOB, TREE, Entry, encode_recipe, encode_tree, object_id
from harmonicd.core.pack import (
    FOOTER_LEN,
    FRAME_HEAD,
    PREAMBLE,
    Header,
    PackReader,
    PackWriter,
)
from harmonicd.errors import CorruptPack, PackError, TruncatedPack, UntrustedPack
from tests.core.helpers import FAST, SENDER, SLOWER, STRANGER, header, read_pack, trust_only, write_pack

REFUSALS = (TruncatedPack, CorruptPack, UntrustedPack)


# --------------------------------------------------------------------------- strategies

payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 2000)),  # compressible
)


@st.composite
def pack_items(draw: Any) -> tuple[list[tuple[Any, ...]], dict[bytes, bytes], list[tuple[int, bytes, bytes]]]:
    """Items to write, the receiver's base objects, and the records the reader must yield."""
    bases: dict[bytes, bytes] = {}
    items: list[tuple[Any, ...]] = []
    expect: list[tuple[int, bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 8))):
        what = draw(st.sampled_from(["blob", "blob", "tree", "recipe", "delta", "flush"]))
        if what == "flush":
            items.append(("flush",))
            continue
        if what == "delta":
            base = draw(payloads)
            target = base + draw(st.binary(max_size=40)) if draw(st.booleans()) else draw(payloads)
            bid = object_id(BLOB, base)
            bases[bid] = base
            oid = object_id(BLOB, target)
            items.append(("delta", BLOB, oid, bid, len(target), delta_compress(base, target)))
            expect.append((BLOB, oid, target))
            continue
        if what == "tree":
            data = encode_tree([Entry(n, T_BLOB, 0, object_id(BLOB, n.encode()), len(n))
                                for n in draw(st.sets(st.sampled_from(["a", "b", "readme.txt", "z"])))])
            kind = TREE
        elif what == "recipe":
            data = encode_recipe([(object_id(BLOB, bytes([i])), i + 1) for i in range(draw(st.integers(2, 5)))])
            kind = RECIPE
        else:
            data = draw(payloads)
            kind = BLOB
        oid = object_id(kind, data)
        items.append(("plain", kind, oid, data))
        expect.append((kind, oid, data))
    return items, bases, expect


# --------------------------------------------------------------------------- round trip


@FAST
@given(pack_items(), st.booleans())
def test_round_trip(case: Any, last: bool) -> None:
    items, bases, expect = case
    hdr = header(releases=[(b"body", b"s" * 64)], acks=[{"collection": "stats", "seq": 1}],
                 have={"held": {}}, extra={"note": "x"})
    data, digest = write_pack(items, hdr=hdr, last=last)
    r, recs = read_pack(data, base=bases.get)
    assert [(x.kind, x.id, x.data) for x in recs] == expect
    assert r.header == hdr
    assert r.trailer == {"frames": r.trailer["frames"], "objects": len(expect),
                         "raw_bytes": sum(len(d) for _k, _i, d in expect), "last": last}
    # The footer: digest of everything before it, signed by the sender, then the end mark.
    assert data[-FOOTER_LEN:-FOOTER_LEN + 32] == digest
    sig = data[-FOOTER_LEN + 32:-8]
    assert keys.verify(SENDER.public, keys.TAG_PACK, digest, sig)
    assert r.offset == len(data)


@SLOWER
@given(pack_items())
def test_thread_pool_writes_the_same_bytes(case: Any) -> None:
    items, _bases, _expect = case
    plain, _ = write_pack(items)
    buf = io.BytesIO()
    with ThreadPoolExecutor(2) as pool:
        w = PackWriter(buf, SENDER, header(), pool, depth=2)
        for it in items:
            if it[0] == "plain":
                w.add(*it[1:])
            elif it[0] == "delta":
                w.add_delta(*it[1:])
            else:
                w.flush_frame()
        w.close(last=True)
    assert buf.getvalue() == plain


@SLOWER
@given(pack_items(), st.binary(max_size=3000))
def test_worst_case_size_never_undershoots(case: Any, extra: bytes) -> None:
    """Volumes are split on worst_case_size: the real size must never exceed it."""
    items, _bases, _expect = case
    buf = io.BytesIO()
    w = PackWriter(buf, SENDER, header())
    for it in items:
        if it[0] == "plain":
            w.add(*it[1:])
    bound = w.worst_case_size(len(extra) + 41)
    w.add(BLOB, object_id(BLOB, extra), extra)
    w.close(last=True)
    assert len(buf.getvalue()) <= bound


def test_big_objects_make_several_frames() -> None:
    big = [os.urandom(1 << 20) for _ in range(5)] + [b"\0" * (3 << 20)]
    items = [("plain", BLOB, object_id(BLOB, b), b) for b in big]
    data, _ = write_pack(items)
    r, recs = read_pack(data)
    assert [x.data for x in recs] == big
    assert r.trailer["frames"] >= 2


def test_delta_needs_its_base() -> None:
    base, target = b"0123456789" * 50, b"0123456789" * 50 + b"tail"
    bid, oid = object_id(BLOB, base), object_id(BLOB, target)
    data, _ = write_pack([("delta", BLOB, oid, bid, len(target), delta_compress(base, target))])
    with pytest.raises(CorruptPack, match="does not hold"):
        read_pack(data)
    with pytest.raises(CorruptPack):  # a different base: the patch does not give the target
        read_pack(data, base=lambda _b: b"9876543210" * 50)


def test_wrong_signer_and_untrusted_sender() -> None:
    data, _ = write_pack([("plain", BLOB, object_id(BLOB, b"x"), b"x")], key=STRANGER)
    # The header claims SENDER's key, the signature is STRANGER's.
    with pytest.raises(UntrustedPack, match="signature does not verify"):
        read_pack(data)
    # A header that names another key is refused before any frame is read.
    data, _ = write_pack([], key=STRANGER, hdr=header(sender_key=STRANGER.public))
    with pytest.raises(UntrustedPack):
        read_pack(data)


def test_object_that_does_not_match_its_id_is_refused() -> None:
    data, _ = write_pack([("plain", BLOB, object_id(BLOB, b"good"), b"evil")])
    with pytest.raises(CorruptPack, match="does not match its id"):
        read_pack(data)


def test_bytes_after_the_footer_are_refused() -> None:
    data, _ = write_pack([("plain", BLOB, object_id(BLOB, b"x"), b"x")])
    with pytest.raises(CorruptPack, match="after the end"):
        read_pack(data + b"\0")


# --------------------------------------------------------------------------- any damage is refused


def _sample_pack() -> tuple[bytes, dict[bytes, bytes], list[tuple[int, bytes, bytes]]]:
    """A small pack with every record type: a zstd frame, a stored frame, a delta."""
    rnd = random.Random(7)
    base = b"line of text\n" * 20
    target = base + b"one more line\n"
    noise = bytes(rnd.randrange(256) for _ in range(120))
    tree = encode_tree([Entry("a.txt", T_BLOB, 0, object_id(BLOB, b"a"), 1)])
    items: list[tuple[Any, ...]] = [
        ("plain", BLOB, object_id(BLOB, b"hello " * 30), b"hello " * 30),
        ("plain", TREE, object_id(TREE, tree), tree),
        ("flush",),
        ("plain", BLOB, object_id(BLOB, noise), noise),
        ("flush",),
        ("delta", BLOB, object_id(BLOB, target), object_id(BLOB, base), len(target), delta_compress(base, target)),
    ]
    data, _ = write_pack(items)
    expect = [(BLOB, object_id(BLOB, b"hello " * 30), b"hello " * 30), (TREE, object_id(TREE, tree), tree),
              (BLOB, object_id(BLOB, noise), noise), (BLOB, object_id(BLOB, target), target)]
    return data, {object_id(BLOB, base): base}, expect


SAMPLE, SAMPLE_BASES, SAMPLE_EXPECT = _sample_pack()


def outcome(data: bytes) -> tuple[str, Any]:
    """('ok', records) or ('refused', exception); anything else propagates and fails the test."""
    try:
        _r, recs = read_pack(data, base=SAMPLE_BASES.get)
    except PackError as exc:
        refused: PackError = exc
    else:
        return "ok", [(x.kind, x.id, x.data) for x in recs]
    assert type(refused) in REFUSALS, f"unexpected refusal type {type(refused).__name__}: {refused}"
    assert str(refused).startswith("test.hpk"), f"message does not name the pack: {refused}"
    return "refused", refused


def test_sample_pack_is_valid() -> None:
    assert outcome(SAMPLE) == ("ok", SAMPLE_EXPECT)


def frame_boundaries(data: bytes) -> list[int]:
    """Offsets where the framing changes: after the preamble and header, before and
    after each frame head, the trailer and each part of the footer."""
    out = [0, PREAMBLE.size]
    hlen = PREAMBLE.unpack_from(data)[3]
    pos = PREAMBLE.size + hlen
    while True:
        out.append(pos)
        typ, _raw, stored = FRAME_HEAD.unpack_from(data, pos)
        out.append(pos + FRAME_HEAD.size)
        pos += FRAME_HEAD.size + stored
        if typ == 0xFF:
            break
    out += [pos, pos + 32, pos + 96, len(data)]
    return out


def test_boundaries_parse_the_sample() -> None:
    b = frame_boundaries(SAMPLE)
    assert b[-1] == len(SAMPLE)
    assert b[-4] == len(SAMPLE) - FOOTER_LEN
    assert len(b) >= 12  # preamble, header, 3 frames, end frame, footer


def test_every_truncation_is_an_incomplete_pack() -> None:
    for cut in range(len(SAMPLE)):
        kind, exc = outcome(SAMPLE[:cut])
        assert kind == "refused", cut
        assert isinstance(exc, TruncatedPack), (cut, exc)
        assert "incomplete" in str(exc)


def test_every_bit_flip_is_refused() -> None:
    for pos in range(len(SAMPLE)):
        for bit in range(8):
            d = bytearray(SAMPLE)
            d[pos] ^= 1 << bit
            kind, val = outcome(bytes(d))
            assert kind == "refused" or val == SAMPLE_EXPECT, (pos, bit)


def test_every_inserted_or_deleted_byte_is_refused() -> None:
    for pos in range(len(SAMPLE) + 1):
        for ins in (b"\0", b"\xff", SAMPLE[pos:pos + 1] or b"x"):
            kind, val = outcome(SAMPLE[:pos] + ins + SAMPLE[pos:])
            assert kind == "refused" or val == SAMPLE_EXPECT, ("insert", pos, ins)
        if pos < len(SAMPLE):
            kind, val = outcome(SAMPLE[:pos] + SAMPLE[pos + 1:])
            assert kind == "refused" or val == SAMPLE_EXPECT, ("delete", pos)


@FAST
@given(st.data())
def test_any_mutation_is_refused_or_decodes_identically(data: st.DataObject) -> None:
    d = bytearray(SAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        pos = data.draw(st.integers(0, max(len(d) - 1, 0)))
        if op == "flip" and d:
            d[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and d:
            d[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del d[pos:]
        elif op == "insert":
            d[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del d[pos:pos + data.draw(st.integers(1, 16))]
        elif op == "dup":
            d[pos:pos] = d[pos:pos + data.draw(st.integers(1, 64))]
    kind, val = outcome(bytes(d))
    assert kind == "refused" or val == SAMPLE_EXPECT


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_are_refused(blob: bytes) -> None:
    from harmonicd.core.pack import MAGIC
    for candidate in (blob, MAGIC + blob, SAMPLE[:PREAMBLE.size] + blob):
        kind, _ = outcome(candidate)
        assert kind == "refused"


def test_resigned_damage_is_still_refused() -> None:
    """Damage made by someone holding the key (so the footer verifies) is caught by
    the per-object hash, the frame limits and the trailer counts."""
    items = [("plain", BLOB, object_id(BLOB, b"good"), b"evil")]
    data, _ = write_pack(items)
    with pytest.raises(CorruptPack):
        read_pack(data)
    # A trailer whose counts lie.
    buf = io.BytesIO()
    w = PackWriter(buf, SENDER, header())
    w.add(BLOB, object_id(BLOB, b"x"), b"x")
    w.objects += 1
    w.close(last=True)
    with pytest.raises(CorruptPack, match="trailer counts"):
        read_pack(buf.getvalue())


def test_header_is_checked_before_trust() -> None:
    seen: list[Header] = []

    def trust(h: Header) -> bytes:
        seen.append(h)
        return SENDER.public

    bad = pack_msg({"v": 1, "pack": b"short"})
    from harmonicd.core.pack import MAGIC, VERSION
    data = PREAMBLE.pack(MAGIC, VERSION, 0, len(bad)) + bad
    with pytest.raises(CorruptPack, match="header"):
        PackReader(io.BytesIO(data), "test.hpk", trust)
    assert not seen
    with pytest.raises(CorruptPack, match="claims"):
        PackReader(io.BytesIO(PREAMBLE.pack(MAGIC, VERSION, 0, 1 << 30)), "test.hpk", trust)
    with pytest.raises(CorruptPack, match="version"):
        PackReader(io.BytesIO(PREAMBLE.pack(MAGIC, 9, 0, 0)), "test.hpk", trust)
    with pytest.raises(CorruptPack, match="flags"):
        PackReader(io.BytesIO(PREAMBLE.pack(MAGIC, VERSION, 1, 0)), "test.hpk", trust)
    with pytest.raises(CorruptPack, match="magic"):
        PackReader(io.BytesIO(PREAMBLE.pack(b"NOTAPACK", VERSION, 0, 0)), "test.hpk", trust)


def test_trust_callback_decides_the_key() -> None:
    data, _ = write_pack([("plain", BLOB, object_id(BLOB, b"x"), b"x")])
    with pytest.raises(UntrustedPack):
        PackReader(io.BytesIO(data), "p", trust_only(STRANGER.public))


# --------------------------------------------------------------------------- signed but hostile framing


def _rec(kind: int, oid: bytes, data: bytes) -> bytes:
    from harmonicd.core.pack import REC_PLAIN
    return REC_PLAIN.pack(kind, oid, len(data)) + data


def _zstd_claiming(size: int) -> bytes:
    import struct
    return b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", size) + b"\x09\x00\x00x"


def _streamed(data: bytes, window_log: int) -> bytes:
    import zstandard
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return c.compress(data) + c.flush()


def _hostile_frames() -> dict[str, tuple[list[tuple[int, int, bytes]], Any, str]]:
    from harmonicd.core.pack import DELTA_BIT, F_STORED, F_ZSTD, MAX_FRAME_RAW, REC_DELTA
    good = _rec(BLOB, object_id(BLOB, b"x"), b"x")
    delta_head = REC_DELTA.pack(BLOB | DELTA_BIT, object_id(BLOB, b"x"), object_id(BLOB, b"y"), 0xFFFFFFFF, 4)
    return {
        "zstd frame declaring 2^40 bytes": ([(F_ZSTD, len(good), _zstd_claiming(1 << 40))], None, "declares"),
        "zstd window of 128 MiB": ([(F_ZSTD, len(good), _streamed(good, 27))], None, "window"),
        "zstd frame expanding past raw_len": ([(F_ZSTD, 10, _streamed(good * 100, 20))], None, "damaged"),
        "zstd frame with trailing data": ([(F_ZSTD, len(good), _streamed(good, 20) + b"junk")], None, "damaged"),
        "frame claiming more than the limit": ([(F_STORED, MAX_FRAME_RAW + 1, b"")], None, "claims"),
        "empty frame": ([(F_STORED, 0, b"")], None, "claims"),
        "stored sizes disagree": ([(F_STORED, 5, good)], None, "disagree"),
        "unknown frame type": ([(7, len(good), good)], None, "unknown frame type"),
        "record longer than its frame": ([(F_STORED, len(good) - 1, good[:-1])], None, "malformed"),
        "record header cut short": ([(F_STORED, 10, good[:10])], None, "cut short"),
        "unknown record kind": ([(F_STORED, len(good), bytes([9]) + good[1:])], None, "malformed"),
        "delta claiming 4 GiB": ([(F_STORED, len(delta_head) + 4, delta_head + b"abcd")], None, "malformed"),
        "trailer that lies": ([(F_STORED, len(good), good)], {"frames": 1, "objects": 2, "raw_bytes": 1},
                              "trailer counts"),
        "trailer that is a list": ([], [1, 2], "trailer is malformed"),
        "trailer nested deep": ([], b"\x91" * 10_000 + b"\xc0", "malformed msgpack"),
        "trailer with trailing bytes": ([], pack_msg({"frames": 0, "objects": 0, "raw_bytes": 0}) + b"x",
                                        "trailing bytes"),
    }


HOSTILE_FRAMES = _hostile_frames()


@pytest.mark.parametrize("case", list(HOSTILE_FRAMES))
def test_signed_pack_with_hostile_frames_is_refused(case: str) -> None:
    from tests.core.helpers import raw_pack
    frames, trailer, why = HOSTILE_FRAMES[case]
    data = raw_pack(SENDER, header(), frames, trailer=trailer, objects=len(frames), raw_bytes=len(frames))
    with pytest.raises(CorruptPack, match=why):
        read_pack(data)


@pytest.mark.parametrize(("head", "why"), [
    ((1, 10, (16 << 20) + (64 << 10) + 4096 + 1), "claims"),  # stored length over the limit
    ((0xFF, 0, (64 << 10) + 1), "end frame is malformed"),  # trailer over its limit
    ((0xFF, 1, 3), "end frame is malformed"),
])
def test_lengths_are_checked_before_reading(head: tuple[int, int, int], why: str) -> None:
    """Nothing follows the frame head: a length over the limit is refused before any read."""
    data = SAMPLE[:frame_boundaries(SAMPLE)[2]] + FRAME_HEAD.pack(*head)
    with pytest.raises(CorruptPack, match=why):
        read_pack(data)

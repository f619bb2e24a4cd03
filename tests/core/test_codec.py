"""Bounds of the only zstd and msgpack decoders (RELIABILITY.md §5.1, §5.2, C3, C4).

Every hostile input must raise CorruptPack, before a large allocation: the
memory-sensitive cases run in a child process with RLIMIT_AS set."""

from __future__ import annotations

import json
import struct

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core.codec import (
    MAX_WINDOW,
    Compressor,
    Decompressor,
    delta_compress,
    delta_decompress,
    pack_msg,
    unpack_msg,
)
from harmonicd.errors import CorruptPack
from tests.core.helpers import FAST, run_limited

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LAST_RAW_BLOCK_1 = b"\x09\x00\x00x"  # last block, raw, 1 byte: "x"


def frame_claiming(size: int, *, single_segment: bool) -> bytes:
    """A tiny zstd frame whose header declares `size` bytes of content."""
    if single_segment:
        return ZSTD_MAGIC + b"\xe0" + struct.pack("<Q", size) + LAST_RAW_BLOCK_1
    # FCS field of 8 bytes, a window descriptor of 1 KiB.
    return ZSTD_MAGIC + b"\xc0" + b"\x00" + struct.pack("<Q", size) + LAST_RAW_BLOCK_1


def streamed(data: bytes, *, window_log: int | None = None, level: int = 3) -> bytes:
    """A frame made by streaming compression: no content size in its header."""
    if window_log is None:
        c = zstandard.ZstdCompressor(level=level).compressobj()
    else:
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log)
        c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return c.compress(data) + c.flush()


# --------------------------------------------------------------------------- zstd


def test_round_trip() -> None:
    data = b"some text " * 1000
    assert Decompressor().decompress(Compressor().compress(data), len(data)) == data
    assert Decompressor().decompress(streamed(data), len(data)) == data


@pytest.mark.parametrize("single_segment", [True, False])
def test_frame_claiming_2_to_the_40_is_refused(single_segment: bool) -> None:
    frame = frame_claiming(1 << 40, single_segment=single_segment)
    assert zstandard.get_frame_parameters(frame).content_size == 1 << 40
    with pytest.raises(CorruptPack, match="declares"):
        Decompressor().decompress(frame, 1000)
    with pytest.raises(CorruptPack, match="declares"):
        delta_decompress(b"base", frame, 1000, what="delta")


def test_frame_that_declares_less_or_more_than_expected_is_refused() -> None:
    data = b"abc" * 100
    with pytest.raises(CorruptPack, match="declares"):
        Decompressor().decompress(Compressor().compress(data), len(data) + 1)
    with pytest.raises(CorruptPack, match="declares"):
        Decompressor().decompress(Compressor().compress(data), len(data) - 1)


def test_streamed_frame_that_expands_to_less_is_refused() -> None:
    data = b"abc" * 100
    with pytest.raises(CorruptPack, match="expands to"):
        Decompressor().decompress(streamed(data), len(data) + 10)


def test_bomb_is_refused() -> None:
    """1 GiB of zeros compressed in streaming mode (about 32 KiB), expected small."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    zero = bytes(1 << 20)
    bomb = b"".join(c.compress(zero) for _ in range(1024)) + c.flush()
    assert len(bomb) < 64 << 10
    with pytest.raises(CorruptPack):
        Decompressor().decompress(bomb, 4096)
    with pytest.raises(CorruptPack):
        delta_decompress(b"\0" * 100, bomb, 4096, what="delta")


BOUNDED_BOMB = """
    import resource, json, io
    import zstandard
    from harmonicd.core.codec import Decompressor, delta_decompress
    from harmonicd.errors import CorruptPack
    c = zstandard.ZstdCompressor(level=3).compressobj()
    zero = bytes(1 << 20)
    bomb = b"".join(c.compress(zero) for _ in range(1024)) + c.flush()
    results = []
    for fn in (lambda: Decompressor().decompress(bomb, 1 << 20),
               lambda: Decompressor().decompress(bomb, 16 << 20),
               lambda: delta_decompress(b"x" * 64, bomb, 16 << 20, what="delta")):
        try:
            fn()
            results.append("accepted")
        except CorruptPack:
            results.append("refused")
    # And inside a pack: a frame whose stored bytes are the bomb.
    from harmonicd.core.pack import FRAME_HEAD, F_ZSTD, MAX_FRAME_RAW
    from tests.core.helpers import header, read_pack, SENDER
    from tests.core.helpers import raw_pack
    import struct
    claim = b"\\x28\\xb5\\x2f\\xfd\\xe0" + struct.pack("<Q", 1 << 40) + b"\\x09\\x00\\x00x"
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    wide = c.compress(b"abc" * 1000) + c.flush()
    for frame in (bomb, claim, wide):
        data = raw_pack(SENDER, header(), [(F_ZSTD, MAX_FRAME_RAW, frame)])
        try:
            read_pack(data)
            results.append("accepted")
        except CorruptPack:
            results.append("refused")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"results": results, "peak": peak}))
"""


def test_bomb_is_refused_in_bounded_memory() -> None:
    p = run_limited(BOUNDED_BOMB, mem_bytes=1 << 30)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["results"] == ["refused"] * 6
    assert out["peak"] < 256 << 20, f"peak RSS {out['peak']} bytes"


@pytest.mark.parametrize("window_log", [25, 27])
def test_window_over_the_limit_is_refused(window_log: int) -> None:
    frame = streamed(b"abc" * 1000, window_log=window_log)
    assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log > MAX_WINDOW
    with pytest.raises(CorruptPack, match="window"):
        Decompressor().decompress(frame, 3000)
    with pytest.raises(CorruptPack, match="window"):
        delta_decompress(b"abc", frame, 3000, what="delta")


def test_window_at_the_limit_is_accepted() -> None:
    frame = streamed(b"abc" * 1000, window_log=MAX_WINDOW.bit_length() - 1)
    assert Decompressor().decompress(frame, 3000) == b"abc" * 1000


def test_trailing_data_is_refused() -> None:
    data = b"hello world " * 20
    one = Compressor().compress(data)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"junk"
    for tail in (b"x", b"\0" * 16, one, skippable, ZSTD_MAGIC):
        with pytest.raises(CorruptPack):
            Decompressor().decompress(one + tail, len(data))
    patch = delta_compress(data, data + b"!")
    with pytest.raises(CorruptPack):
        delta_decompress(data, patch + b"x", len(data) + 1, what="delta")


def test_damaged_frame_is_refused() -> None:
    data = bytes(range(256)) * 40
    frame = Compressor().compress(data)
    for pos in range(len(ZSTD_MAGIC), len(frame), max(1, len(frame) // 50)):
        bad = bytearray(frame)
        bad[pos] ^= 0x40
        try:
            out = Decompressor().decompress(bytes(bad), len(data))
        except CorruptPack:
            continue
        assert out == data  # (a flip the content checksum cannot see must not change the output)


@pytest.mark.parametrize("junk", [b"", b"x", b"not zstd at all", ZSTD_MAGIC, ZSTD_MAGIC + b"\xff" * 8])
def test_not_a_frame(junk: bytes) -> None:
    with pytest.raises(CorruptPack):
        Decompressor().decompress(junk, 10)
    with pytest.raises(CorruptPack):
        delta_decompress(b"base", junk, 10, what="delta")


def test_delta_round_trip_and_wrong_base() -> None:
    base = b"The quick brown fox jumps over the lazy dog. " * 100
    target = base.replace(b"lazy", b"busy")
    patch = delta_compress(base, target)
    assert len(patch) < len(Compressor().compress(target))
    assert delta_decompress(base, patch, len(target), what="d") == target
    try:
        out = delta_decompress(b"another base entirely " * 100, patch, len(target), what="d")
    except CorruptPack:
        return
    assert out != target  # the caller's id check refuses it


@FAST
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_any_bytes_decompress_or_corrupt(junk: bytes, size: int) -> None:
    for candidate in (junk, ZSTD_MAGIC + junk):
        try:
            out = Decompressor().decompress(candidate, size)
        except CorruptPack:
            continue
        assert len(out) == size


# --------------------------------------------------------------------------- msgpack


HOSTILE_MSGPACK = {
    "array32 header claiming 2^32-1 items": b"\xdd\xff\xff\xff\xff",
    "array32 header claiming 2^32-1 items, some given": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 1000,
    "map32 header claiming 2^32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "array16 header over max_items": b"\xdc\xff\xff" + b"\xc0" * 0xFFFF,
    "str32 header claiming 4 GiB": b"\xdb\xff\xff\xff\xff",
    "bin32 header claiming 4 GiB": b"\xc6\xff\xff\xff\xff",
    "ext32 header claiming 4 GiB": b"\xc9\xff\xff\xff\xff\x05",
    "arrays nested 10,000 deep": b"\x91" * 10_000 + b"\xc0",
    "maps nested 10,000 deep": b"\x81\xa1k" * 10_000 + b"\xc0",
    "int map key": b"\x81\x01\x02",
    "array (tuple) map key": b"\x81\x92\x01\x02\x03",
    "nil map key": b"\x81\xc0\x01",
    "fixext1 of type 5": b"\xd4\x05\x00",
    "ext8 of type -1 (timestamp)": b"\xc7\x04\xff\x00\x00\x00\x00",
    "empty ext8": b"\xc7\x00\x05",
    "invalid UTF-8": b"\xa2\xff\xfe",
    "UTF-8 surrogate": b"\xa3\xed\xa0\x80",
    "overlong UTF-8": b"\xa2\xc0\xaf",
    "trailing bytes": b"\xc0\xc0",
    "trailing bytes after a map": b"\x80\x00",
    "reserved byte 0xc1": b"\xc1",
    "empty input": b"",
    "cut short": b"\x92\x01",
}


@pytest.mark.parametrize("raw", list(HOSTILE_MSGPACK.values()), ids=list(HOSTILE_MSGPACK))
def test_hostile_msgpack_is_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptPack):
        unpack_msg(raw, max_items=1000)


def test_names_the_record() -> None:
    with pytest.raises(CorruptPack, match=r"^pack\.hpk: header"):
        unpack_msg(b"\xc1", what="pack.hpk: header")


def test_limits_follow_max_items() -> None:
    assert unpack_msg(pack_msg(list(range(100))), max_items=100) == list(range(100))
    with pytest.raises(CorruptPack):
        unpack_msg(pack_msg(list(range(101))), max_items=100)
    with pytest.raises(CorruptPack):
        unpack_msg(pack_msg({str(i): i for i in range(101)}), max_items=100)


def test_canonical_round_trip() -> None:
    v = {"s": "text", "b": b"\0\1", "i": [1, -1, 1 << 62], "n": None, "t": True, "m": {"x": [[], {}]}}
    assert unpack_msg(pack_msg(v)) == v
    assert isinstance(unpack_msg(pack_msg(b"x")), bytes)
    assert isinstance(unpack_msg(pack_msg("x")), str)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_unpack_or_corrupt(raw: bytes) -> None:
    try:
        unpack_msg(raw, max_items=64)
    except CorruptPack:
        pass


def _nested_empty(outer: int, inner: int, item: bytes) -> bytes:
    one = b"\xdd" + struct.pack(">I", inner) + item * inner
    return b"\xdd" + struct.pack(">I", outer) + one * outer


BOUNDED_MSGPACK = """
    import json, resource, struct, sys
    from harmonicd.core.codec import unpack_msg
    from harmonicd.core.pack import MAX_HEADER, MAX_TRAILER
    from harmonicd.core.objects import MAX_OBJECT, MAX_TREE_ENTRIES
    from harmonicd.errors import CorruptPack
    kind = sys.argv[1] if len(sys.argv) > 1 else ""

    def nested(total, item, per):
        n = (total - 5) // (5 + per * len(item))
        one = b"\\xdd" + struct.pack(">I", per) + item * per
        return b"\\xdd" + struct.pack(">I", n) + one * n

    results = {}
    cases = {
        # The largest header a pack may have, made of the cheapest objects
        # that cost the most memory: empty arrays, empty maps, short strings.
        "header of empty arrays": (nested(MAX_HEADER, b"\\x90", 1_000_000), 1_000_000),
        "header of empty maps": (nested(MAX_HEADER, b"\\x80", 1_000_000), 1_000_000),
        "header of 2-char strings": (nested(MAX_HEADER, b"\\xa2ab", 1_000_000), 1_000_000),
        "header of bin": (nested(MAX_HEADER, b"\\xc4\\x01x", 1_000_000), 1_000_000),
        "tree of empty arrays": (nested(MAX_OBJECT, b"\\x90", MAX_TREE_ENTRIES), MAX_TREE_ENTRIES),
        "header array of 50M claimed": (b"\\xdd\\x02\\xfa\\xf0\\x80" + b"\\xc0" * (MAX_HEADER - 5), 1_000_000),
    }
    for name, (data, max_items) in cases.items():
        try:
            unpack_msg(data, max_items=max_items)
            results[name] = "accepted"
        except CorruptPack:
            results[name] = "refused"
        except MemoryError:
            results[name] = "MemoryError"
        del data
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"results": results, "peak": peak}))
"""


def test_msgpack_memory_is_bounded() -> None:
    """The largest records a pack may hold, built to cost the most memory when
    decoded, are refused (or decoded) within a 1 GiB address space.

    Each empty array costs about 72 bytes for 1 byte of input: a 16 MiB header
    of them needed about 1.1 GiB before unpack_msg counted containers."""
    p = run_limited(BOUNDED_MSGPACK, mem_bytes=1 << 30, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert "MemoryError" not in out["results"].values(), out
    assert out["results"]["header of empty arrays"] == "refused"
    assert out["results"]["header of empty maps"] == "refused"
    assert out["results"]["tree of empty arrays"] == "refused"
    assert out["peak"] < 768 << 20, out


def test_msgpack_library_is_the_one_checked() -> None:
    """RELIABILITY.md §5.2 was checked against msgpack 1.x; the limits rely on it."""
    assert msgpack.version >= (1, 0, 8)

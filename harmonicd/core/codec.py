"""The only place msgpack and zstandard are used, with fixed, bounded options.

Everything read from a pack or a peer is hostile until verified: every
decoder here takes an explicit size limit and refuses, with ``CorruptPack``,
anything that would exceed it *before* allocating for it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import zstandard

from harmonicd.errors import CorruptPack

# Window cap for decompression. Our writer compresses frames of at most
# MAX_FRAME_RAW bytes one-shot, so the window never needs to be larger.
MAX_WINDOW = 16 << 20
ZSTD_LEVEL = 3


def pack_msg(obj: Any) -> bytes:
    """Canonical msgpack: bin for bytes, str for text, no extension types."""
    out: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=False)
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise CorruptPack(f"unknown msgpack extension type {code}")


def unpack_msg(data: bytes, *, max_items: int = 1_000_000, what: str = "record") -> Any:
    """Decode one msgpack value from untrusted bytes, bounded in every dimension.

    ``max_items`` bounds each array's and map's length *and* the number of
    arrays and maps in all: an empty array is one byte of input but some 70
    bytes of memory, so 16 MiB of them would otherwise take over 1 GiB.
    """
    containers = 0

    def count(value: Any) -> Any:
        nonlocal containers
        containers += 1
        if containers > max_items + 1:
            raise CorruptPack(f"{what}: more than {max_items} nested arrays or maps")
        return value

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=min(len(data), 1 << 20),
            max_bin_len=len(data),
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
            ext_hook=_no_ext,
            list_hook=count,
            object_hook=count,
        )
    except CorruptPack:
        raise
    except msgpack.ExtraData as exc:
        raise CorruptPack(f"{what}: trailing bytes after the msgpack value") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # StackError (deep nesting) and FormatError are UnpackException subclasses.
        raise CorruptPack(f"{what}: malformed msgpack ({type(exc).__name__}: {exc})") from exc


class Compressor:
    """zstd level 3 with checksums; one instance per thread (zstd contexts are not shared)."""

    def __init__(self, level: int = ZSTD_LEVEL, threads: int = 0) -> None:
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._c.compress(data)


class Decompressor:
    """Bounded one-shot zstd decoding of a single frame with a known size."""

    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)

    def decompress(self, data: bytes, expected_size: int, *, what: str = "frame") -> bytes:
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise CorruptPack(f"{what}: not a zstd frame ({exc})") from exc
        declared = params.content_size
        # The one-shot API allocates what the frame header declares, so a
        # tiny frame could ask for terabytes: check the claim first.
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, expected_size):
            raise CorruptPack(
                f"{what}: zstd frame declares {declared} bytes, the pack says {expected_size}"
            )
        if params.window_size > MAX_WINDOW:
            raise CorruptPack(f"{what}: zstd window of {params.window_size} bytes is over the limit")
        try:
            out = self._d.decompress(data, max_output_size=expected_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CorruptPack(f"{what}: zstd data is damaged ({exc})") from exc
        if len(out) != expected_size:
            raise CorruptPack(f"{what}: expands to {len(out)} bytes, the pack says {expected_size}")
        return out


def raw_dict(base: bytes) -> zstandard.ZstdCompressionDict:
    """A raw-content dictionary: zstd's "patch-from" delta against an old version."""
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def delta_compress(base: bytes, target: bytes, level: int = ZSTD_LEVEL) -> bytes:
    c = zstandard.ZstdCompressor(level=level, dict_data=raw_dict(base), write_checksum=True,
                                 write_dict_id=False)
    return c.compress(target)


def delta_decompress(base: bytes, patch: bytes, expected_size: int, *, what: str) -> bytes:
    try:
        params = zstandard.get_frame_parameters(patch)
    except zstandard.ZstdError as exc:
        raise CorruptPack(f"{what}: not a zstd frame ({exc})") from exc
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, expected_size):
        raise CorruptPack(f"{what}: delta declares {params.content_size} bytes, expected {expected_size}")
    if params.window_size > MAX_WINDOW:
        raise CorruptPack(f"{what}: zstd window of {params.window_size} bytes is over the limit")
    d = zstandard.ZstdDecompressor(dict_data=raw_dict(base), max_window_size=MAX_WINDOW)
    try:
        out = d.decompress(patch, max_output_size=expected_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptPack(f"{what}: delta is damaged ({exc})") from exc
    if len(out) != expected_size:
        raise CorruptPack(f"{what}: delta expands to {len(out)} bytes, expected {expected_size}")
    return out

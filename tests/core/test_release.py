"""Signed releases, keys and the other object encodings."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core import keys, release
from harmonicd.core.codec import pack_msg
from harmonicd.core.objects import (
    BLOB,
    RECIPE,
    TREE,
    check_object,
    decode_recipe,
    encode_recipe,
    object_id,
    parse_hexid,
)
from harmonicd.errors import BadSignature, CorruptPack
from tests.core.helpers import FAST, SENDER, STRANGER

REL = release.Release(collection="content", owner="master-1", seq=3, root=object_id(TREE, b"\x90"),
                      created=1_800_000_000, size=1234, files=5)


def test_sign_verify_decode() -> None:
    sr = release.sign(REL, SENDER)
    sr.verify(SENDER.public)
    back = release.decode(sr.body, sr.signature)
    assert back.release == REL
    back.verify(SENDER.public)


def test_wrong_key_is_refused() -> None:
    sr = release.sign(REL, SENDER)
    with pytest.raises(BadSignature, match="master-1/content release 3"):
        sr.verify(STRANGER.public)
    with pytest.raises(BadSignature):
        release.sign(REL, STRANGER).verify(SENDER.public)


@pytest.mark.parametrize("change", [
    {"seq": 4}, {"root": object_id(TREE, b"\x91\xc0")}, {"collection": "stats"}, {"owner": "master-2"},
    {"target": "school-1"}, {"size": 1}, {"files": 6}, {"created": 1},
])
def test_modified_body_is_refused(change: dict[str, object]) -> None:
    sr = release.sign(REL, SENDER)
    other = dataclasses.replace(REL, **change)  # type: ignore[arg-type]
    forged = release.decode(other.encode(), sr.signature)
    with pytest.raises(BadSignature):
        forged.verify(SENDER.public)


@FAST
@given(st.data())
def test_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    sr = release.sign(REL, SENDER)
    body, sig = bytearray(sr.body), bytearray(sr.signature)
    target = data.draw(st.sampled_from([body, sig]))
    pos = data.draw(st.integers(0, len(target) - 1))
    target[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        parsed = release.decode(bytes(body), bytes(sig))
    except CorruptPack:
        return
    with pytest.raises(BadSignature):
        parsed.verify(SENDER.public)


def test_signature_is_domain_separated() -> None:
    """A release signature cannot pass as a pack signature, and back."""
    sr = release.sign(REL, SENDER)
    assert not keys.verify(SENDER.public, keys.TAG_PACK, sr.body, sr.signature)
    pack_sig = SENDER.sign(keys.TAG_PACK, sr.body)
    with pytest.raises(BadSignature):
        release.SignedRelease(REL, sr.body, pack_sig).verify(SENDER.public)


def _body(**over: object) -> bytes:
    d: dict[str, object] = {"v": 1, "collection": "content", "owner": "master-1", "seq": 3, "root": bytes(32),
                            "created": 0, "size": 0, "files": 0, "for": None}
    d.update(over)
    return pack_msg({k: v for k, v in d.items() if v is not ...})


@pytest.mark.parametrize("body", [
    _body(v=2), _body(seq=0), _body(seq=-1), _body(seq=1 << 63), _body(seq=True), _body(seq="3"),
    _body(root=bytes(31)), _body(root="00" * 32), _body(collection="Content"), _body(collection="../x"),
    _body(collection=""), _body(owner="Master"), _body(owner="a/b"), _body(owner=...), _body(**{"for": 5}),
    _body(**{"for": "../school"}), _body(size=1.5), _body(files=None), b"\xc1", pack_msg([1, 2]),
    _body(extra="x" * 5000),
])
def test_decode_refuses_malformed_records(body: bytes) -> None:
    with pytest.raises(CorruptPack):
        release.decode(body, b"s" * 64)


def test_decode_refuses_bad_signature_fields() -> None:
    for sig in (b"", b"s" * 63, b"s" * 65):
        with pytest.raises(CorruptPack):
            release.decode(_body(), sig)


def test_keys() -> None:
    k = keys.SigningKey(bytes(32))
    assert keys.SigningKey(k.seed()).public == k.public
    text = keys.format_key(k.public)
    assert keys.parse_key(text) == k.public
    assert keys.parse_key(f"  {text}\n") == k.public
    for bad in ("", k.public.hex(), "ed25519:zz", "ed25519:" + "00" * 31, "rsa:" + "00" * 32):
        with pytest.raises(ValueError, match="key"):
            keys.parse_key(bad)
    assert not keys.verify(k.public[:31], keys.TAG_PACK, b"m", k.sign(keys.TAG_PACK, b"m"))
    assert not keys.verify(k.public, keys.TAG_PACK, b"m", b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        keys.SigningKey(b"short")


def test_object_ids_depend_on_kind() -> None:
    assert object_id(BLOB, b"x") != object_id(TREE, b"x")
    assert parse_hexid(object_id(BLOB, b"x").hex()) == object_id(BLOB, b"x")
    for bad in ("zz", "00" * 31):
        with pytest.raises(ValueError, match="object id"):
            parse_hexid(bad)


def test_recipes() -> None:
    chunks = [(object_id(BLOB, b"a"), 1), (object_id(BLOB, b"bb"), 2)]
    assert decode_recipe(encode_recipe(chunks)) == chunks
    for bad in (b"", encode_recipe(chunks[:1]), encode_recipe(chunks) + b"x",
                encode_recipe([(bytes(32), 0), (bytes(32), 1)]),
                encode_recipe([(bytes(32), (16 << 20) + 1), (bytes(32), 1)])):
        with pytest.raises(CorruptPack):
            decode_recipe(bad)
        with pytest.raises(CorruptPack):
            check_object(RECIPE, bad)
    with pytest.raises(CorruptPack):
        check_object(9, b"")
    check_object(BLOB, b"anything")

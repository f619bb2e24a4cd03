"""Bootstrap bundles, enrollment proofs and revocation lists (core/bundle.py), as hostile input."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from harmonicd.core import bundle, keys, trust
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.errors import BundleError, CorruptPack, UntrustedPack

MASTER = "master-1"


def seeded(n: int) -> keys.SigningKey:
    return keys.SigningKey(bytes([n]) * 32)


ANCHOR = seeded(1)


def school_bundle(**changes: object) -> bundle.Bundle:
    b = bundle.Bundle(master=MASTER, anchor=ANCHOR.public, chain=[], upstream=["https://master.example.org"],
                      school="school-042", prefix=None, count=1, collections=["content"], seqs={},
                      token_id=b"\x01" * 16, token=b"\x02" * 32, created=1_800_000_000,
                      expires=1_800_000_000 + 30 * 86400)
    return dataclasses.replace(b, **changes)  # type: ignore[arg-type]


def read(data: bytes) -> bundle.Bundle:
    b, body, sig = bundle.decode(data, "b.hbundle")
    bundle.verify(b, body, sig, "b.hbundle")
    return b


def test_round_trip_school_and_region() -> None:
    b = school_bundle()
    assert read(bundle.encode(b, ANCHOR)) == b
    region = school_bundle(school=None, prefix="north-", count=40)
    got = read(bundle.encode(region, ANCHOR))
    assert got == region
    assert got.school_id("lab3") == "north-lab3"
    assert got.school_id("north-lab3") == "north-lab3"
    assert b.school_id(None) == "school-042"
    with pytest.raises(BundleError, match="is for school-042, not school-7"):
        b.school_id("school-7")


@pytest.mark.parametrize("offset", [0, 9, 14, 40, -70, -1])
def test_any_byte_flipped_is_refused(offset: int) -> None:
    data = bytearray(bundle.encode(school_bundle(), ANCHOR))
    data[offset] ^= 0x40
    with pytest.raises(BundleError) as e:
        read(bytes(data))
    assert "b.hbundle" in str(e.value)
    assert "\n" not in str(e.value)


def test_field_changed_and_resigned_by_another_key_is_refused() -> None:
    # The school id changed, then signed by a key that is not the master's: the
    # anchor stays the master's (the school pins it), so the signature fails.
    forged = bundle.encode(school_bundle(school="school-666"), seeded(9))
    with pytest.raises(BundleError, match="signature does not verify against the master's key"):
        read(forged)
    # Replacing the anchor too makes a bundle of another "master": it verifies by
    # itself, and that anchor is what the school would pin: nothing of ours trusts it
    # (the real master refuses the token, tests/bad_input/test_enrollment.py).
    other = read(bundle.encode(school_bundle(anchor=seeded(9).public), seeded(9)))
    assert other.anchor != ANCHOR.public


def test_cut_short_oversized_and_not_a_bundle() -> None:
    data = bundle.encode(school_bundle(), ANCHOR)
    with pytest.raises(BundleError, match="length does not match"):
        read(data[:-1])
    with pytest.raises(BundleError, match="too short"):
        read(data[:20])
    with pytest.raises(BundleError, match="not a Harmonic bundle"):
        read(b"PK\x03\x04" + data[4:])
    with pytest.raises(BundleError, match="larger than any bundle"):
        read(data + bytes(bundle.MAX_BUNDLE))
    with pytest.raises(BundleError, match="format version 7"):
        read(data[:8] + struct.pack(">H", 7) + data[10:])


def _signed_body(d: dict[str, object]) -> bytes:
    body = pack_msg(d)
    return bundle.HEAD.pack(bundle.MAGIC, bundle.VERSION, len(body)) + body + ANCHOR.sign(keys.TAG_BUNDLE, body)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("school", "../etc", "server id"),
    ("school", "master", "reserved"),
    ("upstream", ["file:///etc/passwd"], "not an http"),
    ("upstream", ["https://x"] * 9, "at most 8"),
    ("collections", ["Content!"], "collection name"),
    ("token", b"short", "'token' is not 32 bytes"),
    ("expires", 1_700_000_000, "expires before it was made"),
    ("count", 3, "count of 1"),
    ("chain", [[b"x", b"y", b"z"]], "key chain"),
    ("seqs", {"stats": -1}, "'seqs'"),
    ("v", 2, "unknown bundle version"),
])
def test_malformed_fields_signed_by_the_master_are_refused(field: str, value: object, says: str) -> None:
    d = unpack_msg(school_bundle().body())
    d[field] = value
    with pytest.raises(BundleError, match=says) as e:
        read(_signed_body(d))
    assert str(e.value).startswith("b.hbundle: damaged bundle")


def test_bundle_follows_the_key_chain_to_the_current_signing_key() -> None:
    root1, signing1 = seeded(11), seeded(101)
    link = trust.sign(trust.make_record(MASTER, 1, root1.public, signing1.public, 1_800_000_001), ANCHOR, root1)
    b = school_bundle(chain=[link.wire()])
    assert read(bundle.encode(b, signing1)).chain == [link.wire()]
    # The anchor is retired as signing key once the chain moved on.
    with pytest.raises(BundleError, match="does not verify"):
        read(bundle.encode(b, ANCHOR))
    # A link not signed by the anchor (a forged chain) is refused whoever signs the bundle.
    bad = trust.sign(trust.make_record(MASTER, 1, root1.public, signing1.public, 1), seeded(5), root1)
    with pytest.raises(BundleError, match="key chain is refused: link 1 is not signed by the previous root"):
        read(bundle.encode(school_bundle(chain=[bad.wire()]), signing1))


def test_proof_binds_token_id_and_key() -> None:
    token = b"\x07" * 32
    p = bundle.proof(token, "school-042", seeded(3).public)
    assert len(p) == bundle.PROOF_LEN
    assert bundle.proof_matches(token, "school-042", seeded(3).public, p)
    assert not bundle.proof_matches(token, "school-043", seeded(3).public, p)
    assert not bundle.proof_matches(token, "school-042", seeded(4).public, p)
    assert not bundle.proof_matches(b"\x08" * 32, "school-042", seeded(3).public, p)
    assert bundle.read_enroll(bundle.enroll_extra(b"\x01" * 16, p), "x") == (b"\x01" * 16, p)
    for bad in (None, [], {"token": b"\x01" * 16}, {"token": b"\x01" * 15, "proof": p},
                {"token": b"\x01" * 16, "proof": p, "more": 1}, {"token": "x" * 16, "proof": p}):
        with pytest.raises(CorruptPack, match="enrollment proof"):
            bundle.read_enroll(bad, "x")


def test_revocation_list_signed_and_hostile() -> None:
    rl = bundle.RevocationList(MASTER, 3, (bundle.Revoked("school-1", seeded(3).public, 1_800_000_000),))
    carried = bundle.sign_revocations(rl, ANCHOR)
    got, body, sig = bundle.read_revocations(carried, ANCHOR.public, "p.hpk")
    assert got == rl
    assert got.names(seeded(3).public) == rl.entries[0]
    assert got.names(seeded(4).public) is None
    assert (body, sig) == (carried[0], carried[1])
    with pytest.raises(UntrustedPack, match=r"p\.hpk: its revocation list is not signed by the master.s key"):
        bundle.read_revocations(bundle.sign_revocations(rl, seeded(9)), ANCHOR.public, "p.hpk")
    with pytest.raises(CorruptPack, match="not \\[body, signature\\]"):
        bundle.read_revocations([carried[0]], ANCHOR.public, "p.hpk")

    def signed(d: object) -> list[bytes]:
        body = pack_msg(d)
        return [body, ANCHOR.sign(keys.TAG_REVOCATIONS, body)]

    for d, says in (({"v": 1, "master": MASTER, "seq": 0, "entries": []}, "positive seq"),
                    ({"v": 1, "master": MASTER, "seq": 1, "entries": [["school-1", b"k", 1]]}, "entry"),
                    ({"v": 1, "master": "../x", "seq": 1, "entries": []}, "server id"),
                    ({"v": 9}, "unknown version")):
        with pytest.raises(CorruptPack, match=says):
            bundle.read_revocations(signed(d), ANCHOR.public, "p.hpk")

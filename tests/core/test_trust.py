"""The master's key chain (core/trust.py): following links, and each refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core import keys, trust
from harmonicd.core.codec import pack_msg
from harmonicd.errors import ChainError, ChainFork, ChainGap, ChainRollback, ChainSignature
from tests.core.helpers import FAST

MASTER = "master-1"


def seeded(n: int) -> keys.SigningKey:
    return keys.SigningKey(bytes([n]) * 32)


ANCHOR = seeded(1)


def chain(n: int, *, keep_root_at: frozenset[int] = frozenset()) -> tuple[list[trust.Link], list[keys.SigningKey]]:
    """n links from ANCHOR; at versions in keep_root_at the root stays the previous one
    (a routine signing-key rotation), else a new root too. Returns the links and roots R_0..R_n."""
    roots = [ANCHOR]
    links = []
    for v in range(1, n + 1):
        root = roots[-1] if v in keep_root_at else seeded(10 + v)
        rec = trust.make_record(MASTER, v, root.public, seeded(100 + v).public, 1_800_000_000 + v)
        links.append(trust.sign(rec, roots[-1], root))
        roots.append(root)
    return links, roots


def test_follow_three_links_one_at_a_time() -> None:
    links, roots = chain(3, keep_root_at=frozenset({2}))
    state, new = trust.advance(trust.genesis(ANCHOR.public), links)
    assert new == links
    assert state.version == 3
    assert state.master == MASTER
    assert state.root == roots[3].public
    assert state.signing == seeded(103).public
    assert state.signing_keys() == [ANCHOR.public, seeded(101).public, seeded(102).public, seeded(103).public]
    # From a server holding version 1, only 2 and 3 are new; the same chain again adds nothing.
    mid, _ = trust.advance(trust.genesis(ANCHOR.public), links[:1])
    again, new = trust.advance(mid, links)
    assert new == links[1:]
    assert again == state
    assert trust.advance(state, links) == (state, [])
    # An older copy (a prefix) or no chain at all changes nothing.
    assert trust.advance(state, links[:2]) == (state, [])
    assert trust.advance(state, []) == (state, [])
    # Order offered does not matter: links are followed by version.
    assert trust.advance(trust.genesis(ANCHOR.public), list(reversed(links)))[0] == state


def test_wire_round_trip() -> None:
    links, _ = chain(2)
    state, _ = trust.advance(trust.genesis(ANCHOR.public), links)
    assert trust.decode_chain(state.wire()) == links


def test_retired_keys_and_rollback() -> None:
    links, _ = chain(2)
    state, _ = trust.advance(trust.genesis(ANCHOR.public), links)
    assert state.retired(ANCHOR.public) == 0
    assert state.retired(seeded(101).public) == 1
    assert state.retired(seeded(102).public) is None  # current
    assert state.retired(seeded(99).public) is None  # never in the chain
    with pytest.raises(ChainRollback, match="retired signing key of version 1; this server trusts version 2"):
        trust.check_signer(state, seeded(101).public, "pack x")
    trust.check_signer(state, seeded(102).public, "pack x")


def forge(rec: trust.Record, previous: keys.SigningKey | None, own: keys.SigningKey | None) -> trust.Link:
    body = rec.encode()
    return trust.Link(rec, body, previous.sign(keys.TAG_CHAIN, body) if previous else b"\0" * 64,
                      own.sign(keys.TAG_CHAIN, body) if own else b"\0" * 64)


def _gap(links: list[trust.Link], _roots: list[keys.SigningKey]) -> list[trust.Link]:
    return [links[0], links[2]]


def _wrong_previous(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    # Link 2 signed by a stranger instead of R_1 (its own signature is right).
    r = links[1].record
    return [links[0], forge(r, seeded(77), roots[2]), links[2]]


def _no_self_signature(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    r = links[1].record
    return [links[0], forge(r, roots[1], None)]


def _names_a_root_it_does_not_hold(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    # Whoever holds R_1 names a root key it does not hold (someone else's public key).
    r = trust.make_record(MASTER, 2, seeded(12).public, seeded(200).public, 1)
    return [links[0], forge(r, roots[1], seeded(77))]


def _other_master(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    r = trust.make_record("master-2", 2, seeded(12).public, seeded(200).public, 1)
    return [links[0], trust.sign(r, roots[1], seeded(12))]


def _fork_offered(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    r = trust.make_record(MASTER, 2, seeded(12).public, seeded(201).public, 1)
    return [links[0], links[1], trust.sign(r, roots[1], seeded(12))]


def _retired_signing_again(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    r = trust.make_record(MASTER, 2, seeded(12).public, seeded(101).public, 1)
    return [links[0], trust.sign(r, roots[1], seeded(12))]


def _wrong_version_inside(links: list[trust.Link], roots: list[keys.SigningKey]) -> list[trust.Link]:
    # A record claiming version 3 signed as if it were link 2 still leaves link 2 missing.
    r = trust.make_record(MASTER, 3, seeded(12).public, seeded(200).public, 1)
    return [links[0], trust.sign(r, roots[1], seeded(12))]


REFUSALS: list[tuple[str, Callable[[list[trust.Link], list[keys.SigningKey]], list[trust.Link]], type, str]] = [
    ("gap", _gap, ChainGap, r"link 2 missing"),
    ("wrong signature", _wrong_previous, ChainSignature, r"link 2 is not signed by the previous root key"),
    ("no self-signature", _no_self_signature, ChainSignature, r"link 2 is not signed by its own new root key"),
    ("foreign root", _names_a_root_it_does_not_hold, ChainSignature, r"link 2 is not signed by its own"),
    ("other master", _other_master, ChainError, r"link 2 is for master 'master-2', not 'master-1'"),
    ("fork offered", _fork_offered, ChainFork, r"two different links 2"),
    ("retired key again", _retired_signing_again, ChainRollback, r"link 2 makes an earlier signing key current"),
    ("version skipped", _wrong_version_inside, ChainGap, r"link 2 missing"),
]


@pytest.mark.parametrize(("case", "make", "exc", "msg"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_is_one_line_and_changes_nothing(
        case: str, make: Callable[[list[trust.Link], list[keys.SigningKey]], list[trust.Link]], exc: type,
        msg: str) -> None:
    links, roots = chain(3)
    start = trust.genesis(ANCHOR.public)
    offered = make(links, roots)
    with pytest.raises(exc, match=msg) as info:
        trust.advance(start, offered)
    assert "\n" not in str(info.value)
    assert start.version == 0  # frozen: a refused advance leaves nothing half-followed


def test_fork_of_a_held_link() -> None:
    links, roots = chain(2)
    held, _ = trust.advance(trust.genesis(ANCHOR.public), links)
    other = trust.sign(trust.make_record(MASTER, 2, seeded(12).public, seeded(250).public, 5), roots[1], seeded(12))
    with pytest.raises(ChainFork, match="link 2 differs from the link 2 this server holds"):
        trust.advance(held, [links[0], other])


def test_wrong_master_against_the_one_known() -> None:
    links, _ = chain(1)
    with pytest.raises(ChainError, match="link 1 is for master 'master-1', not 'master-9'"):
        trust.advance(trust.genesis(ANCHOR.public, "master-9"), links)


def test_too_many_records() -> None:
    links, _ = chain(1)
    with pytest.raises(ChainError, match="257 links"):
        trust.decode_chain([links[0].wire()] * (trust.MAX_RECORDS + 1))
    with pytest.raises(ChainError, match="more than 256 links"):
        trust.advance(trust.genesis(ANCHOR.public), links * (trust.MAX_RECORDS + 1))
    with pytest.raises(ChainError, match="versions 1 to 256"):
        trust.make_record(MASTER, trust.MAX_RECORDS + 1, ANCHOR.public, ANCHOR.public, 0)


def test_record_field_types() -> None:
    good = {"v": 1, "master": MASTER, "version": 1, "root": b"r" * 32, "signing": b"s" * 32, "created": 5}
    assert trust.decode_record(pack_msg(good)).version == 1
    bad: list[tuple[dict[str, object], str]] = [
        ({**good, "v": 2}, "unknown version"),
        ({**good, "extra": 1}, "other fields"),
        ({k: v for k, v in good.items() if k != "created"}, "other fields"),
        ({**good, "master": 7}, "master id is not text"),
        ({**good, "master": "../x"}, "not valid"),
        ({**good, "version": True}, "version is not a number"),
        ({**good, "version": 0}, "version is not a number"),
        ({**good, "version": "1"}, "version is not a number"),
        ({**good, "created": -1}, "time"),
        ({**good, "root": b"r" * 31}, "root key is not 32 bytes"),
        ({**good, "signing": "s" * 32}, "signing key is not 32 bytes"),
    ]
    for d, msg in bad:
        with pytest.raises(ChainError, match=msg):
            trust.decode_record(pack_msg(d))
    with pytest.raises(ChainError, match="limit 512"):
        trust.decode_record(b"\x90" * 600)
    with pytest.raises(ChainError, match="malformed msgpack"):
        trust.decode_record(b"\xc1")
    # The same record in another msgpack encoding (a 64-bit int for the version) is not canonical.
    noncanon = pack_msg({**good, "version": 0}).replace(b"\xa7version\x00", b"\xa7version\xcf" + (1).to_bytes(8, "big"))
    with pytest.raises(ChainError, match="canonical"):
        trust.decode_record(noncanon)


@pytest.mark.parametrize("item", [
    "x", [], [b"a", b"b"], [b"a", b"b", b"c", b"d"], [b"a", "b", b"c"], {"body": b""},
])
def test_link_shape(item: object) -> None:
    with pytest.raises(ChainError):
        trust.decode_chain([item])


def test_link_signatures_present() -> None:
    links, _ = chain(1)
    body, prev, own = links[0].wire()
    with pytest.raises(ChainSignature, match="link 1 has no self-signature"):
        trust.decode_link([body, prev, b""])
    with pytest.raises(ChainSignature, match="link 1 is not signed by the previous root key"):
        trust.decode_link([body, b"", own])
    with pytest.raises(ChainSignature, match="not 64 bytes"):
        trust.decode_link([body, prev[:10], own])
    with pytest.raises(ChainError, match="not a list"):
        trust.decode_chain({"a": 1})


def test_sign_refuses_a_root_other_than_named() -> None:
    rec = trust.make_record(MASTER, 1, seeded(5).public, seeded(6).public, 0)
    with pytest.raises(ChainError, match="not the one the record names"):
        trust.sign(rec, ANCHOR, seeded(7))


@FAST
@given(st.data())
def test_any_flipped_bit_of_a_link_is_refused(data: st.DataObject) -> None:
    links, _ = chain(2)
    i = data.draw(st.integers(0, 1), label="link")
    part = data.draw(st.integers(0, 2), label="part")
    wire = [lk.wire() for lk in links]
    blob = bytearray(wire[i][part])
    pos = data.draw(st.integers(0, len(blob) * 8 - 1), label="bit")
    blob[pos // 8] ^= 1 << (pos % 8)
    wire[i][part] = bytes(blob)
    with pytest.raises(ChainError):
        trust.advance(trust.genesis(ANCHOR.public), trust.decode_chain(wire))


@FAST
@given(st.lists(st.integers(1, 4), max_size=6))
def test_any_subset_either_follows_or_names_the_missing_link(versions: list[int]) -> None:
    links, _ = chain(4)
    offered = [links[v - 1] for v in versions]
    top = max(versions, default=0)
    missing = [v for v in range(1, top + 1) if v not in versions]
    if missing:
        with pytest.raises(ChainGap, match=f"link {missing[0]} missing"):
            trust.advance(trust.genesis(ANCHOR.public), offered)
    else:
        state, new = trust.advance(trust.genesis(ANCHOR.public), offered)
        assert state.version == top
        assert new == links[:top]

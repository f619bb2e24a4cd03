"""The master's answer on a stick is the answer online sync makes (services/shared.py):
the shared packs of the collections for everyone, copied as they are from STATE/shared/,
then a small pack for the school alone. shared.prepare builds the shared packs ahead,
after a publish, so that a visit copies instead of planning; to-everyone/ is the
shared pack of the whole release when it is built."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from harmonicd.core.pack import PackReader
from harmonicd.services import shared
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import coll, gen_tree, packs_in, status


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cached(m: Server) -> dict[str, Path]:
    """The shared packs the master holds, by file name."""
    return {p.name: p for p in (m.state / "shared").glob("*/*.hpk")}


def recipient(p: Path) -> str | None:
    with open(p, "rb") as f:
        return PackReader(f, str(p), lambda h: h.sender_key).header.recipient


def prepare(m: Server) -> list[str]:
    store = m.store()
    try:
        return shared.prepare(store)
    finally:
        store.close()


def test_the_stick_carries_the_shared_packs_copied_and_a_small_one_for_the_school(pair: tuple[Server, Server, Path],
                                                                                  tmp_path: Path) -> None:
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=3, files=60, big=2)
    m.ctl("publish", "content", str(src))
    assert prepare(m) == ["content release 1 whole"]  # as the master's daemon does after a publish
    write_tree(s.source("stats"), {"visits.json": b"12"})
    s.ctl("exchange", str(stick))
    out = m.ctl("exchange", str(stick)).stdout
    assert "for school-1: content release 1" in out
    answer = packs_in(stick, "to-school-1")
    held = cached(m)
    copies = [p for p in answer if p.name in held]
    own = [p for p in answer if p.name not in held]
    assert copies, "the release for everyone went as the shared pack"
    for p in copies:
        assert digest(p) == digest(held[p.name]), f"{p.name} is not the shared pack as built"
        assert recipient(p) is None
    # The school's own pack carries the acknowledgement of its stats, and no content.
    assert len(own) == 1
    assert recipient(own[0]) == "school-1"
    assert sum(p.stat().st_size for p in own) < 64 << 10
    receipt = (stick / "HARMONIC" / "RECEIPT-master-1.txt").read_text()
    assert f"read back from the stick and checked: {len(answer)} pack file(s)" in receipt

    # The school takes the packs addressed to no one from its own folder too.
    r = s.ctl("exchange", str(stick)).stdout
    assert "received master-1/content release 1" in r
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    assert not packs_in(stick, "to-school-1")
    assert coll(status(s), "stats")["acked_seq"] == 1
    s.ctl("verify")


def test_a_shared_pack_not_built_is_not_built_during_the_visit(pair: tuple[Server, Server, Path],
                                                               tmp_path: Path) -> None:
    """No shared pack built ahead: the visit plans the answer straight onto the stick (with
    its progress and budget), rather than building a pack on this server to copy after."""
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=7, files=40, big=1)
    m.ctl("publish", "content", str(src))
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    assert not cached(m)
    [answer] = packs_in(stick, "to-school-1")
    assert recipient(answer) == "school-1"
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)


def test_prepare_builds_ahead_and_the_visit_copies(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """After a publish, prepare builds the delta from the release the school holds and
    the whole release; the next visit builds nothing and copies the delta."""
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=4, files=60, big=2)
    m.ctl("publish", "content", str(src))
    # Release 1 to the school, and its next request (it holds release 1) to the master.
    for who in (s, m, s, m, s):
        who.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)

    write_tree(src, {"news.html": b"<p>new</p>"})
    m.ctl("publish", "content", str(src))
    built = prepare(m)
    assert sorted(built) == ["content release 2 from release 1", "content release 2 whole"]
    assert prepare(m) == [], "built once"
    before = {n: (digest(p), p.stat().st_mtime_ns) for n, p in cached(m).items()}
    assert len(before) == 2

    m.ctl("exchange", str(stick))
    assert {n: (digest(p), p.stat().st_mtime_ns) for n, p in cached(m).items()} == before, "nothing built"
    answer = packs_in(stick, "to-school-1")
    delta = [p for p in answer if p.name in before]
    assert len(delta) == 1
    whole = max(before, key=lambda n: cached(m)[n].stat().st_size)
    assert delta[0].name != whole, "the school holds release 1: it gets the delta, not the whole release"
    s.ctl("exchange", str(stick))
    assert (s.deploy / "content" / "news.html").read_bytes() == b"<p>new</p>"
    assert coll(status(s), "content")["seq"] == 2


def test_to_everyone_is_the_whole_release_as_built(tmp_path: Path) -> None:
    """The broadcast is the shared pack of the whole release: the same file at every
    visit (not a new pack each time), which a new school takes."""
    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    s2 = make_school(tmp_path, m, key, "school-2")
    src = tmp_path / "content"
    gen_tree(src, seed=5, files=40, big=1)
    m.ctl("publish", "content", str(src))
    assert prepare(m) == ["content release 1 whole"]
    whole = cached(m)
    sticks = []
    for i in (1, 2):
        stick = tmp_path / f"stick-{i}"
        stick.mkdir()
        s1.ctl("exchange", str(stick))
        m.ctl("exchange", str(stick))
        sticks.append(stick)
    first, second = (packs_in(x, "to-everyone") for x in sticks)
    assert [p.name for p in first] == [p.name for p in second] == sorted(whole)
    for p in first:
        assert digest(p) == digest(whole[p.name])
    r = s2.ctl("exchange", str(sticks[0])).stdout
    assert "received master-1/content release 1" in r
    assert tree_digest(s2.deploy / "content") == tree_digest(src)
    assert packs_in(sticks[0], "to-everyone") == first, "a school never removes the broadcast"


def test_prepare_keeps_the_cache_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schools at two different releases and room for two packs: the deltas the
    schools ask for are built (most asked first), and a new school's whole release,
    built on demand, takes the place of the least recently used."""
    m, key = make_master(tmp_path)
    schools = [make_school(tmp_path, m, key, f"school-{i}") for i in (1, 2, 3)]
    src = tmp_path / "content"
    gen_tree(src, seed=6, files=30, big=1)
    stick = tmp_path / "stick"
    stick.mkdir()
    # school-1 and school-2 hold release 1, school-3 release 2; release 3 is the latest.
    for n, holders in ((1, schools[:2]), (2, schools[2:])):
        write_tree(src, {"n.txt": str(n).encode()})
        m.ctl("publish", "content", str(src))
        for s in holders:
            s.ctl("exchange", str(stick))
            m.ctl("exchange", str(stick))
            s.ctl("exchange", str(stick))
            s.ctl("exchange", str(stick))  # its request says what it holds now
            m.ctl("exchange", str(stick))
    write_tree(src, {"n.txt": b"3"})
    m.ctl("publish", "content", str(src))
    monkeypatch.setattr(shared, "MAX_ENTRIES", 2)
    built = prepare(m)
    assert built == ["content release 3 from release 1", "content release 3 from release 2"]
    assert len(cached(m)) == 2
    make_school(tmp_path, m, key, "school-4")
    store = m.store()
    try:
        assert shared.for_school(store, "school-4").built == 1  # the whole release
    finally:
        store.close()
    assert len(cached(m)) == 2

"""Sticks in real life: two schools on one stick, re-inserted sticks, lost sticks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.conftest import Server, make_master, make_school, tree_digest, trusted_state, write_tree
from tests.crash.helpers import coll, gen_tree, packs_in, status


def test_two_schools_share_one_stick(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    s2 = make_school(tmp_path, m, key, "school-2")
    stick = tmp_path / "stick"
    stick.mkdir()
    src = tmp_path / "content"
    gen_tree(src, seed=5, files=60, big=1)
    m.ctl("publish", "content", str(src))
    write_tree(s1.source("stats"), {"s1.json": b"one"})
    write_tree(s2.source("stats"), {"s2.json": b"two"})

    s1.ctl("exchange", str(stick))
    s2.ctl("exchange", str(stick))
    # Each school leaves its own pack; neither removes the other's.
    senders = sorted(re.sub(r"-\d{8}T\d{6}-.*", "", p.name) for p in packs_in(stick, "to-master"))
    assert senders == ["school-1", "school-2"]

    m.ctl("exchange", str(stick))
    assert not packs_in(stick, "to-master")  # imported, then removed
    a1, a2 = packs_in(stick, "to-school-1"), packs_in(stick, "to-school-2")
    assert a1, "each school gets its own answer"
    assert a2, "each school gets its own answer"
    assert (m.deploy / "school-1" / "stats" / "s1.json").read_bytes() == b"one"
    assert (m.deploy / "school-2" / "stats" / "s2.json").read_bytes() == b"two"
    assert not (m.deploy / "school-1" / "stats" / "s2.json").exists()

    # School 1 takes its answer and leaves school 2's alone.
    before2 = trusted_state(s2)
    s1.ctl("exchange", str(stick))
    assert tree_digest(s1.deploy / "content") == tree_digest(src)
    assert packs_in(stick, "to-school-2") == a2
    assert not packs_in(stick, "to-school-1")
    assert trusted_state(s2) == before2

    # A pack for school 2 dropped into school 1's folder is not school 1's business:
    # left where it is, nothing applied, no refusal.
    # (The answers share the pack of the release for everyone, addressed to no one, which
    # either school may take; the pack addressed to school 2 is the one not in a1.)
    mine = [p for p in a2 if p.name not in {q.name for q in a1}]
    assert len(mine) == 1
    stray = stick / "HARMONIC" / "to-school-1" / mine[0].name
    shutil.copy2(mine[0], stray)
    before1 = trusted_state(s1)
    p = s1.ctl("exchange", str(stick))
    assert p.returncode == 0
    assert "refused" not in p.stderr
    assert stray.exists()
    assert trusted_state(s1)["deploy"] == before1["deploy"]
    assert trusted_state(s1)["objects"] == before1["objects"]
    stray.unlink()

    s2.ctl("exchange", str(stick))
    assert tree_digest(s2.deploy / "content") == tree_digest(src)
    assert coll(status(s2), "stats")["acked_seq"] == 1
    assert coll(status(s1), "stats")["acked_seq"] == 1
    for srv in (m, s1, s2):
        srv.ctl("verify")


def test_reinserted_stick_is_quiet(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """The same pack imported twice: the second time nothing happens and nothing is refused."""
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=9, files=40, big=1)
    m.ctl("publish", "content", str(src))
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    answer = packs_in(stick, "to-school-1")
    keep = tmp_path / "copy"
    keep.mkdir()
    for p in answer:
        shutil.copy2(p, keep / p.name)
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    before = trusted_state(s)

    # The stick comes back with the same answer on it (a copy left, a second stick...).
    for p in answer:
        shutil.copy2(keep / p.name, p)
    r = s.ctl("exchange", str(stick))
    assert r.stderr == ""
    assert "received" not in r.stdout
    after = trusted_state(s)
    assert after["deploy"] == before["deploy"]
    assert after["objects"] == before["objects"]
    assert not packs_in(stick, "to-school-1")  # recognised and removed

    # Also when the school has not seen it as a duplicate pack but holds the release
    # (the master's answer written again by a second master visit).
    m.ctl("exchange", str(stick))
    r = s.ctl("exchange", str(stick))
    assert r.stderr == ""
    assert "received" not in r.stdout
    assert trusted_state(s)["deploy"] == before["deploy"]

    # The master, too, takes a school's pack twice without complaint.
    s.ctl("exchange", str(stick))
    up = packs_in(stick, "to-master")
    for p in up:
        shutil.copy2(p, keep / p.name)
    m.ctl("exchange", str(stick))
    mb = trusted_state(m)
    for p in up:
        shutil.copy2(keep / p.name, p)
    r = m.ctl("exchange", str(stick))
    assert r.stderr == ""
    assert trusted_state(m)["deploy"] == mb["deploy"]
    assert trusted_state(m)["objects"] == mb["objects"]
    s.ctl("verify")
    m.ctl("verify")


def test_lost_stick_costs_a_trip_not_data(pair: tuple[Server, Server, Path]) -> None:
    """The school's upward pack is lost before the master sees it: the statistics
    stay unacknowledged at the school and the next stick carries them again."""
    m, s, stick = pair
    stats = s.source("stats")
    write_tree(stats, {"day1.json": b'{"day": 1}'})
    s.ctl("exchange", str(stick))
    lost = packs_in(stick, "to-master")
    assert lost
    for p in lost:
        p.unlink()  # the stick falls behind a radiator

    # The school deletes its file meanwhile (its own programs rotate logs), and
    # writes another one; nothing is acknowledged, so nothing is forgotten.
    (stats / "day1.json").unlink()
    write_tree(stats, {"day2.json": b'{"day": 2}'})
    c = coll(status(s), "stats")
    assert c["acked_seq"] == 0
    assert c["pending_bytes"] > 0

    m.ctl("exchange", str(stick))  # the master sees an empty mailbox: nothing to answer
    assert not packs_in(stick, "to-school-1")
    s.ctl("exchange", str(stick))  # a new stick: carries releases 1 and 2
    m.ctl("exchange", str(stick))
    arch = m.deploy / "school-1" / "stats"
    assert (arch / "day1.json").read_bytes() == b'{"day": 1}'
    assert (arch / "day2.json").read_bytes() == b'{"day": 2}'
    s.ctl("exchange", str(stick))
    c = coll(status(s), "stats")
    assert c["acked_seq"] == c["seq"]
    assert c["pending_bytes"] == 0
    m.ctl("verify")
    s.ctl("verify")


def test_lost_answer_stick_costs_a_trip(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """The master's answer (content and ack) is lost: the school keeps its statistics
    and the next round trip brings both again."""
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=4, files=30, big=1)
    m.ctl("publish", "content", str(src))
    write_tree(s.source("stats"), {"d.json": b"x"})
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    for p in packs_in(stick, "to-school-1"):
        p.unlink()
    s.ctl("exchange", str(stick))
    assert coll(status(s), "stats")["acked_seq"] == 0
    assert tree_digest(s.deploy / "content") == "absent"
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    assert coll(status(s), "stats")["acked_seq"] == 1

"""Broadcast: the master puts the latest releases for everyone in HARMONIC/to-everyone/
when a school that left no request on the stick lacks them, so that school is
brought up to date in one visit. Schools take it and leave it for the next one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_master, make_school, tree_digest, trusted_state, write_tree
from tests.crash.helpers import coll, gen_tree, packs_in, status


def test_broadcast_reaches_a_school_that_left_no_request(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    s2 = make_school(tmp_path, m, key, "school-2")  # new: never sent anything
    stick = tmp_path / "stick"
    stick.mkdir()
    src = tmp_path / "content"
    gen_tree(src, seed=11, files=40, big=1)
    m.ctl("publish", "content", str(src))
    s1.ctl("exchange", str(stick))
    out = m.ctl("exchange", str(stick)).stdout
    assert "for school-1: content release 1" in out
    assert "for every school: content release 1" in out
    broadcast = packs_in(stick, "to-everyone")
    assert broadcast
    receipt = (stick / "HARMONIC" / "RECEIPT-master-1.txt").read_text()
    assert "to every school: content release 1;" in receipt

    # School 2 comes by with the same stick, having left nothing on it.
    r = s2.ctl("exchange", str(stick))
    assert "received master-1/content release 1 (" in r.stdout
    assert tree_digest(s2.deploy / "content") == tree_digest(src)
    assert packs_in(stick, "to-everyone") == broadcast, "a school never removes the broadcast"
    assert coll(status(s2), "content")["seq"] == 1

    # Seen once, it is passed over quietly, at school 2 and at school 1 (which has
    # its own answer too).
    before = trusted_state(s2)
    r = s2.ctl("exchange", str(stick))
    assert r.stderr == ""
    assert "received" not in r.stdout
    assert trusted_state(s2)["deploy"] == before["deploy"]
    r = s1.ctl("exchange", str(stick))
    assert r.stdout.count("received master-1/content release 1") == 1
    assert tree_digest(s1.deploy / "content") == tree_digest(src)
    assert packs_in(stick, "to-everyone") == broadcast
    for x in (s1, s2):
        x.ctl("verify")

    # A new release, and the schools' requests went on another stick: the master's
    # next visit replaces the broadcast with the new release.
    write_tree(src, {"news.html": b"<p>new</p>"})
    m.ctl("publish", "content", str(src))
    for p in packs_in(stick, "to-master"):
        p.unlink()
    m.ctl("exchange", str(stick))
    newer = packs_in(stick, "to-everyone")
    assert newer
    assert not set(newer) & set(broadcast)
    s2.ctl("exchange", str(stick))
    assert (s2.deploy / "content" / "news.html").read_bytes() == b"<p>new</p>"


def test_no_broadcast_when_every_school_is_up_to_date(tmp_path: Path) -> None:
    """Each school said (in its last request) it holds the latest release: nothing
    goes to to-everyone/, and an old broadcast is taken away."""
    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    s2 = make_school(tmp_path, m, key, "school-2")
    stick = tmp_path / "stick"
    stick.mkdir()
    src = tmp_path / "content"
    write_tree(src, {"index.html": b"<h1>hello</h1>"})
    m.ctl("publish", "content", str(src))
    s1.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    assert packs_in(stick, "to-everyone")  # school 2 was never heard from
    for x in (s1, s2):
        x.ctl("exchange", str(stick))  # both take it; their requests now say so
    out = m.ctl("exchange", str(stick)).stdout
    assert "every school" not in out
    assert not packs_in(stick, "to-everyone")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs stick needs root")
def test_broadcast_only_if_it_fits_whole(tmp_path: Path) -> None:
    """On a stick with room for school 1's answer but not for the whole release
    again, nothing goes to to-everyone/ (half a release for schools that did not
    ask is worth less than the room) and the receipt says so."""
    from tests.scenarios.test_small_sticks import content, no_margin, tmpfs_stick

    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    make_school(tmp_path, m, key, "school-2")
    for x in (m, s1):
        no_margin(x)
    src = tmp_path / "content"
    content(src, seed=3, small=10, big=2, big_size=1 << 20)  # about 2.2 MiB
    m.ctl("publish", "content", str(src))
    with tmpfs_stick(tmp_path / "stick", "3m") as stick:
        s1.ctl("exchange", str(stick))
        out = m.ctl("exchange", str(stick)).stdout
        assert packs_in(stick, "to-school-1")
        assert not packs_in(stick, "to-everyone")
        assert "next trip: for every school: content release 1" in out
        assert "did not fit; not put on this stick" in (stick / "HARMONIC" / "RECEIPT-master-1.txt").read_text()
        assert not subprocess.run(["find", str(stick), "-name", "*.part"], capture_output=True,
                                  text=True, check=True).stdout

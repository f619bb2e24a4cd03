"""Commands on one server wait for the store's lock, never fail as "busy"."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from tests.conftest import Server, tree_digest, write_tree
from tests.crash.helpers import coll, ctl_popen, gen_tree, status


def _holds_flock(pid: int, lock: Path) -> bool:
    """Whether process pid holds a flock on the file lock (from /proc/locks)."""
    ino = os.stat(lock).st_ino
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:
                continue  # a waiter, not a holder
            if (len(parts) >= 6 and parts[1] == "FLOCK" and parts[4] == str(pid)
                    and parts[5].split(":")[-1] == str(ino)):
                return True
    return False


def _wait_for(cond: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("timed out waiting")


def test_two_publishes_at_once_both_succeed(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    m, _s, _stick = pair
    a, b = tmp_path / "a", tmp_path / "b"
    gen_tree(a, seed=1, files=80, big=1)
    write_tree(b, {"only-b.txt": b"b"})
    # Hold the lock ourselves first, so both commands must wait for it.
    fd = os.open(m.state / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pa = ctl_popen(m, "publish", "content", str(a))
        pb = ctl_popen(m, "publish", "content", str(b))
        time.sleep(1.0)
        assert pa.poll() is None, "a publish did not wait for the lock"
        assert pb.poll() is None, "a publish did not wait for the lock"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    oa, ea = pa.communicate(timeout=120)
    ob, eb = pb.communicate(timeout=120)
    assert pa.returncode == 0, ea
    assert pb.returncode == 0, eb
    assert sorted([int(oa), int(ob)]) == [1, 2]
    m.ctl("verify")

    # And a plain race, without our help: both succeed, one after the other.
    gen_tree(a, seed=2, files=80, big=1)
    write_tree(b, {"only-b2.txt": b"b2"})
    pa = ctl_popen(m, "publish", "content", str(a))
    pb = ctl_popen(m, "publish", "content", str(b))
    oa, ea = pa.communicate(timeout=120)
    ob, eb = pb.communicate(timeout=120)
    assert pa.returncode == 0, ea
    assert pb.returncode == 0, eb
    assert sorted([int(oa), int(ob)]) == [3, 4]
    assert coll(status(m), "content")["seq"] == 4
    m.ctl("verify")


def test_exchange_waits_for_a_running_publish(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """An exchange started while a publish holds the lock waits, then answers with
    the release that publish made."""
    m, s, stick = pair
    src = tmp_path / "content"
    write_tree(src, {"v1.txt": b"1"})
    m.ctl("publish", "content", str(src))
    s.ctl("exchange", str(stick))  # a request for the master

    gen_tree(src, seed=3, files=300, big=24, big_size=900 << 10)  # some seconds of publishing
    pub = ctl_popen(m, "publish", "content", str(src))
    _wait_for(lambda: _holds_flock(pub.pid, m.state / "lock") or pub.poll() is not None)
    assert pub.poll() is None, "publish finished before the exchange could start; make the tree bigger"
    ex = ctl_popen(m, "exchange", str(stick))
    time.sleep(0.3)
    assert pub.poll() is not None or ex.poll() is None, "the exchange ran while the publish held the lock"
    out, err = pub.communicate(timeout=300)
    assert pub.returncode == 0, err
    assert out.strip() == "2"
    eout, eerr = ex.communicate(timeout=300)
    assert ex.returncode == 0, eerr
    assert "content release 2" in eout, eout  # it ran after the publish
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)


def test_school_exchange_waits_for_a_running_exchange(pair: tuple[Server, Server, Path], tmp_path: Path) -> None:
    """Two exchanges of one school through one stick at once (F1): one imports, the
    other finds nothing new; the end state equals a serial run."""
    m, s, stick = pair
    src = tmp_path / "content"
    gen_tree(src, seed=4, files=200, big=6)
    m.ctl("publish", "content", str(src))
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    p1 = ctl_popen(s, "exchange", str(stick))
    p2 = ctl_popen(s, "exchange", str(stick))
    o1, e1 = p1.communicate(timeout=300)
    o2, e2 = p2.communicate(timeout=300)
    assert p1.returncode == 0, e1
    assert p2.returncode == 0, e2
    assert (o1 + o2).count("received master-1/content release 1") == 1
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    s.ctl("verify")


def test_master_and_schools_on_one_stick_at_once(tmp_path: Path) -> None:
    """The master and two schools working on one stick folder at the same moment
    (a network share, say): nobody refuses anything or trips on another's files,
    and a few rounds later everyone is in step."""
    from tests.conftest import make_master, make_school

    m, key = make_master(tmp_path)
    s1 = make_school(tmp_path, m, key, "school-1")
    s2 = make_school(tmp_path, m, key, "school-2")
    stick = tmp_path / "stick"
    stick.mkdir()
    src = tmp_path / "content"
    for rnd in range(4):
        gen_tree(src, seed=40 + rnd, files=60, big=1)
        m.ctl("publish", "content", str(src))
        write_tree(s1.source("stats"), {f"r{rnd}.json": b"1"})
        write_tree(s2.source("stats"), {f"r{rnd}.json": b"2"})
        procs = [ctl_popen(x, "exchange", str(stick)) for x in (m, s1, s2)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{out}\n{err}"
    # Then in turn, twice round, so every pack has been carried.
    for _ in range(2):
        for x in (s1, s2, m):
            x.ctl("exchange", str(stick))
    for x in (s1, s2):
        x.ctl("exchange", str(stick))
        assert tree_digest(x.deploy / "content") == tree_digest(src)
        c = coll(status(x), "stats")
        assert c["acked_seq"] == c["seq"]
        x.ctl("verify")
    for i, x in ((1, s1), (2, s2)):
        assert tree_digest(m.deploy / x.name / "stats") == tree_digest(x.source("stats"))
        assert (m.deploy / x.name / "stats" / "r0.json").read_bytes() == str(i).encode()
    m.ctl("verify")

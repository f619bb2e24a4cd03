"""An online school server relaying for a stick (issue 5, item 5), through real daemons.

master-1 listens on loopback; relay-1 is an online school server (upstream.url
set, no server.listen); school-a and school-b are offline: they only ever see
one stick folder, on which both leave their requests. relay-1 takes them off
the stick (relay.for_stick), forwards them to the master with one online sync
(peer.sync.forward_now) and writes onto the stick, for each school, its own
answer from its replica and the master's answer packs that came back. The
schools then exchange the stick as they always do: they get the content and
the master's acknowledgement of their statistics. Nothing here is mocked: the
master is a real harmonicd, the schools are driven by the real command line.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harmonicd.peer.sync import forward_now
from harmonicd.services import relay
from harmonicd.services.exchange import ExportResult
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc
from tests.daemon.test_online import free_port, no_auto_sync


@dataclass
class Route:
    master: Server
    relay: Server
    schools: list[Server]
    content: Path
    stick: Path  # the folder standing for the stick (HARMONIC/ inside)
    port: int

    @property
    def box(self) -> Path:
        return self.stick / "HARMONIC"


@pytest.fixture
def route(tmp_path: Path) -> Route:
    port = free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    r = make_school(tmp_path, m, key, "relay-1", "--upstream", f"http://127.0.0.1:{port}")
    no_auto_sync(r)
    schools = [make_school(tmp_path, m, key, name) for name in ("school-a", "school-b")]
    for s in schools:
        write_tree(s.source("backup"), {"stats.csv": f"{s.name},42\n".encode()})
    content = tmp_path / "content"
    write_tree(content, {"index.html": b"<h1>one</h1>\n", "video.bin": os.urandom(300_000)})
    m.ctl("publish", "content", str(content))
    stick = tmp_path / "stick"
    stick.mkdir()
    return Route(m, r, schools, content, stick, port)


def _requests(rt: Route, school: str) -> list[Path]:
    return sorted((rt.box / "to-master").glob(f"{school}-2*.hpk"))


def _queued(rt: Route, school: str) -> list[Path]:
    return sorted((rt.relay.state / "relay" / "up" / school).glob("*.hpk"))


def _collection(s: Server, name: str) -> tuple[int, int]:
    with s.store(lock=False) as st:
        c = st.db.collection(name)
        assert c is not None
        return c.seq, c.acked_seq


def _relay_visit(rt: Route, budget: int | None = None) -> tuple[list[ExportResult], list[str], int]:
    """relay-1 with the stick: for_stick as exchange() calls it, forwarding by one online sync.
    Returns what it wrote, what it refused and how often it went online."""
    calls = 0
    with rt.relay.store() as st:
        def forward() -> str | None:
            nonlocal calls
            calls += 1
            return forward_now(st)

        exported, refused = relay.for_stick(st, str(rt.box), budget, None, forward)
    return exported, refused, calls


def _schools_leave_requests(rt: Route) -> None:
    for s in rt.schools:
        s.ctl("exchange", str(rt.stick))
        assert len(_requests(rt, s.name)) == 1, f"{s.name}'s request is on the stick"


def test_online_school_relays_two_offline_schools_requests(
        route: Route, start_daemon: Callable[..., DaemonProc]) -> None:
    rt = route
    md = start_daemon(rt.master)
    _schools_leave_requests(rt)
    exported, refused, calls = _relay_visit(rt)
    assert refused == []
    assert calls == 1, "one online sync for all the requests on the stick"
    assert {e.recipient for e in exported} == {"school-a", "school-b"}
    for s in rt.schools:
        # The master took the request: its statistics are at the master, the
        # request is off the stick and out of the relay's queue.
        assert (rt.master.deploy / s.name / "backup" / "stats.csv").read_bytes() == f"{s.name},42\n".encode()
        assert _requests(rt, s.name) == []
        assert _queued(rt, s.name) == []
        e = next(e for e in exported if e.recipient == s.name)
        senders = {p.name.split("-2")[0] for p in (rt.box / f"to-{s.name}").glob("*.hpk")}
        assert senders == {"relay-1", "master-1"}, "the relay's answer and the master's, side by side"
        assert {os.path.basename(f) for f in e.files} == {p.name for p in (rt.box / f"to-{s.name}").glob("*.hpk")}
        assert any(x.startswith("content release 1") for x in e.releases), e.releases
        assert "master-1's confirmation of backup release 1" in e.releases, e.releases
        assert not list((rt.box / f"to-{s.name}").glob(".*.part"))
    # The offline schools exchange the stick as always: content, and the master's acknowledgement.
    for s in rt.schools:
        assert _collection(s, "backup") == (1, 0)
        out = s.ctl("exchange", str(rt.stick)).stdout
        assert re.search(r"received master-1/content release 1 \(\w+\) from relay-1", out), out
        assert "master-1 confirmed backup release 1" in out, out
        assert tree_digest(s.deploy / "content") == tree_digest(rt.content)
        assert _collection(s, "backup") == (1, 1)
        assert not list((rt.box / f"to-{s.name}").glob("*.hpk")), "imported, then removed from the stick"
        s.ctl("verify")
    rt.relay.ctl("verify")
    assert "Traceback" not in md.output()


def test_master_unreachable_requests_stay_queued_and_replica_answers_go(
        route: Route, start_daemon: Callable[..., DaemonProc]) -> None:
    rt = route
    md = start_daemon(rt.master)
    with rt.relay.store() as st:  # relay-1 has been online once: content release 1 in its replica
        assert forward_now(st) is None
    assert md.stop() == 0
    _schools_leave_requests(rt)
    on_stick = {s.name: _requests(rt, s.name) for s in rt.schools}
    exported, refused, calls = _relay_visit(rt)
    assert calls == 1
    assert refused == [], "an unreachable master refuses nothing: the requests wait"
    for s in rt.schools:
        assert _requests(rt, s.name) == on_stick[s.name], "kept on the stick for the next place it goes"
        assert [p.name for p in _queued(rt, s.name)] == [p.name for p in on_stick[s.name]], "and queued here"
        e = next(e for e in exported if e.recipient == s.name)
        assert [os.path.basename(f).split("-2")[0] for f in e.files] == ["relay-1"]
    with rt.relay.store() as st:
        waits = relay.waiting(st)
        assert st.db.get_meta("upstream.reachable") == "0"
    assert len(waits) == 2, waits
    assert all("kept here for the master" in w for w in waits), waits
    assert "cannot reach the upstream" in waits[0], waits
    for s in rt.schools:
        out = s.ctl("exchange", str(rt.stick)).stdout
        assert re.search(r"received master-1/content release 1 \(\w+\) from relay-1", out), out
        assert "master-1 confirmed" not in out, "nobody but the master confirms"
        assert tree_digest(s.deploy / "content") == tree_digest(rt.content)
        assert _collection(s, "backup") == (1, 0)
    # The master is back; the stick comes through relay-1 again (each school
    # replaced its request with a newer one): forwarded now, and acknowledged.
    start_daemon(rt.master)
    exported, refused, calls = _relay_visit(rt)
    assert refused == []
    assert calls == 1
    for s in rt.schools:
        assert _requests(rt, s.name) == []
        assert _queued(rt, s.name) == []
        out = s.ctl("exchange", str(rt.stick)).stdout
        assert "master-1 confirmed backup release 1" in out, out
        assert _collection(s, "backup") == (1, 1)


def test_small_stick_the_masters_packs_first_shared_between_schools(
        route: Route, start_daemon: Callable[..., DaemonProc]) -> None:
    """A budget too small for the content (300 KB from the replica), shared by two
    schools: each school's acknowledgement goes whole, then what fits of the
    content; the school keeps that part, says so, and the rest comes next trip."""
    rt = route
    start_daemon(rt.master)
    _schools_leave_requests(rt)
    budget = 80_000
    exported, refused, _calls = _relay_visit(rt, budget=budget)
    assert refused == []
    assert sum(e.stick_bytes for e in exported) <= budget
    first = {e.recipient: e.raw_bytes for e in exported}
    for s in rt.schools:
        e = next(e for e in exported if e.recipient == s.name)
        if s.name == "school-a":  # the first answered: an even share; what it leaves goes to school-b
            assert e.stick_bytes <= budget // 2
        assert e.left_bytes > 0, "the rest waits for the next trip"
        names = sorted(p.name for p in (rt.box / f"to-{s.name}").glob("*.hpk"))
        assert [n.split("-2")[0] for n in names] == ["master-1", "relay-1"], names
        out = s.ctl("exchange", str(rt.stick)).stdout
        assert "master-1 confirmed backup release 1" in out, out
        assert "received part of master-1/content release 1" in out, out
        assert not (s.deploy / "content").exists(), "never a partial release in use"
    # Next trip, room enough: the rest of the content goes, nothing twice.
    exported, refused, _calls = _relay_visit(rt)
    assert refused == []
    for s in rt.schools:
        e = next(e for e in exported if e.recipient == s.name)
        assert e.left_bytes == 0
        assert first[s.name] + e.raw_bytes < 300_000 + 1_000, "what the school holds already is not sent again"
        s.ctl("exchange", str(rt.stick))
        assert tree_digest(s.deploy / "content") == tree_digest(rt.content)


def test_bad_requests_on_the_stick(route: Route, tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """A damaged request is refused (one line naming it) and left on the stick; a
    request for another master and the relay's own request are left alone; the
    good request beside them is relayed."""
    rt = route
    start_daemon(rt.master)
    rt.relay.ctl("exchange", str(rt.stick))  # relay-1's own request, for the master's next visit
    own = sorted((rt.box / "to-master").glob("relay-1-*.hpk"))
    assert own
    a = rt.schools[0]
    a.ctl("exchange", str(rt.stick))
    good = _requests(rt, "school-a")[0]
    damaged = rt.box / "to-master" / good.name.replace("school-a", "school-c")
    data = good.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    other, okey = make_master(tmp_path, "master-9")
    stranger = make_school(tmp_path, other, okey, "school-9")
    stranger.ctl("exchange", str(rt.stick))
    (foreign,) = _requests(rt, "school-9")
    exported, refused, calls = _relay_visit(rt)
    assert len(refused) == 1, refused
    assert refused[0].startswith(f"{damaged}: "), refused
    assert damaged.exists()
    assert foreign.exists()
    assert sorted((rt.box / "to-master").glob("relay-1-*.hpk")) == own
    assert [e.recipient for e in exported] == ["school-a"]
    assert calls == 1
    assert not (rt.box / "to-school-9").exists()
    assert not (rt.relay.state / "relay" / "up" / "school-9").exists()
    assert _requests(rt, "school-a") == []
    out = a.ctl("exchange", str(rt.stick)).stdout
    assert "master-1 confirmed backup release 1" in out, out


def test_no_requests_no_sync(route: Route) -> None:
    """A stick with only the relay's own request: nothing relayed, no online sync."""
    rt = route
    rt.relay.ctl("exchange", str(rt.stick))
    exported, refused, calls = _relay_visit(rt)
    assert (exported, refused, calls) == ([], [], 0)
    shutil.rmtree(rt.box)
    assert _relay_visit(rt) == ([], [], 0)


def test_whole_visit_of_the_relay(route: Route, start_daemon: Callable[..., DaemonProc]) -> None:
    """The relay's visit as the daemon runs it (stick.visit with forward_now): its own
    request, the relayed answers read back from the stick, the receipt says it all."""
    from harmonicd.services.stick import visit

    rt = route
    start_daemon(rt.master)
    _schools_leave_requests(rt)
    with rt.relay.store() as st:
        v = visit(st, str(rt.stick), None, consent=True, forward=lambda: forward_now(st))
    rep = v.report
    assert rep.refused == []
    assert {e.recipient for e in rep.exported} >= {"school-a", "school-b", "master-1"}
    relayed = [f for e in rep.exported if e.recipient.startswith("school-") for f in e.files]
    assert len(relayed) == 4, "per school: the master's answer and the relay's"
    assert v.verified_files == sum(len(e.files) for e in rep.exported), "every file read back and checked"
    receipt = (rt.box / "RECEIPT-relay-1.txt").read_text()
    for s in rt.schools:
        assert f"to {s.name}: content release 1" in receipt, receipt
        assert "master-1's confirmation of backup release 1" in receipt, receipt
        assert _requests(rt, s.name) == []
    assert len(sorted((rt.box / "to-master").glob("relay-1-*.hpk"))) == 1, "its own request, for the master"
    for s in rt.schools:
        out = s.ctl("exchange", str(rt.stick)).stdout
        assert "master-1 confirmed backup release 1" in out, out
        assert tree_digest(s.deploy / "content") == tree_digest(rt.content)


def test_a_revoked_schools_request_on_the_stick_is_refused_by_the_relay(
        route: Route, start_daemon: Callable[..., DaemonProc]) -> None:
    """school-b's server was stolen: once the relay holds the master's revocation
    list (from its own online sync), school-b's request on a stick is refused with
    one line, neither queued nor answered, and left on the stick; school-a's
    beside it is relayed as ever."""
    rt = route
    start_daemon(rt.master)
    rt.master.ctl("revoke", "school-b")
    with rt.relay.store() as st:
        forward_now(st)  # one online sync: the master's answer carries its signed revocation list
    _schools_leave_requests(rt)
    (b_request,) = _requests(rt, "school-b")
    exported, refused, calls = _relay_visit(rt)
    assert calls == 1, "school-a's request forwarded"
    assert len(refused) == 1, refused
    assert refused[0].startswith(f"{b_request}: "), refused
    assert "revoked" in refused[0]
    assert "\n" not in refused[0]
    assert b_request.exists(), "left on the stick: the relay deletes nothing it refused"
    assert _queued(rt, "school-b") == []
    assert not (rt.box / "to-school-b").exists()
    assert [e.recipient for e in exported] == ["school-a"]
    assert _requests(rt, "school-a") == []

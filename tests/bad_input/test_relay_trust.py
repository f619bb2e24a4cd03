"""Packs signed by a relay (a school server serving others from its replica), through
`harmonicctl exchange`: what a school takes from one, and what it refuses (issue 4, item 5).

A relay's pack is judged by what the master signed inside it: every release must
verify against the master's key; it may carry no acknowledgement; an older
release than held is a rollback."""

from __future__ import annotations

from harmonicd.core import keys
from tests.bad_input.helpers import (
    MASTER_ID,
    SCHOOL_ID,
    Synced,
    assert_unchanged,
    exchange,
    header_for,
    inbox,
    pack_file_name,
    public_key,
    refusal,
    sign_release,
    signing_key,
    snapshot,
    sync_once,
    write_pack,
)
from tests.bad_input.test_trust import _tree
from tests.conftest import write_tree

RELAY_ID = "relay-1"


class _Relay:
    name = RELAY_ID


def test_a_relay_pack_of_the_masters_release_is_taken(synced: Synced) -> None:
    """Signed by a key the school has never seen, but every release in it is the
    master's: applied (the master's key signed the content, the hashes hold)."""
    m, s, stick = synced.master, synced.school, synced.stick
    relay = keys.SigningKey.generate()
    root, objs = _tree({"index.html": b"<h1>release two, through a relay</h1>"})
    rel = sign_release(signing_key(m), root, seq=2)
    write_pack(inbox(s, stick) / pack_file_name(RELAY_ID, "served"), relay,
               header_for(_Relay(), relay, SCHOOL_ID, public_key(s), [rel]), objs)
    p = exchange(s, stick)
    assert p.returncode == 0, p.stderr
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>release two, through a relay</h1>"
    with s.store(lock=False) as st:
        master = st.db.peer(MASTER_ID)
        assert master is not None
        assert master.role == "master"
        assert st.db.peer(RELAY_ID) is None, "a relay is not recorded as a master"


def test_a_release_the_relay_signed_is_refused(synced: Synced) -> None:
    _m, s, stick = synced.master, synced.school, synced.stick
    relay = keys.SigningKey.generate()
    root, objs = _tree({"index.html": b"<h1>made up by the relay</h1>"})
    rel = sign_release(relay, root, seq=2)
    f = write_pack(inbox(s, stick) / pack_file_name(RELAY_ID, "forged"), relay,
                   header_for(_Relay(), relay, SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"content release 2 .* from relay-1 is not signed by the master")
    assert_unchanged(s, before)


def test_a_release_of_another_owner_through_a_relay_is_refused(synced: Synced) -> None:
    """Signed by the master's key but naming another owner than the master known."""
    m, s, stick = synced.master, synced.school, synced.stick
    relay = keys.SigningKey.generate()
    root, objs = _tree({"x": b"x"})
    rel = sign_release(signing_key(m), root, seq=2, owner="master-2")
    f = write_pack(inbox(s, stick) / pack_file_name(RELAY_ID, "owner"), relay,
                   header_for(_Relay(), relay, SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"which the master master-1 does not own")
    assert_unchanged(s, before)


def test_acknowledgements_from_a_relay_are_refused(synced: Synced) -> None:
    """The school's statistics wait for the master; a relay says the master has them."""
    _m, s, stick = synced.master, synced.school, synced.stick
    write_tree(s.source("stats"), {"day.json": b'{"logins": 1}'})
    s.ctl("exchange", str(stick))  # published and sent up, not yet taken by the master
    with s.store(lock=False) as st:
        c = st.db.collection("stats")
        assert c is not None
        assert c.root is not None
        assert c.acked_seq < c.seq
        ack = {"collection": "stats", "seq": c.seq, "root": c.root}
    relay = keys.SigningKey.generate()
    f = write_pack(inbox(s, stick) / pack_file_name(RELAY_ID, "acks"), relay,
                   header_for(_Relay(), relay, SCHOOL_ID, public_key(s), [], acks=[ack]), [])
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"carries acknowledgements but is signed by relay-1, not the master")
    # The exchange wrote a new request for the master (not trusted state); nothing else changed.
    assert_unchanged(s, before)
    with s.store(lock=False) as st:
        c = st.db.collection("stats")
        assert c is not None
        assert c.acked_seq < c.seq


def test_rollback_by_a_relay_is_refused(synced: Synced) -> None:
    """The school holds release 2; a relay offers the master's genuine release 1."""
    m, s, stick = synced.master, synced.school, synced.stick
    with m.store(lock=False) as st:
        one = st.db.release("content", 1)
        assert one is not None
    (synced.content / "index.html").write_bytes(b"<h1>two</h1>")
    assert m.ctl("publish", "content", str(synced.content)).stdout.strip() == "2"
    sync_once(m, s, stick)
    relay = keys.SigningKey.generate()
    f = write_pack(inbox(s, stick) / pack_file_name(RELAY_ID, "rollback"), relay,
                   header_for(_Relay(), relay, SCHOOL_ID, public_key(s), [(one.body, one.sig)]), [])
    before = snapshot(s)
    p = exchange(s, stick)
    line = refusal(p, f, r"upstream relay-1 offered content release 1, older than release 2 held; kept 2")
    assert f"{f}: upstream relay-1" in line, line
    assert_unchanged(s, before)
    assert (s.deploy / "content" / "index.html").read_bytes() == b"<h1>two</h1>"


def test_a_relay_posing_as_the_master_is_refused(synced: Synced) -> None:
    m, s, stick = synced.master, synced.school, synced.stick
    relay = keys.SigningKey.generate()
    root, objs = _tree({"index.html": b"<h1>two</h1>"})
    rel = sign_release(signing_key(m), root, seq=2)
    f = write_pack(inbox(s, stick) / pack_file_name(MASTER_ID, "posing"), relay,
                   header_for(m, relay, SCHOOL_ID, public_key(s), [rel]), objs)
    before = snapshot(s)
    p = exchange(s, stick)
    refusal(p, f, r"claims to be from the master 'master-1' but is signed by a key this server does not trust")
    assert_unchanged(s, before)

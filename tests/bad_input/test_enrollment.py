"""Bootstrap bundles, enrollment at first contact and revocation, by stick
(`harmonicctl bundle`, `init --bundle`, `exchange`, `revoke`), with the bad
inputs of issue 6: a bundle tampered with, expired or already used, a token
presented twice, a revoked school. Each refusal: one line naming what and
why, an exit code, and the trusted state (the master's state.db, the school's
configuration and key) unchanged."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harmonicd.core import keys
from harmonicd.core.bundle import HEAD, MAGIC, VERSION
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.core.pack import PackReader
from tests.bad_input.helpers import (
    CONTENT,
    assert_unchanged,
    exchange,
    refusal,
    signing_key,
    snapshot,
    sync_once,
)
from tests.conftest import Server, make_master, tree_digest, trusted_state, write_tree


@dataclass
class Lab:
    master: Server
    content: Path
    tmp: Path
    stick: Path

    def bundle(self, school: str, *extra: str, name: str | None = None) -> Path:
        out = self.tmp / (name or f"{school}.hbundle")
        self.master.ctl("bundle", school, "--out", str(out), "--sticks-only", *extra)
        return out

    def init(self, name: str, bundle: Path, *extra: str, check: bool = True) -> tuple[Server, str]:
        s = Server(name, self.tmp / f"{name}.toml", self.tmp / name)
        p = s.ctl("init", "--bundle", str(bundle), "--state-dir", str(s.state),
                  "--socket", str(self.tmp / f"{name}-run" / "control.sock"), *extra, check=check)
        return s, p.stdout.splitlines()[0] if p.returncode == 0 else p.stderr


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    m, _key = make_master(tmp_path)
    content = tmp_path / "content"
    write_tree(content, CONTENT)
    m.ctl("publish", "content", str(content))
    stick = tmp_path / "stick"
    stick.mkdir()
    return Lab(m, content, tmp_path, stick)


def refused_at_the_master(lab: Lab, school: Server, stick_name: str, why: str) -> Path:
    """school's request, on a stick of its own, is refused by the master (one line
    naming the pack and why) with the master's state unchanged. Returns the stick."""
    stick = lab.tmp / stick_name
    stick.mkdir()
    school.ctl("exchange", str(stick))
    (req,) = requests_on(stick, school.cfg().id)
    before = snapshot(lab.master)
    p = exchange(lab.master, stick)
    refusal(p, req, why)
    assert_unchanged(lab.master, before)
    return stick


def files_digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent" for p in paths}


def one_line(p_stderr: str, *needles: str) -> str:
    lines = [ln for ln in p_stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p_stderr
    assert "Traceback" not in p_stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def requests_on(stick: Path, school: str) -> list[Path]:
    return sorted((stick / "HARMONIC" / "to-master").glob(f"{school}-2*.hpk"))


def header_extra(pack: Path) -> dict[str, object]:
    with pack.open("rb") as f:
        return dict(PackReader(f, str(pack), lambda h: h.sender_key).header.extra)


def token_uses(m: Server) -> list[tuple[str, bytes]]:
    with m.store(lock=False) as st:
        return [(r[0], r[1]) for r in st.db.conn.execute("SELECT school, key FROM token_uses ORDER BY school")]


# --------------------------------------------------------------------------- the way it works


def test_bundle_init_and_enroll_by_stick(lab: Lab) -> None:
    b = lab.bundle("school-1")
    assert b.stat().st_mode & 0o777 == 0o600
    s, key = lab.init("school-1", b)
    assert key.startswith("ed25519:")
    cfg = s.cfg()
    assert cfg.id == "school-1"
    assert cfg.master_key == keys.parse_key(lab.master.ctl("key").stdout)
    assert cfg.upstream_url == ""
    s.ctl("exchange", str(lab.stick))
    (req,) = requests_on(lab.stick, "school-1")
    assert set(header_extra(req)) == {"enroll"}, "a pending school proves its token in its request"
    lab.master.ctl("exchange", str(lab.stick))
    s.ctl("exchange", str(lab.stick))
    assert tree_digest(s.deploy / "content") == tree_digest(lab.content)
    with lab.master.store(lock=False) as st:
        peer = st.db.peer("school-1")
        assert peer is not None
        assert peer.key == keys.parse_key(key)
        assert peer.last_how == "stick"
    assert token_uses(lab.master) == [("school-1", keys.parse_key(key))]
    # Enrolled: its next request carries no proof.
    (req,) = requests_on(lab.stick, "school-1")
    assert "enroll" not in header_extra(req)
    lab.master.ctl("exchange", str(lab.stick))
    s.ctl("exchange", str(lab.stick))
    assert "enroll" not in header_extra(requests_on(lab.stick, "school-1")[0])


def test_token_presented_twice_with_the_same_key_is_a_lost_answer(lab: Lab) -> None:
    s, key = lab.init("school-1", lab.bundle("school-1"))
    other = lab.tmp / "stick-2"
    other.mkdir()
    s.ctl("exchange", str(lab.stick))
    s.ctl("exchange", str(other))  # a second request before any answer: the proof again
    assert "enroll" in header_extra(requests_on(other, "school-1")[0])
    lab.master.ctl("exchange", str(lab.stick))
    before = snapshot(lab.master)
    p = lab.master.ctl("exchange", str(other))
    assert p.returncode == 0, p.stderr
    assert token_uses(lab.master) == [("school-1", keys.parse_key(key))]
    after = snapshot(lab.master)
    assert after.rows["peers"][0][:5] == before.rows["peers"][0][:5], "the enrollment is the same"
    assert after.rows["tokens"] == before.rows["tokens"]


# --------------------------------------------------------------------------- bad bundles at init


def _nothing_made(s: Server) -> None:
    assert not s.config.exists(), "no configuration written"
    assert not (s.state / "state.db").exists(), "no state made"
    assert not (s.state / "key").exists(), "no key made"


def test_bundle_with_a_byte_flipped_is_refused(lab: Lab) -> None:
    b = lab.bundle("school-1")
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = lab.tmp / "flipped.hbundle"
    bad.write_bytes(bytes(data))
    s, err = lab.init("school-1", bad, check=False)
    line = one_line(err, str(bad))
    assert "signature does not verify" in line or "damaged" in line, line
    _nothing_made(s)


@pytest.mark.timeout(30)
def test_a_fifo_or_a_folder_in_place_of_a_bundle_is_refused_at_once(lab: Lab) -> None:
    """A hostile stick's FIFO named like a bundle must not hang the reader (nor a first-boot wait)."""
    fifo = lab.tmp / "fifo.hbundle"
    os.mkfifo(fifo)
    folder = lab.tmp / "folder.hbundle"
    folder.mkdir()
    for bad, says in ((fifo, "not a regular file"), (folder, "not a regular file")):
        s, err = lab.init("school-1", bad, check=False)
        one_line(err, str(bad), says)
        _nothing_made(s)


def test_bundle_changed_and_resigned_by_another_key_is_refused(lab: Lab) -> None:
    b = lab.bundle("school-1")
    raw = b.read_bytes()
    n = HEAD.unpack_from(raw)[2]
    d = unpack_msg(raw[HEAD.size:HEAD.size + n])
    d["school"] = "school-666"
    d["upstream"] = ["http://evil.example.org"]
    body = pack_msg(d)
    bad = lab.tmp / "forged.hbundle"
    other = keys.SigningKey.generate()
    bad.write_bytes(HEAD.pack(MAGIC, VERSION, len(body)) + body + other.sign(keys.TAG_BUNDLE, body))
    s, err = lab.init("school-666", bad, check=False)
    one_line(err, str(bad), "signature does not verify against the master's key")
    _nothing_made(s)


def test_expired_bundle_is_refused_at_init(lab: Lab) -> None:
    b = lab.bundle("school-1", "--expires-days", "0.00002")  # about two seconds
    time.sleep(3)
    s, err = lab.init("school-1", b, check=False)
    one_line(err, str(b), "expired at", "by this machine's clock")
    _nothing_made(s)


def test_token_expired_at_the_master_is_refused(lab: Lab) -> None:
    b = lab.bundle("school-1", "--expires-days", "0.00005")  # about four seconds
    s, _key = lab.init("school-1", b)
    s.ctl("exchange", str(lab.stick))
    (req,) = requests_on(lab.stick, "school-1")
    time.sleep(max(0.0, 5 - (time.time() - req.stat().st_mtime)))
    before = snapshot(lab.master)
    p = exchange(lab.master, lab.stick)
    refusal(p, req, r"enrollment token \w+, which expired at .*make a new bundle")
    assert_unchanged(lab.master, before)
    assert not (lab.stick / "HARMONIC" / "to-school-1").exists() or not any(
        (lab.stick / "HARMONIC" / "to-school-1").iterdir()), "nothing written for it"


def test_init_on_a_server_already_set_up_is_refused(lab: Lab) -> None:
    b = lab.bundle("school-1")
    s, _key = lab.init("school-1", b)
    kept = files_digest(s.config, s.state / "key", s.state / "state.db")
    # The same configuration path: it exists.
    p = s.ctl("init", "--bundle", str(b), "--state-dir", str(s.state), check=False)
    assert p.returncode == 1
    one_line(p.stderr, str(s.config), "set up already")
    # Another configuration path, the same state folder.
    p = s.ctl("--config", str(lab.tmp / "other.toml"), "init", "--bundle", str(b), "--state-dir", str(s.state),
              check=False)
    assert p.returncode == 2
    one_line(p.stderr, str(s.state), "already holds a Harmonic state")
    assert not (lab.tmp / "other.toml").exists()
    assert files_digest(s.config, s.state / "key", s.state / "state.db") == kept


def test_used_bundle_proved_by_a_second_key_is_refused(lab: Lab) -> None:
    b = lab.bundle("school-1")
    first, key = lab.init("school-1", b)
    sync_once(lab.master, first, lab.stick)
    # The same bundle again, on another machine: a new key, the same id and token.
    thief, _ = lab.init("thief", b)  # (its folder's name; the id is the bundle's)
    assert thief.cfg().id == "school-1"
    thief_stick = refused_at_the_master(lab, thief, "stick-thief", r"was used already by school-1 with another key")
    assert token_uses(lab.master) == [("school-1", keys.parse_key(key))]
    assert not (thief_stick / "HARMONIC" / "to-school-1").exists()


def test_unknown_and_withdrawn_tokens_are_refused(lab: Lab) -> None:
    old = lab.bundle("school-1", name="old.hbundle")
    lab.bundle("school-1", name="new.hbundle")  # the newer bundle for school-1 replaces the older
    s, _ = lab.init("school-1", old)
    s.ctl("exchange", str(lab.stick))
    (req,) = requests_on(lab.stick, "school-1")
    before = snapshot(lab.master)
    p = exchange(lab.master, lab.stick)
    refusal(p, req, r"which was withdrawn \(a newer bundle replaced it")
    assert_unchanged(lab.master, before)
    # A bundle of another master: its token is unknown here (and its key too).
    other_master, _ = make_master(lab.tmp, "master-2")
    foreign = lab.tmp / "foreign.hbundle"
    other_master.ctl("bundle", "school-9", "--out", str(foreign), "--sticks-only")
    f, _ = lab.init("school-9", foreign)
    st2 = lab.tmp / "stick-9"
    st2.mkdir()
    f.ctl("exchange", str(st2))
    p = exchange(lab.master, st2)
    assert p.returncode == 0, "a pack for another master is left alone, not refused"
    assert requests_on(st2, "school-9"), "still on the stick for its own master"
    assert_unchanged(lab.master, before)


def test_bundle_usage_errors(lab: Lab) -> None:
    m = lab.master
    out = lab.tmp / "x.hbundle"
    for args, says in ((("master", "--out", str(out), "--sticks-only"), "reserved"),
                       (("school-1", "--out", str(out), "--sticks-only", "--collections", "nope"), "not a collection"),
                       (("--region", "north-", "--out", str(out), "--sticks-only"), "--count"),
                       (("school-1", "--out", str(out), "--upstream", "ftp://x"), "not an http")):
        p = m.ctl("bundle", *args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        one_line(p.stderr, says)
        assert not out.exists()
    lab.bundle("school-1", name="x.hbundle")
    p = m.ctl("bundle", "school-2", "--out", str(out), "--sticks-only", check=False)
    one_line(p.stderr, "exists already")
    # No --upstream: a master that does not listen is reached by stick; one that listens
    # on one address there; one on every address has no address to give (and says so).
    assert "by stick only" in m.ctl("bundle", "school-3", "--out", str(lab.tmp / "3.hbundle")).stdout
    text = m.config.read_text()
    m.config.write_text(text.replace('listen = ""', 'listen = "127.0.0.1:8765"'))
    assert "(http://127.0.0.1:8765;" in m.ctl("bundle", "school-4", "--out", str(lab.tmp / "4.hbundle")).stdout
    m.config.write_text(text.replace('listen = ""', 'listen = "0.0.0.0:8765"'))
    p = m.ctl("bundle", "school-5", "--out", str(lab.tmp / "5.hbundle"), check=False)
    assert p.returncode == 2
    one_line(p.stderr, "listens on every address", "--upstream", "public_url")
    assert not (lab.tmp / "5.hbundle").exists()


# --------------------------------------------------------------------------- revocation, by stick


def test_revoked_school_is_refused_by_stick_and_nothing_is_written_for_it(lab: Lab) -> None:
    s, key = lab.init("school-1", lab.bundle("school-1"))
    sync_once(lab.master, s, lab.stick)
    p = lab.master.ctl("revoke", "school-1")
    assert "revoked school-1" in p.stdout
    with lab.master.store(lock=False) as st:
        peer = st.db.peer("school-1")
        assert peer is not None
        assert peer.revoked == 1
        assert st.db.key_revoked(keys.parse_key(key)) == "school-1"
    write_tree(s.source("stats"), {"after.csv": b"stolen,1\n"})
    s.ctl("exchange", str(lab.stick))
    (req,) = requests_on(lab.stick, "school-1")
    before = snapshot(lab.master)
    p = exchange(lab.master, lab.stick)
    refusal(p, req, r"pack is from 'school-1', whose enrollment was revoked")
    assert_unchanged(lab.master, before)
    answers = lab.stick / "HARMONIC" / "to-school-1"
    assert not answers.exists() or not list(answers.glob("*.hpk")), "nothing written for a revoked school"
    # Revoking again says so; an unknown id is a usage error.
    assert "revoked already" in lab.master.ctl("revoke", "school-1").stdout
    p = lab.master.ctl("revoke", "school-77", check=False)
    assert p.returncode == 2
    one_line(p.stderr, "school-77")


def test_revocation_list_travels_to_other_schools(lab: Lab) -> None:
    a, _ = lab.init("school-a", lab.bundle("school-a"))
    b, key_b = lab.init("school-b", lab.bundle("school-b"))
    sticks = {}
    for s in (a, b):
        sticks[s.name] = lab.tmp / f"stick-{s.name}"
        sticks[s.name].mkdir()
        sync_once(lab.master, s, sticks[s.name])
    lab.master.ctl("revoke", "school-b")
    with a.store(lock=False) as st:
        assert st.db.revocation_list() is None
    sync_once(lab.master, a, sticks["school-a"])
    with a.store(lock=False) as st:
        got = st.db.revocation_list()
        assert got is not None
        assert got[:2] == ("master-1", 1)
    from harmonicd.services import enrollment

    with a.store(lock=False) as st:
        rl = enrollment.known_list(st)
        assert rl is not None
        entry = rl.names(keys.parse_key(key_b))
        assert entry is not None
        assert entry.school == "school-b"


def test_stolen_server_replaced_under_the_same_id(lab: Lab) -> None:
    old, old_key = lab.init("school-1", lab.bundle("school-1"))
    write_tree(old.source("backup"), {"notes.txt": b"before the theft\n"})
    sync_once(lab.master, old, lab.stick)
    p = lab.master.ctl("bundle", "school-1", "--out", str(lab.tmp / "again.hbundle"), "--sticks-only", check=False)
    assert p.returncode == 2
    one_line(p.stderr, "enrolled already", "revoke school-1")
    lab.master.ctl("revoke", "school-1")
    new_bundle = lab.bundle("school-1", name="replacement.hbundle")
    new, new_key = lab.init("school-1-new", new_bundle)
    assert new.cfg().id == "school-1"
    assert new_key != old_key
    write_tree(new.source("backup"), {"notes.txt": b"after the replacement\n"})
    sync_once(lab.master, new, lab.stick)
    assert tree_digest(new.deploy / "content") == tree_digest(lab.content)
    with lab.master.store(lock=False) as st:
        peer = st.db.peer("school-1")
        assert peer is not None
        assert peer.key == keys.parse_key(new_key)
        assert not peer.revoked
        archive = st.db.collection("school-1/backup")
        assert archive is not None
        assert archive.seq == 2, "the new server numbers on from the old one's releases"
    assert (lab.master.deploy / "school-1/backup" / "notes.txt").read_bytes() == b"after the replacement\n"
    # The old key stays refused, whatever it does.
    write_tree(old.source("stats"), {"x.csv": b"1\n"})
    refused_at_the_master(lab, old, "stick-old", r"whose enrollment was revoked")


def test_bundle_after_a_key_rotation_starts_the_school_at_the_current_version(lab: Lab) -> None:
    root = lab.tmp / "root.key"
    lab.master.ctl("trust", "new-key", "--out", str(root))
    lab.master.ctl("trust", "rotate", "--new-root-key", str(root))
    b = lab.bundle("school-1")
    s, _key = lab.init("school-1", b)
    # It pins the anchor and holds the link: the master's current signing key is the one it trusts.
    assert s.cfg().master_key == keys.parse_key(lab.master.ctl("key").stdout)
    with s.store(lock=False) as st, lab.master.store(lock=False) as mt:
        assert st.trust_chain().version == 1
        assert st.master_key() == mt.key.public
    sync_once(lab.master, s, lab.stick)
    assert tree_digest(s.deploy / "content") == tree_digest(lab.content)
    assert token_uses(lab.master)[0][0] == "school-1"
    # The chain cut off a bundle signed by the current key: the anchor would have to sign it.
    raw = b.read_bytes()
    d = unpack_msg(raw[HEAD.size:HEAD.size + HEAD.unpack_from(raw)[2]])
    d["chain"] = []
    body = pack_msg(d)
    cut = lab.tmp / "cut.hbundle"
    cut.write_bytes(HEAD.pack(MAGIC, VERSION, len(body)) + body + signing_key(lab.master).sign(keys.TAG_BUNDLE, body))
    s2, err = lab.init("school-2", cut, check=False)
    one_line(err, str(cut), "signature does not verify against the master's key")
    _nothing_made(s2)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_root_init_hands_the_state_to_the_daemons_user(lab: Lab) -> None:
    """The package's /var/lib/harmonicd belongs to harmonicd; root's `init --bundle` there
    must leave nothing the daemon cannot read or replace."""
    s = Server("school-1", lab.tmp / "school-1.toml", lab.tmp / "school-1")
    s.state.mkdir()
    os.chown(s.state, 65534, 65534)
    s.ctl("init", "--bundle", str(lab.bundle("school-1")), "--state-dir", str(s.state),
          "--socket", str(lab.tmp / "run" / "control.sock"))
    owners = {(p, p.lstat().st_uid) for p in s.state.rglob("*")}
    assert owners
    assert {uid for _p, uid in owners} == {65534}, sorted(str(p) for p, uid in owners if uid != 65534)


def test_master_status_lists_the_bundles_not_used_yet(lab: Lab) -> None:
    """Schools on their way: a bundle shows in the master's status until it is used up,
    withdrawn (a newer one, a revocation) or expired."""
    import json

    def bundles() -> list[dict[str, object]]:
        return json.loads(lab.master.ctl("status", "--json").stdout)["bundles"]  # type: ignore[no-any-return]

    one = lab.bundle("school-1")
    lab.master.ctl("bundle", "--region", "north-", "--count", "2", "--out", str(lab.tmp / "north.hbundle"),
                   "--sticks-only")
    lab.bundle("school-3")
    lab.master.ctl("revoke", "school-3")  # never enrolled: its token withdrawn
    got = bundles()
    assert [(b["school"], b["prefix"], b["used"], b["count"]) for b in got] == [
        ("school-1", None, 0, 1), (None, "north-", 0, 2)], got
    text = lab.master.ctl("status").stdout
    assert "bundle:    school-1: not used yet, valid until " in text
    assert "bundle:    region north-* (0 of 2 enrolled): not used yet" in text
    s, _ = lab.init("school-1", one)
    n, _ = lab.init("north-a", lab.tmp / "north.hbundle", "--id", "a")
    for x in (s, n):
        x.ctl("exchange", str(lab.stick))
    lab.master.ctl("exchange", str(lab.stick))
    assert [(b["prefix"], b["used"]) for b in bundles()] == [("north-", 1)]

    # The region's image was copied where it should not be: its bundle is withdrawn;
    # the server it enrolled stays, no other enrolls with it.
    token = str(bundles()[0]["token"])
    before = trusted_state(lab.master)
    for args, says in (((), "give a school server's ID, or --bundle TOKEN"),
                       (("north-a", "--bundle", token), "not both"),
                       (("--bundle", "zz"), "8 hex digits"),
                       (("--bundle", "00000000"), "no bundle with that token")):
        p = lab.master.ctl("revoke", *args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        one_line(p.stderr, says)
    assert trusted_state(lab.master) == before
    out = lab.master.ctl("revoke", "--bundle", token).stdout
    assert "withdrew the bundle for region north-* " in out
    assert "the 1 it enrolled stay enrolled" in out
    assert bundles() == []
    b2, _ = lab.init("north-b", lab.tmp / "north.hbundle", "--id", "b")
    b2.ctl("exchange", str(lab.stick))
    p = lab.master.ctl("exchange", str(lab.stick), check=False)
    assert p.returncode == 1
    assert "'north-b' presents enrollment token" in p.stderr
    assert "which was withdrawn" in p.stderr
    n.ctl("exchange", str(lab.stick))  # the one it enrolled is still taken
    with lab.master.store(lock=False) as st:
        assert st.db.peer("north-b") is None
        peer = st.db.peer("north-a")
        assert peer is not None
        assert not peer.revoked

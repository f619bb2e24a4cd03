"""Anti-theft leases end to end (docs/leases.md): a real master issues them, the
normal sync carries them (online, and by stick), a laptop (a plain HTTP client
here) gets its lease from its school server's listener and checks it with the
master's key alone, with the code docs/leases.md gives. Wrong clocks: the
school's clock behind the newest time the master signed is reported, and
leases are judged against that time, not the clock. Refused: expired leases,
another school's, another laptop's, altered ones; nothing of the school's
trusted state changes when a laptop is refused.

The clocks are shifted with HARMONICD_TEST_CLOCK_OFFSET, read by the one
function that gives leases the system time (services/leases.py, test only).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature

from harmonicd.core import keys
from harmonicd.core.lease import DAY
from tests.conftest import Server, make_master, make_school, trusted_state
from tests.daemon.conftest import DaemonProc, wait_for
from tests.daemon.test_online import free_port, no_auto_sync

ROOT = Path(__file__).resolve().parents[2]
CLOCK = "HARMONICD_TEST_CLOCK_OFFSET"


def docs_function(section: str, name: str) -> Callable[..., Any]:
    """A function docs/leases.md gives laptop makers: the first python block of the
    section, run as written."""
    text = (ROOT / "docs" / "leases.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split(section, 1)[1], re.S)
    assert code is not None, f"docs/leases.md {section!r} has no python block"
    ns: dict[str, Any] = {}
    exec(compile(code.group(1), "docs/leases.md", "exec"), ns)
    fn: Callable[..., Any] = ns[name]
    return fn


def laptop_check() -> Callable[..., dict[str, Any]]:
    """check_lease, docs/leases.md §3."""
    return docs_function("## 3. Checking a lease on the laptop", "check_lease")


def get_lease(port: int, serial: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/lease/{serial}", timeout=10) as r:
            assert r.headers["Cache-Control"] == "private, no-store"
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def refused_reason(port: int, serial: str) -> tuple[str, str]:
    code, body = get_lease(port, serial)
    assert code == 404, body
    doc = json.loads(body)
    assert "\n" not in doc["error"]
    return doc["reason"], doc["error"]


def setup(tmp_path: Path, online: bool = True) -> tuple[Server, Server, bytes, int]:
    """A master (listening) and school-1 with a listener of its own for laptops."""
    mport, sport = free_port(), free_port()
    m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{mport}")
    extra = ("--upstream", f"http://127.0.0.1:{mport}") if online else ()
    s = make_school(tmp_path, m, key, "school-1", *extra, "--listen", f"127.0.0.1:{sport}")
    if online:
        no_auto_sync(s)
    (tmp_path / "serials.txt").write_text("# school-1, class 3\nSHC0001  alice\nSHC0002\n")
    return m, s, keys.parse_key(key), sport


def sync(s: Server) -> str:
    p = s.ctl("sync", "--wait")
    return p.stdout


def issue_expired_leases(m: Server, tmp_path: Path) -> None:
    """Leases issued by a master whose clock read 40 days ago: 30-day leases that ran
    out 10 days ago; renewed by hand in these tests, not by the master's daemon."""
    m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"), "--days", "30",
          env={CLOCK: str(-40 * DAY)})
    with m.config.open("a") as f:
        f.write("\n[leases]\nauto_renew = false\n")


def test_laptop_gets_its_lease_online(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, master_key, port = setup(tmp_path)
    out = m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"), "--days", "30").stdout
    assert re.match(r"issued 2 leases for school-1, valid until \S+ \(leases release 1\)", out), out
    start_daemon(m)
    d = start_daemon(s)
    assert refused_reason(port, "SHC0001")[0] == "none"  # nothing synced yet
    assert "leases release 1" in sync(s)
    check = laptop_check()
    code, data = get_lease(port, "SHC0001")
    assert code == 200, data
    lease = check(data, master_key, "SHC0001", int(time.time()))
    assert (lease["school"], lease["master"], lease["key_version"]) == ("school-1", "master-1", 0)
    assert 29 * DAY < lease["expires"] - time.time() <= 30 * DAY
    with pytest.raises(ValueError, match="another laptop"):
        check(data, master_key, "SHC0002", int(time.time()))
    with pytest.raises(ValueError, match="not signed by the master"):
        check(data, keys.SigningKey.generate().public, "SHC0001", int(time.time()))
    # The same file is in the deployed replica, for other tools.
    assert (s.deploy / "leases" / "SHC0001.lease").read_bytes() == data
    # A stolen laptop (not on the list) and a name that is no serial get a reason.
    before = trusted_state(s)
    assert refused_reason(port, "SHC9999")[0] == "unknown"
    assert refused_reason(port, "..%2Fkey")[0] == "invalid"
    assert trusted_state(s) == before
    st = d.status()
    assert st["leases"]["laptops"] == 2
    assert st["leases"]["warning"] is None
    assert st["clock"]["warning"] is None
    assert st["clock"]["master_offset_seconds"] == 0  # measured at the online sync
    assert st["clock"]["floor"] is not None
    text = s.ctl("status").stdout
    assert re.search(r"leases: +2 laptops valid until \S+ \S+ UTC; renew by sync or stick", text), text
    # The master shows what it issued, and (after the school's next request) that the school holds it.
    sync(s)
    row = next(r for r in json.loads(m.ctl("status", "--json").stdout)["schools"] if r["id"] == "school-1")
    assert row["leases"]["laptops"] == 2
    assert row["leases"]["held"] is True
    assert re.search(r"school-1 .*; 2 leases until \S+ \S+ UTC$", m.ctl("status").stdout, re.M)


def test_expired_lease_not_served_until_renewed(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, master_key, port = setup(tmp_path)
    issue_expired_leases(m, tmp_path)
    start_daemon(m)
    d = start_daemon(s)
    sync(s)
    reason, error = refused_reason(port, "SHC0001")
    assert reason == "expired", error
    st = d.status()
    assert st["leases"]["laptops"] == 0
    assert st["leases"]["expired"] == 2
    assert "no valid lease" in st["leases"]["warning"]
    # Renewed on the master (the same laptops, from now), carried by the next sync.
    out = m.ctl("lease", "renew").stdout
    assert "issued 2 leases for school-1" in out
    assert "leases release 2" in sync(s)
    code, data = get_lease(port, "SHC0002")
    assert code == 200, data
    laptop_check()(data, master_key, "SHC0002", int(time.time()))
    assert d.status()["leases"]["warning"] is None


def test_school_clock_behind_is_reported_and_leases_judged_at_the_floor(
        tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """A school whose clock reads 20 days ago would take a lease that ran out 10
    days ago as valid; the floor (the master's signed time) says it ran out."""
    m, s, master_key, port = setup(tmp_path)
    issue_expired_leases(m, tmp_path)
    start_daemon(m)
    d = start_daemon(s, env={CLOCK: str(-20 * DAY)})
    sync(s)
    reason, error = refused_reason(port, "SHC0001")
    assert reason == "expired", error
    st = d.status()
    clock = st["clock"]
    assert clock["effective"] == clock["floor"]
    assert clock["effective"] > clock["system"]
    assert "20 days behind" in clock["warning"]
    assert "leases are judged against" in clock["warning"]
    assert -20 * DAY - 60 < clock["master_offset_seconds"] < -20 * DAY + 60
    assert "clock: the system clock" in d.output()  # the log line
    assert "warning:   the system clock" in s.ctl("status").stdout
    # Valid leases are still served, judged at the floor: a wrong clock never blocks nor accepts everything.
    m.ctl("lease", "renew", "--days", "5")
    sync(s)
    code, data = get_lease(port, "SHC0001")
    assert code == 200, data
    laptop_check()(data, master_key, "SHC0001", int(time.time()))


def test_school_clock_ahead_is_reported(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    m, s, _key, port = setup(tmp_path)
    m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"), "--days", "30")
    start_daemon(m)
    d = start_daemon(s, env={CLOCK: str(40 * DAY)})
    sync(s)
    # Judged by a clock 40 days ahead, 30-day leases look expired: served as the clock says, and reported.
    assert refused_reason(port, "SHC0001")[0] == "expired"
    clock = d.status()["clock"]
    assert "40 days ahead of the master's" in clock["warning"]


def test_leases_by_stick(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """No network between master and school: the leases travel on a stick (exchange DIR)."""
    m, s, master_key, port = setup(tmp_path, online=False)
    stick = tmp_path / "stick"
    stick.mkdir()
    m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"), "--days", "2")
    s.ctl("exchange", str(stick))  # the school's request
    assert "leases@school-1 release 1" in m.ctl("exchange", str(stick)).stdout
    assert "leases release 1" in s.ctl("exchange", str(stick)).stdout
    d = start_daemon(s)
    code, data = get_lease(port, "SHC0001")
    assert code == 200, data
    laptop_check()(data, master_key, "SHC0001", int(time.time()))
    st = d.status()
    assert st["leases"]["laptops"] == 2
    assert "run out in 2.0 days" in st["leases"]["warning"]  # within [leases] warn_days (7)
    assert st["clock"]["master_offset_seconds"] is None  # only an online sync measures it
    # Renewed by stick, with the daemon running (it takes the stick's packs as the command does).
    m.ctl("lease", "renew", "--days", "30")
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    assert d.status()["leases"]["warning"] is None
    code, data2 = get_lease(port, "SHC0001")
    assert code == 200
    assert data2 != data


def test_another_schools_and_altered_leases_not_served(tmp_path: Path,
                                                       start_daemon: Callable[..., DaemonProc]) -> None:
    """The master's admin publishes by hand a leases folder for school-1 holding a
    lease of school-2's, an altered one and a misnamed one: the school serves
    none of them, and says why."""
    m, s, _key, port = setup(tmp_path, online=False)
    make_school(tmp_path, m, m.ctl("key").stdout.strip(), "school-2")
    m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"))
    (tmp_path / "other.txt").write_text("SHC0003\nSHC0004\n")
    m.ctl("lease", "issue", "school-2", "--serials", str(tmp_path / "other.txt"))
    by_hand = tmp_path / "by-hand"
    shutil.copytree(m.state / "leases" / "school-1", by_hand)
    shutil.copy(m.state / "leases" / "school-2" / "SHC0003.lease", by_hand / "SHC0003.lease")
    doc = json.loads((by_hand / "SHC0002.lease").read_bytes())
    lease = json.loads(doc["lease"])
    lease["expires"] += 365 * DAY
    doc["lease"] = json.dumps(lease, sort_keys=True, separators=(",", ":"))
    (by_hand / "SHC0002.lease").write_text(json.dumps(doc))
    shutil.copy(by_hand / "SHC0001.lease", by_hand / "SHC0005.lease")  # SHC0001's lease under another name
    m.ctl("publish", "leases", str(by_hand), "--for", "school-1")
    stick = tmp_path / "stick"
    stick.mkdir()
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    d = start_daemon(s)
    before = trusted_state(s)
    assert get_lease(port, "SHC0001")[0] == 200
    reason, error = refused_reason(port, "SHC0003")
    assert reason == "school", error
    assert "school-2" in error
    reason, error = refused_reason(port, "SHC0002")
    assert reason == "signature", error
    assert "altered" in error
    assert refused_reason(port, "SHC0005")[0] == "serial"
    assert trusted_state(s) == before
    st = d.status()["leases"]
    assert (st["laptops"], st["refused"]) == (1, 3)
    assert "3 refused" in st["warning"]
    # The command line says the same of a file.
    p = s.ctl("lease", "check", str(s.deploy / "leases" / "SHC0002.lease"), check=False)
    assert p.returncode == 1
    assert "altered" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert s.ctl("lease", "check", str(s.deploy / "leases" / "SHC0001.lease"), "--serial", "SHC0001").stdout.startswith(
        "valid: lease of laptop SHC0001 at school-1")


def test_lease_commands_refuse_bad_input(tmp_path: Path) -> None:
    m, s, _key, _port = setup(tmp_path, online=False)
    serials = str(tmp_path / "serials.txt")
    (tmp_path / "twice.txt").write_text("SHC0001\nSHC0001\n")
    (tmp_path / "bad.txt").write_text("SHC0001\nSHC/0002 x\n")
    before = trusted_state(m)
    cases = [
        (m, ("lease", "issue", "school-9", "--serials", serials), 2, "no enrolled school server"),
        (m, ("lease", "issue", "school-1", "--serials", serials, "--days", "0"), 2, "1 to 3650 days"),
        (m, ("lease", "issue", "school-1", "--serials", str(tmp_path / "none.txt")), 2, "cannot read"),
        (m, ("lease", "issue", "school-1", "--serials", str(tmp_path / "twice.txt")), 1, "listed twice"),
        (m, ("lease", "issue", "school-1", "--serials", str(tmp_path / "bad.txt")), 1, "line 2"),
        (m, ("lease", "issue", "school-1"), 2, "give the list with --serials"),
        (m, ("lease", "renew"), 2, "no school has leases yet"),
        (s, ("lease", "issue", "school-1", "--serials", serials), 2, "issued by the master"),
    ]
    for server, args, code, why in cases:
        p = server.ctl(*args, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert why in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert trusted_state(m) == before


def laptop_chain() -> Callable[..., tuple[int, bytes]]:
    """signing_key_now, docs/leases.md §6."""
    return docs_function("## 6. Key rotation", "signing_key_now")


def test_leases_after_a_key_rotation(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """`trust rotate` signs every school's leases again with the new key (a school
    serves no lease a retired key signed), the next sync carries them; a laptop
    that holds only the anchor follows the chain its school serves (GET
    /v1/trust) and checks the lease."""
    m, s, anchor, port = setup(tmp_path)
    m.ctl("lease", "issue", "school-1", "--serials", str(tmp_path / "serials.txt"))
    start_daemon(m)
    d = start_daemon(s)
    sync(s)
    assert get_lease(port, "SHC0001")[0] == 200
    m.ctl("trust", "new-key", "--out", str(tmp_path / "root.key"))
    out = m.ctl("trust", "rotate", "--new-root-key", str(tmp_path / "root.key")).stdout
    assert re.search(r"leases for school-1 signed again by the new key: 2 laptops, valid until \S+ "
                     r"\(leases release 2\)", out), out
    sync(s)  # the school follows the chain and takes the leases signed again
    assert d.status()["leases"]["refused"] == 0
    code, data = get_lease(port, "SHC0001")
    assert code == 200, data
    lease = json.loads(json.loads(data)["lease"])
    assert lease["key_version"] == 1
    check = laptop_check()
    with pytest.raises(ValueError, match="not signed by the master"):
        check(data, anchor, "SHC0001", int(time.time()))  # the anchor no longer signs
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/trust", timeout=10) as r:
        chain = json.loads(r.read())
    version, key = laptop_chain()(chain, anchor)
    assert version == lease["key_version"]
    assert json.loads(data)["signed_by"] == keys.format_key(key)
    check(data, key, "SHC0001", int(time.time()))
    # A chain whose link is altered does not lead to a key.
    bad = json.loads(json.dumps(chain))
    body = bytearray(base64.b64decode(bad["chain"][0][0]))
    body[-1] ^= 1  # the record's time: still a record, no longer the one signed
    bad["chain"][0][0] = base64.b64encode(bytes(body)).decode()
    with pytest.raises(InvalidSignature):
        laptop_chain()(bad, anchor)


@pytest.mark.parametrize(("section", "why"), [
    ("[leases]\nwarn_days = -1\n", "leases.warn_days: must be a whole number of days"),
    ("[leases]\nclock_tolerance_seconds = 5\n", "leases.clock_tolerance_seconds: must be between 60"),
    ("[leases]\nwarn = 7\n", "leases.warn: unknown key"),
    ("[leases]\nauto_renew = 1\n", "leases.auto_renew: must be true or false"),
])
def test_lease_settings_checked(tmp_path: Path, section: str, why: str) -> None:
    _m, s, _key, _port = setup(tmp_path, online=False)
    s.config.write_text(s.config.read_text() + "\n" + section)
    p = s.ctl("status", check=False)
    assert p.returncode == 1
    assert why in p.stderr


def test_the_master_daemon_renews_leases_past_half_their_time(
        tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    """Nobody has to remember a renewal: 30-day leases issued 16 days ago (by the
    master's clock) are renewed by the master's daemon, for the same laptops and
    the same 30 days, and reach the school at its next sync; a revoked school's
    leases are left to run out."""
    m, s, master_key, port = setup(tmp_path)
    make_school(tmp_path, m, keys.format_key(master_key), "school-2")
    for school in ("school-1", "school-2"):
        m.ctl("lease", "issue", school, "--serials", str(tmp_path / "serials.txt"), "--days", "30",
              env={CLOCK: str(-16 * DAY)})
    m.ctl("revoke", "school-2")
    dm = start_daemon(m)
    wait_for(lambda: "renewed 2 leases for school-1" in dm.output(), timeout=30, what="the renewal job")
    assert "for school-2" not in dm.output()
    start_daemon(s)
    assert "leases release 2" in sync(s)
    code, data = get_lease(port, "SHC0001")
    assert code == 200, data
    lease = laptop_check()(data, master_key, "SHC0001", int(time.time()))
    assert 29 * DAY < lease["expires"] - time.time() <= 30 * DAY
    # Renewed once: the next rounds find nothing due.
    time.sleep(0.5)
    assert dm.output().count("renewed 2 leases for school-1") == 1

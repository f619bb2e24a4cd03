"""Anti-theft leases (core/lease.py): the file format, the master's signature,
the time bounds and the clock floor; each refusal is one line with its reason."""

from __future__ import annotations

import json

import pytest

from harmonicd.core import keys
from harmonicd.core import lease as core
from harmonicd.errors import LeaseError

T0 = 1_790_000_000  # a fixed "now" (2026)
MASTER = keys.SigningKey(bytes(range(32)))
OTHER = keys.SigningKey(bytes(range(1, 33)))


def one(serial: str = "SHC7130003E", school: str = "school-042", days: int = 30,
        key: keys.SigningKey = MASTER) -> core.SignedLease:
    return core.issue([serial], school, "master-1", T0, days, key)[0]


def refused(data: bytes, *, now: int = T0, school: str = "school-042", serial: str | None = "SHC7130003E",
            key: bytes = MASTER.public) -> LeaseError:
    with pytest.raises(LeaseError) as info:
        core.check(data, key, now, school=school, serial=serial, where="SHC7130003E.lease")
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("SHC7130003E.lease"), msg
    return info.value


def test_a_lease_round_trips_and_verifies() -> None:
    sl = one()
    data = sl.encode()
    got = core.check(data, MASTER.public, T0 + 3600, school="school-042", serial="SHC7130003E", where="f")
    assert got.lease == sl.lease
    lz = got.lease
    assert (lz.not_before, lz.issued, lz.expires) == (T0 - core.DAY, T0, T0 + 30 * core.DAY)
    assert (lz.school, lz.master, lz.key_version) == ("school-042", "master-1", 0)
    assert len(data) < 600
    assert core.file_name("SHC7130003E") == "SHC7130003E.lease"


def test_a_laptop_verifies_with_json_and_ed25519_alone() -> None:
    """What docs/leases.md tells a laptop to do, with no Harmonic code."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    doc = json.loads(one().encode())
    body = doc["lease"].encode()
    Ed25519PublicKey.from_public_bytes(MASTER.public).verify(bytes.fromhex(doc["signature"]),
                                                             b"harmonic/lease/v1\x00" + body)
    lease = json.loads(body)
    assert lease["serial"] == "SHC7130003E"
    assert lease["expires"] == T0 + 30 * core.DAY
    assert doc["signed_by"] == keys.format_key(MASTER.public)


def test_the_signed_body_is_canonical() -> None:
    body = one().body
    d = json.loads(body)
    assert body == json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def test_valid_from_a_day_before_issue_until_expiry_exclusive() -> None:
    data = one(days=1).encode()
    core.check(data, MASTER.public, T0 - core.DAY, school="school-042", serial=None, where="f")
    core.check(data, MASTER.public, T0 + core.DAY - 1, school="school-042", serial=None, where="f")
    assert refused(data, now=T0 + core.DAY).reason == "expired"
    assert refused(data, now=T0 - core.DAY - 1).reason == "not-yet-valid"


def test_judged_at_the_floor_when_the_clock_is_behind() -> None:
    """A clock set back cannot make an expired lease valid again."""
    data = one(days=1).encode()
    system, floor = T0 - 100 * core.DAY, T0 + 2 * core.DAY  # a school clock reset to months ago
    now = core.effective_time(system, floor)
    assert now == floor
    assert refused(data, now=now).reason == "expired"
    assert core.effective_time(T0, None) == T0
    assert core.effective_time(T0 + 5, T0) == T0 + 5


def test_altered_lease_refused() -> None:
    doc = json.loads(one().encode())
    doc["lease"] = doc["lease"].replace(str(T0 + 30 * core.DAY), str(T0 + 3000 * core.DAY))
    e = refused(json.dumps(doc).encode())
    assert e.reason == "signature"
    assert "altered" in str(e)


def test_altered_signature_refused() -> None:
    doc = json.loads(one().encode())
    doc["signature"] = ("00" if doc["signature"][:2] != "00" else "11") + doc["signature"][2:]
    assert refused(json.dumps(doc).encode()).reason == "signature"


def test_signed_by_another_key_refused() -> None:
    """A forger's own key named in the file changes nothing: the master's key decides."""
    e = refused(one(key=OTHER).encode())
    assert e.reason == "signature"
    assert "not by the master's current key" in str(e)
    doc = json.loads(one(key=OTHER).encode())
    doc["signed_by"] = keys.format_key(MASTER.public)  # claims the master's key
    assert refused(json.dumps(doc).encode()).reason == "signature"


def test_retired_key_refused_after_rotation() -> None:
    """A lease the old signing key made is refused once the school trusts a new one."""
    e = refused(one().encode(), key=OTHER.public)
    assert e.reason == "signature"
    assert "key rotation" in str(e)


def test_lease_for_another_school_refused() -> None:
    e = refused(one(school="school-043").encode())
    assert e.reason == "school"
    assert "school-043" in str(e)


def test_lease_for_another_laptop_refused() -> None:
    e = refused(one(serial="SHC0000001").encode())
    assert e.reason == "serial"
    assert "SHC0000001" in str(e)


def _doc(**change: object) -> bytes:
    doc = json.loads(one().encode())
    doc.update(change)
    return json.dumps(doc).encode()


def _body(**change: object) -> bytes:
    """A lease whose signed body is changed and signed again by the master: its
    shape, not its signature, is what is refused."""
    d = json.loads(one().body)
    d.update(change)
    for k in [k for k, v in change.items() if v is None]:
        del d[k]
    body = json.dumps(d).encode()
    sl = core.SignedLease(one().lease, body, MASTER.sign(keys.TAG_LEASE, body), MASTER.public)
    return sl.encode()


@pytest.mark.parametrize(("data", "why"), [
    (b"", "not JSON"),
    (b"\xff\xfe garbage", "not JSON"),
    (b"[" * 4000, "not JSON"),
    (b" " * (core.MAX_FILE + 1), "larger than any lease file"),
    (b"[]", "format"),
    (json.dumps({"format": "harmonic-lease/v2"}).encode(), "format"),
    (_doc(lease=None), "field 'lease'"),
    (_doc(signature="zz"), "not 64 bytes"),
    (_doc(signature="ab" * 63), "not 64 bytes"),
    (_doc(signed_by="rsa:00"), "signed_by"),
    (_doc(lease="{not json"), "signed lease is not JSON"),
    (_doc(lease="\ud800"), "not valid text"),
    (_body(v=2), "unknown version"),
    (_body(expires=True), "field 'expires'"),
    (_body(expires="1790000000"), "field 'expires'"),
    (_body(expires=-1), "not a time"),
    (_body(expires=1 << 62), "not a time"),
    (_body(serial=None), "field 'serial'"),
    (_body(serial="../etc/passwd"), "not a laptop serial"),
    (_body(school="School 42"), "not valid"),
    (_body(school="master"), "reserved"),
    (_body(key_version=1.5), "field 'key_version'"),
    (_body(expires=T0 - core.DAY), "expires before it is valid"),
])
def test_malformed_lease_refused_with_one_line(data: bytes, why: str) -> None:
    e = refused(data)
    assert why in str(e), str(e)
    assert e.reason == "invalid"


def test_serial_list() -> None:
    text = "# school-042, grade 3\nSHC0001\n\n  SHC0002   alice 4f1e-uuid\nSHC0003 # spare\n"
    assert core.parse_serials(text, "list.txt") == ["SHC0001", "SHC0002", "SHC0003"]


@pytest.mark.parametrize(("text", "why"), [
    ("", "no laptop serial"),
    ("# only a comment\n", "no laptop serial"),
    ("SHC0001\nSHC0001\n", "line 2: serial SHC0001 is listed twice"),
    ("SHC0001\n../x\n", "line 2"),
    ("SHC/0001\n", "line 1"),
])
def test_bad_serial_list_refused(text: str, why: str) -> None:
    with pytest.raises(LeaseError, match=why):
        core.parse_serials(text, "list.txt")


@pytest.mark.parametrize("days", [0, -1, core.MAX_DAYS + 1])
def test_days_out_of_range_refused(days: int) -> None:
    with pytest.raises(LeaseError, match="1 to"):
        one(days=days)


def test_clock_warnings() -> None:
    tol = 3600
    assert core.clock_warning(T0, None, None, tol) is None
    assert core.clock_warning(T0, T0 + tol, None, tol) is None  # within the tolerance
    w = core.clock_warning(T0 - 100 * core.DAY, T0, None, tol)
    assert w is not None
    assert "100 days behind" in w
    assert core.iso(T0) in w
    assert "\n" not in w
    ahead = core.clock_warning(T0, None, 2 * tol, tol)
    assert ahead is not None
    assert "2 h ahead of the master's" in ahead
    behind = core.clock_warning(T0, None, -3 * core.DAY, tol)
    assert behind is not None
    assert "3 days behind the master's" in behind
    assert core.clock_warning(T0, None, tol, tol) is None

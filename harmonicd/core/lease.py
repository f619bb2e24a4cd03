"""Anti-theft leases: what a laptop holds to keep working (docs/leases.md).

A lease is a small self-contained statement by the master: "laptop SERIAL of
school SCHOOL may run from not_before until expires". The master signs it
with its signing key (domain tag ``harmonic/lease/v1\\0``); a laptop checks it
with the master's public key alone, with no Harmonic code: the file is JSON
and the signed bytes are a JSON text inside it, so a few lines of Python (or
of any language with JSON and ed25519) verify it::

    {"format": "harmonic-lease/v1",
     "lease": "{\\"expires\\":...,\\"serial\\":\\"SHC7130003E\\",...}",   <- the signed bytes, as a string
     "signature": "<128 hex digits>",
     "signed_by": "ed25519:<64 hex digits>"}

Why the body is a string inside the file rather than the file itself: the
signature covers exact bytes, and a JSON text carried as a string keeps them
exact through any JSON parser, with no canonical form to agree on.

Time: every judgement takes "now" from the caller, who gives the effective
time ``max(system clock, clock floor)`` (services/leases.py): the floor is
the newest time the master signed that this server verified, so a school
whose clock was set back cannot make an expired lease valid again.

Everything read from a file is hostile until verified: the size is bounded
before parsing, every field's type and range checked, and each refusal is a
LeaseError whose one line names the file and why.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from harmonicd.core import keys
from harmonicd.core.ident import check_school_id, check_server_id
from harmonicd.errors import HarmonicError, LeaseError

FORMAT = "harmonic-lease/v1"
SUFFIX = ".lease"  # a school's lease collection holds one file per laptop: <SERIAL>.lease
MAX_FILE = 4096  # a lease file is about 400 bytes; anything larger is not one
MAX_SERIALS = 100_000  # laptops in one school's list, at most
MAX_DAYS = 3650
DAY = 86_400
# A lease is valid from a day before it was issued: a laptop whose clock is a
# little behind the master's must not refuse the lease it was just given.
NOT_BEFORE_GRACE = DAY
# OLPC serials are 11 capitals and digits (SHC7130003E); other makers' are
# similar. Letters, digits, '.', '-', '_' only: a serial is a file name and a
# URL path segment.
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_MAX_TIME = 1 << 40  # far beyond any real date, below JSON's and SQLite's integer limits


def check_serial(text: str, where: str = "laptop serial") -> str:
    if not isinstance(text, str) or not _SERIAL.match(text) or ".." in text:
        raise LeaseError(f"{where}: {str(text)[:40]!r} is not a laptop serial (1-64 letters, digits, '.', '-', "
                         "'_', starting with a letter or digit)")
    return text


def file_name(serial: str) -> str:
    return check_serial(serial) + SUFFIX


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Lease:
    serial: str
    school: str
    master: str
    not_before: int  # unix seconds: valid from
    expires: int  # unix seconds: valid until (the laptop locks itself at this time without a newer lease)
    issued: int  # unix seconds, by the master's clock: a laptop may keep it as its own clock floor
    key_version: int  # version of the master's signing key in its key chain (0: the key schools pin)

    def body(self) -> bytes:
        """The signed bytes: canonical JSON (sorted keys, no spaces, ASCII)."""
        return json.dumps({
            "v": 1,
            "serial": self.serial,
            "school": self.school,
            "master": self.master,
            "not_before": self.not_before,
            "expires": self.expires,
            "issued": self.issued,
            "key_version": self.key_version,
        }, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class SignedLease:
    lease: Lease
    body: bytes
    signature: bytes
    signed_by: bytes  # the public key that signed it, as the file names it (checked by verify)

    def encode(self) -> bytes:
        """The lease file's bytes."""
        return json.dumps({
            "format": FORMAT,
            "lease": self.body.decode(),
            "signature": self.signature.hex(),
            "signed_by": keys.format_key(self.signed_by),
        }, indent=1).encode() + b"\n"

    def verify(self, master_key: bytes, where: str) -> None:
        """The signature is the master's, by the key given (its current signing key)."""
        if self.signed_by != master_key:
            raise LeaseError(f"{where}: signed by {keys.format_key(self.signed_by)[:24]}…, not by the master's "
                             f"current key {keys.format_key(master_key)[:24]}… (forged, or issued before a key "
                             "rotation: the master must issue it again)", "signature")
        if not keys.verify(master_key, keys.TAG_LEASE, self.body, self.signature):
            raise LeaseError(f"{where}: the signature does not verify against the master's key "
                             "(the lease was altered)", "signature")


def sign(lease: Lease, key: keys.SigningKey) -> SignedLease:
    body = lease.body()
    return SignedLease(lease, body, key.sign(keys.TAG_LEASE, body), key.public)


def issue(serials: list[str], school: str, master: str, now: int, days: int, key: keys.SigningKey,
          key_version: int = 0) -> list[SignedLease]:
    """One signed lease per serial, valid from a day before now for ``days`` days."""
    check_school_id(school, exc=LeaseError)
    check_server_id(master, exc=LeaseError)
    if type(days) is not int or not 1 <= days <= MAX_DAYS:
        raise LeaseError(f"a lease lasts 1 to {MAX_DAYS} days, not {days}")
    if not 0 < now < _MAX_TIME:
        raise LeaseError(f"the issuing clock reads {now}, not a time")
    out = []
    for s in serials:
        check_serial(s)
        out.append(sign(Lease(s, school, master, now - NOT_BEFORE_GRACE, now + days * DAY, now, key_version), key))
    return out


def parse_serials(text: str, where: str) -> list[str]:
    """A list of laptop serials: one a line; blank lines and '#' comments ignored;
    a line may add words after the serial (a name, a UUID), which are ignored."""
    out: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        serial = check_serial(line.split()[0], f"{where} line {n}")
        if serial in seen:
            raise LeaseError(f"{where} line {n}: serial {serial} is listed twice")
        seen.add(serial)
        out.append(serial)
        if len(out) > MAX_SERIALS:
            raise LeaseError(f"{where}: more than {MAX_SERIALS} serials")
    if not out:
        raise LeaseError(f"{where}: no laptop serial in it (one a line)")
    return out


def _field(d: dict[str, Any], k: str, typ: type, where: str) -> Any:
    v = d.get(k)
    if type(v) is not typ:
        raise LeaseError(f"{where}: field {k!r} is missing or not {'text' if typ is str else 'a whole number'}")
    return v


def _time(d: dict[str, Any], k: str, where: str, what: str = "a time") -> int:
    v: int = _field(d, k, int, where)
    if not 0 <= v < _MAX_TIME:
        raise LeaseError(f"{where}: field {k!r} is not {what}")
    return v


def _json(text: str | bytes, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: a few kilobytes of '[' nest deeper than the parser goes.
        raise LeaseError(f"{where}: {what} is not JSON") from None


def parse(data: bytes, where: str) -> SignedLease:
    """A lease file's bytes, from anywhere (a replica, a laptop, a test): parsed and
    checked for shape only. The caller verifies the signature and judges the time."""
    if len(data) > MAX_FILE:
        raise LeaseError(f"{where}: {len(data)} bytes, larger than any lease file ({MAX_FILE})")
    doc = _json(data, where, "the file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LeaseError(f"{where}: not a lease file (format is not {FORMAT!r})")
    body_text = _field(doc, "lease", str, where)
    sig_hex = _field(doc, "signature", str, where)
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        signature = b""
    if len(signature) != keys.SIG_LEN:
        raise LeaseError(f"{where}: the signature is not {keys.SIG_LEN} bytes of hex")
    try:
        signed_by = keys.parse_key(_field(doc, "signed_by", str, where))
    except ValueError as exc:
        raise LeaseError(f"{where}: signed_by: {exc}") from None
    try:
        body = body_text.encode()
    except UnicodeEncodeError:
        raise LeaseError(f"{where}: the signed lease is not valid text") from None
    d = _json(body_text, where, "the signed lease")
    if not isinstance(d, dict) or d.get("v") != 1:
        raise LeaseError(f"{where}: the signed lease has an unknown version")
    try:
        school = check_school_id(_field(d, "school", str, where), exc=LeaseError)
        master = check_server_id(_field(d, "master", str, where), exc=LeaseError)
    except HarmonicError as exc:
        raise LeaseError(f"{where}: {exc}") from None
    lease = Lease(
        serial=check_serial(_field(d, "serial", str, where), where),
        school=school,
        master=master,
        not_before=_time(d, "not_before", where),
        expires=_time(d, "expires", where),
        issued=_time(d, "issued", where),
        key_version=_time(d, "key_version", where, "a key version"),
    )
    if lease.expires <= lease.not_before:
        raise LeaseError(f"{where}: expires before it is valid")
    return SignedLease(lease, body, signature, signed_by)


def judge(lease: Lease, now: int, *, school: str, serial: str | None, where: str) -> None:
    """Raise LeaseError unless the lease is for this school (and this laptop) and
    valid at ``now``: the effective time, never the bare system clock."""
    if lease.school != school:
        raise LeaseError(f"{where}: issued for school {lease.school}, not for {school}", "school")
    if serial is not None and lease.serial != serial:
        raise LeaseError(f"{where}: issued for laptop {lease.serial}, not for {serial}", "serial")
    if now >= lease.expires:
        raise LeaseError(f"{where}: expired at {iso(lease.expires)} (now {iso(now)})", "expired")
    if now < lease.not_before:
        raise LeaseError(f"{where}: not valid before {iso(lease.not_before)} (now {iso(now)})", "not-yet-valid")


def check(data: bytes, master_key: bytes, now: int, *, school: str, serial: str | None,
          where: str) -> SignedLease:
    """Parse, verify and judge one lease file: what a school does before it serves
    one, and what a laptop does with what it got."""
    sl = parse(data, where)
    sl.verify(master_key, where)
    judge(sl.lease, now, school=school, serial=serial, where=where)
    return sl


# --------------------------------------------------------------------------- the clock


def effective_time(system: int, floor: int | None) -> int:
    """The time leases are judged against: the system clock, but never earlier than
    the newest time the master signed that this server verified."""
    return system if floor is None else max(system, floor)


def clock_warning(system: int, floor: int | None, master_offset: int | None, tolerance: int) -> str | None:
    """One line for the admin when this server's clock is not to be trusted, else None.

    ``floor``: the newest master-signed time verified; ``master_offset``: the
    system clock minus the master's signed time, measured at the last online
    sync with the master itself (None: not measured)."""
    if floor is not None and floor - system > tolerance:
        return (f"the system clock ({iso(system)}) is {_span(floor - system)} behind the newest time the master "
                f"signed ({iso(floor)}): leases are judged against {iso(floor)}; set the clock right")
    if master_offset is not None and abs(master_offset) > tolerance:
        way = "ahead of" if master_offset > 0 else "behind"
        return (f"the system clock was {_span(abs(master_offset))} {way} the master's at the last online sync: "
                "set the clock right (leases are judged against it, never earlier than the master's time)")
    return None


def _span(seconds: int) -> str:
    """Rounded to the nearest unit: a clock 20 days behind a time signed a second
    ago is "20 days" behind, not 19."""
    if seconds >= 2 * DAY:
        return f"{round(seconds / DAY)} days"
    if seconds >= 3600:
        return f"{round(seconds / 3600)} h"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds} s"

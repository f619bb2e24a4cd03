"""Bootstrap bundles, enrollment proofs and the master's revocation list (pure).

A **bundle** is what the master hands a new school server (a file, 0600, on a
stick or inside a disk image): everything it needs to configure itself and to
enroll with no key copied by hand. Layout (docs/pack-format.md, "Bundles")::

    magic "HRMNBNDL" | u16 version (1) | u32 body_len | body (msgpack) | signature[64]

The signature is the master's ed25519 over TAG_BUNDLE + body, by the master's
current signing key: the key its key chain (core/trust.py) ends at, starting
from the anchor key the bundle names (the key a school pins as
upstream.master_key). With an empty chain the anchor signs. Body::

    {v: 1, master: ID, anchor: key, chain: [[body, by_previous, by_self], ...],
     upstream: [URL, ...], school: ID | nil, prefix: TEXT | nil, count: N,
     collections: [NAME, ...], seqs: {NAME: seq}, token_id: 16 bytes,
     token: 32 bytes, created: unix s, expires: unix s}

``school`` names the one school it is for; a region bundle has ``prefix``
instead, and up to ``count`` servers each take an id starting with it.
``seqs``: for a server replacing a revoked one under the same id, the last
release the master holds of each of the old server's collections: the new
server numbers its own releases on from there, so the master's archive of
that school goes on instead of meeting release numbers it holds already.

The **token** never travels again: the school proves it knows it with
``proof = BLAKE3(key=token, ENROLL_CONTEXT + school id + school public key)``
in ``extra["enroll"] = {"token": token_id, "proof": proof}`` of its request
packs, which its own key signs. The proof binds the token to that id and that
key: a copy of the request shows nothing usable with any other key.

The **revocation list** is the master's signed statement of the school
servers it revoked: ``[body, sig]`` in ``extra["revoked"]`` of every pack the
master (or a relay) writes, and ``GET /v1/revocations``. Body::

    {v: 1, master: ID, seq: N, entries: [[school id, key, unix s], ...]}

signed with TAG_REVOCATIONS by the master's current signing key. ``seq`` only
grows: a server keeps the newest list it verified, never an older one.

Everything here is decoded as hostile input: bounded, typed, one-line errors.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3

from harmonicd.core import keys, trust
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.core.ident import check_collection, check_school_id, check_server_id
from harmonicd.errors import BundleError, CorruptPack, HarmonicError, UntrustedPack

MAGIC = b"HRMNBNDL"
VERSION = 1
HEAD = struct.Struct(">8sHI")
MAX_BUNDLE = 1 << 20  # a bundle is a few hundred bytes; a long key chain adds ~300 bytes a link
MAX_UPSTREAMS = 8
MAX_URL = 512
MAX_COLLECTIONS = 64
MAX_REGION = 100_000  # servers a region bundle may enroll
TOKEN_LEN = 32
TOKEN_ID_LEN = 16
PROOF_LEN = 32
ENROLL_CONTEXT = b"harmonic/enroll/v1\x00"
PREFIX_MAX = 40  # a region's id prefix leaves room for each server's own name
MAX_REVOCATIONS = 100_000
MAX_REVOCATIONS_BYTES = 8 << 20

# A key chain's record as carried: [body, by_previous, by_self] (core/trust.py).
ChainRecord = list[bytes]
# The signing key a chain ends at, from the anchor: (anchor, master id, chain) -> key.
ChainEnd = Callable[[bytes, str, list[ChainRecord]], bytes]


# --------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class Bundle:
    master: str
    anchor: bytes  # the master's anchor key: what the school pins as upstream.master_key
    chain: list[ChainRecord]  # the master's key chain (core/trust.py), possibly empty
    upstream: list[str]  # URLs; empty: the school syncs by stick only
    school: str | None  # the one school it is for; None for a region bundle
    prefix: str | None  # region: every id it makes starts with this
    count: int  # servers that may enroll with its token (1 for one school)
    collections: list[str]  # the master's collections the school carries
    seqs: dict[str, int]  # the school's own collections: the master's last release of each (a replacement)
    token_id: bytes
    token: bytes
    created: int
    expires: int

    def body(self) -> bytes:
        return pack_msg({
            "v": 1, "master": self.master, "anchor": self.anchor, "chain": self.chain,
            "upstream": self.upstream, "school": self.school, "prefix": self.prefix, "count": self.count,
            "collections": self.collections, "seqs": self.seqs, "token_id": self.token_id, "token": self.token,
            "created": self.created, "expires": self.expires,
        })

    def what(self) -> str:
        return (f"school {self.school}" if self.school is not None
                else f"up to {self.count} servers named {self.prefix}*")

    def school_id(self, name: str | None) -> str:
        """The id a server takes from this bundle: the bundle's own school, or for a
        region the prefix and name (a name already starting with the prefix is kept)."""
        if self.school is not None:
            if name is not None and name != self.school:
                raise BundleError(f"this bundle is for {self.school}, not {name}; a school bundle "
                                  "names its server's id (leave out --id)")
            return self.school
        assert self.prefix is not None
        if not name:
            raise BundleError("a region bundle needs a name for this server")
        sid = name if name.startswith(self.prefix) else self.prefix + name
        return check_school_id(sid, exc=BundleError)


def encode(b: Bundle, key: keys.SigningKey) -> bytes:
    """The bundle file's bytes, signed with key (the master's current signing key)."""
    body = b.body()
    if len(body) + HEAD.size + keys.SIG_LEN > MAX_BUNDLE:
        raise BundleError(f"the bundle would be {len(body)} bytes, over the limit of {MAX_BUNDLE}")
    return HEAD.pack(MAGIC, VERSION, len(body)) + body + key.sign(keys.TAG_BUNDLE, body)


def decode(data: bytes, where: str) -> tuple[Bundle, bytes, bytes]:
    """Parse a bundle file's bytes (hostile input). Returns the bundle, its signed
    body and signature; the signature is checked by verify()."""
    if len(data) > MAX_BUNDLE:
        raise BundleError(f"{where}: {len(data)} bytes, larger than any bundle ({MAX_BUNDLE}): not a bundle")
    if len(data) < HEAD.size + keys.SIG_LEN:
        raise BundleError(f"{where}: too short to be a Harmonic bundle (cut short?)")
    magic, version, n = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{where}: not a Harmonic bundle (no HRMNBNDL at its start)")
    if version != VERSION:
        raise BundleError(f"{where}: bundle format version {version}; this version reads {VERSION}")
    if HEAD.size + n + keys.SIG_LEN != len(data):
        raise BundleError(f"{where}: its length does not match what its header says (cut short or altered)")
    body = data[HEAD.size:HEAD.size + n]
    sig = data[HEAD.size + n:]
    try:
        d = unpack_msg(body, max_items=trust.MAX_RECORDS * 4 + 256, what=f"{where}: bundle")
        return _fields(d), body, sig
    except CorruptPack as exc:
        raise BundleError(f"{where}: damaged bundle: {exc}") from None
    except HarmonicError as exc:
        raise BundleError(f"{where}: damaged bundle: {exc}") from None


def _fields(d: Any) -> Bundle:
    if not isinstance(d, dict) or d.get("v") != 1:
        raise CorruptPack("unknown bundle version")

    def blob(k: str, n: int) -> bytes:
        v = d.get(k)
        if not isinstance(v, bytes) or len(v) != n:
            raise CorruptPack(f"field {k!r} is not {n} bytes")
        return v

    def whole(k: str, low: int = 0, high: int = 1 << 62) -> int:
        v = d.get(k)
        if type(v) is not int or not low <= v <= high:
            raise CorruptPack(f"field {k!r} is not a whole number from {low} to {high}")
        return v

    def texts(k: str, limit: int, each: int) -> list[str]:
        v = d.get(k)
        if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) and 0 < len(x) <= each for x in v):
            raise CorruptPack(f"field {k!r} is not a list of at most {limit} short texts")
        return list(v)

    master = d.get("master")
    if not isinstance(master, str):
        raise CorruptPack("field 'master' is not text")
    check_server_id(master, exc=CorruptPack)
    anchor = blob("anchor", keys.KEY_LEN)
    chain = check_chain(d.get("chain"))
    upstream = texts("upstream", MAX_UPSTREAMS, MAX_URL)
    for u in upstream:
        if not (u == "auto" or (u.startswith(("http://", "https://")) and u.isprintable() and " " not in u)):
            raise CorruptPack(f"upstream {u[:60]!r} is not an http:// or https:// URL")
    school, prefix = d.get("school"), d.get("prefix")
    count = whole("count", 1, MAX_REGION)
    if school is not None:
        if not isinstance(school, str) or prefix is not None or count != 1:
            raise CorruptPack("a school bundle names one school id, no prefix, and a count of 1")
        check_school_id(school, exc=CorruptPack)
    else:
        if not isinstance(prefix, str):
            raise CorruptPack("a bundle names either a school id or a region's id prefix")
        check_prefix(prefix, exc=CorruptPack)
    collections = texts("collections", MAX_COLLECTIONS, 63)
    for c in collections:
        check_collection(c, exc=CorruptPack)
    seqs = d.get("seqs")
    if not isinstance(seqs, dict) or len(seqs) > MAX_COLLECTIONS or not all(
            isinstance(k, str) and type(v) is int and 0 <= v < 1 << 62 for k, v in seqs.items()):
        raise CorruptPack("field 'seqs' is not a map of collection names to release numbers")
    for c in seqs:
        check_collection(c, exc=CorruptPack)
    created = whole("created")
    expires = whole("expires")
    if expires <= created:
        raise CorruptPack("it expires before it was made")
    return Bundle(master=master, anchor=anchor, chain=chain, upstream=upstream, school=school, prefix=prefix,
                  count=count, collections=collections, seqs=dict(seqs), token_id=blob("token_id", TOKEN_ID_LEN),
                  token=blob("token", TOKEN_LEN), created=created, expires=expires)


def check_prefix(prefix: str, *, exc: type[HarmonicError] = BundleError) -> str:
    """A region's id prefix: the start of a valid school id, short enough to leave room for a name."""
    if not 0 < len(prefix) <= PREFIX_MAX:
        raise exc(f"region prefix {prefix[:60]!r} must be 1-{PREFIX_MAX} characters")
    check_school_id(prefix + "x", exc=exc)
    return prefix


def check_chain(v: Any) -> list[ChainRecord]:
    """A key chain as carried (list of [body, by_previous, by_self]), each link well
    formed (core/trust.py); its signatures are checked by chain_end."""
    return [link.wire() for link in trust.decode_chain(v)]


def chain_end(anchor: bytes, master: str, chain: list[ChainRecord]) -> bytes:
    """The signing key the chain ends at, followed link by link from the anchor."""
    state, _new = trust.advance(trust.genesis(anchor, master), trust.decode_chain(chain))
    return state.signing


def verify(b: Bundle, body: bytes, sig: bytes, where: str, follow: ChainEnd = chain_end) -> bytes:
    """Check a bundle's signature against the signing key its chain ends at (from its
    anchor); returns that key. A byte changed, or a bundle re-signed by any other
    key, is refused here."""
    try:
        signing = follow(b.anchor, b.master, b.chain)
    except HarmonicError as exc:
        raise BundleError(f"{where}: the bundle's key chain is refused: {exc}") from None
    if not keys.verify(signing, keys.TAG_BUNDLE, body, sig):
        raise BundleError(f"{where}: the bundle's signature does not verify against the master's key "
                          f"({keys.format_key(signing)[:24]}…): tampered with, or not made by the master")
    return signing


# --------------------------------------------------------------------------- enrollment


def proof(token: bytes, school: str, public: bytes) -> bytes:
    """What a school sends instead of its token: bound to its id and its key."""
    return blake3.blake3(ENROLL_CONTEXT + school.encode() + public, key=token).digest()


def proof_matches(token: bytes, school: str, public: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(token, school, public), given)


def enroll_extra(token_id: bytes, proof_: bytes) -> dict[str, bytes]:
    return {"token": token_id, "proof": proof_}


def read_enroll(v: Any, where: str) -> tuple[bytes, bytes]:
    """extra["enroll"] of a pack (hostile): (token id, proof)."""
    if (not isinstance(v, dict) or set(v) != {"token", "proof"} or not isinstance(v["token"], bytes)
            or len(v["token"]) != TOKEN_ID_LEN or not isinstance(v["proof"], bytes)
            or len(v["proof"]) != PROOF_LEN):
        raise CorruptPack(f"{where}: its enrollment proof (extra[\"enroll\"]) is malformed")
    return v["token"], v["proof"]


# --------------------------------------------------------------------------- revocations


@dataclass(frozen=True)
class Revoked:
    school: str
    key: bytes
    at: int


@dataclass(frozen=True)
class RevocationList:
    master: str
    seq: int
    entries: tuple[Revoked, ...]

    def body(self) -> bytes:
        return pack_msg({"v": 1, "master": self.master, "seq": self.seq,
                         "entries": [[e.school, e.key, e.at] for e in self.entries]})

    def keys(self) -> frozenset[bytes]:
        return frozenset(e.key for e in self.entries)

    def names(self, key: bytes) -> Revoked | None:
        return next((e for e in self.entries if e.key == key), None)


def sign_revocations(rl: RevocationList, key: keys.SigningKey) -> list[bytes]:
    """[body, sig] as extra["revoked"] carries it."""
    body = rl.body()
    return [body, key.sign(keys.TAG_REVOCATIONS, body)]


def read_revocations(v: Any, signing: bytes, where: str) -> tuple[RevocationList, bytes, bytes]:
    """extra["revoked"] (hostile): decoded and verified against the master's current
    signing key. Returns the list and its body and signature (kept as they came,
    for a relay to pass on)."""
    if (not isinstance(v, list) or len(v) != 2 or not isinstance(v[0], bytes) or not isinstance(v[1], bytes)
            or len(v[0]) > MAX_REVOCATIONS_BYTES or len(v[1]) != keys.SIG_LEN):
        raise CorruptPack(f"{where}: its revocation list (extra[\"revoked\"]) is not [body, signature]")
    body, sig = v[0], v[1]
    if not keys.verify(signing, keys.TAG_REVOCATIONS, body, sig):
        raise UntrustedPack(f"{where}: its revocation list is not signed by the master's key")
    return decode_revocations(body, where), body, sig


def decode_revocations(body: bytes, where: str) -> RevocationList:
    d = unpack_msg(body, max_items=MAX_REVOCATIONS, what=f"{where}: revocation list")
    if not isinstance(d, dict) or d.get("v") != 1:
        raise CorruptPack(f"{where}: revocation list of an unknown version")
    master, seq, raw = d.get("master"), d.get("seq"), d.get("entries")
    if not isinstance(master, str) or type(seq) is not int or not 0 < seq < 1 << 62:
        raise CorruptPack(f"{where}: revocation list without a master id and a positive seq")
    check_server_id(master, exc=CorruptPack)
    if not isinstance(raw, list):
        raise CorruptPack(f"{where}: revocation list entries are not a list")
    entries = []
    for e in raw:
        if (not isinstance(e, list) or len(e) != 3 or not isinstance(e[0], str) or not isinstance(e[1], bytes)
                or len(e[1]) != keys.KEY_LEN or type(e[2]) is not int or e[2] < 0):
            raise CorruptPack(f"{where}: a revocation list entry is not [school id, key, time]")
        entries.append(Revoked(check_server_id(e[0], exc=CorruptPack), e[1], e[2]))
    return RevocationList(master, seq, tuple(entries))

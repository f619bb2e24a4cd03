"""The master's key chain: which key signs for the master now, and since when.

Like TUF's root metadata, with two roles. The *root* key is kept off the
server (a file the admin keeps; `harmonicctl trust new-key`) and does one
thing: it names the next root and the *signing* key. The signing key lives
on the master (STATE/key) and signs its releases and packs. A leaked signing
key is replaced by a record the root signs; a leaked root by a record the old
and the new root both sign.

Version 0 is implicit: root = signing = the *anchor*, the key a school pins
(``upstream.master_key``; on the master, its key before its first rotation).
Link n >= 1 is a record::

    {v: 1, master: ID, version: n, root: R_n, signing: S_n, created: unix seconds}

signed with TAG_CHAIN twice: by R_{n-1} (``by_previous``: the old root hands
over) and by R_n (``by_self``: the new root accepts; nobody can name a key
they do not hold as the next root). Carried as ``[body, by_previous, by_self]``.

A server follows the chain one link at a time from what it holds (advance):
every new link must be the next version, for the same master, signed by the
root it holds and by the link's own root, and it may not bring back a signing
key the chain has retired. A link it holds already must be offered byte for
byte as held (another one is a fork). Nothing here touches the store: the
caller commits the new links with whatever they came with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harmonicd.core import keys
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.core.ident import check_server_id
from harmonicd.errors import (
    ChainError,
    ChainFork,
    ChainGap,
    ChainRollback,
    ChainSignature,
    CorruptPack,
)

MAX_RECORDS = 256  # links in a chain, at most: a rotation a month for twenty years
MAX_RECORD_BYTES = 512  # a record's body (some 150 bytes in practice)
RECORD_VERSION = 1
FIELDS = frozenset({"v", "master", "version", "root", "signing", "created"})


@dataclass(frozen=True, slots=True)
class Record:
    master: str
    version: int
    root: bytes
    signing: bytes
    created: int

    def encode(self) -> bytes:
        return pack_msg({"v": RECORD_VERSION, "master": self.master, "version": self.version,
                         "root": self.root, "signing": self.signing, "created": self.created})


@dataclass(frozen=True, slots=True)
class Link:
    """A record with its two signatures, as carried and stored."""

    record: Record
    body: bytes
    by_previous: bytes
    by_self: bytes

    def wire(self) -> list[bytes]:
        return [self.body, self.by_previous, self.by_self]


def make_record(master: str, version: int, root: bytes, signing: bytes, created: int) -> Record:
    check_server_id(master, exc=ChainError)
    if not 1 <= version <= MAX_RECORDS:
        raise ChainError(f"a key chain holds versions 1 to {MAX_RECORDS}, not {version}")
    if len(root) != keys.KEY_LEN or len(signing) != keys.KEY_LEN:
        raise ChainError("a key chain record names 32-byte keys")
    return Record(master, version, root, signing, created)


def sign(record: Record, previous_root: keys.SigningKey, new_root: keys.SigningKey) -> Link:
    """The link for record: signed by the root it replaces and by the root it names."""
    if new_root.public != record.root:
        raise ChainError(f"link {record.version}: the new root key given is not the one the record names")
    body = record.encode()
    return Link(record, body, previous_root.sign(keys.TAG_CHAIN, body), new_root.sign(keys.TAG_CHAIN, body))


# --------------------------------------------------------------------------- reading (hostile input)


def decode_record(body: Any) -> Record:
    """A record from untrusted bytes: bounded, every field of its fixed type, and
    canonical (encoding it again gives the same bytes, so one record has one body)."""
    if not isinstance(body, bytes):
        raise ChainError("a key chain link's record is not bytes")
    if len(body) > MAX_RECORD_BYTES:
        raise ChainError(f"a key chain record of {len(body)} bytes (limit {MAX_RECORD_BYTES})")
    try:
        d = unpack_msg(body, max_items=16, what="key chain record")
    except CorruptPack as exc:
        raise ChainError(str(exc)) from None
    if not isinstance(d, dict) or d.get("v") != RECORD_VERSION or set(d) != FIELDS:
        raise ChainError("a key chain record of an unknown version or with other fields")
    master, version, root, signing, created = (d["master"], d["version"], d["root"], d["signing"],
                                               d["created"])
    if not isinstance(master, str) or len(master) > 63:
        raise ChainError("a key chain record's master id is not text")
    if type(version) is not int or not 1 <= version <= MAX_RECORDS:
        raise ChainError(f"a key chain record's version is not a number from 1 to {MAX_RECORDS}")
    if type(created) is not int or not 0 <= created < 1 << 63:
        raise ChainError(f"link {version}: its time is not a non-negative number")
    for name, k in (("root", root), ("signing", signing)):
        if not isinstance(k, bytes) or len(k) != keys.KEY_LEN:
            raise ChainError(f"link {version}: its {name} key is not 32 bytes")
    rec = make_record(master, version, root, signing, created)
    if rec.encode() != body:
        raise ChainError(f"link {version}: its record is not in canonical form")
    return rec


def decode_link(item: Any) -> Link:
    if not (isinstance(item, list) and len(item) == 3 and all(isinstance(x, bytes) for x in item)):
        raise ChainError("a key chain link is not [record, signature by the previous root, signature by its root]")
    body, by_previous, by_self = item
    rec = decode_record(body)
    if not by_self:
        raise ChainSignature(f"link {rec.version} has no self-signature (its new root key must sign it)")
    if not by_previous:
        raise ChainSignature(f"link {rec.version} is not signed by the previous root key")
    if len(by_previous) != keys.SIG_LEN or len(by_self) != keys.SIG_LEN:
        raise ChainSignature(f"link {rec.version}: a signature is not {keys.SIG_LEN} bytes")
    return Link(rec, body, by_previous, by_self)


def decode_chain(raw: Any) -> list[Link]:
    """extra["chain"] (or a stored or served chain) from untrusted input: a list of
    at most MAX_RECORDS links. Signatures are checked by advance(), not here."""
    if not isinstance(raw, list):
        raise ChainError("the key chain is not a list of links")
    if len(raw) > MAX_RECORDS:
        raise ChainError(f"the key chain has {len(raw)} links (limit {MAX_RECORDS})")
    return [decode_link(item) for item in raw]


# --------------------------------------------------------------------------- following


@dataclass(frozen=True)
class ChainState:
    """What a server trusts of the master's keys: the anchor and the links it
    verified, in order (links[i] is version i + 1)."""

    anchor: bytes
    master: str | None  # None: a school that has not heard of the master yet (no link, no pack)
    links: tuple[Link, ...] = ()

    @property
    def version(self) -> int:
        return len(self.links)

    @property
    def root(self) -> bytes:
        return self.links[-1].record.root if self.links else self.anchor

    @property
    def signing(self) -> bytes:
        """The master's signing key now: what its packs and releases must verify against."""
        return self.links[-1].record.signing if self.links else self.anchor

    def signing_keys(self) -> list[bytes]:
        """Every signing key of the chain, index = version (the last is current)."""
        return [self.anchor] + [link.record.signing for link in self.links]

    def retired(self, key: bytes) -> int | None:
        """The version whose signing key ``key`` was, if the chain has since replaced it."""
        for v, k in enumerate(self.signing_keys()[:-1]):
            if k == key and k != self.signing:
                return v
        return None

    def wire(self) -> list[list[bytes]]:
        return [link.wire() for link in self.links]


def genesis(anchor: bytes, master: str | None = None) -> ChainState:
    if len(anchor) != keys.KEY_LEN:
        raise ChainError("the anchor key is not 32 bytes")
    return ChainState(anchor, master)


def extend(state: ChainState, link: Link) -> ChainState:
    """state with one more link, checked: the next version, the same master, signed
    by the current root and by its own root, no retired signing key brought back."""
    rec = link.record
    v = state.version + 1
    if rec.version != v:
        raise ChainGap(f"link {v} missing (offered link {rec.version} next)")
    if v > MAX_RECORDS:
        raise ChainError(f"the key chain would pass {MAX_RECORDS} links")
    if state.master is not None and rec.master != state.master:
        raise ChainError(f"link {v} is for master {rec.master!r}, not {state.master!r}")
    if not keys.verify(state.root, keys.TAG_CHAIN, link.body, link.by_previous):
        raise ChainSignature(f"link {v} is not signed by the previous root key")
    if not keys.verify(rec.root, keys.TAG_CHAIN, link.body, link.by_self):
        raise ChainSignature(f"link {v} is not signed by its own new root key (self-signature missing or wrong)")
    if rec.signing in state.signing_keys():
        raise ChainRollback(f"link {v} makes an earlier signing key current again")
    return ChainState(state.anchor, rec.master, (*state.links, link))


def advance(state: ChainState, links: Iterable[Link]) -> tuple[ChainState, list[Link]]:
    """Follow the links offered from what state holds. Returns the new state and
    the links it added (to be stored with whatever carried them). Links at or
    below the version held must be the ones held; a chain shorter than the one
    held (an older copy) changes nothing."""
    offered: dict[int, Link] = {}
    for n, given in enumerate(links):
        if n >= MAX_RECORDS:
            raise ChainError(f"the key chain has more than {MAX_RECORDS} links")
        v = given.record.version
        other = offered.get(v)
        if other is not None and other.body != given.body:
            raise ChainFork(f"two different links {v} offered")
        offered[v] = given
    top = max(offered, default=0)
    new: list[Link] = []
    cur = state
    for v in range(1, top + 1):
        link = offered.get(v)
        if v <= cur.version:
            if link is not None and link.body != cur.links[v - 1].body:
                raise ChainFork(f"link {v} differs from the link {v} this server holds (a fork of the master's "
                                "key chain)")
            continue
        if link is None:
            raise ChainGap(f"link {v} missing (the chain offered jumps from version {v - 1} to {top})")
        cur = extend(cur, link)
        new.append(link)
    return cur, new


def check_signer(state: ChainState, key: bytes, what: str) -> None:
    """Refuse what a retired signing key signed once state trusts a newer one."""
    old = state.retired(key)
    if old is not None:
        raise ChainRollback(f"{what} is signed by the master's retired signing key of version {old}; this "
                            f"server trusts version {state.version} (a rollback to an older key)")

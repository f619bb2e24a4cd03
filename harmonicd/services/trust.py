"""The master's key chain at the store level: followed from packs, carried in
packs and over HTTP, and rotated on the master (core/trust.py is the pure part).

Where the chain lives: table trust_chain (state.db) on the master and on every
school, as verified; ``Store.trust_chain()`` checks it again from the anchor,
and ``Store.master_key()`` is its current signing key: what every signature of
the master is verified against. The master's STATE/key is always that key.

Carried: every pack the master writes, and every pack a relay (a school server
serving others) writes for a downstream, holds the whole chain in its header's
``extra["chain"]`` (a few hundred bytes a link). A school imports a pack by
first following that chain from what it holds (nothing is stored yet), then
checking the pack's signature and each release against the signing key the
chain ends at; the new links are committed in the pack's own transaction, so
a pack refused for any reason leaves the chain as it was. GET /v1/trust serves
the same chain (for tools, laptops and monitoring); a school needs no extra
round trip because the answers it downloads carry the chain themselves.

Why the releases are signed again at a rotation (same bodies, new signatures):
a school that follows the chain trusts only the current signing key from then
on, so that a leaked old key signs nothing it will accept. The releases it
holds keep their old signatures (they were checked when they came); a relay
serves them on, so it must hold them as the current key signed them. A school
says in its request which is the oldest key version that signed a release it
holds (have["chain"]); the master (or a relay) then sends those releases again
as signed now, with their objects only where the release differs (one signed
by a leaked key: the master's own release takes its place, even at a lower
number).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from harmonicd.core import keys, trust
from harmonicd.core.codec import unpack_msg
from harmonicd.core.pack import Header
from harmonicd.core.release import SignedRelease
from harmonicd.errors import ChainError, ChainRollback, HarmonicError, UsageError
from harmonicd.store import durable
from harmonicd.store.db import Collection, ReleaseRow
from harmonicd.store.faults import crash_point
from harmonicd.store.store import ANCHOR_META, KEY_NEXT, Store

EXTRA_KEY = "chain"  # pack header extra: the whole chain, [[record, by_previous, by_self], ...]
HAVE_KEY = "chain"  # have-state: the oldest chain version among the signatures of the master's releases held


@dataclass
class Followed:
    """A pack's chain followed from what this school holds, not yet stored."""

    state: trust.ChainState
    new: list[trust.Link]
    from_master: bool  # the pack is signed by the master's current signing key


def follow(store: Store, h: Header) -> Followed:
    """School: follow the chain a pack carries; refuse a pack the master signed
    with a key the chain has retired (a rollback). Raises ChainError (one line;
    the caller names the file)."""
    held = store.trust_chain()
    raw = h.extra.get(EXTRA_KEY)
    state = held
    new: list[trust.Link] = []
    if raw is not None:
        try:
            state, new = trust.advance(held, trust.decode_chain(raw))
        except ChainError as exc:
            raise type(exc)(f"the master's key chain it carries is refused: {exc}") from None
    from_master = h.sender_key == state.signing
    if not from_master:
        trust.check_signer(state, h.sender_key, "the pack")
    return Followed(state, new, from_master)


def commit(store: Store, followed: Followed | None) -> None:
    """Store the links a pack brought, inside that pack's import transaction."""
    if followed is None:
        return
    now = int(time.time())
    for link in followed.new:
        store.db.add_chain_link(link.record.version, link.body, link.by_previous, link.by_self, now)


def signed_by(state: trust.ChainState, body: bytes, sig: bytes) -> int | None:
    """The chain version whose signing key made sig over a release body (the current first)."""
    ks = state.signing_keys()
    for v in range(len(ks) - 1, -1, -1):
        if keys.verify(ks[v], keys.TAG_RELEASE, body, sig):
            return v
    return None


def check_release(state: trust.ChainState, sr: SignedRelease, where: str) -> None:
    """Called when sr does not verify against the current signing key: say so as a
    rollback if a retired key of the chain made it."""
    v = signed_by(state, sr.body, sr.signature)
    if v is not None and v < state.version:
        raise ChainRollback(f"{where}: {sr.release.label()} is signed by the master's retired signing key of "
                            f"version {v}; this server trusts version {state.version} (a rollback to an older key)")


def stale(state: trust.ChainState, row: ReleaseRow) -> bool:
    """A release held that the current signing key did not sign (an older key did)."""
    return not keys.verify(state.signing, keys.TAG_RELEASE, row.body, row.sig)


def own_keys(store: Store) -> set[bytes]:
    """The keys a pack for this server may be addressed to: on the master every
    signing key of its chain (a school that has not heard of a rotation yet
    addresses the key it knows), on a school its own key."""
    if store.cfg.is_master:
        return set(store.trust_chain().signing_keys())
    return {store.key.public}


def header_extra(store: Store, recipient_key: bytes | None) -> dict[str, Any]:
    """What the chain adds to a pack's header: the whole chain, in every pack the
    master writes and in every pack a school writes for another school (a relay);
    not in a school's own request to its master (the master has it)."""
    state = store.trust_chain()
    if state.version == 0:
        return {}
    if not store.cfg.is_master and recipient_key is not None and recipient_key == state.signing:
        return {}
    return {EXTRA_KEY: state.wire()}


def signed_version(store: Store) -> int:
    """School, for its have-state: the oldest chain version whose key signed a
    release of the master it holds (its chain's version if all are current)."""
    state = store.trust_chain()
    out = state.version
    if out == 0:
        return 0
    for c in store.db.collections():
        if c.mode != "replica" or c.root is None:
            continue
        row = store.db.release(c.name, c.seq)
        if row is None or not stale(state, row):
            continue
        v = signed_by(state, row.body, row.sig)
        out = min(out, v if v is not None else 0)
    return out


def have_version(have: Any) -> int | None:
    """The chain version a have-state states (None: it says nothing: an older server)."""
    v = have.get(HAVE_KEY) if isinstance(have, dict) else None
    return v if type(v) is int and v >= 0 else None


def stored_version(have: bytes | None) -> int | None:
    """have_version of a have-state as the master stored it (peers.have, msgpack)."""
    if not have:
        return None
    try:
        return have_version(unpack_msg(have, what="stored have-state"))
    except HarmonicError:
        return None


def resend(store: Store, colls: list[Collection], held: dict[str, tuple[int, bytes]], theirs_v: int | None
           ) -> tuple[list[ReleaseRow], list[tuple[bytes, bytes | None]]]:
    """The latest releases of colls to send again to a server whose have-state says
    it holds releases signed by a key our chain has retired: those it holds at our
    number or above (what lacking() leaves out), as signed now. Returns the rows and
    the roots whose objects go with them: none for the same release (it holds them),
    the whole tree for another one (one a leaked key signed, which ours replaces)."""
    state = store.trust_chain()
    if state.version == 0 or (theirs_v is not None and theirs_v >= state.version):
        return [], []
    rows: list[ReleaseRow] = []
    roots: list[tuple[bytes, bytes | None]] = []
    for c in colls:
        if c.root is None:
            continue
        theirs = held.get(f"{c.owner}/{c.collection}")
        if theirs is None or theirs[0] < c.seq:
            continue
        row = store.db.release(c.name, c.seq)
        if row is None or stale(state, row):
            continue  # a relay that has not had it signed again yet: nothing better to send
        rows.append(row)
        if theirs != (row.seq, row.root):
            roots.append((row.root, None))
    return rows, roots


# --------------------------------------------------------------------------- keys in files


def new_key(path: str) -> bytes:
    """`trust new-key --out FILE`: a new ed25519 seed in a new file (0600, never
    overwriting one). Returns its public key."""
    key = keys.SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists already; a key file is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create ({exc.strerror})") from None
    try:
        os.write(fd, (key.seed().hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    durable.fsync_dir(os.path.dirname(os.path.abspath(path)))
    return key.public


def read_key(path: str, what: str) -> keys.SigningKey:
    try:
        with open(path, "rb") as f:
            text = f.read(200).decode().strip()
        return keys.SigningKey(bytes.fromhex(text))
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"{what} {path}: not a key file (one line of 64 hex digits, as "
                         "`harmonicctl trust new-key` writes)") from None


# --------------------------------------------------------------------------- rotation (master)


@dataclass
class Rotation:
    state: trust.ChainState
    resigned: list[str]
    dropped: int  # shared packs built ahead with the old key, thrown away


def rotate(store: Store, root_key: keys.SigningKey | None, new_root: keys.SigningKey | None) -> Rotation:
    """The next link of the master's chain: a new signing key (into STATE/key), the
    root kept or replaced, signed by the current root and the new one; the live
    releases of the master's own collections signed again by the new key; shared
    packs built with the old key thrown away. Runs under the store's lock."""
    cfg = store.cfg
    if not cfg.is_master:
        raise UsageError("trust rotate is for the master (a school follows the master's chain from its packs)")
    state = store.trust_chain()
    if state.version >= trust.MAX_RECORDS:
        raise UsageError(f"the key chain has {trust.MAX_RECORDS} links, its limit")
    if state.version == 0:
        # The root is the anchor, whose seed is STATE/key: this rotation replaces
        # STATE/key, so the root must go to a key kept off the server now.
        current_root = store.key
        if root_key is not None and root_key.public != state.root:
            raise UsageError(f"--root-key holds {keys.format_key(root_key.public)}, not the current root key "
                             f"{keys.format_key(state.root)} (this server's own key before its first rotation)")
        if new_root is None:
            raise UsageError("the first rotation moves the root key off this server: give --new-root-key FILE "
                             "(made with `harmonicctl trust new-key --out FILE`, kept off the server)")
    else:
        if root_key is None:
            raise UsageError(f"--root-key FILE is needed: the current root key {keys.format_key(state.root)} "
                             f"signs link {state.version + 1}")
        if root_key.public != state.root:
            raise UsageError(f"--root-key holds {keys.format_key(root_key.public)}, not the current root key "
                             f"{keys.format_key(state.root)}")
        current_root = root_key
    root = new_root or current_root
    if root.public in state.signing_keys():
        raise UsageError("the new root key was a signing key of this master (it lived on the server); make a "
                         "new one with `harmonicctl trust new-key`")
    signing = keys.SigningKey.generate()
    rec = trust.make_record(cfg.id, state.version + 1, root.public, signing.public, int(time.time()))
    link = trust.sign(rec, current_root, root)
    after = trust.extend(state, link)
    # Crash ordering. The chain link in state.db is the commit point; STATE/key must
    # always be the key the committed chain ends at, or every pack the master signs is
    # refused (a key the chain does not name yet, or one it has retired). So: the new
    # key goes to key.next first (durable), then one transaction stores the link and
    # the releases signed again, then key.next is renamed over key. A crash before the
    # commit leaves key.next unused (the chain still names the old key, which is still
    # STATE/key; Store.key removes key.next); a crash after it leaves key.next as the
    # key the chain names (Store.key renames it at the next locked open).
    nxt = os.path.join(store.dir, KEY_NEXT)
    if os.path.exists(nxt):
        os.unlink(nxt)
    fd = os.open(nxt, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (signing.seed().hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    durable.fsync_dir(store.dir)
    crash_point("rotate-key-staged")
    db = store.db
    resigned: list[str] = []
    with db.tx():
        if state.version == 0:
            db.set_meta(ANCHOR_META, state.anchor.hex())
        db.add_chain_link(rec.version, link.body, link.by_previous, link.by_self, int(time.time()))
        for c in db.collections():
            if c.mode != "owned" or c.root is None:
                continue
            row = db.release(c.name, c.seq)
            if row is None:
                continue
            db.set_release_sig(c.name, c.seq, signing.sign(keys.TAG_RELEASE, row.body))
            resigned.append(f"{c.name} release {c.seq}")
    crash_point("rotate-committed")
    os.replace(nxt, os.path.join(store.dir, "key"))
    durable.fsync_dir(store.dir)
    store.forget_key()
    from harmonicd.services import shared

    dropped = shared.discard_all(store)
    return Rotation(after, resigned, dropped)


# --------------------------------------------------------------------------- showing and serving


def show(store: Store) -> dict[str, Any]:
    """`trust show --json`: what this server trusts of the master's keys."""
    state = store.trust_chain()
    return {
        "master": state.master,
        "anchor": keys.format_key(state.anchor),
        "version": state.version,
        "root": keys.format_key(state.root),
        "signing": keys.format_key(state.signing),
        "links": [{"version": lk.record.version, "root": keys.format_key(lk.record.root),
                   "signing": keys.format_key(lk.record.signing),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lk.record.created))}
                  for lk in state.links],
    }


def served(store: Store) -> dict[str, Any]:
    """GET /v1/trust: the chain as this server verified it (the master's own, or a
    relay's copy), each link as base64 [record, by previous root, by its root]."""
    import base64

    state = store.trust_chain()
    return {"master": state.master, "anchor": keys.format_key(state.anchor), "version": state.version,
            "signing": keys.format_key(state.signing),
            "chain": [[base64.b64encode(x).decode() for x in lk.wire()] for lk in state.links]}

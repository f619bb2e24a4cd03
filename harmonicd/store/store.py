"""The store as one object: the state folder, its lock, key, database and objects.

State folder layout (docs/state-dir.md)::

    lock              flock'd by whoever changes anything (the daemon or a command)
    key               this server's ed25519 seed (0600); on the master, its current signing key
    key.next          the master's next signing key while `trust rotate` runs (see Store.key)
    state.db          SQLite (WAL)
    objects/segments/ object records in segment files (indexed in state.db)
    deploy/           default home of deployed replicas (config deploy.dir)
    sources/          default source folders of a school's stats and backup

Opening with ``lock=True`` waits for the lock (never fails as "busy") and
removes segments of uncommitted object batches; bringing deployments to the release the
database says is live is services.maintenance.recover, which every command
that changes state runs first.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from types import TracebackType

from harmonicd.config import Config
from harmonicd.core import keys, trust
from harmonicd.core.objects import (
    BLOB,
    RECIPE,
    T_DIR,
    T_RECIPE,
    TREE,
    Entry,
    ObjectId,
    decode_recipe,
    decode_tree,
)
from harmonicd.errors import StateError, TrustError
from harmonicd.store import durable
from harmonicd.store.db import StateDB, check_generation
from harmonicd.store.objects import ObjectStore

ANCHOR_META = "trust.anchor"  # master: its version-0 key (hex), written with its first chain link
KEY_NEXT = "key.next"


class Store:
    def __init__(self, cfg: Config, *, lock: bool = True, create: bool = False) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir
        if not os.path.isdir(self.dir):
            if not create:
                raise StateError(f"state folder {self.dir} does not exist (run `harmonicctl init`)")
            os.makedirs(self.dir, mode=0o750)
        self._lock_fd: int | None = None
        if lock:
            self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o640)
            # Blocks until the daemon or another command is done: INTERFACE.md
            # asks commands to wait, never to fail as "busy".
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        db_path = os.path.join(self.dir, "state.db")
        self.db = StateDB(db_path)
        self.objects = ObjectStore(os.path.join(self.dir, "objects"), self.db.conn, db_path)
        self._key: keys.SigningKey | None = None
        # The last chain followed, with the rows and anchor it was followed from: most
        # callers ask again with nothing changed (several times per pack).
        self._chain: tuple[tuple[object, ...], trust.ChainState] | None = None
        if not create:
            check_generation(self.db)
        if lock and not create:
            self.objects.recover()

    # -- lifetime
    def close(self) -> None:
        self.objects.close()
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- identity
    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def key(self) -> keys.SigningKey:
        if self._key is None:
            key = _read_seed(os.path.join(self.dir, "key"))
            if self.cfg.is_master and (self.db.chain_links() or os.path.exists(os.path.join(self.dir, KEY_NEXT))):
                key = self._signing_key(key)
            self._key = key
        return self._key

    def forget_key(self) -> None:
        """Read STATE/key again at its next use (trust rotate replaced it)."""
        self._key = None

    def _signing_key(self, key: keys.SigningKey) -> keys.SigningKey:
        """The master's key is the current signing key of its chain. `trust rotate`
        writes the next one into key.next, commits the chain link (the commit point),
        then renames key.next over key: a crash before the commit leaves key.next
        unused (removed here), a crash after it leaves key.next as the key to use
        (renamed here, when this store holds the lock)."""
        chain = self.trust_chain()
        path, nxt = os.path.join(self.dir, "key"), os.path.join(self.dir, KEY_NEXT)
        if key.public == chain.signing:
            if self._lock_fd is not None and os.path.exists(nxt):
                os.unlink(nxt)  # a rotation that never committed: its key signs nothing
                durable.fsync_dir(self.dir)
            return key
        try:
            new = _read_seed(nxt)
        except StateError:
            new = None
        if new is None or new.public != chain.signing:
            raise StateError(f"{path} is not the master's current signing key (key chain version {chain.version}: "
                             f"{keys.format_key(chain.signing)}); restore it from a backup made after that rotation")
        if self._lock_fd is not None:
            os.replace(nxt, path)
            durable.fsync_dir(self.dir)
        return new

    def trust_chain(self) -> trust.ChainState:
        """The master's key chain as this server holds it (core/trust.py), checked
        again from the anchor: on a school upstream.master_key, on the master its
        key before its first rotation."""
        if self.cfg.is_master:
            hexed = self.db.get_meta(ANCHOR_META)
            anchor = bytes.fromhex(hexed) if hexed else _read_seed(os.path.join(self.dir, "key")).public
            master: str | None = self.cfg.id
        else:
            if self.cfg.master_key is None:
                raise StateError("upstream.master_key is not set")
            anchor = self.cfg.master_key
            known = self.db.peers("master")
            master = known[0].id if known else None
        rows = self.db.chain_links()
        held = (anchor, master, rows)
        if self._chain is not None and self._chain[0] == held:
            return self._chain[1]
        try:
            links = [trust.decode_link([body, prev, own]) for _v, body, prev, own in rows]
            state, _new = trust.advance(trust.genesis(anchor, master), links)
        except TrustError as exc:
            raise StateError(f"{self.db.path}: the stored key chain does not follow from the master key "
                             f"{keys.format_key(anchor)} ({exc}); was upstream.master_key changed?") from None
        self._chain = (held, state)
        return state

    def master_key(self) -> bytes:
        """The master's current signing key: what its packs and releases verify against."""
        return self.trust_chain().signing

    # -- trees
    def tree(self, oid: ObjectId, where: str = "") -> list[Entry]:
        return decode_tree(self.objects.get_kind(oid, TREE), where)

    def recipe(self, oid: ObjectId, where: str = "") -> list[tuple[ObjectId, int]]:
        return decode_recipe(self.objects.get_kind(oid, RECIPE), where)

    def walk(self, root: ObjectId, prefix: str = "") -> Iterator[tuple[str, Entry]]:
        """Every (path, entry) below root, depth first, folders before their contents."""
        for e in self.tree(root, prefix):
            path = f"{prefix}/{e.name}" if prefix else e.name
            yield path, e
            if e.type == T_DIR:
                yield from self.walk(e.id, path)

    def missing(self, root: ObjectId, have: set[ObjectId] | None = None) -> tuple[list[ObjectId], set[ObjectId]]:
        """Objects of the tree at root that are not in the store, and those that are."""
        missing: list[ObjectId] = []
        absent: set[ObjectId] = set()
        held: set[ObjectId] = set()
        has = self.objects.has

        def visit(oid: ObjectId, kind: int) -> None:
            if oid in held or oid in absent:
                return
            if (have is not None and oid in have) or has(oid):
                held.add(oid)
            else:
                absent.add(oid)
                missing.append(oid)
                return
            if kind == TREE:
                for e in self.tree(oid):
                    visit(e.id, TREE if e.type == T_DIR else RECIPE if e.type == T_RECIPE else BLOB)
            elif kind == RECIPE:
                for c, _ in self.recipe(oid):
                    visit(c, BLOB)

        visit(root, TREE)
        return missing, held


def _read_seed(path: str) -> keys.SigningKey:
    try:
        with open(path, "rb") as f:
            seed = bytes.fromhex(f.read().decode().strip())
        return keys.SigningKey(seed)
    except OSError as exc:
        raise StateError(f"cannot read this server's key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise StateError(f"cannot read this server's key {path}: {exc}") from exc

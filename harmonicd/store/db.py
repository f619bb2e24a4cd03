"""The state database (SQLite, WAL, synchronous=FULL).

One transaction is one commit point: a release goes live, a peer's state is
recorded, an acknowledgement is taken, all or nothing. Objects are made
durable in their segment files *before* the transaction that indexes them,
and indexed before any release references them (store/objects.py).

Tables:

* ``meta``         role, id, format generation
* ``peers``        the master (on a school) or the enrolled schools (on a master)
* ``collections``  what this server owns or replicates, with the live release
* ``releases``     every signed release kept: live, archived, unacknowledged or incomplete
* ``statcache``    path -> (size, mtime, ctime, inode, id) for publishing without re-reading
* ``packs``        pack volumes read and written (re-inserted sticks are skipped quietly)
* ``objects``      object id -> kind, segment file, offset, length (store/objects.py)
* ``partial``      objects received for releases not yet complete (kept by gc, listed in requests)
* ``trust_chain``  the master's key chain as verified (a school) or made (the master); meta
                   ``trust.anchor`` on a master that rotated: its version-0 key
* ``leases``       master: the laptops' leases it last issued, per school (services/leases.py)
* ``tokens``       master: enrollment tokens of the bundles it made (``token_uses``: who enrolled with each)
* ``revoked_keys`` master: keys of revoked school servers, refused for ever (the revocation list)
* ``revocations``  school: the newest revocation list of the master it verified, as signed
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harmonicd.errors import DiskFullError, StateError

GENERATION = 2  # 2: objects in segment files, indexed in the objects table

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    role TEXT NOT NULL,            -- 'master' or 'node'
    enrolled INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    last_how TEXT,                 -- 'stick' or 'online'
    have BLOB                      -- msgpack: the have-state it last told us
);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,         -- local name: 'content', 'stats', 'school-042/stats', 'leases@school-042'
    collection TEXT NOT NULL,      -- name inside signed releases
    owner TEXT NOT NULL,
    mode TEXT NOT NULL,            -- 'owned', 'replica' or 'archive' (a school's data at the master)
    target TEXT,                   -- the one school a master collection is for
    source TEXT,                   -- owned: folder published from
    path TEXT,                     -- replica/archive: where it is deployed
    seq INTEGER NOT NULL DEFAULT 0,
    root BLOB,
    deployed BLOB,                 -- root of the tree deployed at path
    acked_seq INTEGER NOT NULL DEFAULT 0,   -- owned: highest seq the master has confirmed
    acked_root BLOB,
    scanned_ns INTEGER NOT NULL DEFAULT 0   -- owned: when the stat cache was last written
);
CREATE TABLE IF NOT EXISTS releases (
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    root BLOB NOT NULL,
    body BLOB NOT NULL,
    sig BLOB NOT NULL,
    size INTEGER NOT NULL,
    received INTEGER NOT NULL,
    state TEXT NOT NULL,           -- 'live', 'kept', 'pending' (objects still missing)
    PRIMARY KEY (name, seq)
);
CREATE TABLE IF NOT EXISTS trust_chain (
    version INTEGER PRIMARY KEY,   -- 1, 2, ...: links of the master's key chain (core/trust.py), as verified
    body BLOB NOT NULL,            -- the record: master, version, root key, signing key, created
    by_previous BLOB NOT NULL,     -- its signature by the previous root key
    by_self BLOB NOT NULL,         -- its signature by its own root key
    received INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS statcache (
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    type INTEGER NOT NULL,
    id BLOB NOT NULL,
    PRIMARY KEY (name, path)
);
CREATE TABLE IF NOT EXISTS partial (
    id BLOB PRIMARY KEY            -- objects received for releases still incomplete
);
CREATE TABLE IF NOT EXISTS tokens (
    id BLOB PRIMARY KEY,           -- token id (16 bytes), named in a school's extra["enroll"]
    token BLOB NOT NULL,           -- the secret a school proves it knows (core/bundle.py)
    school TEXT,                   -- the school it is for; NULL: a region bundle
    prefix TEXT,                   -- region: the id prefix of the servers it enrolls
    count INTEGER NOT NULL,        -- servers that may enroll with it
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    withdrawn INTEGER NOT NULL DEFAULT 0   -- a newer bundle replaced it, or its school was revoked
);
CREATE TABLE IF NOT EXISTS token_uses (
    token BLOB NOT NULL,
    school TEXT NOT NULL,
    key BLOB NOT NULL,             -- the key that proved it: the same again is a lost answer, another is refused
    at INTEGER NOT NULL,
    PRIMARY KEY (token, school)
);
CREATE TABLE IF NOT EXISTS revoked_keys (
    key BLOB PRIMARY KEY,
    school TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    master TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    sig BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS packs (
    pack_id BLOB NOT NULL,
    volume INTEGER NOT NULL,
    direction TEXT NOT NULL,       -- 'in' or 'out'
    peer TEXT NOT NULL,
    at INTEGER NOT NULL,
    objects INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (pack_id, volume, direction)
);
CREATE TABLE IF NOT EXISTS leases (
    school TEXT NOT NULL,          -- master: the laptops' leases it last issued (services/leases.py)
    serial TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    PRIMARY KEY (school, serial)
);
"""


@dataclass
class Collection:
    name: str
    collection: str
    owner: str
    mode: str
    target: str | None
    source: str | None
    path: str | None
    seq: int
    root: bytes | None
    deployed: bytes | None
    acked_seq: int
    acked_root: bytes | None
    scanned_ns: int


@dataclass
class Peer:
    id: str
    key: bytes
    role: str
    enrolled: int
    revoked: int
    last_seen: int | None
    last_how: str | None
    have: bytes | None


@dataclass
class Token:
    id: bytes
    token: bytes
    school: str | None
    prefix: str | None
    count: int
    created: int
    expires: int
    withdrawn: int


@dataclass
class ReleaseRow:
    name: str
    seq: int
    root: bytes
    body: bytes
    sig: bytes
    size: int
    received: int
    state: str


class StateDB:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, timeout=600)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives a power cut (NORMAL in WAL
            # mode may lose the last ones, and an acknowledged release must not).
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            full = _full_disk(os.path.dirname(path))
            if full:
                raise DiskFullError(f"disk full: the state database {path} cannot be opened ({full})") from exc
            raise StateError(f"state database {path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with transaction(self.conn, self.path):
            yield self.conn

    # -- meta
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- peers
    def peers(self, role: str | None = None) -> list[Peer]:
        q = "SELECT id, key, role, enrolled, revoked, last_seen, last_how, have FROM peers"
        rows = self.conn.execute(q + (" WHERE role=?" if role else "") + " ORDER BY id",
                                 (role,) if role else ()).fetchall()
        return [Peer(*r) for r in rows]

    def peer(self, pid: str) -> Peer | None:
        r = self.conn.execute(
            "SELECT id, key, role, enrolled, revoked, last_seen, last_how, have FROM peers WHERE id=?",
            (pid,)).fetchone()
        return None if r is None else Peer(*r)

    def peer_by_key(self, key: bytes) -> Peer | None:
        r = self.conn.execute(
            "SELECT id, key, role, enrolled, revoked, last_seen, last_how, have FROM peers WHERE key=?",
            (key,)).fetchone()
        return None if r is None else Peer(*r)

    def put_peer(self, pid: str, key: bytes, role: str, enrolled: int) -> None:
        self.conn.execute(
            "INSERT INTO peers(id, key, role, enrolled) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET key=excluded.key, role=excluded.role",
            (pid, key, role, enrolled))

    def peer_seen(self, pid: str, at: int, how: str, have: bytes | None) -> None:
        self.conn.execute("UPDATE peers SET last_seen=?, last_how=?, have=COALESCE(?, have) WHERE id=?",
                          (at, how, have, pid))

    def enroll_peer(self, pid: str, key: bytes, at: int) -> None:
        """A school enrolled by its bundle's token: a new row, or a revoked one's
        replacement (a new key, nothing of the old server's state kept)."""
        self.conn.execute(
            "INSERT INTO peers(id, key, role, enrolled) VALUES (?, ?, 'node', ?) "
            "ON CONFLICT(id) DO UPDATE SET key=excluded.key, role='node', enrolled=excluded.enrolled, "
            "revoked=0, last_seen=NULL, last_how=NULL, have=NULL", (pid, key, at))

    def revoke_peer(self, pid: str, at: int) -> None:
        self.conn.execute("UPDATE peers SET revoked=1 WHERE id=?", (pid,))
        row = self.peer(pid)
        if row is not None:
            self.conn.execute("INSERT OR IGNORE INTO revoked_keys(key, school, at) VALUES (?, ?, ?)",
                              (row.key, pid, at))
        self.conn.execute("UPDATE tokens SET withdrawn=1 WHERE school=?", (pid,))

    # -- enrollment tokens (master)
    _TCOLS = "id, token, school, prefix, count, created, expires, withdrawn"

    def add_token(self, t: Token) -> None:
        self.conn.execute(f"INSERT INTO tokens({self._TCOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          (t.id, t.token, t.school, t.prefix, t.count, t.created, t.expires, t.withdrawn))

    def token(self, tid: bytes) -> Token | None:
        r = self.conn.execute(f"SELECT {self._TCOLS} FROM tokens WHERE id=?", (tid,)).fetchone()
        return None if r is None else Token(*r)

    def tokens(self) -> list[Token]:
        return [Token(*r) for r in self.conn.execute(f"SELECT {self._TCOLS} FROM tokens ORDER BY created")]

    def withdraw_tokens(self, school: str) -> None:
        """Earlier bundles for school not yet used: a newer one replaces them."""
        self.conn.execute("UPDATE tokens SET withdrawn=1 WHERE school=? AND id NOT IN "
                          "(SELECT token FROM token_uses)", (school,))

    def withdraw_token(self, tid: bytes) -> None:
        self.conn.execute("UPDATE tokens SET withdrawn=1 WHERE id=?", (tid,))

    def token_uses(self, tid: bytes) -> dict[str, bytes]:
        """school -> the key it proved the token with."""
        return {r[0]: r[1] for r in self.conn.execute("SELECT school, key FROM token_uses WHERE token=?", (tid,))}

    def use_token(self, tid: bytes, school: str, key: bytes, at: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO token_uses(token, school, key, at) VALUES (?, ?, ?, ?)",
                          (tid, school, key, at))

    # -- revocation
    def revoked_keys(self) -> list[tuple[str, bytes, int]]:
        """Master: (school, key, when) of every key revoked, oldest first."""
        return [(r[0], r[1], r[2]) for r in
                self.conn.execute("SELECT school, key, at FROM revoked_keys ORDER BY at, school, key")]

    def key_revoked(self, key: bytes) -> str | None:
        """Master: the school a revoked key belonged to, or None."""
        r = self.conn.execute("SELECT school FROM revoked_keys WHERE key=?", (key,)).fetchone()
        return None if r is None else str(r[0])

    def revocation_list(self) -> tuple[str, int, bytes, bytes] | None:
        """School or relay: (master, seq, body, sig) of the newest list verified."""
        r = self.conn.execute("SELECT master, seq, body, sig FROM revocations ORDER BY seq DESC LIMIT 1").fetchone()
        return None if r is None else (str(r[0]), int(r[1]), bytes(r[2]), bytes(r[3]))

    def put_revocation_list(self, master: str, seq: int, body: bytes, sig: bytes) -> None:
        self.conn.execute("DELETE FROM revocations")
        self.conn.execute("INSERT INTO revocations(master, seq, body, sig) VALUES (?, ?, ?, ?)",
                          (master, seq, body, sig))

    # -- collections
    _CCOLS = ("name, collection, owner, mode, target, source, path, seq, root, deployed, "
              "acked_seq, acked_root, scanned_ns")

    def collections(self) -> list[Collection]:
        rows = self.conn.execute(f"SELECT {self._CCOLS} FROM collections ORDER BY name").fetchall()
        return [Collection(*r) for r in rows]

    def collection(self, name: str) -> Collection | None:
        r = self.conn.execute(f"SELECT {self._CCOLS} FROM collections WHERE name=?", (name,)).fetchone()
        return None if r is None else Collection(*r)

    def add_collection(self, name: str, collection: str, owner: str, mode: str, *,
                       target: str | None = None, source: str | None = None,
                       path: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO collections(name, collection, owner, mode, target, source, path) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, collection, owner, mode, target, source, path))

    def update_collection(self, name: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.conn.execute(f"UPDATE collections SET {cols} WHERE name=?", (*fields.values(), name))

    # -- releases
    _RCOLS = "name, seq, root, body, sig, size, received, state"

    def releases(self, name: str | None = None, state: str | None = None) -> list[ReleaseRow]:
        q = f"SELECT {self._RCOLS} FROM releases"
        cond, args = [], []
        if name is not None:
            cond.append("name=?")
            args.append(name)
        if state is not None:
            cond.append("state=?")
            args.append(state)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        return [ReleaseRow(*r) for r in self.conn.execute(q + " ORDER BY name, seq", args).fetchall()]

    def release(self, name: str, seq: int) -> ReleaseRow | None:
        r = self.conn.execute(f"SELECT {self._RCOLS} FROM releases WHERE name=? AND seq=?",
                              (name, seq)).fetchone()
        return None if r is None else ReleaseRow(*r)

    def put_release(self, row: ReleaseRow) -> None:
        self.conn.execute(
            f"INSERT OR REPLACE INTO releases({self._RCOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.name, row.seq, row.root, row.body, row.sig, row.size, row.received, row.state))

    def set_release_state(self, name: str, seq: int, state: str) -> None:
        self.conn.execute("UPDATE releases SET state=? WHERE name=? AND seq=?", (state, name, seq))

    def delete_release(self, name: str, seq: int) -> None:
        self.conn.execute("DELETE FROM releases WHERE name=? AND seq=?", (name, seq))

    # -- stat cache
    def statcache(self, name: str) -> dict[str, tuple[int, int, int, int, int, bytes]]:
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns, ctime_ns, ino, type, id FROM statcache WHERE name=?", (name,))
        return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows}

    def replace_statcache(self, name: str,
                          rows: list[tuple[str, int, int, int, int, int, bytes]]) -> None:
        self.conn.execute("DELETE FROM statcache WHERE name=?", (name,))
        self.conn.executemany(
            "INSERT INTO statcache(name, path, size, mtime_ns, ctime_ns, ino, type, id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ((name, *r) for r in rows))

    # -- packs
    def pack_seen(self, pack_id: bytes, volume: int, direction: str) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM packs WHERE pack_id=? AND volume=? AND direction=?",
            (pack_id, volume, direction)).fetchone() is not None

    def record_pack(self, pack_id: bytes, volume: int, direction: str, peer: str, at: int,
                    objects: int, nbytes: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO packs(pack_id, volume, direction, peer, at, objects, bytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (pack_id, volume, direction, peer, at, objects, nbytes))

    # -- the master's key chain (core/trust.py; services/trust.py)
    def chain_links(self) -> list[tuple[int, bytes, bytes, bytes]]:
        """(version, body, by_previous, by_self), in order."""
        return [(r[0], r[1], r[2], r[3]) for r in self.conn.execute(
            "SELECT version, body, by_previous, by_self FROM trust_chain ORDER BY version")]

    def add_chain_link(self, version: int, body: bytes, by_previous: bytes, by_self: bytes, at: int) -> None:
        # A plain INSERT: a version held is never replaced (core/trust.py refuses a fork before this).
        self.conn.execute("INSERT INTO trust_chain(version, body, by_previous, by_self, received) "
                          "VALUES (?, ?, ?, ?, ?)", (version, body, by_previous, by_self, at))

    def set_release_sig(self, name: str, seq: int, sig: bytes) -> None:
        """A release's body signed again by the master's new signing key (services/trust.py)."""
        self.conn.execute("UPDATE releases SET sig=? WHERE name=? AND seq=?", (sig, name, seq))

    # -- objects held for incomplete releases
    def add_partial(self, ids: list[bytes]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO partial(id) VALUES (?)", ((i,) for i in ids))

    def partial_ids(self) -> set[bytes]:
        return {r[0] for r in self.conn.execute("SELECT id FROM partial")}

    def clear_partial(self) -> None:
        self.conn.execute("DELETE FROM partial")

    # -- laptops' leases (master)
    def leases_issued(self, school: str) -> list[tuple[str, int, int, int]]:
        """(serial, not_before, expires, issued) of the leases last issued for school."""
        return [(r[0], r[1], r[2], r[3]) for r in self.conn.execute(
            "SELECT serial, not_before, expires, issued FROM leases WHERE school=? ORDER BY serial", (school,))]

    def lease_schools(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT school FROM leases ORDER BY school")]

    def replace_leases(self, school: str, rows: list[tuple[str, int, int, int]]) -> None:
        self.conn.execute("DELETE FROM leases WHERE school=?", (school,))
        self.conn.executemany("INSERT INTO leases(school, serial, not_before, expires, issued) "
                              "VALUES (?, ?, ?, ?, ?)", ((school, *r) for r in rows))

    def check_integrity(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


@contextmanager
def transaction(conn: sqlite3.Connection, path: str) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; SQLite's "disk full"
    becomes a DiskFullError that says so (the transaction left nothing behind)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise DiskFullError(f"disk full while writing the state database {path}; nothing was changed") from exc
        raise


def _full_disk(folder: str) -> str | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_files and st.f_favail == 0:
        return "no free inodes: delete files on that file system"
    if st.f_bavail == 0:
        return "no free space: delete files on that file system"
    return None


def check_generation(db: StateDB) -> None:
    gen = db.get_meta("generation")
    if gen is None:
        raise StateError(f"{db.path} is not a Harmonic state database (run `harmonicctl init` first)")
    if int(gen) != GENERATION:
        raise StateError(f"{db.path} has state format {gen}; this version reads {GENERATION}")

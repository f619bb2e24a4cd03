"""init and enroll: creating a server's identity and trusting others."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from harmonicd import config as config_mod
from harmonicd.config import NODE_COLLECTIONS, Config
from harmonicd.core import keys
from harmonicd.core.ident import check_school_id
from harmonicd.errors import ConfigError, UsageError
from harmonicd.services.deploy import default_path
from harmonicd.store import durable
from harmonicd.store.db import GENERATION
from harmonicd.store.store import Store


def init(cfg: Config, *, key: keys.SigningKey | None = None, then: Callable[[Store], None] | None = None,
         replace_config: bool = False) -> str:
    """Write the config file, create the state folder and key. Returns the public key.

    ``key``: the key to keep (init from a bundle made its proof with it); ``then``:
    more to write into the new state in its first transaction (a bundle's pending
    enrollment). The config file is written last: a state folder without one is
    an init that did not finish. ``replace_config``: the file at cfg.path is a
    first-boot configuration (no server id) that this one replaces."""
    if os.path.exists(cfg.path) and not replace_config:
        raise ConfigError(f"{cfg.path}: a configuration already exists; init never overwrites one")
    if os.path.exists(os.path.join(cfg.state_dir, "state.db")):
        raise UsageError(f"{cfg.state_dir} already holds a Harmonic state; choose another --state-dir")
    os.makedirs(cfg.state_dir, mode=0o750, exist_ok=True)
    for src in cfg.sources.values():
        os.makedirs(src, exist_ok=True)
    key = key or keys.SigningKey.generate()
    key_path = os.path.join(cfg.state_dir, "key")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.seed().hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    with Store(cfg, create=True) as store:
        store.objects.setup()
        db = store.db
        with db.tx():
            db.set_meta("generation", str(GENERATION))
            db.set_meta("id", cfg.id)
            db.set_meta("role", cfg.role)
            db.set_meta("created", str(int(time.time())))
            if cfg.is_master:
                db.add_collection("content", "content", cfg.id, "owned")
            else:
                # The master's id is learned from its first pack; until then
                # its collections are listed under the placeholder "master".
                db.add_collection("content", "content", "master", "replica",
                                  path=default_path(store, "content"))
                for name in NODE_COLLECTIONS:
                    db.add_collection(name, name, cfg.id, "owned", source=cfg.sources[name])
            if then is not None:
                then(store)
    durable.fsync_dir(cfg.state_dir)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.path)), exist_ok=True)
    durable.atomic_write(cfg.path, config_mod.render(cfg).encode(), 0o640)
    return keys.format_key(key.public)


def enroll(store: Store, school: str, key_text: str) -> None:
    check_school_id(school)
    if not store.cfg.is_master:
        raise UsageError("enroll is for the master")
    try:
        key = keys.parse_key(key_text)
    except ValueError as exc:
        raise UsageError(f"enroll {school}: {exc}") from None
    if key == store.key.public:
        raise UsageError(f"enroll {school}: that is the master's own key")
    db = store.db
    other = db.peer_by_key(key)
    if other is not None and other.id != school:
        raise UsageError(f"enroll {school}: that key already belongs to {other.id}")
    existing = db.peer(school)
    if existing is not None and existing.key != key and existing.last_seen:
        raise UsageError(f"enroll {school}: already enrolled with another key (revoke it first)")
    with db.tx():
        db.put_peer(school, key, "node", int(time.time()))

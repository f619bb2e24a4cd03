"""Bootstrap bundles, enrollment at first contact, revocation (docs/design.md §
"Enrollment and revocation").

Master:

- ``make_bundle``: a one-time token in the ``tokens`` table and the signed
  bundle file (core/bundle.py) that carries it;
- ``first_contact``: an unknown sender whose pack proves a live token (its
  header's extra["enroll"]) is enrolled, in the same transaction as that
  pack's import (``record``); online or by stick alike, since both go through
  services/exchange.py's import;
- ``revoke``: peers.revoked, the key remembered in ``revoked_keys`` for ever,
  the signed revocation list's seq bumped; the list goes in extra["revoked"]
  of every pack the master writes (``header_extra``).

School:

- ``init_from_bundle``: verify, configure, generate the key, keep the
  pending enrollment (token id and proof, never the token) in state.db;
- ``header_extra``: extra["enroll"] in every request to the master until the
  master's first pack addressed to it arrives (``after_import`` clears it);
- the newest verified revocation list (no rollback of seq), passed on by a
  relay in its own packs and used to refuse revoked schools' requests.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any

from harmonicd import config as config_mod
from harmonicd.config import Config
from harmonicd.core import bundle as bundle_mod
from harmonicd.core import keys, trust
from harmonicd.core.bundle import Bundle, RevocationList, Revoked
from harmonicd.core.ident import check_school_id
from harmonicd.core.pack import Header
from harmonicd.errors import (
    BundleError,
    ConfigError,
    EnrollmentRefused,
    HarmonicError,
    UntrustedPack,
    UsageError,
)
from harmonicd.store import durable
from harmonicd.store.db import StateDB, Token
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

DEFAULT_EXPIRES_DAYS = 30
MAX_EXPIRES_DAYS = 3650
BUNDLE_SUFFIX = ".hbundle"
# A freshly installed server with no configuration looks for HARMONIC/bundle*.hbundle on sticks.
STICK_BUNDLE = re.compile(r"bundle[A-Za-z0-9._-]{0,64}\.hbundle\Z")
META_TOKEN = "enroll.token"  # school: the token id of its bundle (hex), until the master answered
META_PROOF = "enroll.proof"  # school: its proof of the token (hex)
META_REVOCATIONS_SEQ = "revocations.seq"  # master: the seq of its revocation list
# Host names images and installers leave by default: two clones would take one id.
GENERIC_HOSTNAMES = {"localhost", "debian", "ubuntu", "raspberrypi", "raspberry", "linux", "server", "school"}


# --------------------------------------------------------------------------- the master's key chain


# --------------------------------------------------------------------------- master: bundles


@dataclass
class Made:
    bundle: Bundle
    path: str


def make_bundle(store: Store, out: str, *, school: str | None = None, prefix: str | None = None,
                count: int = 1, upstream: list[str] | None = None, expires_days: float = DEFAULT_EXPIRES_DAYS,
                collections: list[str] | None = None, now: int | None = None) -> Made:
    """Master: a bundle for one school (school) or a region (prefix, count), written to out (0600)."""
    cfg = store.cfg
    if not cfg.is_master:
        raise UsageError("bundle is for the master")
    db = store.db
    now = int(time.time()) if now is None else now
    if (school is None) == (prefix is None):
        raise UsageError("bundle needs a school id, or --region PREFIX --count N")
    if school is not None:
        check_school_id(school)
        count = 1
        peer = db.peer(school)
        if peer is not None and (peer.role != "node" or not peer.revoked):
            raise UsageError(f"bundle {school}: {school} is enrolled already; to replace its server, "
                             f"`harmonicctl revoke {school}` first (its key stays refused)")
    else:
        assert prefix is not None
        bundle_mod.check_prefix(prefix, exc=UsageError)
        if not 1 <= count <= bundle_mod.MAX_REGION:
            raise UsageError(f"--count must be from 1 to {bundle_mod.MAX_REGION}")
    if not 0 < expires_days <= MAX_EXPIRES_DAYS:
        raise UsageError(f"--expires-days must be more than 0 and at most {MAX_EXPIRES_DAYS}")
    urls = list(upstream) if upstream is not None else default_upstream(cfg)
    for u in urls:
        if u != config_mod.AUTO_UPSTREAM and not re.match(r"https?://[^/\s]+\S*\Z", u):
            raise UsageError(f"--upstream {u!r} is not an http:// or https:// URL (or \"auto\")")
    if len(urls) > bundle_mod.MAX_UPSTREAMS:
        raise UsageError(f"at most {bundle_mod.MAX_UPSTREAMS} --upstream addresses")
    owned = [c for c in db.collections() if c.mode == "owned"]
    mine = {c.collection for c in owned}  # a collection --for one school is "NAME@SCHOOL" here, NAME there
    if collections is None:
        names = sorted({c.collection for c in owned if c.target is None or c.target == school})
    else:
        names = []
        for n in collections:
            if n not in mine:
                raise UsageError(f"--collections: {n!r} is not a collection of this master "
                                 f"(its collections: {', '.join(sorted(mine)) or 'none'})")
            if n not in names:
                names.append(n)
    if os.path.lexists(out):
        raise UsageError(f"{out} exists already; a bundle never overwrites a file (choose another --out)")
    # A replacement goes on from the old server's releases the master holds (core/bundle.py).
    seqs = ({c.collection: c.seq for c in db.collections() if c.mode == "archive" and c.owner == school}
            if school is not None else {})
    # The anchor and the whole key chain: the school pins the anchor and starts at
    # the current version, as one that followed every rotation would be.
    chain = store.trust_chain()
    b = Bundle(master=cfg.id, anchor=chain.anchor, chain=chain.wire(), upstream=urls, school=school,
               prefix=prefix, count=count, collections=names, seqs=seqs,
               token_id=secrets.token_bytes(bundle_mod.TOKEN_ID_LEN), token=secrets.token_bytes(bundle_mod.TOKEN_LEN),
               created=now,
               expires=now + math.ceil(expires_days * 86400))
    data = bundle_mod.encode(b, store.key)
    # The token is recorded with the file written: a bundle whose write failed
    # leaves no token behind (the transaction is rolled back).
    with db.tx():
        if school is not None:
            db.withdraw_tokens(school)  # the newest bundle for a school is the one that counts
        db.add_token(Token(b.token_id, b.token, school, prefix, count, now, b.expires, 0))
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise UsageError(f"--out {out}: no folder {folder}")
        durable.atomic_write(out, data, 0o600)
    log.info("bundle for %s written to %s (expires %s)", b.what(), out, iso(b.expires))
    return Made(b, out)


def default_upstream(cfg: Config) -> list[str]:
    """Where a school reaches this master, without --upstream: [server] public_url; else
    server.listen when it names one address (not 0.0.0.0 or ::); a master that does not
    listen is reached by stick only. A listener on every address is ambiguous: refused."""
    if cfg.public_url:
        return [cfg.public_url]
    if not cfg.listen:
        return []
    host, _, port = cfg.listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        raise UsageError(f"bundle: no upstream address for the school: this master listens on every address "
                         f"({cfg.listen}); give --upstream URL, or set [server] public_url in {cfg.path} (the "
                         "address schools reach this master at); --sticks-only for a school that syncs by stick")
    return [f"{'https' if cfg.tls_cert else 'http'}://{host}:{port}"]


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --------------------------------------------------------------------------- master: first contact


@dataclass(frozen=True)
class Enrollment:
    """A first contact that proved a live token: enrolled when its pack is imported."""

    school: str
    key: bytes
    token: bytes
    again: bool  # the same key proved it before (a lost answer): nothing new to record


def revoked_sender(store: Store, h: Header) -> str | None:
    """Master: why this sender is refused as revoked, or None."""
    owner = store.db.key_revoked(h.sender_key)
    if owner is not None:
        return (f"pack is from {h.sender!r}, whose enrollment was revoked"
                + ("" if owner == h.sender else f" (the key of {owner})"))
    return None


def first_contact(store: Store, h: Header, where: str = "pack") -> Enrollment | None:
    """Master: the sender is not an enrolled school with this key. If its header
    proves a bundle's token for its id and key, the enrollment to record with the
    pack's import; without a proof None (the caller refuses it as unenrolled);
    a proof that fails is refused here, one line naming why."""
    raw = h.extra.get("enroll") if isinstance(h.extra, dict) else None
    if raw is None:
        return None
    tid, proof = bundle_mod.read_enroll(raw, where)
    db = store.db
    t = db.token(tid)
    name = f"enrollment token {tid.hex()[:8]}"
    if t is None:
        raise EnrollmentRefused(f"{h.sender!r} presents an unknown {name} (not made by this master)")
    if t.withdrawn:
        raise EnrollmentRefused(f"{h.sender!r} presents {name}, which was withdrawn (a newer bundle replaced it, "
                                "its school was revoked, or `revoke --bundle`)")
    now = int(time.time())
    if now >= t.expires:
        raise EnrollmentRefused(f"{h.sender!r} presents {name}, which expired at {iso(t.expires)}: make a new "
                                f"bundle (`harmonicctl bundle {t.school or h.sender}`)")
    if t.school is not None and t.school != h.sender:
        raise EnrollmentRefused(f"{h.sender!r} presents {name}, which is for {t.school}")
    if t.prefix is not None and not (h.sender.startswith(t.prefix) and len(h.sender) > len(t.prefix)):
        raise EnrollmentRefused(f"{h.sender!r} presents {name}, which is for ids starting with {t.prefix!r}")
    if not bundle_mod.proof_matches(t.token, h.sender, h.sender_key, proof):
        raise EnrollmentRefused(f"{h.sender!r} presents {name} with a proof that does not match its id and key")
    uses = db.token_uses(tid)
    used = uses.get(h.sender)
    if used is not None and used != h.sender_key:
        raise EnrollmentRefused(f"{h.sender!r}: {name} was used already by {h.sender} with another key; "
                                "a bundle enrolls one server (make a new bundle to replace it)")
    if used is None and len(uses) >= t.count:
        raise EnrollmentRefused(f"{h.sender!r}: {name} was used already"
                                + (f" by its {t.count} servers" if t.prefix is not None else "")
                                + "; a bundle enrolls no more servers than it was made for")
    peer = db.peer(h.sender)
    if peer is not None and not peer.revoked and peer.key != h.sender_key:
        raise EnrollmentRefused(f"{h.sender!r} is enrolled with another key; revoke it first to replace "
                                "its server")
    if peer is not None and peer.role != "node":
        raise EnrollmentRefused(f"{h.sender!r} is not a school server's id here")
    other = db.peer_by_key(h.sender_key)
    if other is not None and other.id != h.sender:
        raise EnrollmentRefused(f"{h.sender!r}: its key belongs to {other.id}")
    return Enrollment(h.sender, h.sender_key, tid, again=used is not None)


def record(db: StateDB, e: Enrollment, now: int) -> None:
    """In the import's transaction: the school enrolled, the token's use noted."""
    peer = db.peer(e.school)
    if peer is None or peer.key != e.key or peer.revoked:
        db.enroll_peer(e.school, e.key, now)
    db.use_token(e.token, e.school, e.key, now)
    log.info("enrolled %s at its first contact (token %s)", e.school, e.token.hex()[:8])


# --------------------------------------------------------------------------- master: revocation


def withdraw_bundle(store: Store, token: str) -> str:
    """Master: a bundle not used up yet is no longer accepted (a region's image
    copied where it should not be, a bundle lost with its stick). Servers it
    already enrolled stay enrolled: revoke those by id. Returns one line."""
    if not store.cfg.is_master:
        raise UsageError("revoke --bundle is for the master")
    text = token.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,32}", text):
        raise UsageError(f"revoke --bundle {token[:40]!r}: give the token as status shows it (8 hex digits)")
    db = store.db
    found = [t for t in db.tokens() if t.id.hex().startswith(text)]
    if not found:
        raise UsageError(f"revoke --bundle {text}: no bundle with that token")
    if len(found) > 1:
        raise UsageError(f"revoke --bundle {text}: {len(found)} bundles' tokens start so; give more digits")
    t = found[0]
    who = t.school or f"region {t.prefix}*"
    if t.withdrawn:
        return f"the bundle for {who} (token {text}) was withdrawn already"
    with db.tx():
        db.withdraw_token(t.id)
    used = len(db.token_uses(t.id))
    return (f"withdrew the bundle for {who} (token {text}): no server enrolls with it from now on"
            + (f"; the {used} it enrolled stay enrolled (revoke them by id)" if used else ""))


def revoke(store: Store, school: str) -> str:
    """Master: refuse school from now on. Returns one line for the admin."""
    cfg = store.cfg
    if not cfg.is_master:
        raise UsageError("revoke is for the master")
    check_school_id(school)
    db = store.db
    peer = db.peer(school)
    now = int(time.time())
    if peer is None or peer.role != "node":
        if any(t.school == school and not t.withdrawn for t in db.tokens()):
            with db.tx():
                db.withdraw_tokens(school)
            return f"{school} never enrolled; its bundle's token is withdrawn"
        raise UsageError(f"revoke {school}: no such school server (enrolled, or with a bundle)")
    if peer.revoked:
        return f"{school} was revoked already"
    with db.tx():
        db.revoke_peer(school, now)
        seq = int(db.get_meta(META_REVOCATIONS_SEQ) or 0) + 1
        db.set_meta(META_REVOCATIONS_SEQ, str(seq))
    # Its last online answer is not served any more (services/online.py's outbox).
    shutil.rmtree(os.path.join(store.dir, "outbox", school), ignore_errors=True)
    log.info("revoked %s (key %s); revocation list %d", school, keys.format_key(peer.key)[:24], seq)
    return f"revoked {school}: its packs and requests are refused from now on (revocation list {seq})"


def master_list(store: Store) -> RevocationList | None:
    db = store.db
    seq = int(db.get_meta(META_REVOCATIONS_SEQ) or 0)
    if not seq:
        return None
    return RevocationList(store.cfg.id, seq, tuple(Revoked(s, k, at) for s, k, at in db.revoked_keys()))


def carried_list(store: Store) -> list[bytes] | None:
    """[body, sig] for extra["revoked"]: the master signs its list (with its current
    signing key, so a rotation needs nothing more); a school or relay passes on
    the newest one it verified, as the master signed it."""
    if store.cfg.is_master:
        rl = master_list(store)
        return None if rl is None else bundle_mod.sign_revocations(rl, store.key)
    row = store.db.revocation_list()
    return None if row is None else [row[2], row[3]]


def known_list(store: Store) -> RevocationList | None:
    """The revocation list this server goes by (the master's own, or the newest verified)."""
    if store.cfg.is_master:
        return master_list(store)
    row = store.db.revocation_list()
    if row is None:
        return None
    try:
        return bundle_mod.decode_revocations(row[2], "stored revocation list")
    except HarmonicError:
        return None


# --------------------------------------------------------------------------- packs: header and import


def header_extra(store: Store, recipient_key: bytes | None) -> dict[str, Any]:
    """What this server puts in extra of a pack it writes: the revocation list (every
    pack of the master, and of a relay), and a not-yet-enrolled school's proof in
    its requests to the master."""
    extra: dict[str, Any] = {}
    rl = carried_list(store)
    if rl is not None:
        extra["revoked"] = rl
    if not store.cfg.is_master and recipient_key is not None:
        pending = pending_enrollment(store.db)
        if pending is not None and recipient_key in store.trust_chain().signing_keys():
            extra["enroll"] = bundle_mod.enroll_extra(*pending)
    return extra


def pending_enrollment(db: StateDB) -> tuple[bytes, bytes] | None:
    tid, proof = db.get_meta(META_TOKEN), db.get_meta(META_PROOF)
    if not tid or not proof:
        return None
    return bytes.fromhex(tid), bytes.fromhex(proof)


@dataclass
class Incoming:
    """What a pack's header says that this module acts on, checked before anything
    of the pack is stored; recorded in the import's transaction (after_import)."""

    enrollment: Enrollment | None = None
    revocations: tuple[RevocationList, bytes, bytes] | None = None


def assess(store: Store, h: Header, where: str, enrollment: Enrollment | None) -> Incoming:
    """School: the revocation list the pack carries (verified against the master's
    key, whoever signed the pack), if newer than the one held."""
    inc = Incoming(enrollment)
    if store.cfg.is_master or not isinstance(h.extra, dict) or h.extra.get("revoked") is None:
        return inc
    signing = _signing_now(store, h)
    rl, body, sig = bundle_mod.read_revocations(h.extra["revoked"], signing, where)
    master = next(iter(store.db.peers("master")), None)
    if master is not None and rl.master != master.id:
        raise UntrustedPack(f"{where}: its revocation list is of {rl.master}, not of the master {master.id}")
    held = store.db.revocation_list()
    if held is None or rl.seq > held[1]:
        inc.revocations = (rl, body, sig)
    return inc


def _signing_now(store: Store, h: Header) -> bytes:
    """The master's signing key once this pack's key chain is followed (services/exchange.py
    checked the chain already; it is committed with the import)."""
    state = store.trust_chain()
    raw = h.extra.get("chain")
    if raw:
        state, _new = trust.advance(state, trust.decode_chain(raw))
    return state.signing


def after_import(store: Store, h: Header, inc: Incoming, now: int) -> None:
    """In the import's transaction."""
    db = store.db
    if inc.enrollment is not None:
        record(db, inc.enrollment, now)
    if inc.revocations is not None:
        rl, body, sig = inc.revocations
        db.put_revocation_list(rl.master, rl.seq, body, sig)
        log.info("revocation list %d of %s taken: %d school server(s) revoked", rl.seq, rl.master,
                 len(rl.entries))
    if (not store.cfg.is_master and h.recipient_key == store.key.public and db.get_meta(META_TOKEN)
            and h.sender_key == _signing_now(store, h)):
        # The master answered this school: it is enrolled; the proof need not travel again.
        db.set_meta(META_TOKEN, "")
        db.set_meta(META_PROOF, "")
        log.info("enrolled with the master %s", h.sender)


def refuse_revoked(store: Store, h: Header, what: str = "request") -> None:
    """A relay: refuse a request from a school the master revoked (by its key)."""
    rl = known_list(store)
    if rl is None:
        return
    hit = rl.names(h.sender_key)
    if hit is not None:
        raise UntrustedPack(f"{what} is from {h.sender!r}, whose enrollment was revoked by the master "
                            f"{rl.master} (revocation list {rl.seq}, {iso(hit.at)})")


# --------------------------------------------------------------------------- school: init from a bundle


def read_bundle(path: str, now: int | None = None) -> Bundle:
    """A bundle file, checked whole: size, format, signature, expiry by this machine's clock."""
    try:
        # O_NONBLOCK: a FIFO in its place (a hostile stick) must not hang the
        # first-boot wait; anything but a regular file is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the bundle ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file, so not a bundle")
    with os.fdopen(fd, "rb") as f:
        data = f.read(bundle_mod.MAX_BUNDLE + 1)
    b, body, sig = bundle_mod.decode(data, path)
    bundle_mod.verify(b, body, sig, path)
    now = int(time.time()) if now is None else now
    if now >= b.expires:
        raise BundleError(f"{path}: the bundle expired at {iso(b.expires)} by this machine's clock (now "
                          f"{iso(now)}): ask the master for a new one (`harmonicctl bundle "
                          f"{b.school or '--region ' + str(b.prefix)}`), or set the clock right")
    return b


def hostname_name(hostname: str) -> str | None:
    """This machine's name as a region server's name, or None when it is a default
    name two clones of an image would share."""
    first = hostname.split(".", 1)[0].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", first).strip("-")
    if not name or name in GENERIC_HOSTNAMES:
        return None
    return name[:40]


def fingerprint_name(public: bytes) -> str:
    import hashlib

    return hashlib.sha256(public).hexdigest()[:10]


def init_from_bundle(cfg_path: str, bundle_path: str, state_dir: str, *, socket: str = config_mod.DEFAULT_SOCKET,
                     name: str | None = None, hostname: str | None = None, listen: str = "",
                     deploy_dir: str | None = None, sources: dict[str, str] | None = None,
                     media: Config | None = None, replace_config: bool = False) -> tuple[str, Bundle, str]:
    """School: configure this server from a bundle. Returns (its id, the bundle, its key as text).

    The id: the bundle's school; for a region bundle the prefix and a name: name
    (--id) if given, else this machine's host name unless a default one, else
    the new key's fingerprint. ``media``: a first-boot configuration whose
    [media] settings are kept. ``replace_config``: the file at cfg_path is a
    first-boot configuration (no server id) and may be replaced."""
    from harmonicd.config import NODE_COLLECTIONS
    from harmonicd.services import setup

    b = read_bundle(bundle_path)
    if media is not None and media.master_key is not None and b.anchor != media.master_key:
        # A disk image that names its deployment's master takes no bundle of another:
        # a stick with someone else's bundle must not give the server away at first boot.
        raise BundleError(f"{bundle_path}: made by the master {b.master} with key {keys.format_key(b.anchor)}, "
                          f"not the master this server was prepared for ([upstream] master_key "
                          f"{keys.format_key(media.master_key)}): refused")
    state = os.path.abspath(state_dir)
    if os.path.exists(cfg_path) and not replace_config:
        raise ConfigError(f"{cfg_path}: a configuration already exists: this server is set up already "
                          "(init never overwrites one)")
    if os.path.exists(os.path.join(state, "state.db")):
        raise UsageError(f"{state} already holds a Harmonic state: this server is set up already")
    key = keys.SigningKey.generate()
    if b.school is not None:
        sid = b.school_id(name)
    else:
        given = name or (hostname_name(hostname) if hostname else None) or fingerprint_name(key.public)
        sid = b.school_id(given)
    srcs = sources or {n: os.path.join(state, "sources", n) for n in NODE_COLLECTIONS}
    base = media
    cfg = Config(path=os.path.abspath(cfg_path), id=sid, role="node", state_dir=state, socket=socket,
                 listen=listen, upstream_url=b.upstream[0] if b.upstream else "", master_key=b.anchor,
                 sources=srcs, deploy_dir=deploy_dir or os.path.join(state, "deploy"))
    if base is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, media_devices=base.media_devices, media_mount_base=base.media_mount_base,
                                  media_watch=base.media_watch, media_adopt_blank=base.media_adopt_blank,
                                  socket_group=base.socket_group, admin_group=base.admin_group)
    proof = bundle_mod.proof(b.token, sid, key.public)

    def enrolling(store: Store) -> None:
        db = store.db
        db.set_meta(META_TOKEN, b.token_id.hex())
        db.set_meta(META_PROOF, proof.hex())
        db.set_meta("bundle.master", b.master)
        db.set_meta("bundle.expires", str(b.expires))
        for c, seq in b.seqs.items():
            own = db.collection(c)
            if own is not None and own.mode == "owned" and seq > own.seq:
                db.update_collection(c, seq=seq)  # its first release is seq + 1
        for c in b.collections:
            if db.collection(c) is None:
                from harmonicd.services.deploy import default_path

                db.add_collection(c, c, "master", "replica", path=default_path(store, c))
        store_chain(store, b)

    public = setup.init(cfg, key=key, then=enrolling, replace_config=replace_config)
    return sid, b, public


def store_chain(store: Store, b: Bundle) -> None:
    """The master's key chain the bundle carries (verified by read_bundle), so the
    school starts at its current version."""
    now = int(time.time())
    for version, (body, by_previous, by_self) in enumerate(b.chain, 1):
        store.db.add_chain_link(version, body, by_previous, by_self, now)


def find_stick_bundle(mountpoints: list[str]) -> str | None:
    """The first HARMONIC/bundle*.hbundle on the sticks mounted at mountpoints."""
    for m in mountpoints:
        box = os.path.join(m, "HARMONIC")
        try:
            names = sorted(os.listdir(box))
        except OSError:
            continue
        for n in names:
            p = os.path.join(box, n)
            if STICK_BUNDLE.match(n) and os.path.isfile(p) and not os.path.islink(p):
                return p
    return None


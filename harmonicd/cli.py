"""harmonicctl: the command line of INTERFACE.md.

Exit codes: 0 done; 1 failed (one line on stderr saying what and why);
2 wrong usage; 3 the daemon is needed and is not running. Commands that
change the store (publish, exchange, verify, gc, enroll) run in this
process under the store's lock, waiting for it if the daemon holds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from harmonicd import __version__
from harmonicd import config as config_mod
from harmonicd.config import NODE_COLLECTIONS, Config
from harmonicd.core import keys
from harmonicd.core.ident import check_school_id, check_server_id
from harmonicd.errors import ConfigError, DaemonNotRunning, HarmonicError, UsageError

if TYPE_CHECKING:
    from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors, as we want
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="configuration file (default: $HARMONICD_CONFIG or /etc/harmonicd/harmonicd.toml)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    p = _Parser(prog="harmonicctl", parents=[common],
                description="Harmonic: content down, data up, online or by USB stick.")
    p.add_argument("--version", action="version", version=f"harmonicctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    init = sub.add_parser("init", parents=[common], help="create this server's configuration, state and key")
    init.add_argument("role", nargs="?", choices=["master", "node"])
    init.add_argument("--id")
    init.add_argument("--state-dir")
    init.add_argument("--master-key")
    init.add_argument("--upstream", default="")
    init.add_argument("--listen", default="")
    init.add_argument("--public-url", default="",
                      help="master: the address schools reach it at, named in its bundles ([server] public_url)")
    init.add_argument("--socket", default=config_mod.DEFAULT_SOCKET)
    init.add_argument("--deploy-dir", help="where replicas are deployed (default STATE_DIR/deploy)")
    init.add_argument("--stats-dir", help="school: source folder of stats (default STATE_DIR/sources/stats)")
    init.add_argument("--backup-dir", help="school: source folder of backup (default STATE_DIR/sources/backup)")
    init.add_argument("--volume-size", help="largest pack file, e.g. 3900MiB (default just below 4 GB)")
    init.add_argument("--bundle", help="configure this school server from the master's bootstrap bundle FILE")

    bu = sub.add_parser("bundle", parents=[common], help="master: a bootstrap bundle for a new school server")
    bu.add_argument("id", nargs="?", help="the school server's id (or --region)")
    bu.add_argument("--out", required=True, help="the bundle file to write (0600; never overwritten)")
    bu.add_argument("--upstream", action="append", metavar="URL",
                    help="where the school reaches the master (repeatable; default: [server] public_url)")
    bu.add_argument("--sticks-only", action="store_true", help="no upstream address: the school syncs by stick")
    bu.add_argument("--expires-days", type=float, default=30.0, help="days the bundle may be used (default 30)")
    bu.add_argument("--collections", nargs="+", metavar="NAME",
                    help="the master's collections the school carries (default: all for everyone, and its own)")
    bu.add_argument("--region", metavar="PREFIX", help="one bundle for up to --count servers, ids PREFIX+name")
    bu.add_argument("--count", type=int, help="with --region: how many servers may enroll with it")
    rv = sub.add_parser("revoke", parents=[common], help="master: refuse school server ID from now on")
    rv.add_argument("id", nargs="?")
    rv.add_argument("--bundle", metavar="TOKEN",
                    help="instead: withdraw a bundle not used up yet (its token as status shows it)")

    sub.add_parser("key", parents=[common],
                   help="print this server's public key (the master: the key schools pin, its first)")
    tr = sub.add_parser("trust", parents=[common], help="the master's key chain: keys, rotation")
    tr_sub = tr.add_subparsers(dest="trust_command", required=True, parser_class=_Parser)
    tn = tr_sub.add_parser("new-key", parents=[common],
                           help="write a new key (an offline root key) into FILE (0600) and print its public key")
    tn.add_argument("--out", required=True, metavar="FILE")
    trr = tr_sub.add_parser("rotate", parents=[common],
                            help="master: a new signing key, signed by the root key (and a new root, if given)")
    trr.add_argument("--root-key", metavar="FILE", help="the current root key (not needed for the first rotation)")
    trr.add_argument("--new-root-key", metavar="FILE", help="a new root key (needed for the first rotation)")
    tsh = tr_sub.add_parser("show", parents=[common], help="the master's key chain as this server trusts it")
    tsh.add_argument("--json", action="store_true")
    en = sub.add_parser("enroll", parents=[common], help="master: accept a school server and its key")
    en.add_argument("id")
    en.add_argument("key")
    pub = sub.add_parser("publish", parents=[common], help="snapshot DIR as the next release of COLLECTION")
    pub.add_argument("collection")
    pub.add_argument("dir")
    pub.add_argument("--for", dest="target")
    ex = sub.add_parser("exchange", parents=[common], help="sync through DIR (a stick or any folder)")
    ex.add_argument("dir")
    stick = sub.add_parser("stick", parents=[common], help="sticks: prepare one for Harmonic")
    stick_sub = stick.add_subparsers(dest="stick_command", required=True, parser_class=_Parser)
    sp = stick_sub.add_parser("prepare", parents=[common],
                              help="make the stick mounted at DIR a Harmonic stick (HARMONIC/ and a README)")
    sp.add_argument("dir")
    st = sub.add_parser("status", parents=[common], help="what this server holds and does")
    st.add_argument("--json", action="store_true")
    sub.add_parser("verify", parents=[common], help="re-check every stored object and deployed file")
    sub.add_parser("gc", parents=[common], help="remove what nothing needs any more")
    sy = sub.add_parser("sync", parents=[common], help="ask the daemon to sync online now")
    sy.add_argument("--wait", action="store_true")
    sub.add_parser("watch", parents=[common], help="live events and progress")
    lease = sub.add_parser("lease", parents=[common], help="laptops' anti-theft leases (docs/leases.md)")
    lease_sub = lease.add_subparsers(dest="lease_command", required=True, parser_class=_Parser)
    li = lease_sub.add_parser("issue", parents=[common],
                              help="master: sign a lease for each laptop of SCHOOL and publish them for it")
    li.add_argument("school")
    li.add_argument("--serials", help="file of laptop serials, one a line (default: the laptops issued last time)")
    li.add_argument("--days", type=int, default=30, help="days each lease is valid from now (default 30)")
    lr = lease_sub.add_parser("renew", parents=[common],
                              help="master: issue again, from now, the leases of these schools (default: all)")
    lr.add_argument("schools", nargs="*")
    lr.add_argument("--days", type=int, default=None,
                    help="days each lease is valid from now (default: as long as the school's last ones)")
    lc = lease_sub.add_parser("check", parents=[common],
                              help="verify a lease file with the master's key against this server's clock")
    lc.add_argument("file")
    lc.add_argument("--serial", help="the laptop it must be for")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s: %(message)s", stream=sys.stderr)
    path = config_mod.config_path(getattr(args, "config", None))
    try:
        return _run(args, path)
    except HarmonicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except OSError as exc:
        # Unexpected I/O trouble still gets one clear line, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, path: str) -> int:
    cmd = args.command
    if cmd == "init":
        return _init(args, path)
    if cmd == "trust" and args.trust_command == "new-key":
        # No configuration needed: the root key is made on the admin's own machine.
        from harmonicd.services.trust import new_key

        print(keys.format_key(new_key(args.out)))
        return 0
    if cmd == "status":
        first = config_mod.load(path, first_boot=True)
        if not first.configured:
            return _status_unconfigured(first, args.json)
    cfg = config_mod.load(path)
    # The commands that only talk to the daemon come first: they must not pay
    # for importing the store (sync --wait is timed against rsync).
    if cmd == "sync":
        return _sync(cfg, args.wait)
    if cmd == "watch":
        return _watch(cfg)
    from harmonicd.store import durable
    from harmonicd.store.store import Store

    if cmd == "key":
        with Store(cfg, lock=False) as store:
            # The master prints the anchor of its key chain (its key before any
            # rotation): what `init node --master-key` takes, through every rotation.
            print(keys.format_key(store.trust_chain().anchor if cfg.is_master else store.key.public))
        return 0
    if cmd == "trust" and args.trust_command == "show":
        with Store(cfg, lock=False) as store:
            return _trust_show(store, args.json)
    if cmd == "status":
        st = _daemon_status(cfg)
        if st is None:
            from harmonicd.services.status import status

            with Store(cfg, lock=False) as store:
                st = status(store)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(_render_status(st))
        return 0
    if cmd == "stick":
        return _stick_prepare(cfg, args.dir)
    if cmd == "lease" and args.lease_command == "check":
        with Store(cfg, lock=False) as store:
            return _lease_check(store, args.file, args.serial)
    _become_state_owner(cfg)
    with Store(cfg) as store:
        from harmonicd.services.maintenance import recover

        recover(store)
        if cmd == "bundle":
            return _bundle(store, args)
        if cmd == "revoke":
            from harmonicd.services.enrollment import revoke, withdraw_bundle

            if (args.id is None) == (args.bundle is None):
                raise UsageError("revoke: give a school server's ID, or --bundle TOKEN (not both)")
            print(revoke(store, args.id) if args.id is not None else withdraw_bundle(store, args.bundle))
            return 0
        if cmd == "enroll":
            from harmonicd.services.setup import enroll

            enroll(store, args.id, args.key)
            print(f"enrolled {args.id}")
            return 0
        if cmd == "publish":
            from harmonicd.services.publish import publish

            seq, _changed = publish(store, args.collection, args.dir, args.target)
            print(seq)
            return 0
        if cmd == "exchange":
            return _exchange(store, args.dir)
        if cmd == "trust":
            return _trust_rotate(store, args.root_key, args.new_root_key)
        if cmd == "lease":
            return _lease(store, args)
        if cmd == "verify":
            from harmonicd.services.maintenance import verify

            rep = verify(store)
            for prob in rep.problems:
                print(f"damaged: {prob}", file=sys.stderr)
            if rep.problems:
                print(f"error: verify found {len(rep.problems)} problem(s) in {rep.objects} objects "
                      f"and {rep.files} deployed files", file=sys.stderr)
                return 1
            print(f"ok: {rep.objects} objects ({durable.mib(rep.bytes)}) and {rep.files} deployed files verified")
            return 0
        if cmd == "gc":
            from harmonicd.services.maintenance import gc

            g = gc(store)
            print(f"removed {g.removed} objects ({durable.mib(g.removed_bytes)}), kept {g.kept}")
            return 0
    raise UsageError(f"unknown command {cmd}")


def _bundle(store: Store, args: argparse.Namespace) -> int:
    from harmonicd.services.enrollment import iso, make_bundle

    if args.region is not None:
        if args.id is not None:
            raise UsageError("bundle: give a school id, or --region PREFIX --count N, not both")
        if args.count is None:
            raise UsageError("bundle --region needs --count N (how many servers may enroll with it)")
    elif args.id is None:
        raise UsageError("bundle needs the school server's id (or --region PREFIX --count N)")
    elif args.count is not None:
        raise UsageError("--count is for --region")
    if args.sticks_only and args.upstream:
        raise UsageError("--sticks-only and --upstream: choose one")
    made = make_bundle(store, args.out, school=args.id, prefix=args.region, count=args.count or 1,
                       upstream=[] if args.sticks_only else args.upstream, expires_days=args.expires_days,
                       collections=args.collections)
    b = made.bundle
    where = ", ".join(b.upstream) or "by stick only"
    print(f"wrote {made.path}: bundle for {b.what()} ({where}; collections {', '.join(b.collections) or 'none'}); "
          f"valid until {iso(b.expires)}; keep it secret until it is used")
    return 0


def _init_bundle(args: argparse.Namespace, path: str) -> int:
    """init --bundle: a school server configured from the master's bundle."""
    import socket as socket_mod

    from harmonicd.services.enrollment import init_from_bundle

    if args.role == "master" or args.master_key or args.upstream:
        raise UsageError("init --bundle takes the role, the master's key and the upstream from the bundle "
                         "(no role, --master-key or --upstream)")
    first = None
    if os.path.exists(path):
        first = config_mod.load(path, first_boot=True)
        if first.configured:
            raise ConfigError(f"{path}: a configuration already exists: this server is set up already "
                              "(init never overwrites one)")
    state = args.state_dir or (first.state_dir if first else config_mod.DEFAULT_STATE_DIR)
    sock = args.socket if args.socket != config_mod.DEFAULT_SOCKET or first is None else first.socket
    sources = {}
    for name in NODE_COLLECTIONS:
        given = getattr(args, f"{name}_dir")
        sources[name] = os.path.abspath(given) if given else os.path.join(os.path.abspath(state), "sources", name)
    owner = _owner(state)
    sid, b, key = init_from_bundle(os.path.abspath(path), args.bundle, state, socket=os.path.abspath(sock),
                                   name=args.id, hostname=socket_mod.gethostname(), listen=args.listen,
                                   deploy_dir=os.path.abspath(args.deploy_dir) if args.deploy_dir else None,
                                   sources=sources, media=first, replace_config=first is not None)
    _hand_over(os.path.abspath(state), owner)
    print(key)
    how = f"online at {b.upstream[0]} or by stick" if b.upstream else "by stick"
    print(f"{sid}: configured from {args.bundle}; enrolls with the master {b.master} at its first contact ({how})")
    return 0


def _owner(state: str) -> os.stat_result | None:
    try:
        return os.stat(state)
    except FileNotFoundError:
        return None


def _hand_over(top: str, owner: os.stat_result | None) -> None:
    """root setting up a state folder the daemon's user owns (the package's
    /var/lib/harmonicd, made by the unit's StateDirectory= while a first-boot
    daemon waits on it): everything init made under it goes to that user (links
    themselves, not their targets), so the daemon reads its key and writes its
    database without a restart."""
    if os.geteuid() != 0 or owner is None or owner.st_uid == 0:
        return
    for folder, dirs, files in os.walk(top):
        for n in dirs + files:
            os.chown(os.path.join(folder, n), owner.st_uid, owner.st_gid, follow_symlinks=False)


def _init(args: argparse.Namespace, path: str) -> int:
    if args.bundle:
        return _init_bundle(args, path)
    if not args.role:
        raise UsageError("init needs a role: `init master` or `init node`")
    if not args.id or not args.state_dir:
        raise UsageError("init needs --id and --state-dir")
    (check_school_id if args.role == "node" else check_server_id)(args.id)
    state = os.path.abspath(args.state_dir)
    master_key = None
    sources: dict[str, str] = {}
    if args.role == "node":
        if not args.master_key:
            raise UsageError("init node needs --master-key (the master's `harmonicctl key`)")
        try:
            master_key = keys.parse_key(args.master_key)
        except ValueError as exc:
            raise UsageError(f"--master-key: {exc}") from None
        for name in NODE_COLLECTIONS:
            given = getattr(args, f"{name}_dir")
            sources[name] = os.path.abspath(given) if given else os.path.join(state, "sources", name)
    elif args.master_key or args.upstream:
        raise UsageError("--master-key and --upstream are for `init node`")
    volume = config_mod.DEFAULT_VOLUME_SIZE
    if args.volume_size:
        try:
            volume = config_mod.parse_size(args.volume_size)
        except ValueError as exc:
            raise UsageError(f"--volume-size: {exc}") from None
    if args.public_url and args.role != "master":
        raise UsageError("--public-url is for `init master` (the address its bundles give schools)")
    cfg = Config(path=os.path.abspath(path), id=args.id, role=args.role, state_dir=state,
                 socket=os.path.abspath(args.socket), listen=args.listen, upstream_url=args.upstream,
                 master_key=master_key, sources=sources, volume_size=volume, public_url=args.public_url,
                 deploy_dir=os.path.abspath(args.deploy_dir) if args.deploy_dir else os.path.join(state, "deploy"))
    # Validate what we are about to write exactly as it will be read back.
    config_mod.validate(_as_toml_dict(cfg), cfg.path)
    from harmonicd.services.setup import init

    owner = _owner(state)
    key = init(cfg)
    _hand_over(state, owner)
    print(key)
    return 0


def _as_toml_dict(cfg: Config) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(config_mod.render(cfg))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg.path}: would not be valid TOML ({exc})") from None


def _status_unconfigured(cfg: Config, as_json: bool) -> int:
    """A server not set up yet (no configuration): what its first-boot daemon says
    (harmonicd/firstboot.py); without one, the configuration's own error."""
    st = _daemon_status(cfg)
    if st is None:
        config_mod.load(cfg.path)  # raises: no configuration file, or no server.id
        raise ConfigError(f"{cfg.path}: not configured")
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    daemon = "running" if st.get("daemon") else "not running"
    print(f"not configured ({cfg.path}): harmonicd {st.get('version', __version__)}  daemon {daemon}")
    print(f"waiting:   {st.get('waiting_for')}")
    if st.get("last_error"):
        print(f"refused:   {st['last_error']}")
    return 0


def _stick_prepare(cfg: Config, folder: str) -> int:
    from harmonicd.services.stick import is_prepared, prepare

    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder")
    if is_prepared(folder):
        print(f"{folder} is already a Harmonic stick")
        return 0
    box = prepare(folder)
    # root preparing an ext4 stick: the daemon's user must be able to write there
    # (FAT and exFAT sticks are mounted with its uid, so this changes nothing).
    if os.geteuid() == 0:
        try:
            owner = os.stat(cfg.state_dir)
        except OSError:
            owner = None
        if owner is not None and owner.st_uid != 0:
            for p in (box, os.path.join(box, "README.txt")):
                os.chown(p, owner.st_uid, owner.st_gid, follow_symlinks=False)
    print(f"prepared {folder}: Harmonic will use it (HARMONIC/)")
    return 0


def _exchange(store: Store, folder: str) -> int:
    from harmonicd.services.stick import visit
    from harmonicd.store import durable

    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder")
    t0 = time.monotonic()
    cfg = store.cfg

    def forward() -> str | None:
        # Called by the visit only on an online school that found other schools' requests.
        from harmonicd.peer.sync import forward_now

        return forward_now(store)
    # Typed by a person: consent to write to a stick not yet prepared.
    v = visit(store, folder, None, consent=True, read_back=cfg.media_read_back, forward=forward)
    rep = v.report
    for name, seq in rep.published:
        print(f"published {name} release {seq}")
    for r in rep.imported:
        if r.duplicate:
            print(f"already had {os.path.basename(r.path)} from {r.sender}")
        for a in r.applied:
            print(f"received {a} from {r.sender}")
        for a in r.pending:
            print(f"received part of {a}")
        for a in r.acked:
            print(f"{r.sender} confirmed {a}")
    for e in rep.exported:
        what = ", ".join(e.releases) or "request"
        print(f"wrote {len(e.files)} pack file(s) for {e.recipient}: {what} "
              f"({e.objects} objects, {durable.mib(e.bytes)})")
    if v.verified_files:
        print(f"read back {v.verified_files} pack file(s) ({durable.mib(v.verified_bytes)}) from {folder}: "
              "as written")
    for w in v.left_over:
        print(f"next trip: {w}")
    for w in rep.waiting:
        print(f"waiting: {w}")
    for line in rep.refused:
        print(f"refused: {line}", file=sys.stderr)
    from harmonicd.services.maintenance import gc

    gc(store)  # after the visit, as the daemon does: the stick is ready to go before this
    if rep.refused:
        print(f"error: {len(rep.refused)} pack(s) refused in {folder}", file=sys.stderr)
        return 1
    log.info("exchange took %.1f s", time.monotonic() - t0)
    return 0


def _lease(store: Store, args: argparse.Namespace) -> int:
    from harmonicd.core.lease import MAX_DAYS, iso, parse_serials
    from harmonicd.services import leases

    if args.days is not None and not 1 <= args.days <= MAX_DAYS:
        raise UsageError(f"--days: a lease lasts 1 to {MAX_DAYS} days, not {args.days}")
    if args.lease_command == "issue":
        serials = None
        if args.serials:
            try:
                with open(args.serials, encoding="utf-8", errors="replace") as f:
                    text = f.read(64 << 20)
            except OSError as exc:
                raise UsageError(f"--serials {args.serials}: cannot read ({exc.strerror})") from None
            serials = parse_serials(text, args.serials)
        done = [leases.issue(store, args.school, serials, args.days)]
    else:
        done = leases.renew(store, args.schools or None, args.days)
    for i in done:
        print(f"issued {i.laptops} leases for {i.school}, valid until {iso(i.expires)} (leases release {i.seq}); "
              "they reach the school at its next sync or stick")
    return 0


def _lease_check(store: Store, path: str, serial: str | None) -> int:
    """Verify a lease file as a school would serve it (or, on the master, as it signed it)."""
    from harmonicd.core import lease as core
    from harmonicd.errors import LeaseError
    from harmonicd.services import leases

    try:
        with open(path, "rb") as f:
            data = f.read(core.MAX_FILE + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    cfg = store.cfg
    key = store.key.public if cfg.is_master else store.master_key()
    if key is None:
        raise LeaseError("no master key to check leases with")
    sl = core.parse(data, path)
    school = sl.lease.school if cfg.is_master else cfg.id
    core.check(data, key, leases.now(store), school=school, serial=serial, where=path)
    lz = sl.lease
    print(f"valid: lease of laptop {lz.serial} at {lz.school}, from {core.iso(lz.not_before)} until "
          f"{core.iso(lz.expires)}, signed by the master {lz.master}'s key (version {lz.key_version})")
    return 0


def _trust_show(store: Store, as_json: bool) -> int:
    from harmonicd.services.trust import show

    t = show(store)
    if as_json:
        print(json.dumps(t, indent=2))
        return 0
    print(f"master {t['master'] or '(not heard from yet)'}: key chain version {t['version']}")
    print(f"signing key: {t['signing']}")
    print(f"root key:    {t['root']}")
    print(f"anchor:      {t['anchor']} (version 0)")
    for link in t["links"]:
        print(f"link {link['version']}: {link['created']}  signing {link['signing']}  root {link['root']}")
    return 0


def _trust_rotate(store: Store, root_key: str | None, new_root_key: str | None) -> int:
    from harmonicd.services.trust import read_key, rotate

    rot = rotate(store, read_key(root_key, "--root-key") if root_key else None,
                 read_key(new_root_key, "--new-root-key") if new_root_key else None)
    st = rot.state
    print(f"key chain version {st.version}: signing key {keys.format_key(st.signing)}, root key "
          f"{keys.format_key(st.root)}")
    print(f"signed again: {', '.join(rot.resigned) or 'no release'}; shared packs thrown away: {rot.dropped}")
    # A school serves only leases the current key signed (docs/leases.md §6): renewed now, not
    # left to the daemon's half-period renewal while laptops' leases stop being served.
    from harmonicd.core.lease import iso
    from harmonicd.services import leases

    for i in leases.renew(store, None) if store.db.lease_schools() else []:
        print(f"leases for {i.school} signed again by the new key: {i.laptops} laptops, valid until "
              f"{iso(i.expires)} (leases release {i.seq})")
    return 0


def _daemon_status(cfg: Config) -> dict[str, Any] | None:
    """The daemon's own status (live fields included), or None when it does not answer."""
    from harmonicd import ctlclient as control

    try:
        code, st = control.call(cfg.socket, "GET", f"{control.API}/status", timeout=10)
    except DaemonNotRunning:
        return None
    except HarmonicError as exc:
        log.warning("%s; showing the state without the daemon's live fields", exc)
        return None
    return st if code == 200 else None


def _become_state_owner(cfg: Config) -> None:
    """root changing a store that belongs to the daemon's user acts as that user,
    so nothing it writes (objects, the database, deployed files) ends up owned by
    root where the daemon could not replace it later."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(cfg.state_dir)
    except OSError:
        return
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
    log.info("acting as uid %d, the owner of %s", st.st_uid, cfg.state_dir)


def _sync(cfg: Config, wait: bool) -> int:
    from harmonicd import ctlclient as control

    code, out = control.call(cfg.socket, "POST", f"{control.API}/sync", {"wait": wait},
                             timeout=None if wait else 10)
    if code == 202:
        print("sync queued")
        return 0
    if "error" in out:
        raise HarmonicError(out["error"])
    if not out.get("ok"):
        raise HarmonicError(f"sync failed: {out.get('summary', 'no reason given')}")
    print(out.get("summary", ""))
    return 0


def _watch(cfg: Config) -> int:
    from harmonicd import ctlclient as control

    try:
        for ev in control.events(cfg.socket, recent=True):
            print(_render_event(ev), flush=True)
    except KeyboardInterrupt:
        return 0
    print("the daemon ended the stream (stopped or restarting)", file=sys.stderr)
    return 0


def _bar(done: int, total: int | None, width: int = 24) -> str:
    from harmonicd.store import durable

    if not total:
        return f"{durable.mib(done)}"
    frac = min(done / total, 1.0)
    fill = int(frac * width)
    pct = int(frac * 1000) / 10  # rounded down: 100.0% only when done
    return f"[{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}% {durable.mib(done)} of {durable.mib(total)}"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f", about {s // 60} min {s % 60:02d} s left" if s >= 60 else f", about {s} s left"


def _render_event(ev: dict[str, Any]) -> str:
    t = ev.get("time", "")[11:19]
    kind = ev.get("event")
    if kind == "progress":
        bar = _bar(ev["done_bytes"], ev.get("total_bytes"))
        return f"{t} {ev['kind']} {ev['detail']}: {bar}{_eta(ev.get('eta_s'))}"
    if kind == "started":
        return f"{t} {ev['kind']} {ev['detail']}: started"
    if kind == "stick":
        where = f" at {ev['path']}" if ev.get("path") else ""
        return f"{t} stick {ev['device']}{where}: {ev['message']}"
    if kind in ("done", "failed"):
        what = ev.get("summary") or ("done" if kind == "done" else "failed")
        return f"{t} {ev['kind']} {ev['detail']}: {'' if kind == 'done' else 'FAILED: '}{what} ({ev['seconds']} s)"
    rest = {k: v for k, v in ev.items() if k not in ("time", "event")}
    return f"{t} {kind} {json.dumps(rest)}"


def _age(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return iso
    s = max(0, int(time.time() - then))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s // n} {unit} ago"
    return f"{s} s ago"


def _date(iso: str | None) -> str:
    return "-" if not iso else iso.replace("T", " ").replace("Z", " UTC")


def _render_status(st: dict[str, Any]) -> str:
    from harmonicd.store import durable

    daemon = "running" if st["daemon"] else "not running"
    lines = [f"{st['id']}  {st['role']}  harmonicd {st['version']}  daemon {daemon}"]
    if st.get("master"):
        m = st["master"]
        lines.append(f"master:    {m['id'] or 'not yet heard from'}"
                     + (f", last contact {_age(m['last_seen'])} by {m['how']}" if m["last_seen"] else ""))
        if st.get("enrolling"):
            lines.append("enrolling: set up from a bundle; enrolled at the master's first answer (online or stick)")
    up = st.get("upstream")
    if up:
        reach = {True: "reachable", False: "unreachable", None: "not checked"}[up.get("reachable")]
        where = f"auto, found {up['found']}" if up.get("found") else up["url"]
        lines.append(f"upstream:  {where} ({reach}; last sync {_age(up.get('last_sync'))})"
                     + (f"; last error [{up.get('reason') or 'error'}]: {up['last_error']}"
                        if up.get("last_error") else ""))
    elif not st.get("schools") and st["role"] == "node":
        lines.append("upstream:  none (sticks only)")
    media = st.get("media")
    if media:
        kinds = ", ".join(media.get("devices", [])) or "none"
        if media.get("error"):
            lines.append(f"sticks:    {media['error']}")
        if not media.get("sticks"):
            lines.append(f"sticks:    none inserted (taken: {kinds})")
        for s in media.get("sticks", []):
            where = f" at {s['path']}" if s.get("path") else ""
            line = f"stick:     {s['device']}{where}: {s['message']}"
            if s.get("state") == "visiting" and s.get("done_bytes"):
                line += f"  {_bar(s['done_bytes'], s.get('total_bytes'))}{_eta(s.get('eta_s'))}"
            lines.append(line)
    act = st.get("activity")
    if act:
        lines.append(f"now:       {act['kind']} {act.get('detail', '')}  "
                     f"{_bar(act['done_bytes'], act.get('total_bytes'))}{_eta(act.get('eta_s'))}")
    elif st["daemon"]:
        lines.append("now:       idle" + (f" ({len(st['queued'])} queued)" if st.get("queued") else ""))
    lz = st.get("leases")
    if lz:
        lines.append(f"leases:    {lz['laptops']} laptops valid until {_date(lz['valid_until'])}; "
                     "renew by sync or stick" if lz["laptops"] else "leases:    no valid lease")
    for w in [*st.get("warnings", []), (lz or {}).get("warning"), (st.get("clock") or {}).get("warning")]:
        if w:
            lines.append(f"warning:   {w}")
    q = st.get("pending_quota")
    if q and q.get("exceeded") and q["exceeded"] not in st.get("warnings", []):
        lines.append(f"warning:   {q['exceeded']}")
    lines.append("")
    lines.append(f"{'collection':<28} {'owner':<16} {'seq':>5} {'released':<14} {'size':>10} {'pending':>10}  path")
    for c in st["collections"]:
        lines.append(f"{c['name']:<28} {c['owner']:<16} {c['seq']:>5} {_age(c.get('released')):<14} "
                     f"{durable.mib(c['size']):>10} {durable.mib(c['pending_bytes']):>10}  {c['path'] or ''}")
    if "schools" in st:
        lines.append("")
        lines.append(f"{'school':<20} {'last seen':<16} {'how':<7} {'waiting':>10}  holds")
        for s in st["schools"]:
            holds = ", ".join(f"{k.split('/', 1)[-1]}={v}" for k, v in s["holds"].items()) or "-"
            lz = s.get("leases")
            if lz:  # the laptops' leases last issued for it, and whether it holds them yet
                holds += (f"; {lz['laptops']} leases until {_date(lz['until'])}"
                          + ("" if lz["held"] else " (not held yet)"))
            lines.append(f"{s['id']:<20} {_age(s['last_seen']):<16} {s['how'] or '-':<7} "
                         f"{durable.mib(s['waiting_bytes']):>10}  {holds}")
    for b in st.get("bundles", []):  # schools on their way: bundles made, not yet used up
        who = b["school"] or f"region {b['prefix']}* ({b['used']} of {b['count']} enrolled)"
        lines.append(f"bundle:    {who}: not used yet, valid until {_date(b['expires'])} (token {b['token']})")
    lines.append("")
    store = st["store"]
    lines.append(f"store: {store['objects']} objects, {durable.mib(store['bytes'])}")
    return "\n".join(lines)

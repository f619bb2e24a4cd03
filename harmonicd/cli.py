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
from typing import Any

from harmonicd import __version__
from harmonicd import config as config_mod
from harmonicd.config import NODE_COLLECTIONS, Config
from harmonicd.core import keys
from harmonicd.core.ident import check_school_id, check_server_id
from harmonicd.errors import ConfigError, DaemonNotRunning, HarmonicError, UsageError
from harmonicd.store import durable
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
    init.add_argument("--socket", default=config_mod.DEFAULT_SOCKET)
    init.add_argument("--deploy-dir", help="where replicas are deployed (default STATE_DIR/deploy)")
    init.add_argument("--stats-dir", help="school: source folder of stats (default STATE_DIR/sources/stats)")
    init.add_argument("--backup-dir", help="school: source folder of backup (default STATE_DIR/sources/backup)")
    init.add_argument("--volume-size", help="largest pack file, e.g. 3900MiB (default just below 4 GB)")
    init.add_argument("--bundle", help="configure from a bootstrap bundle (not available yet)")

    sub.add_parser("key", parents=[common], help="print this server's public key")
    en = sub.add_parser("enroll", parents=[common], help="master: accept a school server and its key")
    en.add_argument("id")
    en.add_argument("key")
    pub = sub.add_parser("publish", parents=[common], help="snapshot DIR as the next release of COLLECTION")
    pub.add_argument("collection")
    pub.add_argument("dir")
    pub.add_argument("--for", dest="target")
    ex = sub.add_parser("exchange", parents=[common], help="sync through DIR (a stick or any folder)")
    ex.add_argument("dir")
    st = sub.add_parser("status", parents=[common], help="what this server holds and does")
    st.add_argument("--json", action="store_true")
    sub.add_parser("verify", parents=[common], help="re-check every stored object and deployed file")
    sub.add_parser("gc", parents=[common], help="remove what nothing needs any more")
    sy = sub.add_parser("sync", parents=[common], help="ask the daemon to sync online now")
    sy.add_argument("--wait", action="store_true")
    sub.add_parser("watch", parents=[common], help="live events and progress")
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
    cfg = config_mod.load(path)
    if cmd == "key":
        with Store(cfg, lock=False) as store:
            print(keys.format_key(store.key.public))
        return 0
    if cmd == "status":
        from harmonicd.services.status import status

        with Store(cfg, lock=False) as store:
            st = status(store)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(_render_status(st))
        return 0
    if cmd in ("sync", "watch"):
        raise DaemonNotRunning(f"`{cmd}` needs the daemon, and it is not running "
                               f"(no control socket at {cfg.socket})")
    with Store(cfg) as store:
        from harmonicd.services.maintenance import recover

        recover(store)
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


def _init(args: argparse.Namespace, path: str) -> int:
    if args.bundle:
        raise HarmonicError("init --bundle is not available in this version (bootstrap bundles come later)")
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
    cfg = Config(path=os.path.abspath(path), id=args.id, role=args.role, state_dir=state,
                 socket=args.socket, listen=args.listen, upstream_url=args.upstream,
                 master_key=master_key, sources=sources, volume_size=volume,
                 deploy_dir=os.path.abspath(args.deploy_dir) if args.deploy_dir else os.path.join(state, "deploy"))
    # Validate what we are about to write exactly as it will be read back.
    config_mod.validate(_as_toml_dict(cfg), cfg.path)
    from harmonicd.services.setup import init

    key = init(cfg)
    print(key)
    return 0


def _as_toml_dict(cfg: Config) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(config_mod.render(cfg))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg.path}: would not be valid TOML ({exc})") from None


def _exchange(store: Store, folder: str) -> int:
    from harmonicd.services.exchange import exchange

    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder")
    t0 = time.monotonic()
    rep = exchange(store, folder)
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
    for w in rep.waiting:
        print(f"waiting: {w}")
    for line in rep.refused:
        print(f"refused: {line}", file=sys.stderr)
    if rep.refused:
        print(f"error: {len(rep.refused)} pack(s) refused in {folder}", file=sys.stderr)
        return 1
    log.info("exchange took %.1f s", time.monotonic() - t0)
    return 0


def _render_status(st: dict[str, Any]) -> str:
    lines = [f"{st['id']} ({st['role']}, harmonicd {st['version']}, daemon "
             f"{'running' if st['daemon'] else 'not running'})"]
    if st.get("master"):
        m = st["master"]
        lines.append(f"master: {m['id'] or 'not yet heard from'}"
                     + (f", last contact {m['last_seen']} by {m['how']}" if m["last_seen"] else ""))
    if st.get("upstream"):
        lines.append(f"upstream: {st['upstream']['url']}")
    lines.append("")
    lines.append(f"{'collection':<28} {'owner':<16} {'seq':>5} {'size':>10} {'pending':>10}  path")
    for c in st["collections"]:
        lines.append(f"{c['name']:<28} {c['owner']:<16} {c['seq']:>5} {durable.mib(c['size']):>10} "
                     f"{durable.mib(c['pending_bytes']):>10}  {c['path'] or ''}")
    if "schools" in st:
        lines.append("")
        lines.append(f"{'school':<20} {'last seen':<22} {'how':<7} {'waiting':>10}  holds")
        for s in st["schools"]:
            holds = ", ".join(f"{k.split('/', 1)[-1]}={v}" for k, v in s["holds"].items()) or "-"
            lines.append(f"{s['id']:<20} {s['last_seen'] or 'never':<22} {s['how'] or '-':<7} "
                         f"{durable.mib(s['waiting_bytes']):>10}  {holds}")
    lines.append("")
    lines.append(f"store: {st['store']['objects']} objects, {durable.mib(st['store']['bytes'])}")
    return "\n".join(lines)

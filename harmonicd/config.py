"""Configuration: TOML in, one frozen dataclass out, validated in one place.

Every problem is a ConfigError naming the file and the key. Defaults live
here in code; docs/harmonicd.example.toml is the commented example. The
config object is passed explicitly; there is no global.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harmonicd.core import keys
from harmonicd.core.ident import check_collection, check_server_id
from harmonicd.errors import ConfigError, HarmonicError

if TYPE_CHECKING:
    import ssl  # imported where TLS files are checked: the mount helper loads this at every insertion

DEFAULT_PATH = "/etc/harmonicd/harmonicd.toml"
DEFAULT_SOCKET = "/run/harmonicd/control.sock"
DEFAULT_STATE_DIR = "/var/lib/harmonicd"  # the packaged unit's StateDirectory=: a first boot's state
UNCONFIGURED = "unconfigured"  # the id of a first-boot configuration (no [server] id yet): see load()
# FAT32 cannot hold a file of 4 GiB or more; stay clearly below it.
DEFAULT_VOLUME_SIZE = 4_000_000_000
MIN_VOLUME_SIZE = 64 << 10
NODE_COLLECTIONS = ("stats", "backup")
DEFAULT_QUIET = 5.0  # seconds without change before a watched folder is published
DEFAULT_RESCAN = 600.0  # seconds between stat rescans of watched folders
DEFAULT_PENDING_QUOTA = 4 << 30  # unacknowledged upward data kept at most
DEFAULT_STOP_GRACE = 20.0  # seconds a stopping daemon waits for its current job
DEFAULT_SYNC_INTERVAL = 3600.0  # seconds between a school's online syncs
DEFAULT_RELAY_QUEUE_QUOTA = 8 << 30  # downstream requests a relay keeps for the master, at most (bytes)
DEFAULT_MOUNT_BASE = "/media/harmonicd"  # where harmonicd-mount mounts sticks (systemd/harmonicd.tmpfiles.conf)
DEFAULT_MEDIA_WATCH = ("/media", "/run/media")  # where desktops mount sticks
DEFAULT_FREE_MARGIN = 16 << 20  # bytes left free on a stick
# Block devices that may be taken as sticks: USB mass storage, SD cards, and loop
# devices (tests and disk images; never a default).
MEDIA_KINDS = ("usb", "mmc", "loop")
AUTO_UPSTREAM = "auto"  # upstream.url: find a server on the LAN by mDNS
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})\Z")


def parse_window(value: str) -> tuple[int, int]:
    """ "22:00-06:00" -> (1320, 360): minutes after local midnight; may wrap past midnight."""
    m = _WINDOW.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a time window like \"22:00-06:00\"")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"{value!r}: hours 0-23 and minutes 0-59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"{value!r}: the window is empty")
    return start, end


def in_window(window: tuple[int, int] | None, minute_of_day: int) -> bool:
    if window is None:
        return True
    start, end = window
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


@dataclass(frozen=True)
class Config:
    path: str
    id: str
    role: str  # 'master' or 'node'
    state_dir: str
    socket: str = DEFAULT_SOCKET
    listen: str = ""
    upstream_url: str = ""
    master_key: bytes | None = None
    sources: dict[str, str] = field(default_factory=dict)  # owned collection -> source folder
    volume_size: int = DEFAULT_VOLUME_SIZE
    archive_keep_days: int = 0  # 0: keep forever
    media_devices: tuple[str, ...] = ("usb",)
    # Where the mount helper (harmonicd-mount, a separate privileged unit) mounts sticks
    # for us, and where the daemon leaves its "done, unmount it" requests.
    media_mount_base: str = DEFAULT_MOUNT_BASE
    # Also taken: sticks a desktop mounted under these folders (the daemon cannot unmount those).
    media_watch: tuple[str, ...] = DEFAULT_MEDIA_WATCH
    media_adopt_blank: bool = False  # write to a stick with no HARMONIC/ folder (not prepared) too
    media_free_margin: int = DEFAULT_FREE_MARGIN  # bytes left free on a stick, whatever fits
    media_read_back: bool = True  # read back what was written, past the page cache, before "safe to remove"
    deploy_dir: str = ""
    socket_group: str = "harmonicd"  # may read status and events
    admin_group: str = "harmonicd-admin"  # may also change things (sync, publish, verify, gc)
    quiet_seconds: float = DEFAULT_QUIET
    rescan_seconds: float = DEFAULT_RESCAN
    pending_quota: int = DEFAULT_PENDING_QUOTA
    stop_grace_seconds: float = DEFAULT_STOP_GRACE
    sync_interval: float = DEFAULT_SYNC_INTERVAL  # seconds between online syncs (jittered)
    sync_window: tuple[int, int] | None = None  # minutes after midnight (local time): start, end
    rate_limit: int = 0  # bytes/s each way for online sync; 0: no cap
    max_request: int = 4_000_000_000  # largest request pack a school may send online
    # The master's limits per school and per remote address (peer/limits.py); 0: no limit.
    max_syncs_per_minute: int = 6
    max_address_syncs_per_minute: int = 60
    max_downloads_per_address: int = 4
    max_request_age: float = 0.0  # seconds an online request's creation time may be off our clock; 0: any
    max_answer_wait: float = 30.0  # seconds of queued answers before a new sync is told "busy"; 0: never
    sync_timeout: float = 60.0  # seconds without a byte before an online transfer gives up
    relay_queue_quota: int = DEFAULT_RELAY_QUEUE_QUOTA  # a relay keeps at most this much of downstream requests
    public_url: str = ""  # master: the address schools reach it at, named in the bundles it makes
    configured: bool = True  # False: a first boot's configuration, waiting for a bundle (load(first_boot=True))
    tls_cert: str = ""  # PEM certificate (chain) the peer HTTP API serves https with; empty: plain http
    tls_key: str = ""  # its PEM private key
    ca_file: str = ""  # PEM CA or self-signed certificate(s) to check an https upstream by; empty: the system's
    lease_warn_days: int = 7  # school: warn in status when its laptops' leases run out within this many days
    lease_auto_renew: bool = True  # master: the daemon renews leases past half their time
    clock_tolerance: float = 3600.0  # seconds the system clock may be off the master's before status warns

    @property
    def is_master(self) -> bool:
        return self.role == "master"


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get("HARMONICD_CONFIG") or DEFAULT_PATH


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\Z")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a size (bytes, or a number with KiB, MiB, GiB)")


def load(path: str, *, first_boot: bool = False) -> Config:
    """The configuration at path. ``first_boot`` (the daemon and the mount helper):
    no file (in a folder that exists), or one with no ``[server] id`` (only [media] and [server] state_dir,
    socket, say), is a server not set up yet: an unconfigured Config with those
    settings, which waits for a bundle (services/firstboot.py)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        # Its folder there (the package makes /etc/harmonicd) but no file: a first boot.
        # A folder missing too is a wrong path, refused as always.
        if first_boot and os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return unconfigured(path, {})
        raise ConfigError(f"{path}: no configuration file (run `harmonicctl init` first, "
                          "or give --config)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the configuration") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if first_boot and isinstance(data.get("server", {}), dict) and "id" not in data.get("server", {}):
        return unconfigured(path, data)
    return validate(data, path)


def unconfigured(path: str, data: dict[str, Any]) -> Config:
    """A first boot's settings: what the file gives (checked as always), the rest defaults."""
    import dataclasses

    server = dict(data.get("server", {}))
    for k in ("id", "role"):
        if k in server:
            raise ConfigError(f"{path}: server.{k}: a first-boot configuration has no server.id and no server.role")
    server.update(id=UNCONFIGURED, role="master")  # "master": validated without an upstream key
    server.setdefault("state_dir", DEFAULT_STATE_DIR)
    cfg = validate({**data, "server": server}, path)
    return dataclasses.replace(cfg, role="node", configured=False)


def validate(data: dict[str, Any], path: str) -> Config:
    def err(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {why}")

    def table(name: str, keys: set[str] | None = None) -> dict[str, Any]:
        v = data.get(name, {})
        if not isinstance(v, dict):
            raise err(name, "must be a table")
        if keys is not None:
            for k in v:
                if k not in keys:
                    # A typo must not silently fall back to a default.
                    raise err(f"{name}.{k}", f"unknown key (known: {', '.join(sorted(keys))})")
        return v

    def text(t: dict[str, Any], tname: str, key: str, default: str | None = None) -> str:
        v = t.get(key, default)
        if v is None:
            raise err(f"{tname}.{key}", "is required")
        if not isinstance(v, str):
            raise err(f"{tname}.{key}", "must be a string")
        return v

    def seconds(t: dict[str, Any], tname: str, key: str, default: float, low: float, high: float) -> float:
        v = t.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise err(f"{tname}.{key}", "must be a number of seconds")
        if not low <= v <= high:
            raise err(f"{tname}.{key}", f"must be between {low:g} and {high:g} seconds")
        return float(v)

    known = {"server", "upstream", "collections", "packs", "archive", "media", "deploy", "publish", "relay",
             "leases"}
    for k in data:
        if k not in known:
            raise err(k, f"unknown section (known: {', '.join(sorted(known))})")

    server = table("server", {"id", "role", "state_dir", "socket", "listen", "socket_group", "admin_group",
                              "stop_grace_seconds", "max_request", "tls_cert", "tls_key", "max_syncs_per_minute",
                              "max_address_syncs_per_minute", "max_downloads_per_address",
                              "max_request_age_seconds", "max_answer_wait_seconds", "public_url"})
    sid_text = text(server, "server", "id")
    try:
        sid = check_server_id(sid_text)
    except HarmonicError as exc:
        raise err("server.id", str(exc)) from None
    role = text(server, "server", "role")
    if role not in ("master", "node"):
        raise err("server.role", f"must be 'master' or 'node', not {role!r}")
    state_dir = text(server, "server", "state_dir")
    if not os.path.isabs(state_dir):
        raise err("server.state_dir", "must be an absolute path")

    upstream = table("upstream", {"url", "master_key", "interval_seconds", "window", "rate_limit",
                                  "timeout_seconds", "ca_file"})
    master_key = None
    if "master_key" in upstream:
        try:
            master_key = keys.parse_key(text(upstream, "upstream", "master_key"))
        except ValueError as exc:
            raise err("upstream.master_key", str(exc)) from None
    if role == "node" and master_key is None:
        raise err("upstream.master_key", "is required on a school server")

    sources: dict[str, str] = {}
    for name, t in table("collections").items():
        try:
            check_collection(name)
        except HarmonicError as exc:
            raise err(f"collections.{name}", str(exc)) from None
        if not isinstance(t, dict):
            raise err(f"collections.{name}", "must be a table")
        for k in t:
            if k != "path":
                raise err(f"collections.{name}.{k}", "unknown key (known: path)")
        src = text(t, f"collections.{name}", "path")
        if not os.path.isabs(src):
            raise err(f"collections.{name}.path", "must be an absolute path")
        sources[name] = src

    packs = table("packs", {"volume_size"})
    try:
        volume_size = parse_size(packs.get("volume_size", DEFAULT_VOLUME_SIZE))
    except ValueError as exc:
        raise err("packs.volume_size", str(exc)) from None
    if not MIN_VOLUME_SIZE <= volume_size < 1 << 32:
        raise err("packs.volume_size", f"must be between {MIN_VOLUME_SIZE} bytes and 4 GiB "
                  "(FAT32 sticks hold files below 4 GiB)")

    archive = table("archive", {"keep_days"})
    keep = archive.get("keep_days", 0)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise err("archive.keep_days", "must be a whole number of days (0 = keep forever)")

    media = table("media", {"devices", "mount_base", "watch", "adopt_blank", "free_margin", "read_back"})
    devices = media.get("devices", ["usb"])
    if not (isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
        raise err("media.devices", "must be a list of strings, e.g. [\"usb\"]")
    for d in devices:
        if d not in MEDIA_KINDS:
            raise err("media.devices", f"unknown kind {d!r} (known: {', '.join(MEDIA_KINDS)})")
    mount_base = text(media, "media", "mount_base", DEFAULT_MOUNT_BASE)
    if not os.path.isabs(mount_base):
        raise err("media.mount_base", "must be an absolute path")
    watch = media.get("watch", list(DEFAULT_MEDIA_WATCH))
    if not (isinstance(watch, list) and all(isinstance(d, str) and os.path.isabs(d) for d in watch)):
        raise err("media.watch", "must be a list of absolute paths, e.g. [\"/media\", \"/run/media\"]")
    flags = {}
    for k, default in (("adopt_blank", False), ("read_back", True)):
        v = media.get(k, default)
        if not isinstance(v, bool):
            raise err(f"media.{k}", "must be true or false")
        flags[k] = v
    try:
        margin = parse_size(media.get("free_margin", DEFAULT_FREE_MARGIN))
    except ValueError as exc:
        raise err("media.free_margin", str(exc)) from None

    deploy = table("deploy", {"dir"})
    deploy_dir = text(deploy, "deploy", "dir", os.path.join(state_dir, "deploy"))
    if not os.path.isabs(deploy_dir):
        raise err("deploy.dir", "must be an absolute path")

    # 0: no online sync by itself (only when asked: `harmonicctl sync`).
    interval = seconds(upstream, "upstream", "interval_seconds", DEFAULT_SYNC_INTERVAL, 0, 7 * 86400)
    sync_timeout = seconds(upstream, "upstream", "timeout_seconds", 60.0, 1, 3600)
    try:
        max_request = parse_size(server.get("max_request", 4_000_000_000))
    except ValueError as exc:
        raise err("server.max_request", str(exc)) from None
    if max_request < 1024:
        raise err("server.max_request", "must be at least 1 KiB")

    def count(key: str, default: int) -> int:
        v = server.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1_000_000:
            raise err(f"server.{key}", "must be a whole number from 0 (no limit) to 1000000")
        return v

    rates = {k: count(k, d) for k, d in (("max_syncs_per_minute", 6), ("max_address_syncs_per_minute", 60),
                                          ("max_downloads_per_address", 4))}
    # 0 (the default): an online request is not refused for its time. Replays are
    # caught by pack id (kept for ever), and a school server's clock is often
    # wrong (no RTC battery): refusing it would cut it off from the sync that
    # could tell it so. A relay also forwards requests it queued days ago.
    max_age = seconds(server, "server", "max_request_age_seconds", 0.0, 0, 365 * 86400)
    if 0 < max_age < 60:
        raise err("server.max_request_age_seconds", "must be 0 (no limit) or at least 60 seconds")
    # Half the schools' default timeout: a sync queued behind more answers than
    # that is told to come back later (503) rather than left to time out.
    answer_wait = seconds(server, "server", "max_answer_wait_seconds", 30.0, 0, 3600)
    window = None
    if "window" in upstream:
        try:
            window = parse_window(text(upstream, "upstream", "window"))
        except ValueError as exc:
            raise err("upstream.window", str(exc)) from None
    try:
        rate = parse_size(upstream.get("rate_limit", 0))
    except ValueError as exc:
        raise err("upstream.rate_limit", str(exc)) from None
    if rate < 0 or 0 < rate < 1024:
        raise err("upstream.rate_limit", "must be 0 (no cap) or at least 1 KiB (bytes per second)")
    url = text(upstream, "upstream", "url", "")
    public_url = text(server, "server", "public_url", "")
    if public_url and not re.match(r"https?://[^/\s]+\S*\Z", public_url):
        raise err("server.public_url", f"{public_url!r} is not an http:// or https:// URL")
    # "auto": the upstream is found on the LAN by mDNS at sync time (peer/mdns.py).
    if url and url != AUTO_UPSTREAM and not re.match(r"https?://[^/\s]+", url):
        raise err("upstream.url", f"{url!r} is not an http:// or https:// URL (or \"auto\")")
    relay = table("relay", {"queue_quota"})
    try:
        relay_quota = parse_size(relay.get("queue_quota", DEFAULT_RELAY_QUEUE_QUOTA))
    except ValueError as exc:
        raise err("relay.queue_quota", str(exc)) from None
    if relay_quota < 1024:
        raise err("relay.queue_quota", "must be at least 1 KiB")
    listen = text(server, "server", "listen", "")
    if listen and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}", listen):
        raise err("server.listen", f"{listen!r} is not HOST:PORT")

    tls_cert, tls_key = text(server, "server", "tls_cert", ""), text(server, "server", "tls_key", "")
    if bool(tls_cert) != bool(tls_key):
        raise err("server.tls_key" if tls_cert else "server.tls_cert",
                  "is needed too: set both server.tls_cert and server.tls_key, or neither")
    if tls_cert:
        _check_tls(tls_cert, tls_key, err)
    ca_file = text(upstream, "upstream", "ca_file", "")
    if ca_file:
        _check_ca(ca_file, err)

    publish = table("publish", {"quiet_seconds", "rescan_seconds", "pending_quota"})
    quiet = seconds(publish, "publish", "quiet_seconds", DEFAULT_QUIET, 0.1, 3600)
    rescan = seconds(publish, "publish", "rescan_seconds", DEFAULT_RESCAN, 10, 7 * 86400)
    try:
        quota = parse_size(publish.get("pending_quota", DEFAULT_PENDING_QUOTA))
    except ValueError as exc:
        raise err("publish.pending_quota", str(exc)) from None
    if quota <= 0:
        raise err("publish.pending_quota", "must be more than 0 (automatic publishing stops at the quota)")
    stop_grace = seconds(server, "server", "stop_grace_seconds", DEFAULT_STOP_GRACE, 0, 3600)
    leases = table("leases", {"warn_days", "clock_tolerance_seconds", "auto_renew"})
    warn_days = leases.get("warn_days", 7)
    if isinstance(warn_days, bool) or not isinstance(warn_days, int) or not 0 <= warn_days <= 365:
        raise err("leases.warn_days", "must be a whole number of days from 0 to 365")
    auto_renew = leases.get("auto_renew", True)
    if not isinstance(auto_renew, bool):
        raise err("leases.auto_renew", "must be true or false")
    clock_tolerance = seconds(leases, "leases", "clock_tolerance_seconds", 3600.0, 60, 30 * 86400)
    socket = text(server, "server", "socket", DEFAULT_SOCKET)
    if not os.path.isabs(socket):
        raise err("server.socket", "must be an absolute path")

    return Config(
        path=path, id=sid, role=role, state_dir=state_dir,
        socket=socket,
        socket_group=text(server, "server", "socket_group", "harmonicd"),
        admin_group=text(server, "server", "admin_group", "harmonicd-admin"),
        stop_grace_seconds=stop_grace, quiet_seconds=quiet, rescan_seconds=rescan, pending_quota=quota,
        listen=listen,
        upstream_url=url, sync_interval=interval, sync_window=window, rate_limit=rate, sync_timeout=sync_timeout,
        max_request=max_request, relay_queue_quota=relay_quota, max_request_age=max_age,
        max_answer_wait=answer_wait, **rates,
        master_key=master_key, sources=sources, volume_size=volume_size,
        tls_cert=tls_cert, tls_key=tls_key, ca_file=ca_file, public_url=public_url, configured=True,
        archive_keep_days=keep, media_devices=tuple(devices), deploy_dir=deploy_dir,
        media_mount_base=mount_base, media_watch=tuple(watch), media_adopt_blank=flags["adopt_blank"],
        media_free_margin=margin, media_read_back=flags["read_back"],
        lease_warn_days=warn_days, clock_tolerance=clock_tolerance, lease_auto_renew=auto_renew,
    )


def _ssl_why(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None) or ""
    return {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate server.tls_cert",
            "PEM_LIB": "not a PEM file of the expected kind",
            "NO_START_LINE": "not a PEM file of the expected kind"}.get(reason, str(exc))


def _check_tls(cert: str, key: str, err: Callable[[str, str], ConfigError]) -> None:
    """Both files readable and PEM, the key that of the certificate: else one line naming the key."""
    import ssl

    for k, p in (("server.tls_cert", cert), ("server.tls_key", key)):
        if not os.path.isabs(p):
            raise err(k, f"{p!r} must be an absolute path")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise err(k, f"cannot read {p} ({exc.strerror})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise err("server.tls_cert", f"{cert}: {_ssl_why(exc)} (a PEM certificate is expected)") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise err("server.tls_key", f"{key}: {_ssl_why(exc)}") from None


def _check_ca(path: str, err: Callable[[str, str], ConfigError]) -> None:
    import ssl

    if not os.path.isabs(path):
        raise err("upstream.ca_file", f"{path!r} must be an absolute path")
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:
        raise err("upstream.ca_file", f"cannot read {path} ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise err("upstream.ca_file", f"{path}: {_ssl_why(exc)} (a PEM certificate is expected)") from None


def render(cfg: Config) -> str:
    """The config file `harmonicctl init` writes (commented, see docs/harmonicd.example.toml)."""
    lines = [
        "# harmonicd configuration, written by `harmonicctl init`.",
        "# Every key is described in docs/harmonicd.example.toml.",
        "",
        "[server]",
        f"id = {_q(cfg.id)}",
        f"role = {_q(cfg.role)}",
        f"state_dir = {_q(cfg.state_dir)}",
        f"socket = {_q(cfg.socket)}",
        f"listen = {_q(cfg.listen)}   # HOST:PORT to serve other servers; empty: do not",
        *([f"public_url = {_q(cfg.public_url)}   # the address schools reach this master at (named in bundles)"]
          if cfg.role == "master" else []),
        f"socket_group = {_q(cfg.socket_group)}   # may read status and events",
        f"admin_group = {_q(cfg.admin_group)}   # may also sync, publish, verify, gc",
        "",
    ]
    if cfg.role == "node":
        lines += [
            "[upstream]",
            f"url = {_q(cfg.upstream_url)}   # the master (or a relay); empty: sticks only",
            f"master_key = {_q(keys.format_key(cfg.master_key or b''))}",
            f"interval_seconds = {cfg.sync_interval:g}   # online sync this often (with jitter); 0: only when asked",
            "# window = \"22:00-06:00\"   # start online syncs only in these hours (local time)",
            "rate_limit = 0   # bytes per second each way for online sync; 0: no cap",
            f"timeout_seconds = {cfg.sync_timeout:g}   # an online transfer with no byte for this long gives up",
            "",
        ]
    for name, src in cfg.sources.items():
        lines += [f"[collections.{name}]", f"path = {_q(src)}   # published by itself when it changes", ""]
    if cfg.sources:
        lines += ["[publish]",
                  f"quiet_seconds = {cfg.quiet_seconds:g}   # no change for this long, then the daemon publishes",
                  f"rescan_seconds = {cfg.rescan_seconds:g}   # also look for missed changes this often",
                  f"pending_quota = {cfg.pending_quota}   # unacknowledged upward data kept at most (bytes)",
                  ""]
    lines += [
        "[packs]",
        f"volume_size = {cfg.volume_size}   # bytes per pack file; below 4 GiB for FAT32 sticks",
        "",
        "[media]",
        f"devices = [{', '.join(_q(d) for d in cfg.media_devices)}]   # block devices taken as sync sticks",
        f"mount_base = {_q(cfg.media_mount_base)}   # where harmonicd-mount mounts them for the daemon",
        *([f"watch = [{', '.join(_q(d) for d in cfg.media_watch)}]   # also sticks a desktop mounts under these"]
          if cfg.media_watch != DEFAULT_MEDIA_WATCH else []),
        f"adopt_blank = {'true' if cfg.media_adopt_blank else 'false'}   # also write to sticks not prepared "
        "(`harmonicctl stick prepare`)",
        "",
        "[deploy]",
        f"dir = {_q(cfg.deploy_dir or os.path.join(cfg.state_dir, 'deploy'))}   # where replicas are deployed",
        "",
    ]
    if cfg.role == "master":
        lines += ["[archive]",
                  "keep_days = 0   # keep files a school deleted for this many days; 0 = forever", ""]
    return "\n".join(lines)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

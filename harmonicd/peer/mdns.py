"""Finding a Harmonic server on the LAN: mDNS / DNS-SD (python-zeroconf).

A server with ``server.listen`` (the master, or a school server acting as a
relay) announces ``<id>._harmonic._tcp.local.`` with TXT records:

    id     its server id
    role   "master" or "relay"
    fp     fingerprint of the master key it serves for (the anchor of the master's
           key chain: the master's key before its first rotation, a relay's
           upstream.master_key): BLAKE2b-64 of the key, hex. The anchor, not
           the current signing key: it is what schools are configured with and
           stays the same through rotations (services/trust.py)
    scheme "http" or "https"

A school with ``upstream.url = "auto"`` browses for BROWSE_SECONDS at each
sync and takes an announcer for its own master key: the master if it answers,
else a relay; never itself. What is announced is only a hint of where to go:
nothing announced is trusted (a pack is judged by its signatures, whoever
served it), so a spoofed announcement costs a failed sync, not trust.

Blocking calls (zeroconf runs its own thread): the daemon starts and stops
the announcer off its event loop, and discovery runs in the sync job's thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

import ifaddr
from zeroconf import ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from harmonicd.config import Config
from harmonicd.peer import UpstreamError
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd")

SERVICE = "_harmonic._tcp.local."
BROWSE_SECONDS = 3.0  # how long a sync looks for announcers before it gives up
RESOLVE_MS = 1000


def fingerprint(key: bytes) -> str:
    return hashlib.blake2b(key, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Found:
    id: str
    role: str
    url: str


def _announce_addresses(listen: str) -> list[str]:
    """The addresses to announce for server.listen: its own host, or every
    non-loopback IPv4 and IPv6 address when it listens on all of them."""
    host = listen.rpartition(":")[0].strip("[]")
    if host not in ("", "0.0.0.0", "::"):
        try:
            if ipaddress.ip_address(host).is_loopback:
                return []  # nobody on the LAN can reach it there: announcing it would mislead
        except ValueError:
            # A host name: announce what it resolves to here.
            try:
                return sorted({str(a[4][0]) for a in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
            except OSError:
                return []
        return [host]
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                a = ipaddress.ip_address(addr)
            except ValueError:
                continue
            if a.is_loopback or (a.is_link_local and a.version == 6):
                continue
            out.append(str(a))
    return out


class Announcer:
    """``<id>._harmonic._tcp.local.`` while the server listens."""

    def __init__(self, cfg: Config, master_fp: str) -> None:
        self.cfg = cfg
        self.master_fp = master_fp
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None

    def start(self) -> None:
        cfg = self.cfg
        port = int(cfg.listen.rpartition(":")[2])
        addresses = _announce_addresses(cfg.listen)
        if not addresses:
            log.warning("mDNS: no address to announce for server.listen %s; not announced", cfg.listen)
            return
        scheme = "https" if getattr(cfg, "tls_cert", "") else "http"
        props = {"id": cfg.id, "role": "master" if cfg.is_master else "relay", "fp": self.master_fp,
                 "scheme": scheme}
        info = ServiceInfo(SERVICE, f"{cfg.id}.{SERVICE}", port=port, properties=props,
                           server=f"harmonic-{cfg.id}.local.", parsed_addresses=addresses)
        zc = Zeroconf()
        try:
            # Another server with our id on the LAN gets a renamed instance, not a failure.
            zc.register_service(info, allow_name_change=True)
        except Exception as exc:  # a LAN without multicast must not stop the daemon
            zc.close()
            log.warning("mDNS: cannot announce %s (%s); downstream servers need its URL", cfg.id, exc)
            return
        self._zc, self._info = zc, info
        log.info("mDNS: announced %s as %s on %s port %d", cfg.id, props["role"], ", ".join(addresses), port)

    def stop(self) -> None:
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None:
            return
        try:
            if info is not None:
                zc.unregister_service(info)
        finally:
            zc.close()


class _Names(ServiceListener):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.names.add(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.names.add(name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.names.discard(name)


def browse(seconds: float = BROWSE_SECONDS) -> list[tuple[dict[str, str], list[str], int]]:
    """Every announcer answering within ``seconds``: (TXT, addresses, port)."""
    zc = Zeroconf()
    try:
        names = _Names()
        browser = ServiceBrowser(zc, SERVICE, listener=names)
        time.sleep(seconds)
        browser.cancel()
        out = []
        for name in sorted(names.names):
            info = zc.get_service_info(SERVICE, name, timeout=RESOLVE_MS)
            if info is None or info.port is None:
                continue
            txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                   for k, v in info.properties.items()}
            out.append((txt, info.parsed_scoped_addresses(), info.port))
        return out
    finally:
        zc.close()


def choose(found: list[tuple[dict[str, str], list[str], int]], me: str, master_fp: str,
           remembered: str | None = None) -> Found | None:
    """The master if it announces, else a relay, for our master key; never
    ourselves; among equals the one used last time, then by id."""
    best: tuple[tuple[int, int, str], Found] | None = None
    for txt, addresses, port in found:
        sid, role = txt.get("id", ""), txt.get("role", "")
        if txt.get("fp") != master_fp or sid == me or role not in ("master", "relay") or not addresses:
            continue
        scheme = "https" if txt.get("scheme") == "https" else "http"
        host = sorted(addresses, key=lambda a: (":" in a, a))[0]  # IPv4 first: no zone id in the URL
        url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        rank = (0 if role == "master" else 1, 0 if sid == remembered else 1, sid)
        if best is None or rank < best[0]:
            best = (rank, Found(sid, role, url))
    return None if best is None else best[1]


def discover(store: Store, seconds: float = BROWSE_SECONDS) -> Found:
    """upstream.url = "auto": the server to sync with now, found by mDNS."""
    cfg = store.cfg
    assert cfg.master_key is not None
    fp = fingerprint(cfg.master_key)  # the anchor, as announced (not the current signing key)
    try:
        found = browse(seconds)
    except OSError as exc:
        raise UpstreamError(f"upstream.url auto: cannot browse the LAN by mDNS ({exc.strerror or exc})",
                            False, "network") from None
    remembered = (store.db.get_meta("upstream.found") or "").partition("(")[2].partition(",")[0] or None
    pick = choose(found, cfg.id, fp, remembered)
    if pick is None:
        others = len(found)
        raise UpstreamError(f"upstream.url auto: no Harmonic server for this master key (fingerprint {fp}) "
                            f"answered on the LAN within {seconds:g} s (mDNS {SERVICE}; {others} other "
                            "announcement(s) seen)", False, "network")
    return pick

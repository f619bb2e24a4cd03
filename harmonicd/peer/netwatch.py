"""Notices the network coming up (rtnetlink, through pyroute2), so a school
syncs the moment it can instead of at its next interval.

A school on 3G or satellite is offline for hours and online for minutes;
waiting up to ``upstream.interval_seconds`` after the link comes back can
miss the whole window. The kernel says when it happens: a link going
up-and-running, a global address being added (DHCP done, or an IPv6 address
through DAD), a default route appearing. Those are the "came up" events;
everything else (addresses removed, link-local addresses, routes to one
subnet, statistics) is ignored. Events come in bursts (link, then address,
then route), so ``on_up`` is called once, ``debounce`` seconds after the
first event of a burst.

It runs on the daemon's event loop (pyroute2's asyncio netlink socket: the
one place netlink meets asyncio). Where netlink cannot be opened (a sandbox
without AF_NETLINK, no permission), it logs one line and ends: the interval
timer still syncs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("harmonicd")

DEBOUNCE = 2.0  # seconds from the first event of a burst to on_up

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFA_F_TENTATIVE = 0x40  # an IPv6 address still in duplicate address detection: not usable yet
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RT_TABLE_MAIN = 254


class NetWatch:
    def __init__(self, on_up: Callable[[str], None], debounce: float = DEBOUNCE) -> None:
        self.on_up = on_up
        self.debounce = debounce
        self.active = False  # netlink is open and listened to (status shows it)
        self.unavailable: str | None = None  # why not, once it failed
        self._links: dict[int, bool] = {}  # ifindex -> up and running (loopback left out)
        self._names: dict[int, str] = {}
        self._pending: asyncio.TimerHandle | None = None
        self._why: list[str] = []

    async def run(self) -> None:
        """Listen until cancelled (or until netlink fails: logged, then return)."""
        try:
            from pyroute2 import AsyncIPRoute
            from pyroute2.netlink.rtnl import (
                RTMGRP_IPV4_IFADDR,
                RTMGRP_IPV4_ROUTE,
                RTMGRP_IPV6_IFADDR,
                RTMGRP_IPV6_ROUTE,
                RTMGRP_LINK,
            )
        except ImportError as exc:
            self._give_up(f"pyroute2 is not installed ({exc})")
            return
        groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        try:
            ipr = AsyncIPRoute()
        except OSError as exc:
            self._give_up(f"cannot open a netlink socket ({exc.strerror or exc})")
            return
        try:
            try:
                await ipr.setup_endpoint()
                # Subscribe first, then read the links' state: a change in between is
                # queued for us rather than missed.
                await ipr.bind(groups=groups)
                async for msg in await ipr.get_links():
                    self._link(msg, initial=True)
            except OSError as exc:
                self._give_up(f"cannot listen to netlink ({exc.strerror or exc})")
                return
            self.active = True
            log.info("watching the network (netlink): a sync starts when it comes up")
            while True:
                try:
                    async for msg in ipr.get():
                        self.event(msg)
                except OSError as exc:
                    self._give_up(f"netlink failed ({exc.strerror or exc})")
                    return
        finally:
            self.active = False
            if self._pending is not None:
                self._pending.cancel()
            ipr.close()

    def _give_up(self, why: str) -> None:
        self.unavailable = why
        log.warning("not watching the network: %s; online syncs follow upstream.interval_seconds only", why)

    def event(self, msg: Any) -> None:
        """One rtnetlink message: is it the network coming up?"""
        kind = msg.get("event")
        why: str | None = None
        if kind == "RTM_NEWLINK":
            why = self._link(msg, initial=False)
        elif kind == "RTM_DELLINK":
            self._links.pop(msg.get("index"), None)
        elif kind == "RTM_NEWADDR":
            if msg.get("scope") == RT_SCOPE_UNIVERSE and not msg.get("flags", 0) & IFA_F_TENTATIVE:
                addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
                why = f"address {addr} on {self._names.get(msg.get('index'), 'an interface')}"
        elif kind == "RTM_NEWROUTE":
            table = msg.get_attr("RTA_TABLE") or msg.get("table")
            if msg.get("dst_len") == 0 and msg.get("type") == RTN_UNICAST and table == RT_TABLE_MAIN:
                via = msg.get_attr("RTA_GATEWAY")
                why = "a default route" + (f" via {via}" if via else "")
        if why is not None:
            self._came_up(why)

    def _link(self, msg: Any, initial: bool) -> str | None:
        flags = int(msg.get("flags", 0))
        index = msg.get("index")
        name = msg.get_attr("IFLA_IFNAME") or f"interface {index}"
        self._names[index] = name
        if flags & IFF_LOOPBACK:
            return None
        up = bool(flags & IFF_UP and flags & IFF_RUNNING)
        was = self._links.get(index, False)
        self._links[index] = up
        return f"{name} up" if up and not was and not initial else None

    def _came_up(self, why: str) -> None:
        self._why.append(why)
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.debounce, self._fire)

    def _fire(self) -> None:
        self._pending = None
        why, self._why = ", ".join(dict.fromkeys(self._why)), []
        self.on_up(why)

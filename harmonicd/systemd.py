"""sd_notify without a dependency: READY, STATUS, WATCHDOG and STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).
Without that variable (not started by systemd, or in tests that do not ask
for it) every call does nothing.
"""

from __future__ import annotations

import os
import socket

# A datagram to a receiver whose queue is full blocks the sender. These calls
# run on the event loop, so a stalled receiver may cost it at most this long
# (the message is then dropped) instead of hanging the daemon, SIGTERM included.
SEND_TIMEOUT = 2.0


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        self.watchdog_usec = 0
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd expects pings from; when it is
        # set for another process (a wrapper), the pings are not ours to send.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of what systemd allows), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec and self.enabled else None

    def notify(self, **fields: str | int) -> None:
        if self._addr is None:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto(msg, self._addr)
        except OSError:
            # systemd gone, or its queue still full after SEND_TIMEOUT: a
            # status line is not worth dying (or hanging) for.
            pass

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status, mainpid=os.getpid())

    def status(self, text: str) -> None:
        self.notify(status=text)

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def stopping(self, status: str) -> None:
        self.notify(stopping=1, status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

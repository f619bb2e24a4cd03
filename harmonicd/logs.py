"""Logging set-up: one line per event.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with a
syslog priority prefix (``<3>``) that journald turns into the entry's
priority, and carries no timestamp: the journal adds its own. Elsewhere the
line has a timestamp and the level's name. Expected failures are logged as
one line; only a bug logs a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # Continuation lines (a traceback) keep the priority, so journald does not split them at INFO.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def under_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_daemon_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiohttp's access log would add a line per status query; the control API logs what matters itself.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

"""harmonicd: the daemon. Its event loop, control socket and watchers are the
subject of the next milestone; until then it refuses to start, clearly."""

from __future__ import annotations

import sys


def main() -> int:
    print("error: harmonicd (the daemon) is not part of this version yet; use `harmonicctl exchange` "
          "and `harmonicctl publish`", file=sys.stderr)
    return 1

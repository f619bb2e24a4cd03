"""harmonicctl with other FastCDC parameters: ``HBENCH_CHUNK=min,avg,max python hctl.py ARGS``.

The constants are patched before any command runs, in every module that
copied them at import time; without HBENCH_CHUNK this is plain harmonicctl.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    spec = os.environ.get("HBENCH_CHUNK")
    if spec:
        lo, avg, hi = (int(x) for x in spec.split(","))
        import harmonicd.core.objects as objects
        import harmonicd.services.publish as publish

        objects.CHUNK_MIN, objects.CHUNK_AVG, objects.CHUNK_MAX = lo, avg, hi
        publish.CHUNK_MIN = lo
    from harmonicd.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

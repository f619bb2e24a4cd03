"""harmonicctl as the benchmarks run it: ``python hctl.py ARGS`` is ``harmonicctl ARGS``, with two knobs.

* ``HBENCH_CODE=DIR``: import harmonicd from DIR (a snapshot of the code taken
  when the run started) instead of the editable install, so that commits made
  while a 17-minute run goes on cannot mix two versions into one result.
* ``HBENCH_CHUNK=min,avg,max``: other FastCDC parameters, patched before any
  command runs in every module that copied them at import time.
"""

from __future__ import annotations

import os
import sys


def use_code(path: str) -> None:
    """Make `import harmonicd` load the package under path (drop the editable-install finder)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                        and "__editable__" not in repr(f)]
    sys.path.insert(0, path)
    for name in [m for m in sys.modules if m == "harmonicd" or m.startswith("harmonicd.")]:
        del sys.modules[name]


def main() -> int:
    code = os.environ.get("HBENCH_CODE")
    if code:
        use_code(code)
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

"""Run a command and write its own resource use as JSON: ``python -S spawn.py OUT CMD...``.

On Linux a process's ru_maxrss starts at the RSS its parent had when it
called exec (the kernel carries the old address space's high-water mark
over), so a child of the large benchmark process would report that size
whatever it used itself. This small process forks the real command, so its
peak RSS is measured from a few MiB.
"""

import json
import os
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _pid, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "user": ru.ru_utime, "sys": ru.ru_stime,
                   "maxrss": ru.ru_maxrss * 1024}, f)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    raise SystemExit(main())

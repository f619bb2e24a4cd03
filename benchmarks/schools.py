"""200 schools syncing at once from one master (issue 4): sync times and the master's memory.

    .venv/bin/python benchmarks/schools.py                 # 200 schools, a 52 MiB / 1,124-file tree (~6 min)
    .venv/bin/python benchmarks/schools.py --quick         # 20 schools, 8 MiB (a smoke run)
    .venv/bin/python benchmarks/schools.py --commit HEAD --out benchmarks/results/schools-before
    .venv/bin/python benchmarks/schools.py --before benchmarks/results/schools-before.json

One real master daemon (`harmonicd`, `server.listen` on loopback, started
as benchmarks/daemon.py starts it) serves 200 enrolled school stores. The
schools are not daemons: each runs the school's real sync path,
`harmonicd.peer.sync.sync_online` on its own `Store`, the function the
school daemon's sync job runs. They are spread over 8 worker processes of
25 threads each, so that all 200 are in flight at once: a process per school
would cost 200 Python interpreters (~40 MiB each) on this 2-core machine for
no more parallelism than 2 cores give, while one process would serialise the
schools' Python work on one GIL; 8 processes keep both cores busy whatever
the schools wait on. Each thread opens its school's store, then all 200
wait for one start time (a few seconds ahead, the same clock for every
process) and sync. The schools' processes run at nice 10: they stand for
200 other machines, so they take only the CPU the master leaves (in a first run
at nice 0 the master got about a quarter of one core: 54 s of CPU in the
214 s of the first round, its answers queued behind the schools' unpacking,
storing and deploying).

Rounds, each against a freshly started master (so its VmHWM is that round's):
(a) first sync: the master has published release 1 of the generated tree
    (benchmarks/gen.py's school tree), no school has anything;
(b) a small change: every school has release 1, the master publishes release 2
    (a dozen pages edited, two files added: ~0.3 MiB);
(c) no-op: every school has release 2, nothing new.

Measured: each school's sync wall time from the common start to the end of
its `sync_online` (p50, p99, max) and the wait until its answer's first byte
(the first progress callback: the answer is planned, the download starts);
failures with their first line; the master daemon's peak RSS (VmHWM of the
daemon and of any child, and the peak of their summed VmRSS polled every
100 ms); its CPU time and what it wrote to disk (/proc/PID/io write_bytes); what it
keeps on disk for the answers (state/ but the store, deployments and
sources: outbox, any shared-pack folder); each school's deployed tree is
compared with the published one after (a) and (b).

The per-address limits of the master (server.max_address_syncs_per_minute,
server.max_downloads_per_address) are lifted (0) for the run: every school
connects from 127.0.0.1 here, where in the field each has its own address.
The schools' upstream.timeout_seconds is raised to 900 s so that a slow
answer is measured rather than given up; the table says how many schools
waited longer than the default 60 s in one attempt (those would have failed
and retried). A school told 503 busy (the master's queue of answers is
longer than server.max_answer_wait_seconds) comes back after Retry-After, as
the daemon's sync loop does; its wall time includes that wait.

State lives on a fresh ext4 image when root (harness.state_area). Results go
to benchmarks/results/schools.md and .json (--quick: benchmarks/scratch/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daemon as D
import gen
import harness as h
import run as R
from run import MiB, Report, Row, Table

SCHOOLS, PROCS, TREE_MIB, FILES = 200, 8, 48, 1_200
QUICK = {"schools": 20, "procs": 4, "tree_mib": 8, "files": 500}
GOAL_RSS = 300 * MiB
TIMEOUT = 900  # the schools' upstream.timeout_seconds for the run
DEFAULT_TIMEOUT = 60.0  # what a school has unless configured
NICE = 10  # the schools stand for 200 other machines: they take the CPU the master leaves
START_AHEAD = 5.0  # seconds between the start signal and the common start time


# --------------------------------------------------------------------------- inputs


def inputs(work: str, seed: int, mib: int, files: int) -> tuple[str, str]:
    """The tree (release 1) and a small change of it (release 2), made once per parameters."""
    tag = f"schools-{mib}m-{files}"
    v1, v2 = os.path.join(work, f"{tag}-v1"), os.path.join(work, f"{tag}-v2")
    stamp = os.path.join(work, f"{tag}.stamp")
    params = {"v": R.GEN_VERSION, "seed": seed, "mib": mib, "files": files, "change": 1}
    if not R._stamp_ok(stamp, params):
        print(f"generating the school tree ({mib} MiB, ~{files} files) and a small change", flush=True)
        gen.school_tree(v1, seed, mib * MiB, files)
        gen._cp_al(v1, v2)
        rng = gen._rng(f"small-change-{seed}")
        pages = sorted(r for r in h.walk_files(v2) if r.endswith(".html"))
        for rel in rng.sample(pages, min(12, len(pages))):  # replaced, never written in place (v1 is linked)
            gen._replace(v2, rel, gen.html_page(rng, 8_000 + rng.randrange(16_000), "edited page"))
        gen._replace(v2, "news/this-week.html", gen.html_page(rng, 20_000, "this week"))
        gen._replace(v2, "news/timetable.pdf", gen.document(rng, 200_000))
        R._stamp(stamp, params)
    return v1, v2


# --------------------------------------------------------------------------- the schools' worker processes


def _code() -> None:
    code = os.environ.get("HBENCH_CODE")
    if code:
        import hctl

        hctl.use_code(code)


def worker(conn: multiprocessing.connection.Connection, schools: list[tuple[str, str, str]], nice: int) -> None:
    """One worker process: its schools (name, config path, state dir), commands from conn."""
    _code()
    os.nice(nice)
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "init":
                conn.send(("ok", [_init_school(name, cfg, state, msg[1], msg[2], msg[3]) for name, cfg, state
                                  in schools]))
            elif msg[0] == "sync":
                cpu0 = _cpu()
                results = _sync_all(schools, msg[1])
                conn.send(("ok", {"results": results, "cpu": _cpu() - cpu0}))
            elif msg[0] == "check":
                conn.send(("ok", {name: h.tree_digest(os.path.join(state, "deploy", "content"))
                                  if os.path.isdir(os.path.join(state, "deploy", "content")) else "absent"
                                  for name, _cfg, state in schools}))
            elif msg[0] == "stop":
                conn.send(("ok", None))
                return
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _init_school(name: str, cfg: str, state: str, master_key: str, url: str, run: str) -> tuple[str, str]:
    from harmonicd.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["--config", cfg, "init", "node", "--id", name, "--state-dir", state, "--master-key",
                       master_key, "--upstream", url, "--socket", os.path.join(run, name, "control.sock")])
    if rc != 0:
        raise RuntimeError(f"init node {name} exited {rc}")
    with open(cfg) as f:
        text = f.read()
    for old, new in (("interval_seconds = 3600", "interval_seconds = 0"),
                     (f"timeout_seconds = {DEFAULT_TIMEOUT:g}", f"timeout_seconds = {TIMEOUT}")):
        if old not in text:
            raise RuntimeError(f"{cfg}: no `{old}` line to replace")
        text = text.replace(old, new)
    with open(cfg, "w") as f:
        f.write(text)
    return name, out.getvalue().strip().splitlines()[-1]


def _sync_all(schools: list[tuple[str, str, str]], start_at: float) -> list[dict[str, Any]]:
    """Every school of this process in its own thread, all starting at start_at (time.time())."""
    results: list[dict[str, Any]] = [{} for _ in schools]
    threads = [threading.Thread(target=_sync_one, args=(cfg, start_at, results[i]), daemon=True)
               for i, (_name, cfg, _state) in enumerate(schools)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, _cfg, _state), r in zip(schools, results, strict=True):
        r["school"] = name
    return results


def _sync_one(cfg_path: str, start_at: float, out: dict[str, Any]) -> None:
    from harmonicd import config as config_mod
    from harmonicd.peer import UpstreamError
    from harmonicd.peer.sync import sync_online
    from harmonicd.store.store import Store

    first: list[float] = []

    def progress(n: int) -> None:
        if not first:
            first.append(time.time())

    try:
        # Opened before the start, as a school daemon has its store open: the sync alone is timed.
        with Store(config_mod.load(cfg_path)) as store:
            time.sleep(max(0.0, start_at - time.time()))
            t0 = time.time()
            busy = 0
            while True:
                attempt = time.time()
                try:
                    res = sync_online(store, progress)
                    out.update(ok=True, summary=res.summary)
                except UpstreamError as exc:
                    if exc.reason == "busy" and exc.retry_after is not None and busy < 20:
                        # As the daemon's sync loop does: come back after Retry-After.
                        busy += 1
                        time.sleep(exc.retry_after)
                        continue
                    out.update(ok=False, error=f"UpstreamError: {str(exc).splitlines()[0]}")
                except Exception as exc:
                    out.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                break
            out["busy"] = busy
            # How long the attempt that got through waited for its answer (a wait
            # over the default timeout would have failed it).
            out["answer_wait"] = (first[0] - attempt) if first else None
            t1 = time.time()
        out.update(start=t0 - start_at, wall=t1 - t0, first_byte=(first[0] - t0) if first else None)
    except Exception as exc:
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}", wall=None, first_byte=None)


class Workers:
    """PROCS worker processes (forked before this process starts any thread) sharing the schools."""

    def __init__(self, schools: list[tuple[str, str, str]], procs: int, nice: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for i in range(procs):
            mine = schools[i::procs]
            if not mine:
                continue
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(b, mine, nice), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def ask(self, *msg: Any) -> list[Any]:
        for c in self.conns:
            c.send(msg)
        out = []
        for c in self.conns:
            status, value = c.recv()
            if status != "ok":
                raise RuntimeError(f"a worker failed:\n{value}")
            out.append(value)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------- the master


class MasterWatch:
    """Polls the master daemon and its children every 100 ms: summed VmRSS, and each one's VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.hwm: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        pids, kids = [self.pid], dict[int, list[int]]()
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        i = 0
        while i < len(pids):
            pids += kids.get(pids[i], [])
            i += 1
        return pids

    @staticmethod
    def _field(pid: int, key: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def sample(self) -> None:
        total = 0
        for pid in self._pids():
            with contextlib.suppress(OSError):
                total += self._field(pid, "VmRSS")
                self.hwm[pid] = max(self.hwm.get(pid, 0), self._field(pid, "VmHWM"))
        self.peak_rss = max(self.peak_rss, total)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def stop(self) -> dict[str, int]:
        self.sample()
        self._stop.set()
        self._thread.join(5)
        return {"peak_rss_sum": self.peak_rss, "vmhwm_daemon": self.hwm.get(self.pid, 0),
                "vmhwm_max": max(self.hwm.values(), default=0), "processes": len(self.hwm)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def written(pid: int) -> int:
    """Bytes the process has caused to be written to storage (/proc/PID/io write_bytes)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def disk_use(root: str) -> int:
    """Bytes of the master's answer files: everything under state/ but the store itself."""
    total = 0
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name in ("objects", "deploy", "sources") or not os.path.isdir(p):
            continue
        total += sum(st.st_size for st in h.walk_files(p).values())
    return total


# --------------------------------------------------------------------------- the benchmark


def stats(xs: list[float]) -> dict[str, float]:
    return D.lat_stats(xs) if xs else {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}


def one_round(a: argparse.Namespace, base: str, m: h.Server, msock: str, notify: D.NotifySink,
              workers: Workers, name: str) -> dict[str, Any]:
    """A fresh master daemon, all schools syncing at once, the daemon stopped; the figures."""
    d = D.DaemonProc(m.config, msock, os.path.join(base, f"master-{name}.log"), notify)
    d.wait(lambda st: bool(st.get("daemon")) and not st["activity"] and not st["queued"], "an idle master")
    h.settle()
    la = D.load()
    watch = MasterWatch(d.pid)
    cpu0, wrote0 = d.cpu_seconds(), written(d.pid)
    start_at = time.time() + START_AHEAD
    parts = workers.ask("sync", start_at)
    results = [r for part in parts for r in part["results"]]
    schools_cpu = sum(float(part["cpu"]) for part in parts)
    mem = watch.stop()
    cpu, wrote = d.cpu_seconds() - cpu0, written(d.pid) - wrote0
    answers = disk_use(m.state)
    exit_code = d.stop()
    ok = [r for r in results if r.get("ok")]
    errors: dict[str, int] = {}
    for r in results:
        if not r.get("ok"):
            errors[str(r.get("error"))[:160]] = errors.get(str(r.get("error"))[:160], 0) + 1
    walls = [float(r["wall"]) for r in ok]
    firsts = [float(r["first_byte"]) for r in ok if r.get("first_byte") is not None]
    out: dict[str, Any] = {"round": name, "schools": len(results), "ok": len(ok), "errors": errors,
           "wall": stats(walls), "first_byte": stats(firsts),
           "over_default_timeout": sum(1 for r in ok if (r.get("answer_wait") or 0) > DEFAULT_TIMEOUT),
           "busy": sum(1 for r in results if r.get("busy")),
           "late_start": max((float(r["start"]) for r in results if r.get("start") is not None), default=0.0),
           "master": {**mem, "cpu_s": cpu, "exit": exit_code, "answer_bytes": answers,
                      "written": wrote},
           "schools_cpu_s": schools_cpu, "span_s": max(walls, default=0.0),
           "tracebacks": d.output().count("Traceback (most recent call last)"),
           "load": la, "summaries": sorted({str(r.get("summary", ""))[:200] for r in ok})[:5],
           "log_tail": d.output().splitlines()[-10:]}
    w, fb = stats(walls), stats(firsts)
    print(f"  {name}: {len(ok)}/{len(results)} ok; sync wall p50 {w['p50']:.2f} s, p99 {w['p99']:.2f} s, "
          f"max {w['max']:.2f} s; first byte p50 {fb['p50']:.2f} s; master VmHWM "
          f"{R.mib(mem['vmhwm_max'])}, summed RSS peak {R.mib(mem['peak_rss_sum'])}, CPU {cpu:.1f} s (schools "
          f"{schools_cpu:.1f} s); "
          f"answers on disk {R.size(answers)}, master wrote {R.size(wrote)}", flush=True)
    for e, n in errors.items():
        print(f"    {n} x {e}", flush=True)
    return out


def check_trees(workers: Workers, tree: str) -> dict[str, Any]:
    want = h.tree_digest(tree)
    got = {k: v for part in workers.ask("check") for k, v in part.items()}
    bad = sorted(k for k, v in got.items() if v != want)
    return {"checked": len(got), "different": len(bad), "examples": bad[:5]}


def bench(a: argparse.Namespace, rep: Report) -> None:
    v1, v2 = inputs(a.work, a.seed, a.tree_mib, a.files)
    nfiles, nbytes = h.tree_bytes(v1)
    raw: dict[str, Any] = {"schools": a.schools, "procs": a.procs, "nice": a.nice, "files": nfiles, "bytes": nbytes,
                           "change": h.tree_bytes(v2)[1] - nbytes, "rounds": {}}
    rep.raw["schools"] = raw
    base = os.path.join(a.state, "schools")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    run_dir = os.path.join(base, "run")
    port = free_port()
    m = h.Server("master-1", os.path.join(base, "master-1.toml"), os.path.join(base, "master-1"))
    msock = os.path.join(run_dir, "master-1", "control.sock")
    mkey = m.ctl("init", "master", "--id", m.name, "--state-dir", m.state, "--socket", msock,
                 "--listen", f"127.0.0.1:{port}").stdout.strip()
    with open(m.config) as f:
        text = f.read()
    # Every school connects from 127.0.0.1 here; in the field each has its own address.
    lifted = "max_address_syncs_per_minute = 0\nmax_downloads_per_address = 0\n"
    with open(m.config, "w") as f:
        f.write(text.replace("[server]\n", "[server]\n" + lifted, 1))
    schools = [(f"school-{i:03d}", os.path.join(base, f"school-{i:03d}.toml"), os.path.join(base, f"school-{i:03d}"))
               for i in range(1, a.schools + 1)]
    workers = Workers(schools, a.procs, a.nice)  # forked before any thread of this process starts
    notify: D.NotifySink | None = None
    try:
        t0 = time.perf_counter()
        keys = [k for part in workers.ask("init", mkey, f"http://127.0.0.1:{port}", run_dir) for k in part]
        _code_enroll(m, keys)
        raw["setup_s"] = time.perf_counter() - t0
        print(f"{a.schools} schools made and enrolled in {raw['setup_s']:.1f} s", flush=True)
        m.ctl("publish", "content", v1)
        notify = D.NotifySink(os.path.join(base, "notify.sock"))
        rounds = raw["rounds"]
        rounds["first"] = one_round(a, base, m, msock, notify, workers, "first")
        rounds["first"]["trees"] = check_trees(workers, v1)
        m.ctl("publish", "content", v2)
        rounds["change"] = one_round(a, base, m, msock, notify, workers, "change")
        rounds["change"]["trees"] = check_trees(workers, v2)
        rounds["noop"] = one_round(a, base, m, msock, notify, workers, "noop")
    finally:
        workers.close()
        if notify is not None:
            notify.close()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    report(rep, raw)


def _code_enroll(m: h.Server, keys: list[tuple[str, str]]) -> None:
    """`harmonicctl enroll` for every school, in one store session (200 CLI starts would take minutes)."""
    from harmonicd import config as config_mod
    from harmonicd.services.setup import enroll
    from harmonicd.store.store import Store

    with Store(config_mod.load(m.config)) as store:
        for name, key in keys:
            enroll(store, name, key)


TITLES = {"first": "First sync, nothing held", "change": "Release N+1, a small change", "noop": "No-op, nothing new"}


def report(rep: Report, raw: dict[str, Any]) -> None:
    n = raw["schools"]
    for key, title in TITLES.items():
        r = raw["rounds"][key]
        w, fb, mm = r["wall"], r["first_byte"], r["master"]
        trees = r.get("trees")
        rows = [
            Row("schools synced", f"{r['ok']} of {r['schools']}", "", "", None, f"all {n}", r["ok"] == n),
            Row("sync wall time p50 / p99 / max", f"{w['p50']:.2f} / {w['p99']:.2f} / {w['max']:.2f} s"),
            Row("answer's first byte p50 / p99 / max",
                f"{fb['p50']:.2f} / {fb['p99']:.2f} / {fb['max']:.2f} s" if fb["n"] else "no download"),
            Row(f"schools waiting > {DEFAULT_TIMEOUT:g} s for their answer", str(r["over_default_timeout"]), "", "",
                None, "0 (the default timeout)", r["over_default_timeout"] == 0),
            Row("schools told 503 busy, back after Retry-After", str(r.get("busy", "?"))),
            Row("master peak RSS (VmHWM)", R.mib(mm["vmhwm_max"]), "summed VmRSS peak", R.mib(mm["peak_rss_sum"]),
                None, "< 300 MiB", max(mm["vmhwm_max"], mm["peak_rss_sum"]) < GOAL_RSS),
            Row("master CPU time / all schools' CPU time", f"{mm['cpu_s']:.1f} s / {r['schools_cpu_s']:.1f} s"),
            Row("master's answer files on disk after", R.size(mm["answer_bytes"])),
            Row("bytes the master wrote to disk (/proc/PID/io)", R.size(mm.get("written", 0))),
            Row("tracebacks in the master's log", str(r.get("tracebacks", "?")), "", "", None, "0",
                r.get("tracebacks") == 0),
        ]
        if trees is not None:
            rows.append(Row("deployed trees equal to the release", f"{trees['checked'] - trees['different']} of "
                            f"{trees['checked']}", "", "", None, "all", trees["different"] == 0))
        errs = "; ".join(f"{c} x {e}" for e, c in r["errors"].items())
        rep.add(Table(
            f"{title}: {n} schools at once",
            note=(f"tree {raw['files']} files, {R.mib(raw['bytes'])}; small change {R.size(raw['change'])} of new "
                  f"bytes; {raw['procs']} worker processes x {-(-n // raw['procs'])} threads at nice "
                  f"{raw.get('nice', 0)}; the last school "
                  f"started {r['late_start'] * 1000:.0f} ms after the common start; master processes watched: "
                  f"{mm['processes']}; load average before: {r['load']}"
                  + (f"; failures: {errs}" if errs else "")),
            rows=rows))


# --------------------------------------------------------------------------- results


def render_md(data: dict[str, Any]) -> str:
    md = [D.results_md(data, "Harmonic: many schools syncing at once from one master", "Servers' state on",
                       "What is measured and how: the docstring of benchmarks/schools.py. One master daemon and "
                       "the schools' sync code share a 2-core VM over loopback, so every figure includes the "
                       "schools' own work (unpacking, storing, deploying) competing with the master for the CPU.")]
    before = data.get("before")
    if before:
        bm = before["machine"]
        md += ["## The earlier run, for comparison", "",
               f"Command: `{before['command'].strip()}`  ", f"Date: {before.get('date', '?')}  ",
               f"harmonicd at commit {bm['commit']} ({bm.get('code', 'working tree')})  ",
               f"Total run time: {before['elapsed_s'] / 60:.1f} min", ""]
        md += [R.render_table(t) for t in D.tables_of(before)]
    return "\n".join(md)


def snapshot_commit(dest: str, rev: str) -> dict[str, object]:
    """Like harness.snapshot_code, but of a commit (`git archive`): others' uncommitted
    edits in the shared working tree stay out of the measure."""
    import hctl

    commit = subprocess.run(["git", "-C", h.REPO, "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", h.REPO, "archive", commit, "harmonicd"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    hctl.use_code(dest)
    info: dict[str, object] = {"commit": commit, "dirty": False, "path": dest}
    h.CODE.update(info)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['schools']} schools, {QUICK['tree_mib']} MiB tree")
    p.add_argument("--schools", type=int, help=f"schools (default {SCHOOLS})")
    p.add_argument("--procs", type=int, help=f"worker processes for the schools (default {PROCS})")
    p.add_argument("--tree-mib", type=int, help=f"size of the generated tree (default {TREE_MIB})")
    p.add_argument("--files", type=int, help=f"files in the tree (default ~{FILES})")
    p.add_argument("--nice", type=int, default=NICE, help=f"niceness of the schools' processes (default {NICE})")
    p.add_argument("--seed", type=int, default=1)
    D.add_run_args(p, "schools", "where the servers keep their state: a fresh ext4 image (default when root) or "
                   "the work folder")
    p.add_argument("--before", metavar="JSON", help="an earlier run's results, shown after this run's")
    p.add_argument("--commit", metavar="REV", help="run harmonicd as committed at REV (default: a snapshot of the "
                                                   "working tree)")
    a = p.parse_args(argv)
    if a.render:
        h.rerender(a.render, render_md)
        return 0
    a.schools = a.schools or (QUICK["schools"] if a.quick else SCHOOLS)
    a.procs = a.procs or (QUICK["procs"] if a.quick else PROCS)
    a.tree_mib = a.tree_mib or (QUICK["tree_mib"] if a.quick else TREE_MIB)
    a.files = a.files or (QUICK["files"] if a.quick else FILES)
    own = D.start_run(a, "schools", snapshot=False)
    if a.commit or not a.no_snapshot:
        info = snapshot_commit(os.path.join(own, "code"), a.commit) if a.commit else \
            h.snapshot_code(os.path.join(own, "code"))
        os.environ["HBENCH_CODE"] = str(h.CODE["path"])  # the worker processes import it too
        D.announce(info)
    t0 = time.perf_counter()
    rep = Report()
    with h.state_area(a.fs, own) as (a.state, rep.raw["state_fs"]):
        print(f"server state on: {rep.raw['state_fs']}", flush=True)
        bench(a, rep)
    elapsed = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    if a.before:
        with open(a.before) as f:
            before = json.load(f)
        extra["before"] = {k: before[k] for k in ("command", "machine", "date", "elapsed_s", "tables")}
    D.write_results(a.out, rep, elapsed, {a.state: "$STATE", a.work: "$WORK", h.REPO: "$REPO"},
                    "schools.py", argv, render_md, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

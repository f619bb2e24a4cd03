"""Benchmarks of the daemon (issue 3): idle CPU, idle memory, control-socket latency during a big import.

    .venv/bin/python benchmarks/daemon.py            # about 3-4 minutes once the 1 GiB input exists
    .venv/bin/python benchmarks/daemon.py --quick    # a smoke run: 64 MiB tree, 10 s idle window

One real `harmonicd` runs for a school server (its state on a fresh ext4
image when root, as benchmarks/run.py does), started as systemd would start
it: NOTIFY_SOCKET (a datagram socket of this script) and WATCHDOG_USEC as
the unit sets them, so READY, STATUS and the watchdog pings are part of
what is measured. Its watched stats and backup folders exist (`init node`
makes them).

1. Idle: utime+stime of the daemon from /proc/PID/stat before and after a
   quiet minute with no request at all, as a share of one core; VmRSS from
   /proc/PID/status after start-up and after that minute.
2. Idle latency: 100 `GET /v1/status` calls, one every 100 ms.
3. A master publishes the generated ~1 GiB school tree (benchmarks/run.py's
   input, reused from benchmarks/scratch/), the school writes its request
   into a stick folder (`harmonicctl exchange`, while the daemon runs), the
   master answers into it; then `POST /v1/exchange {"dir": stick}` asks the
   school's daemon to import, and `GET /v1/status` is called every 100 ms
   until the job's answer comes: p50/p99/max latency of those calls, the
   import's duration, and checks that it worked (status shows content
   release 1, the deployed tree is the published one).

Each latency is one whole client call as harmonicctl makes it (connect,
request, JSON answer decoded) from this process. Results go to
benchmarks/results/daemon.md and .json (--quick: benchmarks/scratch/).
The load average is recorded before each measurement: other work on the
machine shows in latencies, not in the daemon's own CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h
import run as R
from run import MiB, Report, Row, Table

IDLE_SECONDS = 60.0
CALLS_IDLE = 100
EVERY = 0.1  # seconds between status calls
WATCHDOG_USEC = 60_000_000  # systemd/harmonicd.service: WatchdogSec=60s
GOAL_CPU = 0.5  # % of one core
GOAL_RSS = 60 * MiB
GOAL_P99 = 0.100  # seconds
SETTLE_AFTER = 5.0  # seconds after the import before its RSS counts as idle again

# Runs harmonicd's main() from the code snapshot (HBENCH_CODE) when there is one.
LAUNCH = ("import os, sys\n"
          "sys.path.insert(0, os.environ['HBENCH_HERE'])\n"
          "code = os.environ.get('HBENCH_CODE')\n"
          "if code:\n"
          "    import hctl; hctl.use_code(code)\n"
          "from harmonicd.daemon import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


# --------------------------------------------------------------------------- the daemon process


class NotifySink:
    """The NOTIFY_SOCKET end systemd would hold: collects what the daemon says, with times."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def first(self, key: str) -> float | None:
        return next((t for t, m in self.messages if f"{key}=" in m), None)

    def count(self, line: str) -> int:
        return sum(1 for _t, m in self.messages if line in m.splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class DaemonProc:
    def __init__(self, config: str, socket_path: str, log: str, notify: NotifySink) -> None:
        self.socket = socket_path
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_PID", "HARMONICD_CONFIG")}
        env.update({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC), "HBENCH_HERE": h.HERE})
        if h.CODE["path"] is not None:
            env["HBENCH_CODE"] = str(h.CODE["path"])
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([h.PY, "-c", LAUNCH, "--config", config], stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def call(self, method: str, url: str, body: dict[str, Any] | None = None,
             timeout: float | None = 10) -> tuple[int, dict[str, Any]]:
        from harmonicd import control

        return control.call(self.socket, method, url, body, timeout)

    def status(self) -> dict[str, Any]:
        code, st = self.call("GET", "/v1/status")
        if code != 200:
            raise RuntimeError(f"status answered {code}: {st}")
        return st

    def wait(self, cond: Any, what: str, timeout: float = 120) -> dict[str, Any]:
        from harmonicd.errors import HarmonicError

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"harmonicd exited {self.proc.returncode}:\n{self.output()}")
            try:
                st = self.status()
                if cond(st):
                    return st
            except HarmonicError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon (all its threads), from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_ns(self) -> int:
        """Nanoseconds on a CPU of the daemon's live threads (/proc/PID/task/*/schedstat): finer than
        clock ticks, exact over a window in which no thread ends."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def proc_status(self, key: str) -> int:
        """A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes; Threads as is."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    n = int(line.split()[1])
                    return n if key == "Threads" else n * 1024
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def output(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


# --------------------------------------------------------------------------- measuring


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of xs (p in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def lat_stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99), "max": max(xs),
            "mean": sum(xs) / len(xs)}


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(max_load: float, patience: float) -> list[float]:
    """Wait up to patience seconds for the 1-minute load average to fall below max_load."""
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        print(f"  load average {load()} (>= {max_load}): waiting for the machine to calm down", flush=True)
        time.sleep(15)
    return load()


def poll_status(d: DaemonProc, until: threading.Event | None, count: int = 0) -> dict[str, Any]:
    """GET /v1/status every EVERY seconds (a slow call is followed at once by the next), until
    `until` is set, or count calls. Latency of each whole call; failures counted."""
    from harmonicd.errors import HarmonicError

    lat: list[float] = []
    busy = failures = 0
    progress: list[int] = []
    nxt = time.monotonic()
    while (until is not None and not until.is_set()) or (until is None and len(lat) < count):
        t0 = time.perf_counter()
        try:
            code, st = d.call("GET", "/v1/status", timeout=30)
            ok = code == 200
        except HarmonicError:
            ok, st = False, {}
        lat.append(time.perf_counter() - t0)
        if not ok:
            failures += 1
        act = st.get("activity")
        if act:
            busy += 1
            progress.append(int(act.get("done_bytes", 0)))
        nxt += EVERY
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            nxt = time.monotonic()
    return {"latencies": lat, "busy": busy, "failures": failures, **lat_stats(lat),
            "progress_samples": len(set(progress))}


# --------------------------------------------------------------------------- the benchmark


def init_servers(base: str) -> tuple[h.Server, h.Server, str, str]:
    """A master and an enrolled school, each with its control socket under base/run; a stick folder."""
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    m = h.Server("master-1", os.path.join(base, "master-1.toml"), os.path.join(base, "master-1"))
    s = h.Server("school-1", os.path.join(base, "school-1.toml"), os.path.join(base, "school-1"))
    run = os.path.join(base, "run")
    mkey = m.ctl("init", "master", "--id", m.name, "--state-dir", m.state,
                 "--socket", os.path.join(run, m.name, "control.sock")).stdout.strip()
    sock = os.path.join(run, s.name, "control.sock")
    skey = s.ctl("init", "node", "--id", s.name, "--state-dir", s.state, "--master-key", mkey,
                 "--socket", sock).stdout.strip()
    m.ctl("enroll", s.name, skey)
    stick = os.path.join(base, "stick")
    os.makedirs(stick)
    return m, s, stick, sock


def seq_of(st: dict[str, Any], name: str) -> int:
    return int(next((c["seq"] for c in st["collections"] if c["name"] == name), -1))


def bench(a: argparse.Namespace, rep: Report) -> None:
    raw = rep.raw
    v1, _v2, _counts = R.school_inputs(a.work, a.seed, a.tree_mib * MiB, a.files)
    nfiles, nbytes = h.tree_bytes(v1)
    raw["input"] = {"files": nfiles, "bytes": nbytes, "tree_mib": a.tree_mib}
    print(f"input: {nfiles} files, {R.mib(nbytes)}", flush=True)
    base = os.path.join(a.state, "daemon-bench")
    m, s, stick, sock = init_servers(base)
    notify = NotifySink(os.path.join(base, "notify.sock"))
    d = DaemonProc(s.config, sock, os.path.join(base, "school-1-harmonicd.log"), notify)
    try:
        # -- start-up
        d.wait(lambda st: bool(st.get("daemon")), "the control socket")
        st = d.wait(lambda st: seq_of(st, "stats") >= 1 and seq_of(st, "backup") >= 1 and not st["activity"]
                    and not st["queued"], "the start-up publish of the watched folders")
        ready = notify.first("READY")
        raw["startup"] = {"ready_s": None if ready is None else ready - d.started, "watching": st["watching"]}
        if len(st["watching"]) != 2:
            raise RuntimeError(f"the daemon should watch stats and backup, watches {st['watching']}")
        time.sleep(2)  # let the start-up's last callbacks and writes settle

        # -- idle minute: no request at all
        print(f"\n--- idle: {a.idle_seconds:.0f} s without a request", flush=True)
        raw["load_idle"] = wait_for_quiet(a.max_load, a.patience)
        rss0, thr = d.proc_status("VmRSS"), d.proc_status("Threads")
        c0, n0, t0 = d.cpu_seconds(), d.cpu_ns(), time.monotonic()
        w0 = notify.count("WATCHDOG=1")
        time.sleep(a.idle_seconds)
        c1, n1, t1 = d.cpu_seconds(), d.cpu_ns(), time.monotonic()
        rss1 = d.proc_status("VmRSS")
        cpu_pct = (c1 - c0) / (t1 - t0) * 100
        raw["idle"] = {"seconds": t1 - t0, "cpu_s": c1 - c0, "cpu_pct": cpu_pct, "schedstat_ms": (n1 - n0) / 1e6,
                       "rss_start": rss0,
                       "rss_after": rss1, "threads": thr, "watchdog_pings": notify.count("WATCHDOG=1") - w0,
                       "clk_tck": os.sysconf("SC_CLK_TCK")}
        print(f"  CPU {c1 - c0:.2f} s in {t1 - t0:.1f} s = {cpu_pct:.3f} % of one core "
              f"(schedstat: {(n1 - n0) / 1e6:.1f} ms); "
              f"RSS {R.mib(rss0)} -> {R.mib(rss1)}", flush=True)

        # -- idle latency
        print(f"\n--- idle latency: {CALLS_IDLE} status calls, one every {EVERY * 1000:.0f} ms", flush=True)
        raw["load_idle_latency"] = load()
        idle_lat = poll_status(d, None, CALLS_IDLE)
        raw["idle_latency"] = idle_lat
        print(f"  p50 {ms(idle_lat['p50'])}, p99 {ms(idle_lat['p99'])}, max {ms(idle_lat['max'])}", flush=True)

        # -- the big import
        print(f"\n--- import of {R.mib(nbytes)} by the daemon", flush=True)
        h.settle()
        pub = m.ctl("publish", "content", v1)
        req = s.ctl("exchange", stick)  # in this process's child, while the daemon runs
        exp = m.ctl("exchange", stick)
        packs = h.packs_for(stick, s.name)
        pack_bytes = sum(os.path.getsize(p) for p in packs)
        raw["prepare"] = {"publish_s": pub.wall, "request_s": req.wall, "export_s": exp.wall,
                          "pack_bytes": pack_bytes, "pack_volumes": len(packs)}
        print(f"  master publish {pub.wall:.1f} s, school request {req.wall:.1f} s, master export "
              f"{exp.wall:.1f} s: {len(packs)} pack file(s), {R.mib(pack_bytes)}", flush=True)
        h.settle()
        time.sleep(1)
        raw["load_import"] = wait_for_quiet(a.max_load, a.patience)
        cpu_before = d.cpu_seconds()
        done = threading.Event()
        answer: dict[str, Any] = {}

        def do_import() -> None:
            t = time.perf_counter()
            try:
                answer["code"], answer["body"] = d.call("POST", "/v1/exchange", {"dir": stick, "wait": True},
                                                        timeout=None)
            except Exception as exc:  # reported below, whatever it is
                answer["code"], answer["body"] = -1, {"error": str(exc)}
            answer["seconds"] = time.perf_counter() - t
            done.set()

        worker = threading.Thread(target=do_import)
        worker.start()
        during = poll_status(d, done)
        worker.join()
        cpu_import = d.cpu_seconds() - cpu_before
        st = d.status()
        last = st.get("last", {}).get("exchange", {})
        content_seq = seq_of(st, "content")
        same = h.tree_digest(s.deployed) == h.input_digest(v1)
        time.sleep(SETTLE_AFTER)
        rss_idle_after = d.proc_status("VmRSS")
        raw["import"] = {"answer_code": answer["code"], "answer": answer["body"], "seconds": answer["seconds"],
                         "job_seconds": last.get("seconds"), "content_seq": content_seq, "deployed_ok": same,
                         "cpu_s": cpu_import, "rss_idle_after": rss_idle_after,
                         "rss_peak": d.proc_status("VmHWM"),
                         "latency": during}
        print(f"  import: HTTP {answer['code']} after {answer['seconds']:.1f} s; content release {content_seq}; "
              f"deployed tree {'identical' if same else 'DIFFERENT'}; {during['n']} status calls: p50 "
              f"{ms(during['p50'])}, p99 {ms(during['p99'])}, max {ms(during['max'])}", flush=True)
    finally:
        rc = d.stop()
        notify.close()
        raw["stop"] = {"exit_code": rc, "stopping_sent": notify.count("STOPPING=1") > 0}
        raw["daemon_log"] = d.output().splitlines()[-40:]
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    report(rep, nfiles, nbytes)


def report(rep: Report, nfiles: int, nbytes: int) -> None:
    raw = rep.raw
    idle, il, imp = raw["idle"], raw["idle_latency"], raw["import"]
    dl = imp["latency"]
    ok_import = imp["answer_code"] == 200 and imp["content_seq"] == 1 and imp["deployed_ok"]
    rep.add(Table(
        "Idle school server daemon",
        note=(f"harmonicd for a school, state on {raw['state_fs']}; started as systemd does (NOTIFY_SOCKET, "
              f"WATCHDOG_USEC={WATCHDOG_USEC}: {idle['watchdog_pings']} watchdog pings in the window); stats and "
              f"backup folders watched; no request during the {idle['seconds']:.1f} s window; CPU = utime+stime "
              f"from /proc/PID/stat (clock ticks of 1/{idle['clk_tck']} s), RSS = VmRSS; {idle['threads']} "
              f"threads; load average before: {raw['load_idle']}; rescan_seconds is 600, so the periodic rescan "
              "is not in the window"),
        rows=[
            Row(f"idle CPU over {idle['seconds']:.0f} s", f"{idle['cpu_pct']:.3f} % of one core "
                f"({idle['cpu_s']:.2f} s)", "threads' schedstat (ns)",
                f"{idle['schedstat_ms']:.1f} ms = {idle['schedstat_ms'] / 10 / idle['seconds']:.4f} %", None,
                "< 0.5 %", idle["cpu_pct"] < GOAL_CPU),
            Row("idle RSS after start-up", R.mib(idle["rss_start"]), "", "", None, "< 60 MiB",
                idle["rss_start"] < GOAL_RSS),
            Row(f"idle RSS after the {idle['seconds']:.0f} s window", R.mib(idle["rss_after"]), "", "", None,
                "< 60 MiB", idle["rss_after"] < GOAL_RSS),
            Row(f"idle RSS {SETTLE_AFTER:.0f} s after the import below", R.mib(imp["rss_idle_after"]), "", "", None,
                "< 60 MiB", imp["rss_idle_after"] < GOAL_RSS),
            Row("start-up: READY=1 after", R.secs(raw["startup"]["ready_s"]) if raw["startup"]["ready_s"] else "never"),
        ]))
    rep.add(Table(
        f"Control socket during an import of {nfiles} files, {R.mib(nbytes)}",
        note=(f"the master published the tree, the school wrote its request, the master its answer "
              f"({raw['prepare']['pack_volumes']} pack file(s), {R.mib(raw['prepare']['pack_bytes'])}) into a "
              f"stick folder on the same file system; then POST /v1/exchange {{\"dir\": stick, \"wait\": true}} to "
              f"the school's daemon and GET /v1/status every {EVERY * 1000:.0f} ms until its answer; latency = one "
              f"whole client call (connect, request, JSON decoded) from the benchmark process; {dl['busy']} of "
              f"{dl['n']} answers showed the exchange running ({dl['progress_samples']} distinct progress values), "
              f"{dl['failures']} failed; idle: {il['n']} calls at the same pace before the import; page cache warm; "
              f"load average before: {raw['load_import']} (idle latency: {raw['load_idle_latency']})"),
        rows=[
            Row("status p99 during the import", ms(dl["p99"]), "idle", ms(il["p99"]), dl["p99"] / il["p99"],
                "< 100 ms", dl["p99"] < GOAL_P99 and dl["failures"] == 0),
            Row("status p50 during the import", ms(dl["p50"]), "idle", ms(il["p50"]), dl["p50"] / il["p50"]),
            Row("status max during the import", ms(dl["max"]), "idle", ms(il["max"])),
            Row("import (daemon's exchange job)", R.secs(imp["seconds"]), "throughput",
                R.rate(nbytes, imp["seconds"])),
            Row("import worked", "yes" if ok_import else "NO", "HTTP / content seq / deployed tree",
                f"{imp['answer_code']} / {imp['content_seq']} / {'identical' if imp['deployed_ok'] else 'different'}",
                None, "content seq 1", ok_import),
            Row("daemon CPU time during the import / its peak RSS (VmHWM)",
                f"{imp['cpu_s']:.1f} s / {R.mib(imp['rss_peak'])}"),
            Row("SIGTERM after the run", f"exit {raw['stop']['exit_code']}"
                + (", STOPPING=1 sent" if raw["stop"]["stopping_sent"] else ", no STOPPING=1"),
                "", "", None, "exit 0", raw["stop"]["exit_code"] == 0),
        ]))


# --------------------------------------------------------------------------- results


def tables_of(data: dict[str, Any]) -> list[Table]:
    return [Table(**{**t, "rows": [Row(**r) for r in t["rows"]]}) for t in data["tables"]]


def results_md(data: dict[str, Any], title: str, state_on: str, note: str, machine_extra: str = "") -> str:
    """The results page every benchmark script writes: what ran where, the summary, the tables."""
    mach = data["machine"]
    md = [f"# {title}", "",
          f"Command: `{data['command'].strip()}`  ", f"Date: {data.get('date', '?')}  ",
          f"Machine: {mach['cpus']} CPUs, {mach['platform']}, Python {mach['python']}{machine_extra}  ",
          f"harmonicd {mach['harmonicd']} at commit {mach['commit']} ({mach.get('code', 'working tree')})  ",
          f"{state_on}: {data.get('raw', {}).get('state_fs', '?')}  ",
          f"Total run time: {data['elapsed_s'] / 60:.1f} min", "", note, ""]
    md.append(R.render_table(R.summary(tables_of(data))))
    md += [R.render_table(t) for t in tables_of(data)]
    return "\n".join(md)


def render_md(data: dict[str, Any]) -> str:
    return results_md(data, "Harmonic daemon benchmark results", "Server state on",
                      "What is measured and how: the docstring of benchmarks/daemon.py. A shared 2-core VM: other "
                      "work on it shows in the latencies (the load average before each measurement is given).")


def add_run_args(p: argparse.ArgumentParser, name: str, fs_help: str) -> None:
    """The options every benchmark script takes: where it works, where results go, which code runs."""
    p.add_argument("--work", default=os.path.join(h.HERE, "scratch"))
    p.add_argument("--fs", choices=("image", "work"), default=None, help=fs_help)
    p.add_argument("--out", help=f"results file without extension (default benchmarks/results/{name})")
    p.add_argument("--keep", action="store_true", help="keep the servers' folders")
    p.add_argument("--no-snapshot", action="store_true", help="run the working tree's harmonicd as it is")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown next to a results JSON file")


def start_run(a: argparse.Namespace, name: str, snapshot: bool = True) -> str:
    """This benchmark's own folder under --work (its image and code snapshot, apart from the
    others'), the default --out, and (snapshot) the copy of harmonicd every child runs."""
    a.work = os.path.abspath(a.work)
    own = os.path.join(a.work, name)
    os.makedirs(own, exist_ok=True)
    if a.out is None:
        a.out = os.path.join(a.work, f"results-{name}-quick") if a.quick else os.path.join(h.HERE, "results", name)
    if snapshot and not a.no_snapshot:
        announce(h.snapshot_code(os.path.join(own, "code")))
    return own


def announce(info: dict[str, object]) -> None:
    print(f"harmonicd: snapshot of commit {info['commit']}{' + uncommitted changes' if info['dirty'] else ''}",
          flush=True)


def write_results(out: str, rep: Report, elapsed: float, hide: dict[str, str],
                  script: str = "daemon.py", argv: list[str] | None = None,
                  render: Callable[[dict[str, Any]], str] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    """The results of benchmarks/<script> as JSON and markdown (render: the script's
    own, this one's by default); the folders in `hide` (this machine's paths, in the
    daemons' log lines and answers) are written as their placeholders."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    data = {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": R.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "elapsed_s": elapsed, "tables": [asdict(t) for t in rep.tables], "raw": rep.raw, **(extra or {})}
    text = json.dumps(data, indent=1, default=str)
    for path, name in sorted(hide.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    with open(out + ".json", "w") as f:
        f.write(text + "\n")
    with open(out + ".md", "w") as f:
        f.write((render or render_md)(json.loads(text)))
    print(R.render_table(R.summary(rep.tables), ascii_=True))
    print(f"\nresults written to {out}.md and {out}.json ({elapsed / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 MiB tree and a 10 s idle window (a smoke run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tree-mib", type=int, help="size of the generated school tree (default 1024)")
    p.add_argument("--files", type=int, help="files in the school tree (default ~22,000)")
    p.add_argument("--idle-seconds", type=float, help=f"idle window (default {IDLE_SECONDS:.0f})")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait (up to --patience s) for the 1-minute load average to fall below this before "
                        "each measurement (default 1.5)")
    p.add_argument("--patience", type=float, default=180)
    add_run_args(p, "daemon", "where the servers keep their state: a fresh ext4 image (default when root) or "
                 "the work folder")
    a = p.parse_args(argv)
    if a.render:
        h.rerender(a.render, render_md)
        return 0
    sizes = R.QUICK if a.quick else R.FULL
    a.tree_mib = a.tree_mib or sizes["tree_mib"]
    a.files = a.files or sizes["files"]
    a.idle_seconds = a.idle_seconds or (10.0 if a.quick else IDLE_SECONDS)
    own = start_run(a, "daemon")
    t0 = time.perf_counter()
    rep = Report()
    with h.state_area(a.fs, own) as (a.state, rep.raw["state_fs"]):
        print(f"server state on: {rep.raw['state_fs']}", flush=True)
        bench(a, rep)
    write_results(a.out, rep, time.perf_counter() - t0,
                  {a.state: "$STATE", a.work: "$WORK", h.REPO: "$REPO"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

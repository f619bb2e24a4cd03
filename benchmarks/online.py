"""Benchmarks of online sync (issue 4) against an rsync daemon, both on loopback.

    .venv/bin/python benchmarks/online.py            # the 100,000-file tree and the 1 GiB change set
    .venv/bin/python benchmarks/online.py --quick    # a smoke run: 5,000 files, 64 MiB tree

A master daemon serves HTTP on loopback (`server.listen`), a school daemon has
it as upstream (`upstream.interval_seconds = 0`: it syncs only when asked).
Between them sits a byte-counting TCP proxy of this script; the rsync daemon
(`rsync --daemon`, a read-only module on the source tree) gets the same kind
of proxy in front, so both sides' bytes are counted the same way: TCP payload
in each direction (HTTP or rsync protocol, not the TCP/IP headers).

1. No-op sync of the 100,000 small files: the master publishes the tree, the
   school syncs once (the full copy, recorded, not the measure); then
   `harmonicctl sync --wait` is timed (wall of the whole CLI process; the
   daemon's own job time is `last.sync.seconds` of `harmonicctl status
   --json`), best of 3 with each run's bytes kept. rsync: a first full
   `rsync -a --delete` into an empty folder, then the same command timed.
2. Change set of the 1 GiB tree: the master publishes v1, the school syncs;
   the master publishes v2 (not timed), the school syncs: that sync is the
   measure, and the deployed tree is checked against v2. rsync: `cp -a` of
   v1, then `rsync -az --delete --stats` of v2 onto it; again with `-a`.
   The ideal delta (benchmarks/harness.py) is given beside it.

The servers' state, rsync's destinations and the proxies' counts live on a
fresh ext4 image when root (harness.mount_state_fs); `harness.settle()` runs
before each timed step; the load average is recorded before each one.
Results go to benchmarks/results/online.md and .json (--quick: benchmarks/scratch/).
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: TID251 (the counting proxy, as in tests/daemon/test_online.py)
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daemon as D
import harness as h
import run as R
from run import KiB, MiB, Report, Row, Table

REPEAT = 3  # timed no-op syncs of each tool; the fastest is reported
GOAL_NOOP_BYTES = 4 * KiB
GOAL_NOOP_SECONDS = 0.100
GOAL_BYTES_RATIO = 20.0  # rsync's bytes / Harmonic's for the no-op sync
GOAL_TIME_RATIO = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingProxy:
    """A TCP proxy on loopback that forwards everything to target_port and counts the bytes
    each way: `up` (client to server) and `down` (server to client), and the connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = self.down = self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def reset(self) -> None:
        self.up = self.down = self.connections = 0

    def counts(self) -> dict[str, int]:
        time.sleep(0.2)  # the last segments of a closing connection
        return {"up": self.up, "down": self.down, "total": self.up + self.down, "connections": self.connections}

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))
        finally:
            writer.close()
            up_w.close()


# --------------------------------------------------------------------------- Harmonic


class Pair:
    """A master daemon listening on loopback and an enrolled school daemon whose upstream is
    a counting proxy in front of it."""

    def __init__(self, base: str) -> None:
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        self.base = base
        self.port = free_port()
        self.proxy = CountingProxy(self.port).__enter__()
        self.m = h.Server("master-1", os.path.join(base, "master-1.toml"), os.path.join(base, "master-1"))
        self.s = h.Server("school-1", os.path.join(base, "school-1.toml"), os.path.join(base, "school-1"))
        run = os.path.join(base, "run")
        self.msock = os.path.join(run, "master-1", "control.sock")
        self.ssock = os.path.join(run, "school-1", "control.sock")
        mkey = self.m.ctl("init", "master", "--id", "master-1", "--state-dir", self.m.state, "--socket", self.msock,
                          "--listen", f"127.0.0.1:{self.port}").stdout.strip()
        skey = self.s.ctl("init", "node", "--id", "school-1", "--state-dir", self.s.state, "--socket", self.ssock,
                          "--master-key", mkey, "--upstream", f"http://127.0.0.1:{self.proxy.port}").stdout.strip()
        self.m.ctl("enroll", "school-1", skey)
        with open(self.s.config) as f:
            text = f.read()
        if "interval_seconds = 3600" not in text:
            raise RuntimeError("the school's config has no `interval_seconds = 3600` line to replace")
        with open(self.s.config, "w") as f:
            f.write(text.replace("interval_seconds = 3600", "interval_seconds = 0"))
        self.notify = D.NotifySink(os.path.join(base, "notify.sock"))
        self.md: D.DaemonProc | None = None
        self.sd: D.DaemonProc | None = None

    def start(self) -> None:
        self.md = D.DaemonProc(self.m.config, self.msock, os.path.join(self.base, "master-1.log"), self.notify)
        self.sd = D.DaemonProc(self.s.config, self.ssock, os.path.join(self.base, "school-1.log"), self.notify)
        for d in (self.md, self.sd):
            d.wait(lambda st: bool(st.get("daemon")) and not st["activity"] and not st["queued"], "an idle daemon")
        time.sleep(1)
        assert self.sd is not None
        self.sd.wait(lambda st: not st["activity"] and not st["queued"], "an idle school daemon")

    def sync(self) -> dict[str, Any]:
        """One timed `harmonicctl sync --wait` with the bytes through the proxy and the job's own time."""
        assert self.sd is not None
        self.sd.wait(lambda st: not st["activity"] and not st["queued"], "an idle school daemon")
        h.settle()
        la = D.load()
        self.proxy.reset()
        r = self.s.ctl("sync", "--wait")
        wire = self.proxy.counts()
        st = json.loads(self.s.ctl("status", "--json").stdout)
        job = st.get("last", {}).get("sync", {})
        return {"wall": r.wall, "cpu": r.cpu, "job_s": job.get("seconds"), "wire": wire, "load": la,
                "out": r.stdout.strip().splitlines()[-3:]}

    def close(self, keep: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, d in (("school", self.sd), ("master", self.md)):
            if d is not None:
                out[name] = {"exit": d.stop(), "log": d.output().splitlines()[-15:]}
        self.notify.close()
        self.proxy.__exit__()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)
        return out


# --------------------------------------------------------------------------- rsync


class RsyncDaemon:
    """`rsync --daemon` with one read-only module `mod` on `tree`, a counting proxy in front."""

    def __init__(self, base: str, tree: str) -> None:
        os.makedirs(base, exist_ok=True)
        self.port = free_port()
        conf = os.path.join(base, "rsyncd.conf")
        ids = "uid = root\ngid = root\n" if os.geteuid() == 0 else ""
        with open(conf, "w") as f:
            f.write(f"pid file = {base}/rsyncd.pid\nlog file = {base}/rsyncd.log\nuse chroot = no\n{ids}"
                    f"[mod]\n    path = {tree}\n    read only = yes\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"])
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", self.port))
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the rsync daemon did not start")
            time.sleep(0.05)
        self.proxy = CountingProxy(self.port).__enter__()

    def pull(self, dest: str, *flags: str) -> dict[str, Any]:
        h.settle()
        la = D.load()
        self.proxy.reset()
        cmd = ["rsync", *flags, "--delete", "--stats", f"rsync://127.0.0.1:{self.proxy.port}/mod/",
               dest.rstrip("/") + "/"]
        r = h.run(cmd)
        wire = self.proxy.counts()
        stats = {k: int(v.replace(",", "")) for k, v in
                 re.findall(r"Total bytes (sent|received): ([\d,]+)", r.stdout)}
        return {"wall": r.wall, "cpu": r.cpu, "wire": wire, "stats": stats, "load": la, "flags": list(flags)}

    def close(self) -> None:
        self.proxy.__exit__()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: float(r["wall"]))


# --------------------------------------------------------------------------- the benchmarks


def bench_noop(a: argparse.Namespace, rep: Report) -> None:
    tree = R.small_inputs(a.work, a.seed, a.small_files)
    nfiles, nbytes = h.tree_bytes(tree)
    raw: dict[str, Any] = {"files": nfiles, "bytes": nbytes}
    rep.raw["noop"] = raw
    print(f"\n--- no-op sync of {nfiles} files ({R.mib(nbytes)})", flush=True)
    p = Pair(os.path.join(a.state, "online-noop"))
    try:
        pub = p.m.ctl("publish", "content", tree)
        raw["publish_s"] = pub.wall
        p.start()
        raw["first"] = p.sync()
        raw["first_ok"] = h.tree_digest(p.s.deployed) == h.input_digest(tree)
        print(f"  Harmonic first sync: {raw['first']['wall']:.2f} s, {R.size(raw['first']['wire']['total'])}; "
              f"deployed tree {'identical' if raw['first_ok'] else 'DIFFERENT'}", flush=True)
        raw["harmonic"] = [p.sync() for _ in range(a.repeat)]
        for x in raw["harmonic"]:
            print(f"  Harmonic no-op: {x['wall'] * 1000:.0f} ms (job {x['job_s']} s), {x['wire']}", flush=True)
    finally:
        raw["daemons"] = p.close(a.keep)
    rd = RsyncDaemon(os.path.join(a.state, "rsyncd-noop"), tree)
    dest = os.path.join(a.state, "rsync-noop-dest")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        raw["rsync_first"] = rd.pull(dest, "-a")
        raw["rsync"] = [rd.pull(dest, "-a") for _ in range(a.repeat)]
        for x in raw["rsync"]:
            print(f"  rsync no-op: {x['wall'] * 1000:.0f} ms, {x['wire']}", flush=True)
    finally:
        rd.close()
        shutil.rmtree(dest, ignore_errors=True)

    hb, rb = best(raw["harmonic"]), best(raw["rsync"])
    hw, rw = hb["wire"]["total"], rb["wire"]["total"]
    hmax = max(x["wire"]["total"] for x in raw["harmonic"])
    rep.add(Table(
        f"No-op online sync of {nfiles} small files",
        note=(f"after a first full sync (Harmonic {raw['first']['wall']:.1f} s / "
              f"{R.size(raw['first']['wire']['total'])}, deployed tree "
              f"{'identical' if raw['first_ok'] else 'DIFFERENT'}; rsync "
              f"{raw['rsync_first']['wall']:.1f} s / {R.size(raw['rsync_first']['wire']['total'])}); "
              f"best of {a.repeat} runs of each (walls: Harmonic "
              + "/".join(f"{x['wall']:.2f}" for x in raw["harmonic"]) + " s, rsync "
              + "/".join(f"{x['wall']:.2f}" for x in raw["rsync"]) + " s); bytes = TCP payload both ways "
              "through a counting proxy in front of the master / the rsync daemon (rsync's own --stats: sent "
              f"{rb['stats'].get('sent')}, received {rb['stats'].get('received')}); Harmonic's wall is the whole "
              "`harmonicctl sync --wait` process (Python start-up included), rsync's the whole `rsync -a --delete "
              f"--stats` client; load average before: Harmonic {hb['load']}, rsync {rb['load']}"),
        rows=[
            Row("bytes on the wire (up + down)", f"{hw:,} B ({hb['wire']['up']:,} up, {hb['wire']['down']:,} down)",
                "rsync -a", f"{rw:,} B ({rb['wire']['up']:,} up, {rb['wire']['down']:,} down)",
                rw / hw if hw else None, ">= 20x fewer", hw > 0 and rw / hw >= GOAL_BYTES_RATIO),
            Row("bytes on the wire, largest of the runs", f"{hmax:,} B", "", "", None, "< 4 KiB",
                hmax < GOAL_NOOP_BYTES),
            Row("wall time (whole CLI)", R.secs(hb["wall"]), "rsync -a", R.secs(rb["wall"]),
                rb["wall"] / hb["wall"], ">= 10x faster", rb["wall"] / hb["wall"] >= GOAL_TIME_RATIO),
            Row("daemon's sync job (last.sync.seconds)", f"{hb['job_s']} s", "rsync -a", R.secs(rb["wall"]),
                rb["wall"] / hb["job_s"] if hb["job_s"] else None, "< 100 ms",
                hb["job_s"] is not None and hb["job_s"] < GOAL_NOOP_SECONDS),
            Row("HTTP connections / rsync connections", str(hb["wire"]["connections"]), "rsync",
                str(rb["wire"]["connections"])),
        ]))


def bench_change(a: argparse.Namespace, rep: Report) -> None:
    v1, v2, counts = R.school_inputs(a.work, a.seed, a.tree_mib * MiB, a.files)
    nfiles, nbytes = h.tree_bytes(v2)
    raw: dict[str, Any] = {"files_v2": nfiles, "bytes_v2": nbytes, "changes": counts}
    rep.raw["change"] = raw
    print(f"\n--- change set v1 -> v2 ({nfiles} files, {R.mib(nbytes)})", flush=True)
    p = Pair(os.path.join(a.state, "online-change"))
    try:
        p.m.ctl("publish", "content", v1)
        p.start()
        raw["first"] = p.sync()
        raw["first_ok"] = h.tree_digest(p.s.deployed) == h.input_digest(v1)
        print(f"  Harmonic v1 sync: {raw['first']['wall']:.2f} s, {R.size(raw['first']['wire']['total'])}", flush=True)
        pub = p.m.ctl("publish", "content", v2)
        raw["publish_v2_s"] = pub.wall
        raw["harmonic"] = p.sync()
        raw["change_ok"] = h.tree_digest(p.s.deployed) == h.input_digest(v2)
        x = raw["harmonic"]
        print(f"  Harmonic v1 -> v2: {x['wall']:.2f} s (job {x['job_s']} s), {x['wire']}; deployed tree "
              f"{'identical' if raw['change_ok'] else 'DIFFERENT'}", flush=True)
    finally:
        raw["daemons"] = p.close(a.keep)
    rd = RsyncDaemon(os.path.join(a.state, "rsyncd-change"), v2)
    dest = os.path.join(a.state, "rsync-change-dest")
    try:
        for key, flags in (("rsync_z", ("-az",)), ("rsync", ("-a",))):
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["cp", "-a", v1, dest], check=True)
            raw[key] = rd.pull(dest, *flags)
            raw[key + "_ok"] = h.tree_digest(dest) == h.input_digest(v2)
            print(f"  rsync {flags[0]}: {raw[key]['wall']:.2f} s, {raw[key]['wire']}", flush=True)
    finally:
        rd.close()
        shutil.rmtree(dest, ignore_errors=True)
    ideal = h.ideal_delta(v1, v2)
    raw["ideal"] = asdict(ideal)

    hx, rz, ra = raw["harmonic"], raw["rsync_z"], raw["rsync"]
    hw = hx["wire"]["total"]
    rep.add(Table(
        f"Change-set online sync, {nfiles} files, {R.mib(nbytes)}: v1 -> v2",
        note=(f"the master published v1, the school synced it ({raw['first']['wall']:.1f} s, "
              f"{R.size(raw['first']['wire']['total'])}); the master published v2 ({raw['publish_v2_s']:.1f} s, "
              f"not timed); the school's second `harmonicctl sync --wait` is the measure (deployed tree "
              f"{'identical to v2' if raw['change_ok'] else 'DIFFERENT from v2'}); rsync: `cp -a` of v1, then "
              "`rsync -az|-a --delete --stats` of v2 from the daemon onto it (result identical to v2: "
              f"-az {raw['rsync_z_ok']}, -a {raw['rsync_ok']}); bytes = TCP payload both ways through the counting "
              f"proxy; change set: {counts}; {R.ideal_note(ideal)}; load average before: Harmonic {hx['load']}, "
              f"rsync -az {rz['load']}, rsync -a {ra['load']}"),
        rows=[
            Row("bytes on the wire (up + down)", f"{R.size(hw)} ({R.size(hx['wire']['up'])} up)", "rsync -az",
                R.size(rz["wire"]["total"]), rz["wire"]["total"] / hw if hw else None, "fewer than rsync -z",
                hw < rz["wire"]["total"]),
            Row("bytes on the wire vs rsync -a", R.size(hw), "rsync -a", R.size(ra["wire"]["total"]),
                ra["wire"]["total"] / hw if hw else None),
            Row("bytes on the wire vs the ideal delta", R.size(hw), "ideal", R.size(ideal.bytes),
                hw / ideal.bytes if ideal.bytes else None),
            Row("wall time (whole CLI)", R.secs(hx["wall"]), "rsync -az", R.secs(rz["wall"]),
                rz["wall"] / hx["wall"], "no slower than rsync", hx["wall"] <= rz["wall"]),
            Row("wall time vs rsync -a", R.secs(hx["wall"]), "rsync -a", R.secs(ra["wall"]), ra["wall"] / hx["wall"],
                "no slower than rsync", hx["wall"] <= ra["wall"]),
            Row("daemon's sync job (last.sync.seconds)", f"{hx['job_s']} s"),
            Row("change applied", "yes" if raw["change_ok"] else "NO", "", "", None, "deployed tree = v2",
                bool(raw["change_ok"])),
        ]))


# --------------------------------------------------------------------------- results


def render_md(data: dict[str, Any]) -> str:
    return D.results_md(data, "Harmonic online sync benchmark results", "Server state and rsync destinations on",
                        "What is measured and how: the docstring of benchmarks/online.py. Everything on loopback "
                        "on a shared 2-core VM (the load average before each measurement is given); byte counts "
                        "are exact.", f", {data['machine']['rsync']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5,000 small files and a 64 MiB tree (a smoke run)")
    p.add_argument("--only", choices=("noop", "change"), help="one of the two benchmarks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=REPEAT, help=f"timed no-op syncs of each tool (default {REPEAT})")
    D.add_run_args(p, "online", "where state and destinations live: a fresh ext4 image (default when root) or "
                   "the work folder")
    a = p.parse_args(argv)
    if a.render:
        h.rerender(a.render, render_md)
        return 0
    sizes = R.QUICK if a.quick else R.FULL
    a.tree_mib, a.files, a.small_files = sizes["tree_mib"], sizes["files"], sizes["small_files"]
    a.work = os.path.abspath(a.work)
    own = D.start_run(a, "online")
    t0 = time.perf_counter()
    rep = Report()
    with h.state_area(a.fs, own) as (a.state, rep.raw["state_fs"]):
        print(f"server state on: {rep.raw['state_fs']}", flush=True)
        if a.only in (None, "noop"):
            bench_noop(a, rep)
        if a.only in (None, "change"):
            bench_change(a, rep)
    elapsed = time.perf_counter() - t0
    D.write_results(a.out, rep, elapsed, {a.state: "$STATE", a.work: "$WORK", h.REPO: "$REPO"},
                    "online.py", argv, render_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

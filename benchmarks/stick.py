"""Time from insertion to "safe to remove" (issue 5), against `cp` of the same bytes and `sync`.

    sudo .venv/bin/python benchmarks/stick.py            # the 1 GiB tree's change set (~5 min once the tree exists)
    sudo .venv/bin/python benchmarks/stick.py --quick    # a smoke run: 64 MiB tree

Real daemons, real sticks: a master and a school `harmonicd` (started as
benchmarks/daemon.py starts them), each configured with `[media] devices =
["loop"]`, its own `mount_base`, `watch = []`, `adopt_blank = true`. A stick
is a file system image (ext4; exFAT through FUSE, as a second row) attached
to a loop device; `harmonicd-mount /dev/loopN` is started right after the
attach, as the udev rule and harmonicd-stick@.service would start it (no
udevd runs here). The daemons see the kernel's uevents and the mount table
by themselves.

Before the measure (not timed): the master publishes v1 of the generated
school tree (benchmarks/gen.py, as run.py), the school gets it through a
folder (`harmonicctl exchange`) and its next request (it holds v1) reaches
the master, the master publishes v2: the core issue's change set, and builds
its shared packs ahead (services/shared.prepare, as the master's daemon does
as a job at start and after each publish: v1 -> v2 and v2 whole). Then,
with the daemons running, for each file system:

1. at the school: a blank image inserted; the school writes its request onto
   it (adopt_blank); "safe to remove"; pulled;
2. at the master (the measure, writing side): from the `losetup` attach
   (insertion) until the master's status shows the stick `safe-to-remove`:
   the helper mounts it, the daemon reads the request, writes the change
   set's answer, syncfs, reads every pack back with its pages dropped,
   writes the receipt, asks the helper to unmount and sees the mount go;
3. `cp` of the same pack bytes (the master's pack files, copied off the
   stick beforehand onto the state file system) onto the same image: from
   the attach, `mount` with the helper's options, `cp -r`, `sync`, `umount`
   (best of --repeat; the folder is removed untimed after each run);
4. at the school (reading side): from the attach until its status shows
   `safe-to-remove` (import of the answer, v2 applied and deployed, its next
   request written and read back); beside it, `cp` of the pack files off the
   stick onto the state file system, `sync`, `umount`, measured the same way.

Where the master's time goes: its status polled every 20 ms (state changes
and progress) and its event stream read as it comes (a state shorter than a
status call is not missed), the helper's output lines timestamped as they come, and a
profiled rerun of the same visit (`harmonicctl exchange` under cProfile on a
copy of the image taken before step 2, mounted outside the daemon's mount
base): import, planning, pack writing, syncfs, read-back, receipt, gc.

Before the second file system's row the school's state is put back to what
it was after v1 (a copy taken before the daemons started), so both rows
carry the same change set. Servers' state and the stick images live on a
fresh journaled ext4 image (harness.state_area); harness.settle() runs
before each timed step. Needs root. Results: benchmarks/results/stick.md and
.json (--quick: benchmarks/scratch/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import IO, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daemon as D
import harness as h
import run as R
from run import MiB, Report, Row, Table

GOAL_RATIO = 1.5  # insertion -> safe to remove, over attach + mount + cp + sync + umount
POLL = 0.02  # seconds between status calls while a stick is in
TIMEOUT = 900.0  # seconds a visit may take before the run gives up
TOOLS = {"losetup": "mount", "blkid": "util-linux", "mkfs.ext4": "e2fsprogs", "mkfs.exfat": "exfatprogs",
         "mount.exfat-fuse": "exfat-fuse"}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "exfat": ["mkfs.exfat"]}
# harmonicd-mount from the code snapshot, as harmonicd-stick@.service runs it.
HELPER = ("import os, sys\n"
          "sys.path.insert(0, os.environ['HBENCH_HERE'])\n"
          "code = os.environ.get('HBENCH_CODE')\n"
          "if code:\n"
          "    import hctl; hctl.use_code(code)\n"
          "from harmonicd.media.helper import main\n"
          "sys.exit(main(sys.argv[1:]))\n")
# shared.prepare on the master's state, as the master's daemon runs it as a job after each publish.
PREPARE = ("import os, sys, time\n"
           "sys.path.insert(0, os.environ['HBENCH_HERE'])\n"
           "code = os.environ.get('HBENCH_CODE')\n"
           "if code:\n"
           "    import hctl; hctl.use_code(code)\n"
           "from harmonicd import config\n"
           "from harmonicd.services import shared\n"
           "from harmonicd.store.store import Store\n"
           "store = Store(config.load(sys.argv[1]))\n"
           "for line in shared.prepare(store):\n"
           "    print(line)\n"
           "store.close()\n")
# The functions of a visit whose cumulative time the profiled rerun reports, by what they do.
PHASES = [("visit (whole)", "services/stick.py", "visit"),
          ("import the request", "services/stick.py", "_import_all"),
          ("find the shared packs (build any not built ahead)", "services/shared.py", "for_school"),
          ("copy the shared packs", "services/stick.py", "_copy_parts"),
          ("plan the answer", "services/exchange.py", "planned"),
          ("write the packs", "services/exchange.py", "write_packs"),
          ("syncfs", "store/durable.py", "syncfs"),
          ("read back (pages dropped)", "services/stick.py", "_read_back"),
          ("receipt", "services/stick.py", "write_receipt"),
          ("gc after the visit", "services/maintenance.py", "gc")]


def sh(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def sh_env(env: dict[str, str], *cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=TIMEOUT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


class Lines:
    """A child's output, each line with the monotonic time it was read."""

    def __init__(self, stream: IO[str], copy: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self._copy = copy
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with open(self._copy, "a") as out:
            for line in stream:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                out.write(line)
                out.flush()

    def first(self, pattern: str) -> float | None:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)


class Events:
    """A daemon's event stream (GET /v1/events), each event with the monotonic time it came:
    pushed as the daemon emits it, so a state shorter than a status call is not missed."""

    def __init__(self, socket_path: str) -> None:
        self.got: list[tuple[float, dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._read, args=(socket_path,), daemon=True)
        self._thread.start()

    def _read(self, socket_path: str) -> None:
        from harmonicd import ctlclient

        with contextlib.suppress(Exception):  # the stream ends when the daemon stops
            for ev in ctlclient.events(socket_path):
                self.got.append((time.monotonic(), ev))

    def states(self, device: str, since: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, ev in list(self.got):
            if t >= since and ev.get("event") == "stick" and ev.get("device") == device:
                out.setdefault(str(ev["state"]), t - since)
        return out


class Lab:
    """Loop devices and helpers this run made; close() undoes them all, whatever failed."""

    def __init__(self, logs: str) -> None:
        self.logs = logs
        self.loops: list[str] = []
        self.helpers: list[subprocess.Popen[str]] = []
        self.mounts: list[str] = []

    def attach(self, image: str) -> str:
        name = os.path.basename(sh("losetup", "--find", "--show", image).strip())
        self.loops.append(name)
        return name

    def detach(self, name: str) -> None:
        subprocess.run(["losetup", "--detach", f"/dev/{name}"], capture_output=True, check=False)
        if name in self.loops:
            self.loops.remove(name)

    def helper(self, config: str, name: str) -> tuple[subprocess.Popen[str], Lines]:
        """harmonicd-mount /dev/NAME in the background, as the udev rule has systemd start it."""
        env = {**os.environ, "HBENCH_HERE": h.HERE}
        if h.CODE["path"] is not None:
            env["HBENCH_CODE"] = str(h.CODE["path"])
        p = subprocess.Popen([h.PY, "-c", HELPER, "--config", config, f"/dev/{name}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
        self.helpers.append(p)
        assert p.stdout is not None
        return p, Lines(p.stdout, os.path.join(self.logs, f"helper-{name}.log"))

    def mount(self, dev: str, fstype: str, where: str, read_only: bool = False) -> None:
        """Mounts as harmonicd-mount does (its options), outside any daemon's mount base."""
        from harmonicd.media.helper import FAT_MODES, OPTIONS

        os.makedirs(where, exist_ok=True)
        opts = OPTIONS + (",ro" if read_only else "")
        if fstype == "exfat":
            sh("mount.exfat-fuse", "-o", f"{opts},uid=0,gid=0,{FAT_MODES}", dev, where)
        else:
            sh("mount", "-t", fstype, "-o", opts, dev, where)
        self.mounts.append(where)

    def umount(self, where: str) -> None:
        sh("umount", where)
        self.mounts.remove(where)

    def close(self) -> None:
        for p in self.helpers:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for where in self.mounts:
            subprocess.run(["umount", "--lazy", where], capture_output=True, check=False)
        for name in list(self.loops):
            self.detach(name)


def use_sticks(server: h.Server, base: str) -> None:
    """Loop devices as sticks mounted under base, no desktop folders, blank sticks adopted."""
    with open(server.config) as f:
        text = f.read()
    for key, value in (("devices", '["loop"]'), ("mount_base", json.dumps(base)), ("adopt_blank", "true")):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise RuntimeError(f"{server.config}: no `{key} = ` line in [media] to set")
    text = text.replace("[media]\n", "[media]\nwatch = []\n")
    with open(server.config, "w") as f:
        f.write(text)
    os.makedirs(base, exist_ok=True)


def make_image(path: str, fs: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    sh(*MKFS[fs], path)


def stick_of(d: D.DaemonProc, name: str) -> dict[str, Any] | None:
    return next((s for s in d.status()["media"]["sticks"] if s["device"] == name), None)


def insert(lab: Lab, d: D.DaemonProc, events: Events, config: str, image: str,
           until: tuple[str, ...] = ("safe-to-remove",)) -> dict[str, Any]:
    """Insert the stick (attach, then the helper as systemd would), poll the daemon's status every
    POLL s until the stick reaches one of `until`; then wait for the helper and pull the stick.
    Times are seconds from just before the attach."""
    t0 = time.monotonic()
    name = lab.attach(image)
    attached = time.monotonic() - t0
    proc, out = lab.helper(config, name)
    seen: dict[str, float] = {}
    progress: list[tuple[float, int, int | None]] = []
    last: dict[str, Any] | None = None
    deadline = t0 + TIMEOUT
    while True:
        st = stick_of(d, name)
        now = time.monotonic() - t0
        if st is not None:
            last = st
            seen.setdefault(st["state"], now)
            if st["state"] == "visiting" and st.get("total_bytes"):
                progress.append((now, st["done_bytes"], st["total_bytes"]))
            if st["state"] in until:
                break
            if st["state"] in ("removed-early", "unreadable"):
                raise RuntimeError(f"{name}: {st['state']}: {st['message']}\n{d.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not {'/'.join(until)} after {TIMEOUT:.0f} s: {st}\n{d.output()[-3000:]}")
        time.sleep(POLL)
    rc = proc.wait(60)
    time.sleep(0.2)  # the last events on their way
    pushed = events.states(name, t0)
    # Each state at the first time either way saw it (status polled, or its event pushed).
    states = {k: min(seen.get(k, pushed.get(k, 0.0)), pushed.get(k, seen.get(k, 0.0))) for k in {*seen, *pushed}}
    total = states[last["state"]] if last else 0.0
    lab.detach(name)
    mounted = out.first(r": mounted ")
    unmounted = out.first(r": unmounted ")
    return {"device": name, "total_s": total, "attach_s": attached, "states": states, "polled": seen,
            "pushed": pushed,
            "helper_mounted_s": None if mounted is None else mounted - t0,
            "helper_unmounted_s": None if unmounted is None else unmounted - t0,
            "helper_exit": rc, "helper_output": [line for _t, line in out.lines],
            "message": last["message"] if last else "", "progress": progress[-5:], "progress_samples": len(progress)}


def cp_run(lab: Lab, image: str, fs: str, src: str, dest_rel: str | None, mnt: str, into: str | None) -> dict[str, Any]:
    """From just before the attach: attach, mount (the helper's options), cp -r, sync, umount.
    src relative to the stick when into is given (copy off the stick), else a folder copied onto it."""
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    name = lab.attach(image)
    try:
        marks["attach"] = time.monotonic() - t0
        lab.mount(f"/dev/{name}", fs, mnt)
        marks["mount"] = time.monotonic() - t0
        if into is None:
            assert dest_rel is not None
            sh("cp", "-r", src, os.path.join(mnt, dest_rel))
        else:
            sh("cp", "-r", os.path.join(mnt, src), into)
        marks["cp"] = time.monotonic() - t0
        sh("sync")
        marks["sync"] = time.monotonic() - t0
        lab.umount(mnt)
        marks["umount"] = time.monotonic() - t0
    finally:
        lab.detach(name)
    return {"total_s": marks["umount"], "marks": marks}


def remove_on_stick(lab: Lab, image: str, fs: str, rel: str, mnt: str) -> None:
    name = lab.attach(image)
    try:
        lab.mount(f"/dev/{name}", fs, mnt)
        shutil.rmtree(os.path.join(mnt, rel))
        lab.umount(mnt)
    finally:
        lab.detach(name)


def packs_on_stick(lab: Lab, image: str, fs: str, mnt: str, school: str, copy_to: str) -> list[tuple[str, int]]:
    """The pack files the master wrote (for the school, and any broadcast), copied to copy_to
    (kept in their folders): the bytes the cp baseline writes."""
    name = lab.attach(image)
    found: list[tuple[str, int]] = []
    try:
        lab.mount(f"/dev/{name}", fs, mnt, read_only=True)
        shutil.rmtree(copy_to, ignore_errors=True)
        for sub in (f"to-{school}", "to-everyone"):
            folder = os.path.join(mnt, "HARMONIC", sub)
            if not os.path.isdir(folder):
                continue
            os.makedirs(os.path.join(copy_to, sub))
            for f in sorted(os.listdir(folder)):
                if f.endswith(".hpk"):
                    shutil.copyfile(os.path.join(folder, f), os.path.join(copy_to, sub, f))
                    found.append((f"{sub}/{f}", os.path.getsize(os.path.join(folder, f))))
        lab.umount(mnt)
    finally:
        lab.detach(name)
    return found


def profile_visit(lab: Lab, m: h.Server, image: str, fs: str, mnt: str, out: str) -> dict[str, Any]:
    """The master's visit again, on a copy of the image as it was before it, by `harmonicctl exchange`
    under cProfile (the store's lock is taken beside the running daemon, as an admin's command would)."""
    name = lab.attach(image)
    try:
        lab.mount(f"/dev/{name}", fs, mnt)
        h.settle()
        env = {"HBENCH_CODE": str(h.CODE["path"])} if h.CODE["path"] is not None else {}
        r = h.run([h.PY, "-m", "cProfile", "-o", out, os.path.join(h.HERE, "hctl.py"), "--config", m.config,
                   "exchange", mnt], env=env)
        lab.umount(mnt)
    finally:
        lab.detach(name)
    stats = pstats.Stats(out).stats  # type: ignore[attr-defined]
    phases: dict[str, float] = {}
    for label, file, func in PHASES:
        cum = [v[3] for (path, _line, fn), v in stats.items() if fn == func and path.endswith(file)]
        phases[label] = max(cum) if cum else 0.0
    own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    top = [{"function": f"{os.path.relpath(path, str(h.CODE['path'] or h.REPO)) if 'harmonicd' in path else path}"
                        f":{line}({fn})", "own_s": round(v[2], 3), "cum_s": round(v[3], 3), "calls": v[1]}
           for (path, line, fn), v in own]
    return {"wall_s": r.wall, "cpu_s": r.cpu, "phases": phases, "top_own": top,
            "out": r.stdout.strip().splitlines()[-6:]}


# --------------------------------------------------------------------------- the benchmark


def bench(a: argparse.Namespace, rep: Report) -> None:
    raw = rep.raw
    v1, v2, counts = R.school_inputs(a.work, a.seed, a.tree_mib * MiB, a.files)
    nfiles, nbytes = h.tree_bytes(v1)
    raw["input"] = {"files": nfiles, "bytes": nbytes, "tree_mib": a.tree_mib, "changes": counts}
    print(f"input: {nfiles} files, {R.mib(nbytes)}; change set {counts}", flush=True)
    base = os.path.join(a.state, "stick-bench")
    m, s, folder, ssock = D.init_servers(base)
    msock = os.path.join(base, "run", m.name, "control.sock")
    logs = os.path.join(base, "logs")
    os.makedirs(logs)
    mbase, sbase = os.path.join(base, "media-master"), os.path.join(base, "media-school")
    use_sticks(m, mbase)
    use_sticks(s, sbase)

    print("\n--- the school gets v1 through a folder; the master publishes v2 (not timed)", flush=True)
    m.ctl("publish", "content", v1)
    # The school takes v1, and its next request (it holds v1) reaches the master.
    for server in (s, m, s, m):
        server.ctl("exchange", folder)
    if h.tree_digest(s.deployed) != h.input_digest(v1):
        raise RuntimeError("the school's deployed tree is not v1")
    m.ctl("publish", "content", v2)
    # Here rather than left to the daemon (which runs it at start and after each
    # publish, before it is idle): the time it takes is reported.
    env = {**os.environ, "HBENCH_HERE": h.HERE}
    if h.CODE["path"] is not None:
        env["HBENCH_CODE"] = str(h.CODE["path"])
    t = time.monotonic()
    built = sh_env(env, h.PY, "-c", PREPARE, m.config).splitlines()
    raw["prepared"] = {"built": built, "wall_s": time.monotonic() - t}
    print(f"the master's shared packs built ahead (shared.prepare) in {raw['prepared']['wall_s']:.1f} s: "
          + "; ".join(built), flush=True)
    saved = os.path.join(base, "school-1-v1")
    subprocess.run(["cp", "-a", s.state, saved], check=True)  # put back before the second row

    notify = D.NotifySink(os.path.join(base, "notify.sock"))
    lab = Lab(logs)
    master_events: list[Events] = []
    md: D.DaemonProc | None = None
    sd: D.DaemonProc | None = None
    try:
        md = D.DaemonProc(m.config, msock, os.path.join(logs, "master-1.log"), notify)
        for fs in a.fs_rows:
            if sd is not None:
                sd.stop()
                shutil.rmtree(s.state)
                subprocess.run(["cp", "-a", saved, s.state], check=True)
            sd = D.DaemonProc(s.config, ssock, os.path.join(logs, f"school-1-{fs}.log"), notify)
            for up in (md, sd):
                up.wait(lambda st: bool(st.get("daemon")) and not st["activity"] and not st["queued"],
                        "an idle daemon")
            if not master_events:
                master_events.append(Events(msock))
            raw[fs] = row(a, lab, m, s, md, sd, (master_events[0], Events(ssock)), fs, base, v2)
    finally:
        lab.close()
        for who, proc in (("school", sd), ("master", md)):
            if proc is not None:
                raw.setdefault("daemons", {})[who] = {"exit": proc.stop(), "log": proc.output().splitlines()[-30:]}
        notify.close()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    for fs in a.fs_rows:
        report(rep, fs, raw[fs], nfiles, nbytes, raw["prepared"])


def row(a: argparse.Namespace, lab: Lab, m: h.Server, s: h.Server, md: D.DaemonProc, sd: D.DaemonProc,
        events: tuple[Events, Events], fs: str, base: str, v2: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    mev, sev = events
    image = os.path.join(base, f"stick-{fs}.img")
    make_image(image, fs, a.stick_mib * MiB)
    mnt = os.path.join(base, "look")
    print(f"\n--- {fs}: a {a.stick_mib} MiB stick", flush=True)

    h.settle()
    r["request"] = insert(lab, sd, sev, s.config, image)
    print(f"  school, its request: safe to remove after {r['request']['total_s']:.2f} s "
          f"({r['request']['message']})", flush=True)
    before = image + ".before-master"
    subprocess.run(["cp", "--sparse=always", image, before], check=True)

    h.settle()
    load = D.load()
    r["master"] = x = insert(lab, md, mev, m.config, image)
    x["load"] = load
    print(f"  master: safe to remove after {x['total_s']:.2f} s; states {fmt_states(x)}; {x['message']}", flush=True)

    src = os.path.join(base, "cp-src")
    packs = packs_on_stick(lab, image, fs, mnt, s.name, src)
    r["packs"] = packs
    r["pack_bytes"] = sum(n for _f, n in packs)
    print(f"  the master wrote {len(packs)} pack file(s), {R.mib(r['pack_bytes'])}", flush=True)

    r["cp_onto"] = []
    for i in range(a.repeat):
        h.settle()
        c = cp_run(lab, image, fs, src, f"cp-baseline-{i}", mnt, None)
        remove_on_stick(lab, image, fs, f"cp-baseline-{i}", mnt)
        r["cp_onto"].append(c)
        print(f"  cp onto the stick + sync + umount: {c['total_s']:.2f} s {fmt_marks(c)}", flush=True)

    r["profile"] = profile_visit(lab, m, before, fs, mnt, os.path.join(base, f"master-{fs}.prof"))
    os.unlink(before)
    print(f"  profiled rerun (harmonicctl exchange): {r['profile']['wall_s']:.2f} s: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in r["profile"]["phases"].items()), flush=True)
    for f in r["profile"]["top_own"][:8]:
        print(f"    {f['own_s']:.3f} s own, {f['cum_s']:.3f} s with callees, {f['calls']} calls: {f['function']}",
              flush=True)

    h.settle()
    load = D.load()
    r["school"] = y = insert(lab, sd, sev, s.config, image)
    y["load"] = load
    st = sd.status()
    r["content_seq"] = D.seq_of(st, "content")
    r["deployed_ok"] = h.tree_digest(s.deployed) == h.input_digest(v2)
    print(f"  school: safe to remove after {y['total_s']:.2f} s; states {fmt_states(y)}; content release "
          f"{r['content_seq']}, deployed tree {'= v2' if r['deployed_ok'] else 'DIFFERENT'}", flush=True)

    # The reading side's baseline: the same pack bytes copied off the stick (they are still on it
    # when the school leaves them; else put back first, untimed).
    r["cp_off"] = []
    for i in range(a.repeat):
        into = os.path.join(base, f"cp-off-{i}")
        name = lab.attach(image)
        try:
            lab.mount(f"/dev/{name}", fs, mnt)
            shutil.rmtree(os.path.join(mnt, "cp-src"), ignore_errors=True)
            shutil.copytree(src, os.path.join(mnt, "cp-src"))
            lab.umount(mnt)
        finally:
            lab.detach(name)
        h.settle()
        c = cp_run(lab, image, fs, "cp-src", None, mnt, into)
        shutil.rmtree(into, ignore_errors=True)
        r["cp_off"].append(c)
        print(f"  cp off the stick + sync + umount: {c['total_s']:.2f} s {fmt_marks(c)}", flush=True)
    os.unlink(image)
    shutil.rmtree(src, ignore_errors=True)
    return r


def fmt_states(x: dict[str, Any]) -> str:
    marks = [("mounted", x["helper_mounted_s"]), *x["states"].items(), ("unmounted", x["helper_unmounted_s"])]
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(marks, key=lambda kv: kv[1] or 0) if v is not None)


def fmt_marks(c: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v:.2f}" for k, v in c["marks"].items()) + ")"


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda c: float(c["total_s"]))


def breakdown(x: dict[str, Any]) -> list[tuple[str, float]]:
    """Consecutive stretches of one insertion, from the marks seen."""
    st = x["states"]
    marks = [("attach (losetup)", x["attach_s"]), ("helper: start, blkid, mount", x["helper_mounted_s"]),
             ("daemon: sees the mount (visiting)", st.get("visiting")),
             ("the visit job (until ejecting)", st.get("ejecting")),
             ("helper: sees the request, unmounts", x["helper_unmounted_s"]),
             ("daemon: sees the mount go (safe to remove)", st.get("safe-to-remove"))]
    out, prev = [], 0.0
    for label, t in marks:
        if t is None:
            continue
        # A mark polled (every POLL s) may come a moment after the next, read as it was written.
        out.append((label, max(0.0, t - prev)))
        prev = max(prev, t)
    return out


def report(rep: Report, fs: str, r: dict[str, Any], nfiles: int, nbytes: int,
           prepared: dict[str, Any]) -> None:
    x, y = r["master"], r["school"]
    onto, off = best(r["cp_onto"]), best(r["cp_off"])
    name = "exFAT (FUSE)" if fs == "exfat" else "ext4"
    ok = r["deployed_ok"] and r["content_seq"] == 2
    prof = r["profile"]
    rows = [
        Row("master: insertion -> safe to remove", R.secs(x["total_s"]), "attach+mount+cp+sync+umount",
            R.secs(onto["total_s"]), x["total_s"] / onto["total_s"], "<= 1.5x",
            x["total_s"] <= GOAL_RATIO * onto["total_s"]),
        Row("school: insertion -> safe to remove (import + apply)", R.secs(y["total_s"]),
            "attach+mount+cp off+sync+umount", R.secs(off["total_s"]), y["total_s"] / off["total_s"]),
        Row("school: insertion -> safe to remove, vs cp onto the stick", R.secs(y["total_s"]),
            "attach+mount+cp+sync+umount", R.secs(onto["total_s"]), y["total_s"] / onto["total_s"]),
        Row("school: its request (blank stick adopted)", R.secs(r["request"]["total_s"])),
        Row("pack bytes the master wrote", f"{R.mib(r['pack_bytes'])} in {len(r['packs'])} file(s)"),
        Row("shared packs built ahead (shared.prepare, not timed)",
            f"{R.secs(prepared['wall_s'])}: {'; '.join(prepared['built']) or 'nothing to build'}"),
        Row("change applied at the school", "yes" if ok else "NO", "", "", None, "content release 2, tree = v2", ok),
    ]
    for label, secs in breakdown(x):
        rows.append(Row(f"master, stretch: {label}", R.secs(secs)))
    for label, secs in prof["phases"].items():
        rows.append(Row(f"master, profiled rerun: {label}", R.secs(secs)))
    for label, secs in breakdown(y):
        rows.append(Row(f"school, stretch: {label}", R.secs(secs)))
    rep.add(Table(
        f"Insertion to safe to remove, {name}: the change set of {nfiles} files, {R.mib(nbytes)}",
        note=(f"one {fs} image on a loop device carries the school's request to the master and the answer "
              f"back; times from just before `losetup` (insertion) until the daemon's status shows the stick "
              f"`safe-to-remove` (status polled every {POLL * 1000:.0f} ms), harmonicd-mount started right after "
              f"the attach as the udev rule would; cp: from just before `losetup`, `mount` with the helper's "
              f"options, `cp -r` of the master's pack files (copied off the stick beforehand onto the state file "
              f"system), `sync`, `umount`, best of {len(r['cp_onto'])} ("
              + "/".join(f"{c['total_s']:.2f}" for c in r["cp_onto"]) + " s; best: "
              + fmt_marks(onto) + "); cp off: the same pack bytes from the stick onto the state file system (best: "
              + fmt_marks(off) + "); stretches: consecutive marks of the timed insertion (the helper's output "
              f"lines, timestamped as read; state changes as first seen by the status poll or the event stream); "
              f"profiled rerun: `harmonicctl exchange` on a "
              f"copy of the image as it was before the master's insertion, under cProfile (cumulative seconds; "
              f"whole command {prof['wall_s']:.2f} s; most own time: "
              + "; ".join(f"{f['function']} {f['own_s']:.2f} s" for f in prof["top_own"][:6])
              + f"); load average before: master {x['load']}, school "
              f"{y['load']}; master's message: {x['message']}"),
        rows=rows))


# --------------------------------------------------------------------------- results


def render_md(data: dict[str, Any]) -> str:
    return D.results_md(data, "Harmonic stick benchmark results", "Server state and stick images on",
                        "What is measured and how: the docstring of benchmarks/stick.py. A shared 2-core VM; the "
                        "sticks are loop devices on image files, so they are as fast as the state file system, "
                        "not as a USB stick.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 MiB tree (a smoke run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tree-mib", type=int, help="size of the generated school tree (default 1024)")
    p.add_argument("--files", type=int, help="files in the school tree (default ~22,000)")
    p.add_argument("--stick-mib", type=int, default=256, help="size of the stick image (default 256)")
    p.add_argument("--only", choices=("ext4", "exfat"), help="one file system (default: both)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each cp baseline (the fastest counts; default 3)")
    D.add_run_args(p, "stick", "where state and stick images live: a fresh ext4 image (default) or the work folder")
    a = p.parse_args(argv)
    if a.render:
        h.rerender(a.render, render_md)
        return 0
    if os.geteuid() != 0:
        print("benchmarks/stick.py needs root: it attaches loop devices and mounts them "
              "(run it as root: sudo .venv/bin/python benchmarks/stick.py)", file=sys.stderr)
        return 2
    a.fs_rows = [a.only] if a.only else ["ext4", "exfat"]
    for tool, deb in TOOLS.items():
        if shutil.which(tool) is None and (tool in ("losetup", "blkid", "mkfs.ext4") or "exfat" in a.fs_rows):
            p.error(f"{tool} is missing (Debian package {deb}; `make test` installs it)")
    if not os.path.exists("/dev/loop-control"):
        p.error("no loop devices here (/dev/loop-control is missing)")
    sizes = R.QUICK if a.quick else R.FULL
    a.tree_mib = a.tree_mib or sizes["tree_mib"]
    a.files = a.files or sizes["files"]
    own = D.start_run(a, "stick")
    t0 = time.perf_counter()
    rep = Report()
    with contextlib.ExitStack() as stack:
        a.state, rep.raw["state_fs"] = stack.enter_context(h.state_area(a.fs, own))
        print(f"server state on: {rep.raw['state_fs']}", flush=True)
        bench(a, rep)
    D.write_results(a.out, rep, time.perf_counter() - t0, {a.state: "$STATE", a.work: "$WORK", h.REPO: "$REPO"},
                    "stick.py", argv, render_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: a master and two school servers, each with its running daemon.

Everything lives in a temporary folder. Each server gets its own control
socket there (set at `harmonicctl init`) and its own real `harmonicd`
process; the demo drives them only through the real `harmonicctl`:

* the master publishes content;
* school-1 is kept in step through a folder standing for a USB stick (two
  trips: content down, then a change set down and statistics up). `exchange`
  runs in the caller's own process under the store's lock while the daemons
  run, by design (the daemon may not see the caller's folders);
* statistics are written into school-1's stats folder while its daemon
  watches it, and the daemon publishes them by itself after a quiet second;
* school-2 is online: its upstream is the master's HTTP listener on
  loopback, and `harmonicctl sync --wait` takes the content down and its
  statistics up in one round trip;
* school-1 has no upstream: `sync --wait` refuses it in one line.

The demo stops at the first step that fails, ends with `verify`, the status
of all three servers and a SIGTERM to each daemon (each must exit 0), and
exits 0 only when every step worked. HARMONIC_DEMO_KEEP=1 keeps the folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CTL = [sys.executable, "-m", "harmonicd"]
_SCRIPT = Path(sys.executable).parent / "harmonicd"
HARMONICD = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from harmonicd.daemon import main; sys.exit(main())"]
QUIET = 1  # seconds a watched folder stays unchanged before the school's daemon publishes it
WAIT = 60.0  # seconds any wait of the demo may take at most (the machine may be busy)


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def say(text: str) -> None:
    print("   " + text.replace("\n", "\n   "), flush=True)


def ctl(config: Path, *args: str, codes: tuple[int, ...] = (0,), show: bool = True) -> subprocess.CompletedProcess[str]:
    """Run harmonicctl; fail the demo unless it exits with one of codes."""
    shown = " ".join(["harmonicctl", *args])
    if show:
        print(f"$ {shown}   [{config.stem}]", flush=True)
    p = subprocess.run([*CTL, "--config", str(config), *args], capture_output=True, text=True, check=False,
                       timeout=300)
    if show:
        if p.stdout.strip():
            print("  " + p.stdout.rstrip().replace("\n", "\n  "))
        if p.stderr.strip():
            print("  " + p.stderr.rstrip().replace("\n", "\n  "))
        if p.returncode != 0:
            print(f"  (exit code {p.returncode})")
    if p.returncode not in codes:
        raise DemoFailed(f"`{shown}` on {config.stem} exited {p.returncode}: {p.stderr.strip()}")
    return p


def status_json(config: Path) -> dict[str, Any]:
    st: dict[str, Any] = json.loads(ctl(config, "status", "--json", show=False).stdout)
    return st


def seq_of(st: dict[str, Any], name: str) -> int:
    return int(next(c["seq"] for c in st["collections"] if c["name"] == name))


def wait_status(config: Path, cond: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll `harmonicctl status --json` until cond holds (at most WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while True:
        st = status_json(config)
        if cond(st):
            return st
        if time.monotonic() > deadline:
            raise DemoFailed(f"{config.stem}: gave up after {WAIT:.0f} s waiting for {what}")
        time.sleep(0.2)


def set_publish_option(config: Path, key: str, value: str) -> None:
    text = config.read_text()
    new, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    if n != 1:
        raise DemoFailed(f"{config}: no {key} line to change")
    config.write_text(new)


class Daemon:
    """One real harmonicd process, its output in a log file."""

    def __init__(self, name: str, config: Path, base: Path) -> None:
        self.name, self.config = name, config
        self.log = base / f"{name}-harmonicd.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "HARMONICD_CONFIG")}
        self.started = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*HARMONICD, "--config", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> dict[str, Any]:
        def answers(st: dict[str, Any]) -> bool:
            if self.proc.poll() is not None:
                raise DemoFailed(f"harmonicd for {self.name} exited {self.proc.returncode} at start:\n"
                                 + self.output())
            return bool(st.get("daemon"))
        return wait_status(self.config, answers, "its daemon to answer")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise DemoFailed(f"harmonicd for {self.name} did not stop within 30 s of SIGTERM") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace").rstrip() if self.log.exists() else ""


def make_content(root: Path, rng: random.Random) -> None:
    for i in range(40):
        page = root / "pages" / f"lesson-{i:02d}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        words = " ".join(rng.choice(["sun", "water", "maths", "reading", "tree", "river"]) for _ in range(300))
        page.write_text(f"<html><body><h1>Lesson {i}</h1><p>{words}</p></body></html>\n")
    (root / "media").mkdir(exist_ok=True)
    (root / "media" / "video.bin").write_bytes(rng.randbytes(3 << 20))
    (root / "catalog.json").write_text(json.dumps({"lessons": 40, "version": 1}))


def run(base: Path, daemons: list[Daemon]) -> None:
    rng = random.Random(42)
    m_cfg, s1_cfg, s2_cfg = base / "master.toml", base / "school-1.toml", base / "school-2.toml"
    configs = {"master": m_cfg, "school-1": s1_cfg, "school-2": s2_cfg}
    stick = base / "stick"
    stick.mkdir()
    content = base / "content"

    def sock(sid: str) -> str:
        return str(base / "run" / sid / "control.sock")

    step("A master (listening on loopback) and two school servers, each with its own control socket")
    with socket.socket() as probe:  # a free loopback port for the master's HTTP listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mkey = ctl(m_cfg, "init", "master", "--id", "master", "--state-dir", str(base / "master"),
               "--socket", sock("master"), "--listen", f"127.0.0.1:{port}").stdout.strip()
    for cfg, sid in ((s1_cfg, "school-1"), (s2_cfg, "school-2")):
        online = ("--upstream", f"http://127.0.0.1:{port}") if sid == "school-2" else ()
        skey = ctl(cfg, "init", "node", "--id", sid, "--state-dir", str(base / sid), "--master-key", mkey,
                   "--socket", sock(sid), *online).stdout.strip()
        ctl(m_cfg, "enroll", sid, skey)
        set_publish_option(cfg, "quiet_seconds", str(QUIET))
        say(f"{cfg.name}: [publish] quiet_seconds = {QUIET} (watched folders are published after "
            f"{QUIET} s without change)")

    step("Start the daemons: `harmonicd --config ...` for each server")
    for sid, cfg in configs.items():
        print(f"$ harmonicd --config {cfg.name} &", flush=True)
        daemons.append(Daemon(sid, cfg, base))
    for d in daemons:
        st = d.wait_ready()
        say(f"{d.name}: `harmonicctl status --json` shows \"daemon\": true, pid {st['pid']} "
            f"({time.monotonic() - d.started:.1f} s after start), socket {Path(sock(d.name)).relative_to(base)}")
    # At start a school's daemon publishes its watched folders (empty here) as release 1; wait for
    # that, so the statistics written later are seen as a change of their own.
    for sid in ("school-1", "school-2"):
        wait_status(configs[sid], lambda st: seq_of(st, "stats") >= 1 and seq_of(st, "backup") >= 1
                    and not st["activity"] and not st["queued"], "its first publish of stats and backup")
        say(f"{sid}: its daemon published the (empty) stats and backup folders by itself as release 1")

    step("The master publishes content (runs in this process; the master's daemon keeps running)")
    make_content(content, rng)
    ctl(m_cfg, "publish", "content", str(content))

    step("Trip 1: the teacher carries the stick school-1 -> master -> school-1")
    ctl(s1_cfg, "exchange", str(stick))
    ctl(m_cfg, "exchange", str(stick))
    ctl(s1_cfg, "exchange", str(stick))
    if seq_of(status_json(s1_cfg), "content") != 1:
        raise DemoFailed("school-1 does not show content release 1 after trip 1")
    say("school-1's status shows content release 1")

    step("A change set on the master")
    (content / "pages" / "lesson-03.html").write_text("<html><body><h1>Lesson 3, revised</h1></body></html>\n")
    (content / "pages" / "lesson-39.html").unlink()
    (content / "pages" / "lesson-40.html").write_text("<html><body><h1>A new lesson</h1></body></html>\n")
    with open(content / "media" / "video.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(64 << 10))
    ctl(m_cfg, "publish", "content", str(content))

    step("Statistics written at school-1 while its daemon watches the folder")
    stats = base / "school-1" / "sources" / "stats"
    before = seq_of(status_json(s1_cfg), "stats")
    record = json.dumps({"logins": 31, "lessons_opened": 112})
    target = stats / "2026-11-27.json"
    with open(target, "w") as f:  # written in two parts, as a slow program would
        f.write(record[:20])
        f.flush()
        time.sleep(0.3)
        f.write(record[20:])
    say(f"wrote {target.relative_to(base)} ({len(record)} bytes); waiting for the daemon to publish it")
    t0 = time.monotonic()
    st = wait_status(s1_cfg, lambda st: seq_of(st, "stats") > before and not st["activity"],
                     f"stats to go past release {before}")
    last = st.get("last", {}).get("publish", {})
    say(f"school-1's daemon published stats release {seq_of(st, 'stats')} by itself "
        f"{time.monotonic() - t0:.1f} s later ({last.get('summary', '?')})")

    step("Trip 2: the change set goes down, the statistics come up")
    ctl(s1_cfg, "exchange", str(stick))
    ctl(m_cfg, "exchange", str(stick))
    ctl(s1_cfg, "exchange", str(stick))
    if seq_of(status_json(s1_cfg), "content") != 2:
        raise DemoFailed("school-1 does not show content release 2 after trip 2")
    say("school-1's status shows content release 2")

    step("school-2 syncs online: one round trip to the master over HTTP")
    (base / "school-2" / "sources" / "stats" / "2026-11-27.json").write_text('{"logins": 7}\n')
    ctl(s2_cfg, "sync", "--wait")
    if seq_of(status_json(s2_cfg), "content") != 2:
        raise DemoFailed("school-2 does not show content release 2 after its online sync")
    say("school-2's status shows content release 2, fetched online")

    step("school-1 has no upstream: `sync` refuses, in one line")
    p = ctl(s1_cfg, "sync", "--wait", codes=(1,))
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    if len(lines) != 1:
        raise DemoFailed(f"`harmonicctl sync --wait` should refuse in one line, printed {len(lines)}")
    say("expected: school-1 is kept in step by stick only.")

    step("Checks")
    deployed = base / "school-1" / "deploy" / "content"
    same = subprocess.run(["diff", "-r", str(content), str(deployed)], capture_output=True, check=False)
    if same.returncode != 0:
        raise DemoFailed("school-1's content differs from the master's")
    say("school-1's content is identical to the master's")
    same2 = subprocess.run(["diff", "-r", str(content), str(base / "school-2" / "deploy" / "content")],
                           capture_output=True, check=False)
    if same2.returncode != 0:
        raise DemoFailed("school-2's content differs from the master's")
    say("school-2's content (online) is identical to the master's")
    got2 = base / "master" / "deploy" / "school-2" / "stats" / "2026-11-27.json"
    if not got2.is_file():
        raise DemoFailed("the master does not hold school-2's statistics, sent online")
    say(f"the master holds school-2's statistics, sent online: {got2.read_text().strip()}")
    got = base / "master" / "deploy" / "school-1" / "stats" / target.name
    if not got.is_file() or got.read_text() != record:
        raise DemoFailed(f"the master does not hold school-1's statistics as written ({got})")
    say(f"the master holds school-1's statistics: {got.read_text()}")
    for cfg in configs.values():
        ctl(cfg, "verify")

    step("What the teacher reads on the stick")
    say((stick / "HARMONIC" / "RECEIPT-school-1.txt").read_text().rstrip())

    step("Status of every server (asked of its daemon)")
    for cfg in configs.values():
        p = ctl(cfg, "status")
        if "daemon running" not in p.stdout:
            raise DemoFailed(f"{cfg.stem}'s status does not come from its daemon")
        print()

    step("Stop the daemons (SIGTERM)")
    for d in daemons:
        rc = d.stop()
        say(f"{d.name}: harmonicd exited {rc}")
        if rc != 0:
            raise DemoFailed(f"harmonicd for {d.name} exited {rc} after SIGTERM:\n{d.output()}")

    step("What the daemons logged")
    for d in daemons:
        print(f"-- {d.name}")
        say(d.output())


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="harmonic-demo-"))
    daemons: list[Daemon] = []
    t0 = time.monotonic()
    try:
        run(base, daemons)
        print(f"\ndemo: every step worked ({time.monotonic() - t0:.0f} s)")
        return 0
    except (DemoFailed, subprocess.TimeoutExpired) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        for d in daemons:
            if d.output():
                print(f"-- {d.name}'s harmonicd log (last lines)", file=sys.stderr)
                print("\n".join(d.output().splitlines()[-15:]), file=sys.stderr)
        return 1
    finally:
        for d in daemons:
            d.kill()
        if os.environ.get("HARMONIC_DEMO_KEEP"):
            print(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

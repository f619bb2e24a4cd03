"""`make demo`: a master and two school servers, each with its running daemon.

Everything lives in a temporary folder. Each server gets its own control
socket there (set at `harmonicctl init`) and its own real `harmonicd`
process; the demo drives them only through the real `harmonicctl`:

* the master publishes content;
* school-1 is kept in step by USB stick, two trips: content down, then a
  change set down and statistics up. The first trip goes through a folder
  standing for a stick and the typed `harmonicctl exchange DIR` (it runs in
  the caller's own process under the store's lock while the daemons run, by
  design: the daemon may not see the caller's folders). The second goes
  through the daemons themselves when the demo runs as root: a real stick
  (an ext4 image on a loop device) is inserted at school-1, then at the
  master, then at school-1 again; `harmonicd-mount` mounts it as the udev
  rule would have systemd start it (no udevd here), the daemons see it by
  themselves, and the demo prints what a teacher sees in their status:
  inserted, busy with progress, safe to remove; then the receipts on the
  stick. Not root (or no loop devices): the second trip goes through the
  folder too, and the demo says why;
* statistics are written into school-1's stats folder while its daemon
  watches it, and the daemon publishes them by itself after a quiet second;
* school-2 is online: its upstream is the master's HTTP listener on
  loopback, and `harmonicctl sync --wait` takes the content down and its
  statistics up in one round trip;
* school-1 has no upstream: `sync --wait` refuses it in one line.

The demo stops at the first step that fails, ends with `verify`, the status
of all three servers and a SIGTERM to each daemon (each must exit 0), and
exits 0 only when every step worked. HARMONIC_DEMO_KEEP=1 keeps the folder.
Whatever happens, the daemons and mount helpers are stopped, the stick
unmounted and its loop device detached.
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
_MOUNT_SCRIPT = Path(sys.executable).parent / "harmonicd-mount"
MOUNT_HELPER = [str(_MOUNT_SCRIPT)] if _MOUNT_SCRIPT.exists() else [sys.executable, "-m", "harmonicd.media.helper"]
STICK_MIB = 128  # the stick image: room for the answer and the broadcast
POLL = 0.05  # seconds between looks at a daemon's status while a stick is in


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


def sh(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if p.returncode != 0:
        raise DemoFailed(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def why_no_loop_sticks() -> str | None:
    """Why the demo cannot insert a real stick here (None: it can)."""
    if os.geteuid() != 0:
        return "not run as root (loop devices and mounts need root)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control is missing)"
    for tool, deb in (("losetup", "mount"), ("blkid", "util-linux"), ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {deb})"
    return None


def use_sticks(config: Path, base: Path) -> None:
    """This server takes loop devices as sticks, mounted under base; blank sticks are adopted."""
    text = config.read_text()
    for key, value in (("devices", '["loop"]'), ("mount_base", json.dumps(str(base))), ("adopt_blank", "true")):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        if n != 1:
            raise DemoFailed(f"{config}: no `{key} = ` line in [media] to set")
    config.write_text(text.replace("[media]\n", "[media]\nwatch = []\n"))
    base.mkdir(parents=True, exist_ok=True)


class Sticks:
    """Real sticks: an image on a loop device, harmonicd-mount started as the udev rule would
    have systemd start it. close() undoes everything, whatever failed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.loops: list[str] = []
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []

    def image(self, path: Path) -> Path:
        with open(path, "wb") as f:
            f.truncate(STICK_MIB << 20)
        sh("mkfs.ext4", "-q", "-F", str(path))
        return path

    def attach(self, image: Path) -> str:
        name = os.path.basename(sh("losetup", "--find", "--show", str(image)).strip())
        self.loops.append(name)
        return name

    def pull(self, name: str) -> None:
        subprocess.run(["losetup", "--detach", f"/dev/{name}"], capture_output=True, check=False)
        if name in self.loops:
            self.loops.remove(name)

    def helper(self, config: Path, name: str) -> subprocess.Popen[bytes]:
        log = open(self.base / f"harmonicd-mount-{config.stem}-{name}.log", "ab")  # noqa: SIM115 (the child's)
        with log:
            p = subprocess.Popen([*MOUNT_HELPER, "--config", str(config), f"/dev/{name}"], stdout=log,
                                 stderr=subprocess.STDOUT)
        self.helpers.append(p)
        return p

    def look(self, image: Path, where: Path) -> None:
        """Mount the image read-only elsewhere, to read what is on it."""
        where.mkdir(exist_ok=True)
        sh("mount", "-o", "ro,loop,noload", str(image), str(where))
        self.mounts.append(where)

    def unlook(self, where: Path) -> None:
        sh("umount", str(where))
        self.mounts.remove(where)

    def close(self) -> None:
        for p in self.helpers:
            if p.poll() is None:
                p.terminate()  # as systemd stops the unit: the helper unmounts
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        for where in self.mounts:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True, check=False)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(str(self.base) + "/"):
                subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        for name in list(self.loops):
            self.pull(name)


def teacher_line(who: str, st: dict[str, Any]) -> str:
    """A stick's status as a person reads it, progress included while it is busy."""
    line = f"[{who}] stick {st['device']}: {st['message']}"
    total, done = st.get("total_bytes"), st.get("done_bytes") or 0
    if st["state"] == "visiting" and total:
        pct = min(done / total, 1.0) * 100
        line += f" -- {pct:5.1f}% ({done / (1 << 20):.1f} of {total / (1 << 20):.1f} MiB)"
        if (st.get("eta_s") or 0) >= 1:
            line += f", about {int(st['eta_s'])} s left"
    return line


def insert_stick(sticks: Sticks, who: str, config: Path, image: Path) -> dict[str, Any]:
    """The teacher plugs the stick in, watches the server's status until it says safe to remove,
    and pulls it. Returns the stick's last status."""
    from harmonicd import ctlclient

    name = sticks.attach(image)
    print(f"$ losetup --find --show {image.name}   # the teacher plugs the stick in: /dev/{name}", flush=True)
    helper = sticks.helper(config, name)
    say(f"(udev would have systemd start harmonicd-stick@{name}.service: harmonicd-mount /dev/{name})")
    socket_path = control_socket(config)
    deadline = time.monotonic() + WAIT
    shown, shown_line, last_progress = "", "", 0.0
    while True:
        _code, st = ctlclient.call(socket_path, "GET", "/v1/status", None, 10)
        stick = next((s for s in st.get("media", {}).get("sticks", []) if s["device"] == name), None)
        if stick is not None:
            line = teacher_line(who, stick)
            key = f"{stick['state']} {stick['message']}"
            now = time.monotonic()
            progress = stick["state"] == "visiting" and stick.get("total_bytes")
            if key != shown or (progress and line != shown_line and now - last_progress >= 0.3):
                say(line)
                shown, shown_line, last_progress = key, line, now
            if stick["state"] == "safe-to-remove":
                break
            if stick["state"] in ("removed-early", "unreadable"):
                raise DemoFailed(f"{who}: stick {name}: {stick['message']}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"{who}: stick {name} not safe to remove after {WAIT:.0f} s: {stick}")
        time.sleep(POLL)
    try:
        helper.wait(30)
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"harmonicd-mount for {name} did not exit after the daemon's unmount request") from None
    sticks.pull(name)
    print(f"$ losetup --detach /dev/{name}   # the teacher pulls the stick out", flush=True)
    return dict(stick)


def control_socket(config: Path) -> str:
    m = re.search(r'(?m)^socket = "([^"]+)"', config.read_text())
    if m is None:
        raise DemoFailed(f"{config}: no `socket = ` line")
    return m.group(1)


def make_content(root: Path, rng: random.Random) -> None:
    for i in range(40):
        page = root / "pages" / f"lesson-{i:02d}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        words = " ".join(rng.choice(["sun", "water", "maths", "reading", "tree", "river"]) for _ in range(300))
        page.write_text(f"<html><body><h1>Lesson {i}</h1><p>{words}</p></body></html>\n")
    (root / "media").mkdir(exist_ok=True)
    (root / "media" / "video.bin").write_bytes(rng.randbytes(3 << 20))
    (root / "catalog.json").write_text(json.dumps({"lessons": 40, "version": 1}))


def run(base: Path, daemons: list[Daemon], sticks: Sticks) -> None:
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
    ctl(m_cfg, "init", "master", "--id", "master", "--state-dir", str(base / "master"),
        "--socket", sock("master"), "--listen", f"127.0.0.1:{port}")
    say("each school is set up from a one-time bootstrap bundle the master makes: no key is copied by "
        "hand; the school enrolls at its first contact (school-1 by stick, school-2 online)")
    for cfg, sid in ((s1_cfg, "school-1"), (s2_cfg, "school-2")):
        bundle = base / f"{sid}.hbundle"
        ctl(m_cfg, "bundle", sid, "--out", str(bundle), *(("--sticks-only",) if sid == "school-1" else ()))
        ctl(cfg, "init", "--bundle", str(bundle), "--state-dir", str(base / sid), "--socket", sock(sid))
        set_publish_option(cfg, "quiet_seconds", str(QUIET))
        say(f"{cfg.name}: [publish] quiet_seconds = {QUIET} (watched folders are published after "
            f"{QUIET} s without change)")

    no_loop = why_no_loop_sticks()
    if no_loop is None:
        step("USB sticks: school-1 and the master take loop devices as sticks ([media] in their configs)")
        for sid in ("master", "school-1"):
            use_sticks(configs[sid], sticks.base / sid)
            say(f"{configs[sid].name}: [media] devices = [\"loop\"], mount_base = media/{sid}, watch = [], "
                "adopt_blank = true (a blank stick is used without `harmonicctl stick prepare`)")

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
    # A new film: enough bytes for the stick's progress to show.
    (content / "media" / "film-2.bin").write_bytes(rng.randbytes(24 << 20))
    ctl(m_cfg, "publish", "content", str(content))

    step("Statistics written at school-1 while its daemon watches the folder")
    stats = base / "school-1" / "sources" / "stats"
    before = seq_of(status_json(s1_cfg), "stats")
    record = json.dumps({"logins": 31, "lessons_opened": 112})
    target = stats / "2026-11-27.json"
    with open(target, "w") as out:  # written in two parts, as a slow program would
        out.write(record[:20])
        out.flush()
        time.sleep(0.3)
        out.write(record[20:])
    say(f"wrote {target.relative_to(base)} ({len(record)} bytes); waiting for the daemon to publish it")
    t0 = time.monotonic()
    st = wait_status(s1_cfg, lambda st: seq_of(st, "stats") > before and not st["activity"],
                     f"stats to go past release {before}")
    last = st.get("last", {}).get("publish", {})
    say(f"school-1's daemon published stats release {seq_of(st, 'stats')} by itself "
        f"{time.monotonic() - t0:.1f} s later ({last.get('summary', '?')})")

    image: Path | None = None
    if no_loop is None:
        step("Trip 2 with a real stick, through the daemons: school-1 -> master -> school-1; nobody types a command")
        image = sticks.image(base / "stick.img")
        say(f"the stick: a blank {STICK_MIB} MiB ext4 image ({image.name}) on a loop device")
        for who, cfg in (("school-1", s1_cfg), ("master", m_cfg), ("school-1", s1_cfg)):
            print(flush=True)
            insert_stick(sticks, who, cfg, image)
    else:
        step("Trip 2 through the folder: the change set goes down, the statistics come up")
        say(f"(no real stick: {no_loop}; as root the demo inserts a loop device instead)")
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
    if image is None:
        say((stick / "HARMONIC" / "RECEIPT-school-1.txt").read_text().rstrip())
    else:
        look = base / "look"
        sticks.look(image, look)
        try:
            for sid in ("master", "school-1"):
                print(f"-- HARMONIC/RECEIPT-{sid}.txt")
                say((look / "HARMONIC" / f"RECEIPT-{sid}.txt").read_text().rstrip())
        finally:
            sticks.unlook(look)

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
    sticks = Sticks(base / "media")
    t0 = time.monotonic()
    try:
        run(base, daemons, sticks)
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
        sticks.close()  # helpers stopped (they unmount), loop devices detached
        for d in daemons:
            d.kill()
        if os.environ.get("HARMONIC_DEMO_KEEP"):
            print(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

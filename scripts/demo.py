"""`make demo`: a master and two school servers in a temporary folder.

The master publishes content; school-1 is kept in step through a folder
standing for a USB stick (two trips: content down, then a change set down
and statistics up); school-2 is enrolled but never visited. Every step runs
the real `harmonicctl` command; the demo stops at the first that fails and
ends with `verify` and the status of all three servers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CTL = [sys.executable, "-m", "harmonicd"]


def step(title: str) -> None:
    print(f"\n== {title}")


def ctl(config: Path, *args: str) -> str:
    cmd = [*CTL, "--config", str(config), *args]
    shown = " ".join(["harmonicctl", *args])
    print(f"$ {shown}")
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = p.stdout.rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if p.stderr.strip():
        print("  " + p.stderr.rstrip().replace("\n", "\n  "))
    if p.returncode != 0:
        raise SystemExit(f"demo failed: `{shown}` exited {p.returncode}")
    return p.stdout.strip()


def make_content(root: Path, rng: random.Random) -> None:
    for i in range(40):
        page = root / "pages" / f"lesson-{i:02d}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        words = " ".join(rng.choice(["sun", "water", "maths", "reading", "tree", "river"]) for _ in range(300))
        page.write_text(f"<html><body><h1>Lesson {i}</h1><p>{words}</p></body></html>\n")
    (root / "media").mkdir(exist_ok=True)
    (root / "media" / "video.bin").write_bytes(rng.randbytes(3 << 20))
    (root / "catalog.json").write_text(json.dumps({"lessons": 40, "version": 1}))


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="harmonic-demo-"))
    rng = random.Random(42)
    try:
        m_cfg, s1_cfg, s2_cfg = base / "master.toml", base / "school-1.toml", base / "school-2.toml"
        stick = base / "stick"
        stick.mkdir()
        content = base / "content"

        step("A master and two school servers")
        mkey = ctl(m_cfg, "init", "master", "--id", "master", "--state-dir", str(base / "master"))
        for cfg, sid in ((s1_cfg, "school-1"), (s2_cfg, "school-2")):
            skey = ctl(cfg, "init", "node", "--id", sid, "--state-dir", str(base / sid), "--master-key", mkey)
            ctl(m_cfg, "enroll", sid, skey)

        step("The master publishes content")
        make_content(content, rng)
        ctl(m_cfg, "publish", "content", str(content))

        step("Trip 1: the teacher carries the stick school-1 -> master -> school-1")
        ctl(s1_cfg, "exchange", str(stick))
        ctl(m_cfg, "exchange", str(stick))
        ctl(s1_cfg, "exchange", str(stick))

        step("A change set on the master, statistics at school-1")
        (content / "pages" / "lesson-03.html").write_text("<html><body><h1>Lesson 3, revised</h1></body></html>\n")
        (content / "pages" / "lesson-39.html").unlink()
        (content / "pages" / "lesson-40.html").write_text("<html><body><h1>A new lesson</h1></body></html>\n")
        with open(content / "media" / "video.bin", "r+b") as f:
            f.seek(1 << 20)
            f.write(rng.randbytes(64 << 10))
        ctl(m_cfg, "publish", "content", str(content))
        stats = base / "school-1" / "sources" / "stats"
        (stats / "2026-11-27.json").write_text(json.dumps({"logins": 31, "lessons_opened": 112}))

        step("Trip 2: the change set goes down, the statistics come up")
        ctl(s1_cfg, "exchange", str(stick))
        ctl(m_cfg, "exchange", str(stick))
        ctl(s1_cfg, "exchange", str(stick))

        step("Checks")
        deployed = base / "school-1" / "deploy" / "content"
        same = subprocess.run(["diff", "-r", str(content), str(deployed)], capture_output=True, check=False)
        if same.returncode != 0:
            raise SystemExit("demo failed: school-1's content differs from the master's")
        print("school-1's content is identical to the master's")
        got = base / "master" / "deploy" / "school-1" / "stats" / "2026-11-27.json"
        print(f"the master holds school-1's statistics: {got.read_text()}")
        for cfg in (m_cfg, s1_cfg, s2_cfg):
            ctl(cfg, "verify")

        step("What the teacher reads on the stick")
        print((stick / "HARMONIC" / "RECEIPT-school-1.txt").read_text())

        step("Status of every server")
        for cfg in (m_cfg, s1_cfg, s2_cfg):
            ctl(cfg, "status")
            print()
        print("demo: every step worked")
        return 0
    finally:
        if os.environ.get("HARMONIC_DEMO_KEEP"):
            print(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

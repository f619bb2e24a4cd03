"""Harmonic benchmarks (not tests): pack size, throughput, publish time, peak memory, chunk sizes.

    make bench                                   # the full suite (about 1 GiB / 100,000 files / 3 GiB)
    .venv/bin/python benchmarks/run.py --quick   # a small smoke run, about 3 minutes
    .venv/bin/python benchmarks/run.py --only pack,pypi --chunks 64

Each benchmark prints a table with Harmonic's figure, the alternative's, the
ratio and the goal, and everything is written to benchmarks/results/latest.md
and latest.json (latest-quick.* for --quick). Generated data lives under
benchmarks/scratch/ (git-ignored): input trees are kept between runs (they are
rebuilt when their parameters change), servers' state folders are removed
after each benchmark. All input is seeded: the same flags give the same bytes.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen
import harness as h
import pypi

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_CHUNK = (16 * KiB, 64 * KiB, 256 * KiB)
GEN_VERSION = 3  # bump when gen.py changes what it writes

FULL = {"tree_mib": 1024, "files": 22_000, "small_files": 100_000, "big_mib": 3072}
QUICK = {"tree_mib": 64, "files": 2_000, "small_files": 5_000, "big_mib": 256}

ALL = ["pack", "pypi", "chunks", "republish", "rss"]


# --------------------------------------------------------------------------- reporting


@dataclass
class Row:
    metric: str
    harmonic: str
    alt_name: str = ""
    alternative: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None


@dataclass
class Table:
    title: str
    note: str = ""
    rows: list[Row] = field(default_factory=list)
    columns: list[str] | None = None  # free-form tables (chunk sizes)
    cells: list[list[str]] = field(default_factory=list)


class Report:
    def __init__(self) -> None:
        self.tables: list[Table] = []
        self.raw: dict[str, Any] = {}

    def add(self, t: Table) -> None:
        self.tables.append(t)
        print(render_table(t, ascii_=True), flush=True)


def mib(n: float) -> str:
    return f"{n / MiB:,.2f} MiB"


def size(n: float) -> str:
    return mib(n) if n >= MiB else f"{n / KiB:,.1f} KiB"


def secs(s: float) -> str:
    return f"{s:.2f} s"


def rate(n: float, s: float) -> str:
    return f"{n / MiB / s:,.0f} MiB/s" if s > 0 else "-"


def verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "NOT met")


def render_table(t: Table, ascii_: bool = False) -> str:
    if t.columns:
        head, body = t.columns, t.cells
    else:
        head = ["metric", "Harmonic", "alternative", "ratio", "goal", ""]
        body = [[r.metric, r.harmonic, f"{r.alt_name}: {r.alternative}" if r.alt_name else r.alternative,
                 f"{r.ratio:.2f}x" if r.ratio is not None else "", r.goal, verdict(r.met)] for r in t.rows]
    if ascii_:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"\n== {t.title}", line.format(*head), line.format(*("-" * w for w in widths))]
        out += [line.format(*row) for row in body]
        if t.note:
            out.append(f"   ({t.note})")
        return "\n".join(out)
    out = [f"### {t.title}", ""]
    if t.note:
        out += [t.note, ""]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- inputs (cached by parameters)


def _stamp_ok(path: str, params: dict[str, Any]) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def _stamp(path: str, params: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(params, f)


def school_inputs(work: str, seed: int, total: int, files: int) -> tuple[str, str, dict[str, int]]:
    tag = f"school-{total // MiB}m-{files}"
    v1, v2 = os.path.join(work, f"{tag}-v1"), os.path.join(work, f"{tag}-v2")
    stamp = os.path.join(work, f"{tag}.stamp")
    params = {"v": GEN_VERSION, "seed": seed, "total": total, "files": files}
    counts_path = os.path.join(work, f"{tag}.changes.json")
    if not _stamp_ok(stamp, params):
        print(f"generating the school tree ({total / MiB:.0f} MiB, ~{files} files) and its change set", flush=True)
        t0 = time.perf_counter()
        specs = gen.school_tree(v1, seed, total, files)
        counts = gen.school_changes(v1, v2, specs, seed, scale=files / FULL["files"])
        with open(counts_path, "w") as f:
            json.dump(counts, f)
        _stamp(stamp, params)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    with open(counts_path) as f:
        counts = json.load(f)
    return v1, v2, counts


def pypi_inputs(work: str, quick: bool) -> tuple[str, str, dict[str, str]]:
    pairs = pypi.QUICK if quick else pypi.PAIRS
    tag = "pypi-quick" if quick else "pypi"
    v1, v2 = os.path.join(work, f"{tag}-v1"), os.path.join(work, f"{tag}-v2")
    stamp = os.path.join(work, f"{tag}.stamp")
    params = {"pairs": pairs}
    tops_path = os.path.join(work, f"{tag}.tops.json")
    if not _stamp_ok(stamp, json.loads(json.dumps(params))):
        print("preparing the PyPI pair (downloads are cached in benchmarks/scratch/pypi-cache)", flush=True)
        tops = pypi.build(os.path.join(work, "pypi-cache"), v1, v2, pairs)
        with open(tops_path, "w") as f:
            json.dump(tops, f)
        _stamp(stamp, params)
    with open(tops_path) as f:
        return v1, v2, json.load(f)


def small_inputs(work: str, seed: int, files: int) -> str:
    root = os.path.join(work, f"small-{files}")
    stamp = os.path.join(work, f"small-{files}.stamp")
    params = {"v": GEN_VERSION, "seed": seed, "files": files}
    if not _stamp_ok(stamp, params):
        print(f"generating {files} small files", flush=True)
        gen.small_tree(root, seed, files)
        _stamp(stamp, params)
    return root


def big_inputs(work: str, seed: int, total: int) -> str:
    root = os.path.join(work, f"big-{total // MiB}m")
    stamp = os.path.join(work, f"big-{total // MiB}m.stamp")
    params = {"v": GEN_VERSION, "seed": seed, "total": total}
    if not _stamp_ok(stamp, params):
        print(f"generating the {total / GiB:.2f} GiB tree", flush=True)
        gen.big_tree(root, seed, total)
        _stamp(stamp, params)
    return root


# --------------------------------------------------------------------------- the sync flow


def sync_flow(base: str, v1: str, v2: str | None, chunk: tuple[int, int, int] | None = None,
              keep: bool = False, repeat: int = 1, small_rounds: int = 0) -> dict[str, Any]:
    """Master publishes v1; the school gets it through a folder (school, master, school);
    the master publishes v2; school, master: the master's pack for the change; school
    imports it. Every harmonicctl call is timed separately (wall, CPU, peak RSS), and
    the school's deployed tree is checked against v1 and then v2.

    With repeat > 1 the first sync's export and import are run that many times (the
    request pack and the school's state before the import are put back each time) and
    the fastest run is kept: other work on the machine slows single runs down.

    small_rounds > 0: then as many more releases that each change one small file
    (the everyday case): their import time, and how many of the deployed files were
    hard-linked from the previous deployment rather than written again."""
    m, s, stick = h.make_pair(base, chunk)
    r: dict[str, Any] = {"chunk": list(chunk or DEFAULT_CHUNK)}
    to_master = os.path.join(stick, "HARMONIC", "to-master")

    def step(key: str, *args: str, server: h.Server = m) -> h.Run:
        # syncfs() inside Harmonic flushes the whole file system: write back
        # everything that is dirty first, so no step pays for another's writes.
        h.settle()
        run = server.ctl(*args)
        r[key] = {"wall": run.wall, "cpu": run.cpu, "maxrss": run.maxrss}
        return run

    step("publish1", "publish", "content", v1)
    r["objects_v1"], r["store_bytes_v1"] = m.object_count()
    step("republish1", "publish", "content", v1)
    step("request1", "exchange", stick, server=s)
    saved = os.path.join(base, "saved")
    os.makedirs(saved)
    requests = [shutil.copy2(os.path.join(to_master, f), saved) for f in os.listdir(to_master)]
    out = step("export_full", "exchange", stick)
    best_of(r, "export_full", repeat, lambda: [shutil.copy2(p, to_master) for p in requests],
            lambda: step("export_full", "exchange", stick))
    packs = h.packs_for(stick, s.name)
    r["full_pack_bytes"] = sum(os.path.getsize(p) for p in packs)
    r["full_pack_volumes"] = len(packs)
    r["full_pack_objects"] = h.objects_in_output(out.stdout)
    if repeat > 1:
        school_saved = os.path.join(saved, "school-state")
        shutil.copytree(s.state, school_saved, symlinks=True)
        for p in packs:
            os.link(p, os.path.join(saved, os.path.basename(p)))
    step("import_full", "exchange", stick, server=s)

    def restore_school() -> None:
        shutil.rmtree(s.state)
        shutil.copytree(school_saved, s.state, symlinks=True)
        for p in packs:
            os.link(os.path.join(saved, os.path.basename(p)), p)
        for f in os.listdir(to_master):
            os.unlink(os.path.join(to_master, f))

    best_of(r, "import_full", repeat, restore_school, lambda: step("import_full", "exchange", stick, server=s))
    shutil.rmtree(saved, ignore_errors=True)
    r["full_ok"] = h.tree_digest(s.deployed) == h.input_digest(v1)
    if v2 is not None:
        step("publish2", "publish", "content", v2)
        step("request2", "exchange", stick, server=s)
        out = step("export_change", "exchange", stick)
        packs = h.packs_for(stick, s.name)
        r["change_pack_bytes"] = sum(os.path.getsize(p) for p in packs)
        r["change_pack_volumes"] = len(packs)
        r["change_pack_objects"] = h.objects_in_output(out.stdout)
        r["change_anatomy"] = asdict(h.anatomy(packs))
        step("import_change", "exchange", stick, server=s)
        r["change_ok"] = h.tree_digest(s.deployed) == h.input_digest(v2)
        if small_rounds:
            # Next to v2, on its file system: the copy hard-links v2's files.
            src_next = os.path.join(os.path.dirname(v2), f".src-next-{os.path.basename(base)}")
            shutil.rmtree(src_next, ignore_errors=True)
            r["small_rounds"] = small_changes(m, s, stick, v2, src_next, small_rounds, step)
            shutil.rmtree(src_next, ignore_errors=True)
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return r


def small_changes(m: h.Server, s: h.Server, stick: str, v2: str, src: str, rounds: int,
                  step: Any) -> list[dict[str, Any]]:
    """Releases that each rewrite one small page of a copy of v2; per round: the pack,
    the import time, and deployed files linked from the previous deployment or written."""
    subprocess.run(["cp", "-al", v2, src], check=True)
    pages = sorted(rel for rel in h.walk_files(src) if rel.endswith(".html"))
    out = []
    for i in range(rounds):
        before = h.deployed_inodes(s.deployed)
        rel = pages[(i * 7919) % len(pages)]
        p = os.path.join(src, rel)
        with open(p, "rb") as f:
            data = f.read()
        os.unlink(p)  # a new file: the old one is a hard link shared with v2
        with open(p, "wb") as f:
            f.write(data.replace(b"</main>", f"<p>Update {i + 1}.</p></main>".encode(), 1))
        time.sleep(1.1)  # releases are not made within one timestamp tick of each other
        step(f"publish_small{i}", "publish", "content", src)
        step(f"request_small{i}", "exchange", stick, server=s)
        step(f"export_small{i}", "exchange", stick)
        packs = h.packs_for(stick, s.name)
        size = sum(os.path.getsize(x) for x in packs)
        run = step(f"import_small{i}", "exchange", stick, server=s)
        after = h.deployed_inodes(s.deployed)
        linked = sum(1 for k, ino in after.items() if before.get(k) == ino)
        out.append({"pack_bytes": size, "import_s": run.wall, "import_cpu": run.cpu, "files": len(after),
                    "linked": linked, "written": len(after) - linked})
    ok = h.tree_digest(s.deployed) == h.tree_digest(src)
    for o in out:
        o["ok"] = ok
    shutil.rmtree(src, ignore_errors=True)
    return out


def best_of(r: dict[str, Any], key: str, repeat: int, reset: Any, again: Any) -> None:
    """Run a step repeat-1 more times (reset() before each) and keep the fastest in r[key]."""
    runs = [r[key]]
    for _ in range(repeat - 1):
        reset()
        again()
        runs.append(r[key])
    r[key] = dict(min(runs, key=lambda x: x["wall"]))
    r[key]["runs"] = [x["wall"] for x in runs]


def publish_best(base: str, tree: str, repeat: int) -> dict[str, Any]:
    """First publish of tree into a new master, then an unchanged re-publish; best of repeat."""
    runs = []
    for _ in range(repeat):
        m, _s, _stick = h.make_pair(base)
        h.settle()
        first = m.ctl("publish", "content", tree)
        h.settle()
        again = m.ctl("publish", "content", tree)
        runs.append((first, again))
        shutil.rmtree(base, ignore_errors=True)
    return {"first": min(f.wall for f, _ in runs), "again": min(g.wall for _, g in runs),
            "first_runs": "/".join(f"{f.wall:.2f}" for f, _ in runs) + " s",
            "first_rss": max(f.maxrss for f, _ in runs), "again_rss": max(g.maxrss for _, g in runs),
            "first_cpu": min(f.cpu for f, _ in runs)}


def check_ok(r: dict[str, Any], what: str) -> None:
    for k in ("full_ok", "change_ok"):
        if r.get(k) is False:
            print(f"!! {what}: the school's deployed tree differs from the published one ({k})", flush=True)


# --------------------------------------------------------------------------- benchmarks


def pack_size_rows(r: dict[str, Any], ideal: h.Ideal, rs: h.RsyncBatch) -> list[Row]:
    pack = r["change_pack_bytes"]
    return [
        Row("pack for the change vs ideal delta", mib(pack), "ideal (zstd -3)", mib(ideal.bytes),
            pack / ideal.bytes, "<= 1.10x", pack <= 1.10 * ideal.bytes),
        Row("pack for the change vs rsync batch", mib(pack), "rsync batch + zstd -3", mib(rs.zstd),
            pack / rs.zstd, "< 1.00x", pack < rs.zstd),
        Row("objects in the pack", str(r["change_pack_objects"]), "rsync batch raw", mib(rs.raw)),
        Row("master: export of the change", secs(r["export_change"]["wall"]), "school: import",
            secs(r["import_change"]["wall"])),
    ]


def ideal_note(ideal: h.Ideal) -> str:
    return (f"ideal: {ideal.small_files} new/changed files <= 1 MiB ({mib(ideal.small_bytes)} after zstd -3), "
            f"{ideal.large_files} changed files > 1 MiB ({mib(ideal.large_bytes)} for their changed ranges), "
            f"{ideal.renamed} renamed (free), {ideal.deleted} deleted, {ideal.unchanged} unchanged; "
            f"raw changed bytes {mib(ideal.raw_changed)}")


def bench_pack(a: argparse.Namespace, rep: Report) -> None:
    v1, v2, counts = school_inputs(a.work, a.seed, a.tree_mib * MiB, a.files)
    nfiles, nbytes = h.tree_bytes(v1)
    print(f"\nschool tree: {nfiles} files, {mib(nbytes)}; change set: {counts}", flush=True)
    cp = min(h.cp_sync(v1, os.path.join(a.state, "cp-target")) for _ in range(a.repeat))
    pub = publish_best(os.path.join(a.state, "flow-publish"), v1, a.repeat)
    r = sync_flow(os.path.join(a.state, "flow-school"), v1, v2, keep=a.keep, repeat=a.repeat,
                  small_rounds=a.small_rounds)
    check_ok(r, "school tree")
    zb = h.zstd_baseline(v1, os.path.join(a.state, "zstd"))
    ideal = h.ideal_delta(v1, v2)
    rs = h.rsync_batch(v1, v2, os.path.join(a.state, "rsync"))
    rep.raw["school"] = {"files": nfiles, "bytes": nbytes, "changes": counts, "flow": r, "cp_sync_s": cp,
                         "publish": pub,
                         "zstd": asdict(zb), "ideal": asdict(ideal), "rsync": asdict(rs)}
    rep.raw.setdefault("chunks", {}).setdefault("school", {})[fmt_chunk(DEFAULT_CHUNK)] = {
        "flow": r, "ideal": ideal.bytes}
    rep.add(Table(f"Pack size: generated change set ({nfiles} files, {mib(nbytes)})",
                  note=ideal_note(ideal) + f". Change set: {counts}. "
                  + h.anatomy_note(h.Anatomy(**r["change_anatomy"])),
                  rows=pack_size_rows(r, ideal, rs)))
    exp, imp = r["export_full"]["wall"], r["import_full"]["wall"]
    zc, zd = zb.compress_s, zb.decompress_s
    runs = f"best of {a.repeat}: " if a.repeat > 1 else ""
    if r.get("small_rounds"):
        rows = []
        for i, x in enumerate(r["small_rounds"]):
            rows.append(Row(f"release {3 + i}: one page changed", f"import {secs(x['import_s'])}",
                            "files hard-linked / written again", f"{x['linked']} / {x['written']}",
                            None, "1 written", x["written"] <= 1))
        rep.add(Table(f"Everyday releases: one small page changed in the {nfiles}-file tree",
                      note="after the v1 and v2 syncs; 1.1 s between releases; pack sizes "
                      + ", ".join(size(x["pack_bytes"]) for x in r["small_rounds"])
                      + "; a deployment should hard-link every unchanged file from the previous one",
                      rows=rows))
    rep.add(Table(
        f"Throughput: first sync of the whole tree ({mib(nbytes)}, full pack {mib(r['full_pack_bytes'])})",
        note=(f"Harmonic: wall time ({runs}export {h.fmt_runs(r['export_full'])}, import "
              f"{h.fmt_runs(r['import_full'])}) of each `harmonicctl exchange` (master export: plan, read, "
              "compress, write, fsync; school import: verify, store, deploy, fsync); "
              f"zstd: one tar of the tree ({mib(zb.raw)}), zstd -3 -T1 to a file ({mib(zb.compressed)}), "
              "zstd -d to a file, each also timed with a `sync` after it (durable, as Harmonic is); "
              "page cache warm"),
        rows=[
            Row("export (master writes the pack)", rate(nbytes, exp), "zstd -3 -T1", rate(zb.raw, zc),
                (nbytes / exp) / (zb.raw / zc), ">= 0.50x", (nbytes / exp) >= 0.5 * (zb.raw / zc)),
            Row("import (school reads, stores, deploys)", rate(nbytes, imp), "zstd -d", rate(zb.raw, zd),
                (nbytes / imp) / (zb.raw / zd), ">= 0.50x", (nbytes / imp) >= 0.5 * (zb.raw / zd)),
            Row("export, against a durable zstd", rate(nbytes, exp), "zstd -3 -T1 + sync",
                rate(zb.raw, zb.compress_sync_s), (nbytes / exp) / (zb.raw / zb.compress_sync_s)),
            Row("import, against a durable zstd", rate(nbytes, imp), "zstd -d + sync",
                rate(zb.raw, zb.decompress_sync_s), (nbytes / imp) / (zb.raw / zb.decompress_sync_s)),
            Row("import, against copying the tree", rate(nbytes, imp), "cp -a + sync", rate(nbytes, cp),
                (nbytes / imp) / (nbytes / cp)),
            Row("full pack size", mib(r["full_pack_bytes"]), "zstd -3 of the tar", mib(zb.compressed),
                r["full_pack_bytes"] / zb.compressed),
            Row("export / import wall time", f"{secs(exp)} / {secs(imp)}", "zstd -3 / -d", f"{secs(zc)} / {secs(zd)}"),
            Row("export / import CPU time", f"{secs(r['export_full']['cpu'])} / {secs(r['import_full']['cpu'])}"),
        ]))
    p1, rp = pub["first"], pub["again"]
    rep.add(Table(f"Publish: {nfiles} files, {mib(nbytes)}",
                  note=f"best of {a.repeat} (first publish: {pub['first_runs']}, into a new master each time; "
                  f"cp -a + sync likewise); page cache warm; cp -a to the same file system",
                  rows=[
                      Row("first publish", secs(p1), "cp -a + sync", secs(cp), p1 / cp, "<= 2.00x", p1 <= 2 * cp),
                      Row("re-publish, nothing changed", secs(rp)),
                      Row("peak RSS: first publish / re-publish", f"{mib(pub['first_rss'])} / {mib(pub['again_rss'])}"),
                      Row("publish of the change (v2)", secs(r["publish2"]["wall"])),
                      Row("objects after the first publish", f"{r['objects_v1']} ({mib(r['store_bytes_v1'])})"),
                  ]))


def bench_pypi(a: argparse.Namespace, rep: Report) -> None:
    v1, v2, tops = pypi_inputs(a.work, a.quick)
    nfiles, nbytes = h.tree_bytes(v2)
    r = sync_flow(os.path.join(a.state, "flow-pypi"), v1, v2, keep=a.keep)
    check_ok(r, "PyPI pair")
    ideal = h.ideal_delta(v1, v2, pypi.counterpart(tops))
    rs = h.rsync_batch(v1, v2, os.path.join(a.state, "rsync"))
    # The same change with the top folders keeping their v1 names: what the renames cost.
    same = pypi.same_names(v2, tops, os.path.join(a.work, "pypi-v2-samenames"))
    r_same = sync_flow(os.path.join(a.state, "flow-pypi-same"), v1, same, keep=a.keep)
    check_ok(r_same, "PyPI pair without renames")
    rs_same = h.rsync_batch(v1, same, os.path.join(a.state, "rsync"))
    shutil.rmtree(same, ignore_errors=True)
    pairs = pypi.QUICK if a.quick else pypi.PAIRS
    rep.raw["pypi"] = {"files": nfiles, "bytes": nbytes, "pairs": pairs, "flow": r,
                       "ideal": asdict(ideal), "rsync": asdict(rs), "same_names_flow": r_same,
                       "same_names_rsync": asdict(rs_same)}
    chunks = rep.raw.setdefault("chunks", {})
    chunks.setdefault("pypi", {})[fmt_chunk(DEFAULT_CHUNK)] = {"flow": r, "ideal": ideal.bytes}
    chunks.setdefault("pypi, no renames", {})[fmt_chunk(DEFAULT_CHUNK)] = {"flow": r_same, "ideal": ideal.bytes}
    rows = pack_size_rows(r, ideal, rs)
    ps = r_same["change_pack_bytes"]
    rows.append(Row("same change, top folders not renamed", mib(ps), "rsync batch + zstd -3", mib(rs_same.zstd),
                    ps / rs_same.zstd, "", None))
    rows.append(Row("same change, top folders not renamed, vs ideal", mib(ps), "ideal (zstd -3)", mib(ideal.bytes),
                    ps / ideal.bytes))
    rep.add(Table(f"Pack size: PyPI pair ({len(pairs)} sdists, version N -> N+1, {nfiles} files, "
                  f"{mib(nbytes)})",
                  note=ideal_note(ideal) + "; every file is renamed (its top folder carries the version), "
                  "rsync sees only new files. " + h.anatomy_note(h.Anatomy(**r["change_anatomy"]))
                  + ". Without the renames: " + h.anatomy_note(h.Anatomy(**r_same["change_anatomy"])),
                  rows=rows))


def fmt_chunk(c: tuple[int, int, int] | list[int]) -> str:
    return "/".join(f"{x // KiB}K" for x in c)


def bench_chunks(a: argparse.Namespace, rep: Report) -> None:
    sets = [(avg * KiB // 4, avg * KiB, avg * KiB * 4) for avg in a.chunks]
    data = rep.raw.setdefault("chunks", {})
    inputs: list[tuple[str, str, str, h.Ideal]] = []
    v1, v2, _ = school_inputs(a.work, a.seed, a.tree_mib * MiB, a.files)
    inputs.append(("school", v1, v2, h.ideal_delta(v1, v2)))
    same = None
    if "pypi" not in a.skip:
        p1, p2, tops = pypi_inputs(a.work, a.quick)
        ideal = h.ideal_delta(p1, p2, pypi.counterpart(tops))
        inputs.append(("pypi", p1, p2, ideal))
        # The same pair with the top folders keeping their names: old versions are found
        # at the same paths, so unchanged bytes go as zstd patches whatever the chunking.
        same = pypi.same_names(p2, tops, os.path.join(a.work, "pypi-v2-samenames"))
        inputs.append(("pypi, no renames", p1, same, ideal))
    cells = []
    for name, v1, v2, ideal in inputs:
        for c in sets:
            key = fmt_chunk(c)
            got = data.setdefault(name, {}).get(key)
            if got is None:
                print(f"chunk sizes: {name} with min/avg/max {key}", flush=True)
                r = sync_flow(os.path.join(a.state, f"flow-chunks-{name}"), v1, v2, c, keep=False)
                check_ok(r, f"{name} {key}")
                got = data[name][key] = {"flow": r, "ideal": ideal.bytes}
            r = got["flow"]
            cells.append([name, key + (" (current)" if tuple(c) == DEFAULT_CHUNK else ""),
                          mib(r["change_pack_bytes"]), f"{r['change_pack_bytes'] / ideal.bytes:.3f}x",
                          str(r["change_pack_objects"]), str(r["objects_v1"]), secs(r["publish1"]["wall"]),
                          mib(r["full_pack_bytes"]), secs(r["export_full"]["wall"]),
                          secs(r["import_full"]["wall"])])
    if same is not None:
        shutil.rmtree(same, ignore_errors=True)
    rep.add(Table("Chunk sizes (FastCDC min/avg/max; min = avg/4, max = avg*4)",
                  note="pack = the master's pack for the change; objects = objects in the store after "
                       "publishing v1; publish = first publish of v1; full pack / export / import = first sync "
                       "(single runs: timings are noisy). 'pypi, no renames': v2's top folders keep their v1 "
                       "names (ratio against the same ideal)",
                  columns=["data", "min/avg/max", "pack", "vs ideal", "pack objects", "objects v1",
                           "publish v1", "full pack", "export", "import"],
                  cells=cells))


def bench_republish(a: argparse.Namespace, rep: Report) -> None:
    root = small_inputs(a.work, a.seed, a.small_files)
    nfiles, nbytes = h.tree_bytes(root)
    base = os.path.join(a.state, "flow-small")
    m, _s, _stick = h.make_pair(base)
    h.settle()
    first = m.ctl("publish", "content", root)
    again = []
    for _ in range(3):
        h.settle()
        again.append(m.ctl("publish", "content", root))
    cp = min(h.cp_sync(root, os.path.join(a.state, "cp-target")) for _ in range(a.repeat))
    walls = sorted(x.wall for x in again)
    rep.raw["republish"] = {"files": nfiles, "bytes": nbytes, "first": first.wall, "again": [x.wall for x in again],
                            "again_cpu": [x.cpu for x in again], "again_maxrss": [x.maxrss for x in again],
                            "cp_sync_s": cp}
    rep.add(Table(f"Publish: {nfiles} small files ({mib(nbytes)})",
                  note="page cache warm; each figure is one `harmonicctl publish` process, start-up included",
                  rows=[
                      Row("re-publish, nothing changed (median of 3)", secs(walls[1]), "", "", None, "< 2 s",
                          walls[1] < 2.0),
                      Row("re-publish, slowest of 3", secs(walls[-1]), "", "", None, "< 2 s", walls[-1] < 2.0),
                      Row("first publish", secs(first.wall), "cp -a + sync", secs(cp), first.wall / cp, "<= 2.00x",
                          first.wall <= 2 * cp),
                      Row("peak RSS: first publish / re-publish",
                          f"{mib(first.maxrss)} / {mib(max(x.maxrss for x in again))}"),
                  ]))
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


def bench_rss(a: argparse.Namespace, rep: Report) -> None:
    root = big_inputs(a.work, a.seed, a.big_mib * MiB)
    nfiles, nbytes = h.tree_bytes(root)
    r = sync_flow(os.path.join(a.state, "flow-big"), root, None, keep=a.keep)
    check_ok(r, "big tree")
    rep.raw["rss"] = {"files": nfiles, "bytes": nbytes, "flow": r}
    limit = 150 * MiB
    rows = [Row(f"peak RSS: {what}", mib(r[k]["maxrss"]), "", "", None, "< 150 MiB", r[k]["maxrss"] < limit)
            for what, k in (("export (master exchange)", "export_full"), ("import (school exchange)", "import_full"))]
    rows += [Row("peak RSS: publish", mib(r["publish1"]["maxrss"])),
             Row("pack size / volumes", f"{mib(r['full_pack_bytes'])} / {r['full_pack_volumes']}"),
             Row("publish / export / import wall", f"{secs(r['publish1']['wall'])} / {secs(r['export_full']['wall'])}"
                 f" / {secs(r['import_full']['wall'])}", "throughput export / import",
                 f"{rate(nbytes, r['export_full']['wall'])} / {rate(nbytes, r['import_full']['wall'])}")]
    rep.add(Table(f"Peak memory: first sync of {nfiles} files, {mib(nbytes)}",
                  note="max RSS of each harmonicctl child process (os.wait4)", rows=rows))


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    def tool(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "missing"

    import harmonicd

    commit = str(h.CODE["commit"]) if h.CODE["path"] else tool(["git", "-C", h.REPO, "rev-parse", "--short", "HEAD"])
    if h.CODE.get("dirty"):
        commit += " + uncommitted changes"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "harmonicd": harmonicd.__version__, "zstd": tool(["zstd", "--version"]),
            "rsync": tool(["rsync", "--version"]), "commit": commit,
            "code": "snapshot taken at the start" if h.CODE["path"] else "working tree (may change mid-run)"}


def summary(tables: list[Table]) -> Table:
    """Every row that has a goal, in one table."""
    t = Table("Summary: the goals")
    for tab in tables:
        for r in tab.rows:
            if r.goal:
                t.rows.append(Row(f"{tab.title.split(' (')[0]} — {r.metric}", r.harmonic, r.alt_name, r.alternative,
                                  r.ratio, r.goal, r.met))
    return t


def render_md(data: dict[str, Any]) -> str:
    mach = data["machine"]
    tables = [Table(**{**t, "rows": [Row(**r) for r in t["rows"]]}) for t in data["tables"]]
    md = ["# Harmonic benchmark results", "",
          f"Command: `{data['command'].strip()}`  ", f"Date: {data.get('date', '?')}  ",
          f"Machine: {mach['cpus']} CPUs, {mach['platform']}, Python {mach['python']}, {mach['zstd']}, "
          f"{mach['rsync']}  ", f"harmonicd {mach['harmonicd']} at commit {mach['commit']} "
          f"({mach.get('code', 'working tree')})  ",
          f"Servers' state and timed outputs on: {data.get('raw', {}).get('state_fs', '?')}  ",
          f"Total run time: {data['elapsed_s'] / 60:.1f} min", "",
          "Method and caveats: docs/benchmarks.md. Timings are wall-clock seconds of whole `harmonicctl` "
          "processes on a shared 2-core VM; sizes are exact and reproducible.", ""]
    md.append(render_table(summary(tables)))
    md += [render_table(t) for t in tables]
    return "\n".join(md)


def write_results(a: argparse.Namespace, rep: Report, elapsed: float) -> None:
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    data = {"command": "python benchmarks/run.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "elapsed_s": elapsed,
            "tables": [asdict(t) for t in rep.tables], "raw": rep.raw}
    with open(a.out + ".json", "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(a.out + ".md", "w") as f:
        f.write(render_md(json.loads(json.dumps(data, default=str))))
    print(render_table(summary(rep.tables), ascii_=True))
    print(f"\nresults written to {a.out}.md and {a.out}.json ({elapsed / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tree-mib", type=int, help="size of the generated school tree (default 1024)")
    p.add_argument("--files", type=int, help="files in the school tree (default ~22,000)")
    p.add_argument("--small-files", type=int, help="files in the re-publish tree (default 100,000)")
    p.add_argument("--big-mib", type=int, help="size of the peak-memory tree (default 3072)")
    p.add_argument("--chunks", default="16,32,64,128", help="average chunk sizes to compare, in KiB")
    p.add_argument("--work", default=os.path.join(h.HERE, "scratch"))
    p.add_argument("--fs", choices=("image", "work"), default=None,
                   help="where servers keep their state: a fresh journaled ext4 image mounted under the work "
                        "folder (default when root), or the work folder itself")
    p.add_argument("--out", help="results file without extension (default benchmarks/results/latest)")
    p.add_argument("--keep", action="store_true", help="keep the servers' state folders")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown next to a results JSON file")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run the working tree's harmonicd as it is at each step (default: a copy taken at the start)")
    p.add_argument("--small-rounds", type=int, default=3,
                   help="releases changing one page after the generated change set (default 3)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of the first sync's export and import (the fastest counts; default 2)")
    a = p.parse_args(argv)
    if a.render:
        h.rerender(a.render, render_md)
        return 0
    sizes = QUICK if a.quick else FULL
    for k, v in sizes.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.chunks = [int(x) for x in a.chunks.split(",") if x]
    a.skip = {x for x in a.skip.split(",") if x}
    only = [x for x in a.only.split(",") if x and x not in a.skip]
    unknown = set(only) - set(ALL)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if a.out is None:
        # Quick runs are smoke tests: their results stay out of git.
        a.out = os.path.join(a.work, "results-quick") if a.quick else os.path.join(h.HERE, "results", "latest")
    a.work = os.path.abspath(a.work)
    os.makedirs(a.work, exist_ok=True)
    for tool in ("rsync", "zstd"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is missing: run `sh scripts/deb-deps.sh rsync zstd` as root")
    if not a.no_snapshot:
        info = h.snapshot_code(os.path.join(a.work, "code"))
        print(f"harmonicd: snapshot of commit {info['commit']}{' + uncommitted changes' if info['dirty'] else ''}"
              f" in {info['path']}", flush=True)
    t0 = time.perf_counter()
    rep = Report()
    with h.state_area(a.fs, a.work) as (a.state, rep.raw["state_fs"]):
        print(f"server state on: {rep.raw['state_fs']} ({a.state})", flush=True)
        run_all(a, rep, only)
    write_results(a, rep, time.perf_counter() - t0)
    return 0


def run_all(a: argparse.Namespace, rep: Report, only: list[str]) -> None:
    steps = {"pack": bench_pack, "pypi": bench_pypi, "chunks": bench_chunks, "republish": bench_republish,
             "rss": bench_rss}
    for name in ALL:
        if name in only:
            t = time.perf_counter()
            print(f"\n--- {name}", flush=True)
            rep.raw.setdefault("loadavg", {})[name] = os.getloadavg()
            steps[name](a, rep)
            rep.raw.setdefault("timing", {})[name] = time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())

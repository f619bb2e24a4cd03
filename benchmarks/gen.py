"""Seeded generators of benchmark trees and change sets.

Everything here is a pure function of its seed and sizes: the same call
writes the same bytes, names and modification times on any machine.

* ``school_tree``: content shaped like a school's: many small HTML pages and
  JSON metadata files (text-like, compressible), CSS/JS, medium images and
  documents (images are incompressible; documents mix text and embedded
  images), and a few large videos that fill the tree up to its target size.
* ``school_changes``: a realistic next release made from a hard-linked copy
  of the tree (files are replaced, never written in place, so the original
  stays intact): edits inside small files, appends to documents, a 1 MiB
  region rewritten in a large file, files added, deleted and renamed, and a
  folder moved.
* ``small_tree``: N small files (for the unchanged re-publish of 100,000 files).
* ``big_tree``: mostly large incompressible files plus some small ones (peak RSS).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Fixed modification times: v1 files are dated T_V1, files changed in v2 T_V2,
# so rsync's quick check (size + mtime) sees every changed file.
T_V1 = 1_700_000_000
T_V2 = T_V1 + 86_400

SUBJECTS = ["mathematics", "science", "history", "geography", "language", "french", "english", "art",
            "music", "biology", "physics", "chemistry", "civics", "computing"]

# --------------------------------------------------------------------------- content


def _rng(seed: int | str) -> random.Random:
    return random.Random(hashlib.blake2b(str(seed).encode(), digest_size=8).digest())


class Words:
    """Word-level pseudo-text with a Zipf vocabulary: compresses like prose (zstd -3: 2.2-3x)."""

    LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
    FREQ = (12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
            1.0, 0.8, 0.15, 0.15, 0.1, 0.07)

    def __init__(self, seed: int, size: int = 20_000) -> None:
        rng = _rng(f"vocab-{seed}")
        self.vocab = []
        for _ in range(size):
            n = max(1, min(14, int(rng.expovariate(1 / 5)) + 1))
            self.vocab.append("".join(rng.choices(self.LETTERS, self.FREQ, k=n)))
        self.cw = list(itertools.accumulate(1 / (i + 1) ** 1.05 for i in range(size)))

    def text(self, rng: random.Random, nbytes: int) -> str:
        k = max(1, nbytes // 6)
        return " ".join(rng.choices(self.vocab, cum_weights=self.cw, k=k))

    def sentence(self, rng: random.Random, words: int = 12) -> str:
        s = " ".join(rng.choices(self.vocab, cum_weights=self.cw, k=words))
        return s[:1].upper() + s[1:] + "."

    def paragraphs(self, rng: random.Random, nbytes: int) -> list[str]:
        out, got = [], 0
        while got < nbytes:
            p = self.text(rng, min(nbytes - got, rng.randint(200, 1400)))
            out.append(p[:1].upper() + p[1:] + ".")
            got += len(p) + 8
        return out


_WORDS: Words | None = None


def words() -> Words:
    global _WORDS
    if _WORDS is None:
        _WORDS = Words(7)
    return _WORDS


NAV = "".join(f'<li><a href="/courses/{s}/index.html">{s.title()}</a></li>' for s in SUBJECTS)


def html_page(rng: random.Random, size: int, title: str) -> bytes:
    w = words()
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<link rel="stylesheet" href="/site/assets/css/main.css">\n'
            '<script src="/site/assets/js/app.js" defer></script>\n</head>\n<body>\n'
            f'<header><nav><ul>{NAV}</ul></nav></header>\n<main>\n<h1>{title}</h1>\n')
    tail = '</main>\n<footer><p>School content library. Licensed CC BY-SA 4.0.</p></footer>\n</body>\n</html>\n'
    body = []
    for i, p in enumerate(w.paragraphs(rng, max(64, size - len(head) - len(tail)))):
        if i % 5 == 4:
            body.append(f'<h2>{w.sentence(rng, 4)}</h2>\n')
        if i % 7 == 6:
            body.append(f'<figure><img src="media/img-{rng.randint(0, 999):03d}.jpg" alt="{w.sentence(rng, 5)}">'
                        '</figure>\n')
        body.append(f"<p>{p}</p>\n")
    return (head + "".join(body) + tail).encode()


def json_meta(rng: random.Random, size: int, ident: str) -> bytes:
    w = words()
    d = {
        "id": ident,
        "title": w.sentence(rng, 5),
        "language": rng.choice(["en", "fr", "sw", "pt"]),
        "grade": rng.randint(1, 12),
        "duration_min": rng.randint(5, 90),
        "tags": rng.sample(w.vocab[:300], 5),
        "updated": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "description": w.text(rng, max(32, size - 300)),
    }
    return json.dumps(d, indent=2).encode()


def code_text(rng: random.Random, size: int, kind: str) -> bytes:
    w = words()
    out, got = [], 0
    while got < size:
        name = "-".join(rng.choices(w.vocab[:2000], k=2))
        if kind == "css":
            s = (f".{name} {{\n  margin: {rng.randint(0, 40)}px {rng.randint(0, 40)}px;\n"
                 f"  color: #{rng.randrange(1 << 24):06x};\n  font-size: {rng.randint(10, 32)}px;\n}}\n")
        else:
            s = (f"function {name.replace('-', '_')}(el, opts) {{\n  // {w.sentence(rng, 8)}\n"
                 f"  const n = opts.{rng.choice(w.vocab[:500])} || {rng.randint(0, 999)};\n"
                 f"  return el.querySelectorAll('.{name}').length + n;\n}}\n")
        out.append(s)
        got += len(s)
    return "".join(out).encode()[:size]


def image(rng: random.Random, size: int) -> bytes:
    # A JPEG-ish header with a little EXIF text, then entropy-coded data.
    head = b"\xff\xd8\xff\xe1" + b"Exif\x00\x00Camera=SchoolCam 2;Software=harmonic-bench;" * 3
    return (head + rng.randbytes(max(0, size - len(head))))[:size]


def document(rng: random.Random, size: int) -> bytes:
    """PDF-like: text streams (compressible) and embedded images (not), about 40/60."""
    w = words()
    parts = [b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"]
    got = len(parts[0])
    n = 1
    while got < size:
        if rng.random() < 0.4:
            body = w.text(rng, rng.randint(2 * KiB, 24 * KiB)).encode()
        else:
            body = rng.randbytes(rng.randint(8 * KiB, 96 * KiB))
        obj = b"%d 0 obj\n<< /Length %d >>\nstream\n" % (n, len(body)) + body + b"\nendstream\nendobj\n"
        parts.append(obj)
        got += len(obj)
        n += 1
    return b"".join(parts)[:size]


def video(rng: random.Random, size: int) -> bytes:
    head = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
    return head + rng.randbytes(size - len(head))


MAKERS: dict[str, Callable[[random.Random, int, str], bytes]] = {
    "html": lambda r, n, p: html_page(r, n, os.path.basename(p).rsplit(".", 1)[0].replace("-", " ").title()),
    "json": lambda r, n, p: json_meta(r, n, p),
    "css": lambda r, n, p: code_text(r, n, "css"),
    "js": lambda r, n, p: code_text(r, n, "js"),
    "txt": lambda r, n, p: words().text(r, n).encode(),
    "img": lambda r, n, p: image(r, n),
    "doc": lambda r, n, p: document(r, n),
    "video": lambda r, n, p: video(r, n),
    "rand": lambda r, n, p: r.randbytes(n),
}


@dataclass(frozen=True)
class FileSpec:
    path: str
    kind: str
    size: int
    seed: str


def _write(root: str, spec: FileSpec, mtime: int) -> int:
    data = MAKERS[spec.kind](_rng(spec.seed), spec.size, spec.path)
    p = os.path.join(root, spec.path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = p + ".gen-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, p)  # never in place: the old name may be a hard link shared with v1
    return len(data)


def _write_many(root: str, specs: list[FileSpec], mtime: int) -> int:
    return sum(_write(root, s, mtime) for s in specs)


def write_specs(root: str, specs: list[FileSpec], mtime: int, workers: int = 2) -> int:
    if len(specs) < 200 or workers < 2:
        return _write_many(root, specs, mtime)
    parts = [specs[i::workers * 8] for i in range(workers * 8)]
    with ProcessPoolExecutor(workers) as ex:
        return sum(ex.map(_write_many, [root] * len(parts), parts, [mtime] * len(parts)))


def _lognormal(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(0, sigma) * median)))


def _fix_dir_times(root: str, mtime: int) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (mtime, mtime))


# --------------------------------------------------------------------------- the school tree


def school_plan(seed: int, total: int, files: int) -> list[FileSpec]:
    """File list of a school tree of about `total` bytes and at least `files` files."""
    rng = _rng(f"plan-{seed}")
    scale = files / 22_000
    specs: list[FileSpec] = []

    def add(path: str, kind: str, size: int) -> None:
        specs.append(FileSpec(path, kind, size, f"{seed}:{path}:v1"))

    # Site assets: shared CSS/JS.
    for i in range(max(4, int(60 * scale))):
        add(f"site/assets/css/theme-{i:02d}.css", "css", _lognormal(rng, 12 * KiB, 0.8, 1 * KiB, 120 * KiB))
        add(f"site/assets/js/module-{i:02d}.js", "js", _lognormal(rng, 20 * KiB, 0.9, 1 * KiB, 200 * KiB))
    # Courses: subject / grade / unit / lessons (page + metadata), unit media and handouts.
    n_units = max(4, int(900 * scale))
    for u in range(n_units):
        subj = SUBJECTS[u % len(SUBJECTS)]
        grade = 1 + (u // len(SUBJECTS)) % 12
        unit = f"courses/{subj}/grade-{grade:02d}/unit-{u:03d}"
        add(f"{unit}/index.html", "html", _lognormal(rng, 6 * KiB, 0.5, 1 * KiB, 40 * KiB))
        add(f"{unit}/unit.json", "json", _lognormal(rng, 1200, 0.5, 300, 8 * KiB))
        for lesson in range(rng.randint(8, 14)):
            add(f"{unit}/lesson-{lesson:02d}.html", "html", _lognormal(rng, 9 * KiB, 0.7, 1 * KiB, 120 * KiB))
            if rng.random() < 0.5:
                add(f"{unit}/lesson-{lesson:02d}.json", "json", _lognormal(rng, 1500, 0.6, 300, 16 * KiB))
        for k in range(rng.randint(0, 4)):
            add(f"{unit}/media/img-{k:03d}.jpg", "img", _lognormal(rng, 120 * KiB, 0.9, 20 * KiB, 2 * MiB))
        if rng.random() < 0.35:
            add(f"{unit}/handouts/worksheet-{u:03d}.pdf", "doc", _lognormal(rng, 400 * KiB, 0.9, 60 * KiB, 6 * MiB))
        if rng.random() < 0.2:
            add(f"{unit}/notes.txt", "txt", _lognormal(rng, 4 * KiB, 0.7, 500, 40 * KiB))
    # The library: books and reports.
    for i in range(max(2, int(80 * scale))):
        add(f"library/books/book-{i:04d}.pdf", "doc", _lognormal(rng, 1 * MiB, 0.8, 200 * KiB, 12 * MiB))
        add(f"library/books/book-{i:04d}.json", "json", _lognormal(rng, 1500, 0.5, 300, 8 * KiB))
    # A photo gallery.
    for i in range(max(2, int(200 * scale))):
        add(f"gallery/{2015 + i % 10}/photo-{i:04d}.jpg", "img", _lognormal(rng, 250 * KiB, 0.7, 40 * KiB, 4 * MiB))
    # Metadata for a catalogue.
    for i in range(max(10, int(1500 * scale))):
        add(f"catalogue/{i // 100:02d}/item-{i:05d}.json", "json", _lognormal(rng, 900, 0.6, 200, 8 * KiB))
    # Large videos fill the tree up to the target size.
    used = sum(s.size for s in specs)
    left = max(0, total - used)
    n_video = max(2, min(12, left // (48 * MiB)))
    weights = [rng.uniform(0.6, 1.4) for _ in range(n_video)]
    for i, wgt in enumerate(weights):
        add(f"media/videos/lecture-{i:02d}.mp4", "video", max(2 * MiB, int(left * wgt / sum(weights))))
    return specs


def school_tree(root: str, seed: int, total: int, files: int) -> list[FileSpec]:
    specs = school_plan(seed, total, files)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    write_specs(root, specs, T_V1)
    _fix_dir_times(root, T_V1)
    return specs


def _cp_al(src: str, dst: str) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-al", src, dst], check=True)


def _replace(root: str, rel: str, data: bytes, mtime: int = T_V2) -> None:
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = p + ".chg-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, p)


def _read(root: str, rel: str) -> bytes:
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def school_changes(v1: str, v2: str, specs: list[FileSpec], seed: int, scale: float = 1.0) -> dict[str, int]:
    """Make v2 (a hard-linked copy of v1) the next release; returns counts of each kind of change."""
    _cp_al(v1, v2)
    rng = _rng(f"changes-{seed}")
    w = words()
    by_kind: dict[str, list[FileSpec]] = {}
    for s in specs:
        by_kind.setdefault(s.kind, []).append(s)
    counts: dict[str, int] = {}

    def n(x: int) -> int:
        return max(1, int(x * scale))

    # A grade folder of one subject moves to the archive (its files are unchanged).
    units = sorted({os.path.dirname(s.path) for s in by_kind["html"] if s.path.startswith("courses/")
                    and "/media/" not in s.path})
    moved = os.path.dirname(rng.choice(units))
    dest = "courses/archive/" + moved.split("/", 1)[1].replace("/", "-")
    os.makedirs(os.path.join(v2, os.path.dirname(dest)), exist_ok=True)
    os.rename(os.path.join(v2, moved), os.path.join(v2, dest))
    counts["folder moved (files)"] = sum(1 for s in specs if s.path.startswith(moved + "/"))
    live = [s for s in specs if not s.path.startswith(moved + "/")]
    taken: set[str] = set()

    def pick(kind: str, k: int, pred: Callable[[FileSpec], bool] = lambda s: True) -> list[FileSpec]:
        pool = [s for s in live if s.kind == kind and s.path not in taken and pred(s)]
        got = rng.sample(pool, min(k, len(pool)))
        taken.update(s.path for s in got)
        return got

    # Edits inside small files: a sentence replaced in HTML pages, a field in JSON files.
    for s in pick("html", n(300)):
        data = _read(v2, s.path)
        at = data.find(b"<p>", rng.randint(0, max(0, len(data) - 200)))
        at = at if at >= 0 else data.find(b"<p>")
        new = f"<p>{w.sentence(rng, rng.randint(6, 30))}</p>\n".encode()
        _replace(v2, s.path, data[:at] + new + data[at:])
    counts["small files edited"] = n(300)
    for s in pick("json", n(200)):
        d = json.loads(_read(v2, s.path))
        d["updated"] = "2025-01-15"
        d["title"] = w.sentence(rng, 5)
        _replace(v2, s.path, json.dumps(d, indent=2).encode())
    counts["small files edited"] += n(200)
    # Appends to documents (revised editions with a new chapter at the end).
    for s in pick("doc", n(20)):
        _replace(v2, s.path, _read(v2, s.path) + document(rng, rng.randint(16 * KiB, 256 * KiB)))
    counts["documents appended"] = n(20)
    # A 1 MiB region rewritten in a large file.
    big = max(by_kind["video"], key=lambda s: s.size)
    taken.add(big.path)
    data = bytearray(_read(v2, big.path))
    at = rng.randrange(len(data) // 4, len(data) // 2) & ~4095
    data[at:at + MiB] = rng.randbytes(MiB)
    _replace(v2, big.path, bytes(data))
    counts["1 MiB region rewritten"] = 1
    del data
    # Files added: new lessons, images and a new book.
    added = 0
    for i, u in enumerate(rng.sample(units, min(len(units), n(120)))):
        if u.startswith(moved + "/"):
            continue
        for j in range(3):
            rel = f"{u}/lesson-new-{i:03d}-{j}.html"
            _replace(v2, rel, html_page(rng, _lognormal(rng, 9 * KiB, 0.7, 1 * KiB, 120 * KiB), f"New lesson {i} {j}"))
            _replace(v2, rel[:-5] + ".json", json_meta(rng, _lognormal(rng, 1500, 0.6, 300, 16 * KiB), rel))
            added += 2
        _replace(v2, f"{u}/media/img-new-{i:03d}.jpg", image(rng, _lognormal(rng, 120 * KiB, 0.9, 20 * KiB, 2 * MiB)))
        added += 1
    _replace(v2, "library/books/book-new-0001.pdf", document(rng, int(2 * MiB * max(scale, 0.05))))
    counts["files added"] = added + 1
    # Files deleted.
    dels = pick("html", n(150)) + pick("img", n(30)) + pick("json", n(60))
    for s in dels:
        os.unlink(os.path.join(v2, s.path))
    counts["files deleted"] = len(dels)
    # Files renamed in place (same content).
    ren = pick("html", n(60)) + pick("img", n(20)) + pick("doc", n(5))
    for s in ren:
        base, ext = os.path.splitext(s.path)
        os.rename(os.path.join(v2, s.path), os.path.join(v2, f"{base}-renamed{ext}"))
    counts["files renamed"] = len(ren)
    return counts


# --------------------------------------------------------------------------- other trees


def small_tree(root: str, seed: int, files: int) -> int:
    rng = _rng(f"small-{seed}")
    specs = []
    for i in range(files):
        kind = "html" if i % 3 else "json"
        size = _lognormal(rng, 2 * KiB, 0.6, 200, 16 * KiB)
        specs.append(FileSpec(f"d{i // 10000:02d}/s{(i // 100) % 100:02d}/f{i:06d}.{kind}", kind, size,
                              f"{seed}:small:{i}"))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    n = write_specs(root, specs, T_V1)
    _fix_dir_times(root, T_V1)
    return n


def big_tree(root: str, seed: int, total: int) -> int:
    rng = _rng(f"big-{seed}")
    specs = []
    for i in range(2000):
        specs.append(FileSpec(f"pages/p{i // 100:02d}/page-{i:04d}.html", "html",
                              _lognormal(rng, 8 * KiB, 0.6, 1 * KiB, 64 * KiB), f"{seed}:big:{i}"))
    used = sum(s.size for s in specs)
    n = max(2, (total - used) // (128 * MiB))
    for i in range(n):
        specs.append(FileSpec(f"videos/v{i:03d}.mp4", "video", (total - used) // n, f"{seed}:bigv:{i}"))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    out = write_specs(root, specs, T_V1)
    _fix_dir_times(root, T_V1)
    return out

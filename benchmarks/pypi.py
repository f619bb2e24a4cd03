"""A real software change: two consecutive releases of 17 packages from PyPI.

Source distributions are downloaded once with pip (cached under
benchmarks/scratch/pypi/) and extracted side by side, so ``v1/`` holds
``django-5.0.6/ ... sqlalchemy-2.0.30/`` and ``v2/`` the next versions: every
file is renamed (its top folder carries the version) and many are changed, as
in a software repository moving from one release to the next.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable

# (project, version N, version N+1): consecutive releases, all with sdists.
PAIRS = [
    ("django", "5.0.6", "5.0.7"),
    ("sqlalchemy", "2.0.30", "2.0.31"),
    ("sphinx", "7.3.6", "7.3.7"),
    ("babel", "2.14.0", "2.15.0"),
    ("pygments", "2.17.2", "2.18.0"),
    ("setuptools", "69.5.0", "69.5.1"),
    ("pip", "23.3.1", "23.3.2"),
    ("rich", "13.7.0", "13.7.1"),
    ("jinja2", "3.1.3", "3.1.4"),
    ("werkzeug", "3.0.2", "3.0.3"),
    ("flask", "3.0.2", "3.0.3"),
    ("click", "8.1.6", "8.1.7"),
    ("requests", "2.32.2", "2.32.3"),
    ("urllib3", "2.2.1", "2.2.2"),
    ("pytest", "8.2.0", "8.2.1"),
    ("docutils", "0.21.1", "0.21.2"),
    ("attrs", "23.1.0", "23.2.0"),
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _is_sdist(filename: str, project: str, version: str) -> bool:
    """Does filename (``Django-5.0.6.tar.gz``) hold project at version?"""
    for ext in (".tar.gz", ".zip"):
        if filename.lower().endswith(ext):
            stem = filename[: -len(ext)]
            name, _, ver = stem.rpartition("-")
            return _norm(name) == _norm(project) and ver == version
    return False


# The smaller ones, for --quick.
QUICK = PAIRS[6:]

Pair = tuple[str, str, str]


def download(cache: str, pairs: list[Pair]) -> None:
    """Fetch the sdists that are not in the cache yet (two pip calls: one per side)."""
    os.makedirs(cache, exist_ok=True)
    have = os.listdir(cache)
    for side in (1, 2):
        want = [f"{pair[0]}=={pair[side]}" for pair in pairs
                if not any(_is_sdist(f, pair[0], pair[side]) for f in have)]
        if want:
            print(f"  pip download {len(want)} sdists into {cache}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", cache, *want], check=True)


def _archive(cache: str, project: str, version: str) -> str:
    for f in sorted(os.listdir(cache)):
        if _is_sdist(f, project, version):
            return os.path.join(cache, f)
    raise FileNotFoundError(f"no sdist of {project} {version} in {cache}")


def _extract(archive: str, dest: str) -> None:
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
        return
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")


def build(cache: str, v1: str, v2: str, pairs: list[Pair]) -> dict[str, str]:
    """Extract both sides; returns {top folder in v2: its counterpart in v1}."""
    download(cache, pairs)
    tops: dict[str, str] = {}
    for d in (v1, v2):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    for project, a, b in pairs:
        before = set(os.listdir(v1)), set(os.listdir(v2))
        _extract(_archive(cache, project, a), v1)
        _extract(_archive(cache, project, b), v2)
        (t1,) = set(os.listdir(v1)) - before[0]
        (t2,) = set(os.listdir(v2)) - before[1]
        tops[t2] = t1
    return tops


def counterpart(tops: dict[str, str]) -> Callable[[str], str]:
    def f(rel: str) -> str:
        head, _, rest = rel.partition("/")
        old = tops.get(head, head)
        return f"{old}/{rest}" if rest else old
    return f


def same_names(v2: str, tops: dict[str, str], dest: str) -> str:
    """v2 with each top folder under its v1 name (a hard-linked copy): the same
    change without the renames, to see what the renames cost."""
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["cp", "-al", v2, dest], check=True)
    for new, old in tops.items():
        os.rename(os.path.join(dest, new), os.path.join(dest, old))
    return dest

"""What the receiver lacks: a pure function over trees.

Given the roots to send, the set of objects reachable from the receiver's
complete releases (``known``: a known tree means its whole subtree is held)
and loose objects it holds from unfinished transfers (``held``: the object
only), list every object the receiver needs, each once, most useful first:
trees, then recipes, then blobs of small files before blobs of large ones.

Where the receiver has an older version of a file at the same path, the
plan names a *base* for each new blob: an old blob covering the same bytes,
against which the sender may send a zstd patch instead of the whole blob.
When the sender no longer has the receiver's old tree, it simply knows less
and sends more: never less than needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from harmonicd.core.objects import BLOB, RECIPE, T_BLOB, T_DIR, T_RECIPE, TREE, Entry, ObjectId


class TreeSource(Protocol):
    def tree(self, oid: ObjectId, where: str = "") -> list[Entry]: ...

    def recipe(self, oid: ObjectId, where: str = "") -> list[tuple[ObjectId, int]]: ...


@dataclass(frozen=True, slots=True)
class Want:
    kind: int
    id: ObjectId
    size: int  # payload bytes (for blobs and recipes; trees are sized when read)
    order: int  # sort key inside the kind: the size of the file a blob belongs to
    base: ObjectId | None = None


_RANK = {TREE: 0, RECIPE: 1, BLOB: 2}
_DIGITS = re.compile(r"\d+")


class _Planner:
    def __init__(self, src: TreeSource, known: set[ObjectId], held: set[ObjectId]) -> None:
        self.src = src
        self.known = known
        self.held = held
        self.planned: dict[ObjectId, Want] = {}

    def _need(self, oid: ObjectId) -> bool:
        return oid not in self.known and oid not in self.held and oid not in self.planned

    def _base(self, oid: ObjectId | None) -> ObjectId | None:
        """A delta base must be something the receiver surely holds."""
        if oid is not None and (oid in self.known or oid in self.held):
            return oid
        return None

    def tree(self, oid: ObjectId, old: ObjectId | None, path: str) -> None:
        if oid in self.known:
            return  # the whole subtree is held
        entries = self.src.tree(oid, path)
        if self._need(oid):
            # A folder with one changed entry differs from its old tree by a few
            # bytes: the old tree is a good delta base (hashes do not compress).
            self.planned[oid] = Want(TREE, oid, 0, 0, self._base(old))
        old_entries: dict[str, Entry] = {}
        if old is not None and old != oid:
            try:
                old_entries = {e.name: e for e in self.src.tree(old, path)}
            except Exception:
                old_entries = {}
        renamed = _renamed(entries, old_entries)
        for e in entries:
            o = old_entries.get(e.name) or renamed.get(e.name)
            child = f"{path}/{e.name}" if path else e.name
            if e.type == T_DIR:
                self.tree(e.id, o.id if o is not None and o.type == T_DIR else None, child)
            elif e.type == T_BLOB:
                if self._need(e.id):
                    self.planned[e.id] = Want(BLOB, e.id, e.size, e.size, self._base(self._first_old_chunk(o)))
            elif e.type == T_RECIPE:
                self.file(e, o, child)

    def _first_old_chunk(self, o: Entry | None) -> ObjectId | None:
        if o is None:
            return None
        if o.type == T_BLOB:
            return o.id
        if o.type == T_RECIPE:
            try:
                chunks = self.src.recipe(o.id)
            except Exception:
                return None
            return chunks[0][0] if chunks else None
        return None

    def file(self, e: Entry, o: Entry | None, path: str) -> None:
        chunks = self.src.recipe(e.id, path)
        if self._need(e.id):
            old_recipe = o.id if o is not None and o.type == T_RECIPE else None
            self.planned[e.id] = Want(RECIPE, e.id, len(chunks) * 36, 0, self._base(old_recipe))
        old: list[tuple[ObjectId, int, int]] = []  # (id, start, end) of the old file's chunks
        if o is not None and o.id != e.id:
            if o.type == T_BLOB:
                old = [(o.id, 0, o.size)]
            elif o.type == T_RECIPE:
                try:
                    pos = 0
                    for cid, n in self.src.recipe(o.id):
                        old.append((cid, pos, pos + n))
                        pos += n
                except Exception:
                    old = []
        pos = 0
        j = 0
        for cid, n in chunks:
            if self._need(cid):
                base = None
                if old:
                    # The old chunk that covers the start of this one: edits and
                    # appends keep most bytes near the same offset.
                    while j + 1 < len(old) and old[j][2] <= pos:
                        j += 1
                    base = self._base(old[j][0])
                self.planned[cid] = Want(BLOB, cid, n, e.size, base)
            pos += n


def _stem(name: str) -> str:
    """A name with its numbers blanked and case folded: Django-5.0.6 and
    django-5.0.7 share one."""
    return _DIGITS.sub("#", name.casefold())


def _renamed(new: list[Entry], old: dict[str, Entry]) -> dict[str, Entry]:
    """Pair new names with vanished old names of the same stem and type (a software
    release renames its folder with each version): their old contents are the best
    delta bases. Only unambiguous pairs count."""
    gone = {n: e for n, e in old.items()} if old else {}
    for e in new:
        gone.pop(e.name, None)
    if not gone:
        return {}
    by_stem: dict[tuple[str, bool], list[Entry]] = {}
    for e in gone.values():
        by_stem.setdefault((_stem(e.name), e.type == T_DIR), []).append(e)
    fresh: dict[tuple[str, bool], list[Entry]] = {}
    for e in new:
        if e.name not in old:
            fresh.setdefault((_stem(e.name), e.type == T_DIR), []).append(e)
    out = {}
    for key, cands in by_stem.items():
        news = fresh.get(key, [])
        if len(cands) == 1 and len(news) == 1:
            out[news[0].name] = cands[0]
    return out


def plan(src: TreeSource, roots: Iterable[tuple[ObjectId, ObjectId | None]],
         known: set[ObjectId], held: set[ObjectId] | None = None) -> list[Want]:
    """Objects to send for each (new root, receiver's old root of the same collection)."""
    p = _Planner(src, known, held or set())
    for new, old in roots:
        p.tree(new, old, "")
    wants = list(p.planned.values())
    wants.sort(key=lambda w: (_RANK[w.kind], w.order))
    return wants


def reachable(src: TreeSource, roots: Iterable[ObjectId]) -> set[ObjectId]:
    """Every object reachable from roots; shared subtrees are walked once."""
    seen: set[ObjectId] = set()
    stack = []
    for r in roots:
        if r not in seen:
            seen.add(r)
            stack.append(r)
    while stack:
        for e in src.tree(stack.pop()):
            if e.id in seen:
                continue
            seen.add(e.id)
            if e.type == T_DIR:
                stack.append(e.id)
            elif e.type == T_RECIPE:
                seen.update(c for c, _ in src.recipe(e.id))
    return seen

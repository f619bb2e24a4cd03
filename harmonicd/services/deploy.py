"""Deploy: make a replica's folder show exactly one release, switched atomically.

The collection's ``path`` is a symbolic link to a tree folder under
``<deploy dir>/.trees/<name>/``. A new release is written as a new tree
folder (unchanged files hard-linked from the one in use, changed files
written), flushed, and then the link is replaced by one ``rename``: after a
power cut at any instant the path shows the old or the new release, never a
mix. Tree folders no longer linked are removed afterwards.

The database says which tree should be deployed (``collections.deployed``);
``converge`` brings the disk to it, so a crash between the database commit
and the switch is repaired at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor

from harmonicd.core.names import fold
from harmonicd.core.objects import (
    BLOB,
    FLAG_EXEC,
    T_BLOB,
    T_DIR,
    T_RECIPE,
    TREE,
    Entry,
    ObjectId,
    encode_tree,
    object_id,
)
from harmonicd.errors import StoreError
from harmonicd.store import durable
from harmonicd.store.db import Collection
from harmonicd.store.faults import crash_point
from harmonicd.store.objects import Batch
from harmonicd.store.store import Store

log = logging.getLogger("harmonicd.deploy")


STAMP = ".stamp"


WRITERS = 3  # threads writing deployed files: creation and page-cache copies scale across them


def trees_dir(store: Store, name: str) -> str:
    return os.path.join(store.cfg.deploy_dir, ".trees", name)


def default_path(store: Store, name: str) -> str:
    return os.path.join(store.cfg.deploy_dir, name)


def tree_folder_name(seq: int, root: ObjectId) -> str:
    return f"{seq}-{root.hex()}"


def current_target(path: str) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{path} should be a link made by Harmonic but is something else; "
                         "move it away so the release can be deployed")
    target = os.readlink(path)
    return os.path.normpath(os.path.join(os.path.dirname(path), target))


def is_deployed(store: Store, coll: Collection) -> bool:
    if coll.deployed is None or coll.path is None:
        return True
    cur = current_target(coll.path)
    return cur is not None and os.path.basename(cur).endswith("-" + coll.deployed.hex())


def deploy(store: Store, coll: Collection, fresh: set[ObjectId] | frozenset[ObjectId] = frozenset()) -> None:
    """Switch coll.path to the tree coll.deployed (no-op if already there).

    ``fresh``: objects this process verified moments ago (a pack just imported);
    they are copied without hashing them a second time."""
    if coll.deployed is None or coll.path is None or is_deployed(store, coll):
        return
    root = coll.deployed
    base = trees_dir(store, coll.name)
    os.makedirs(base, exist_ok=True)
    os.makedirs(os.path.dirname(coll.path), exist_ok=True)
    prev_dir = current_target(coll.path)
    prev_root = _root_of(store, coll, prev_dir)
    final = os.path.join(base, tree_folder_name(coll.seq, root))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(final):
        shutil.rmtree(final)
    # Bytes of file content the new tree needs, for a disk-full message: the
    # release's size until planning knows what can be linked from the old tree.
    row = store.db.release(coll.name, coll.seq)
    need = [row.size if row is not None and row.root == root else 0]
    try:
        _mkdir(tmp)
        _write_tree(store, root, tmp, prev_root, prev_dir, need, fresh)
        os.rename(tmp, final)
        # Everything in the new tree reaches the disk before the link can point at it.
        durable.syncfs(final)
        crash_point("deploy-tree-written")
        link_tmp = coll.path + ".tmp-link"
        if os.path.lexists(link_tmp):
            os.unlink(link_tmp)
        os.symlink(os.path.relpath(final, os.path.dirname(coll.path)), link_tmp)
        os.replace(link_tmp, coll.path)
        durable.fsync_dir(os.path.dirname(coll.path))
        crash_point("deploy-switched")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise durable.disk_error(exc, f"deploying {coll.name}", need[0], base,
                                 "the previous release stays in place, and the new one, already stored, "
                                 "is deployed once there is room") from exc
    for other in os.listdir(base):
        p = os.path.join(base, other)
        if p != final and other != STAMP:
            shutil.rmtree(p, ignore_errors=True)
    # Written last: every link-count change of this deployment (links made,
    # old folders removed) bumped inode ctimes before this moment, so a
    # deployed file with a later ctime was changed by someone else.
    stamp = os.path.join(base, STAMP)
    fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{coll.seq} {root.hex()}\n".encode())
    finally:
        os.close(fd)
    log.info("deployed %s release %d at %s", coll.name, coll.seq, coll.path)


def _root_of(store: Store, coll: Collection, folder: str | None) -> ObjectId | None:
    """The root id of a deployed tree folder (its name ends in it), if we still hold that tree."""
    if folder is None:
        return None
    try:
        root = bytes.fromhex(os.path.basename(folder).rsplit("-", 1)[-1])
    except ValueError:
        return None
    return root if len(root) == 32 and store.objects.has(root) else None


def _write_tree(store: Store, root: ObjectId, dest: str, prev_root: ObjectId | None,
                prev_dir: str | None, need: list[int] | None = None,
                fresh: set[ObjectId] | frozenset[ObjectId] = frozenset()) -> None:
    """Write the tree at root into dest: folders and hard links here, file contents
    on a few threads (os.write releases the GIL; page-cache copies scale)."""
    jobs: list[tuple[Entry, str]] = []
    # A file changed in place after it was deployed has a newer ctime than the
    # stamp written at the end of that deployment: it is written again from
    # the store, not linked. Without a stamp nothing is linked.
    ref_ctime = 0
    if prev_dir:
        try:
            ref_ctime = os.stat(os.path.join(os.path.dirname(prev_dir), STAMP)).st_ctime_ns
        except FileNotFoundError:
            ref_ctime = 0
    _plan_tree(store, root, dest, prev_root, prev_dir, jobs, ref_ctime)
    if need is not None:
        need[0] = sum(e.size for e, _t in jobs)
    if not jobs:
        return
    def write_group(group: list[tuple[Entry, str]]) -> None:
        for e, target in group:
            write_file(store, e, target, fresh)

    # Interleaved, so the threads mostly create files in different folders
    # (creation in one folder is serialised by the kernel).
    n = max(1, len(jobs) // 64)
    groups = [jobs[i::n] for i in range(n)]
    with ThreadPoolExecutor(WRITERS, thread_name_prefix="deploy") as pool:
        for fut in [pool.submit(write_group, g) for g in groups]:
            fut.result()


def _plan_tree(store: Store, root: ObjectId, dest: str, prev_root: ObjectId | None,
               prev_dir: str | None, jobs: list[tuple[Entry, str]], ref_ctime: int) -> None:
    entries = store.tree(root)
    prev: dict[str, Entry] = {}
    if prev_root is not None and prev_dir is not None:
        try:
            # An unchanged folder (most of them, release after release) is one
            # tree read once, not twice.
            prev = {e.name: e for e in (entries if prev_root == root else store.tree(prev_root))}
        except StoreError:
            prev = {}
    for e in entries:
        target = os.path.join(dest, e.name)
        old = prev.get(e.name)
        old_path = os.path.join(prev_dir, e.name) if old is not None and prev_dir else None
        if e.type == T_DIR:
            _mkdir(target)
            same = old is not None and old.type == T_DIR and old_path is not None
            _plan_tree(store, e.id, target, old.id if same and old else None,
                       old_path if same else None, jobs, ref_ctime)
            continue
        if (old is not None and old.id == e.id and old.flags == e.flags and old_path
                and _linkable(old_path, e.size, ref_ctime)):
            os.link(old_path, target, follow_symlinks=False)
            continue
        jobs.append((e, target))


def _mkdir(path: str) -> None:
    # Deployed folders are 0755 whatever the umask (a web server reads them),
    # as deployed files get their mode explicitly.
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def _linkable(path: str, size: int, ref_ctime: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_ctime_ns <= ref_ctime


def write_file(store: Store, e: Entry, target: str,
               fresh: set[ObjectId] | frozenset[ObjectId] = frozenset()) -> None:
    def blob(oid: ObjectId) -> None:
        if oid in fresh:
            # Verified by this process moments ago: copied by the kernel, unread.
            store.objects.copy_unverified(oid, BLOB, fd)
        else:
            _write_all(fd, store.objects.get_kind(oid, BLOB))

    mode = 0o755 if e.flags & FLAG_EXEC else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if e.type == T_BLOB:
            blob(e.id)
        elif e.type == T_RECIPE:
            for cid, _n in store.recipe(e.id):
                blob(cid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def converge(store: Store) -> None:
    """Bring every deployment to what the database says is live (after a crash)."""
    for coll in store.db.collections():
        if coll.mode in ("replica", "archive") and coll.deployed is not None and not is_deployed(store, coll):
            deploy(store, coll)


def union_tree(store: Store, batch: Batch, roots: list[ObjectId]) -> ObjectId:
    """A tree holding every path of every root, the later root winning (the master's
    archive of a school's data: files the school removed stay)."""
    def merge(ids: list[ObjectId]) -> tuple[ObjectId, int]:
        # Keyed by the folded name: a school that renamed "A.txt" to "a.txt"
        # must not leave two names that collide on FAT in the archive.
        merged: dict[str, Entry] = {}
        subdirs: dict[str, list[ObjectId]] = {}
        for oid in ids:
            for e in store.tree(oid):
                key = fold(e.name)
                prev = merged.get(key)
                if e.type == T_DIR:
                    if prev is None or prev.type != T_DIR or prev.name != e.name:
                        subdirs[key] = []
                    subdirs[key].append(e.id)
                else:
                    subdirs.pop(key, None)
                merged[key] = e
        out = []
        total = 0
        for key, e in merged.items():
            if e.type == T_DIR:
                sub_ids = subdirs[key]
                sid, size = (e.id, e.size) if len(sub_ids) == 1 else merge(sub_ids)
                e = Entry(e.name, T_DIR, 0, sid, size)
            out.append(e)
            total += e.size
        payload = encode_tree(out)
        oid = object_id(TREE, payload)
        batch.put(TREE, oid, payload)
        return oid, total

    if len(roots) == 1:
        return roots[0]
    return merge(roots)[0]

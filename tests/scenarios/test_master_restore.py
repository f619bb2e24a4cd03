"""Backing up and restoring the master, as docs/operations.md tells an admin to:
a copy of the configuration and the state folder taken under the store's lock
(`flock STATE/lock tar ...`, so no job writes meanwhile), restored over a
master that died. A backup is older than the master's last releases: the
restored master must not give an old release number a new tree (every school
would refuse it as an equivocation), so its next release is numbered above
what the schools report holding."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import make_master, make_school, tree_digest, write_tree
from tests.crash.helpers import coll, status


def _backup(state: Path, config: Path, into: Path) -> Path:
    """The documented command: tar under the store's lock (the daemon and commands wait)."""
    into.mkdir()
    tarball = into / "master-backup.tar"
    subprocess.run(["flock", str(state / "lock"), "tar", "-C", str(state.parent), "-cf", str(tarball),
                    state.name, config.name], check=True)
    return tarball


def test_a_master_restored_from_an_older_backup_goes_on_numbering_above_the_schools(tmp_path: Path) -> None:
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key, "school-1")
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"one"})
    stick = tmp_path / "stick"
    stick.mkdir()
    m.ctl("publish", "content", str(src))
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    assert coll(status(s), "content")["seq"] == 1

    tarball = _backup(m.state, m.config, tmp_path / "backups")

    # After the backup: release 2 reaches the school.
    write_tree(src, {"b.txt": b"two"})
    m.ctl("publish", "content", str(src))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))
    assert coll(status(s), "content")["seq"] == 2

    # The master's disk dies; the admin restores the backup (release 1 only).
    shutil.rmtree(m.state)
    m.config.unlink()
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tarball)], check=True)
    assert coll(status(m), "content")["seq"] == 1
    m.ctl("verify")

    # The school's next request tells the master what it holds; the master's
    # next release is 3, not a second, different release 2.
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    write_tree(src, {"c.txt": b"three"})
    r = m.ctl("publish", "content", str(src))
    assert r.stdout.strip() == "3"
    assert "restored from an older backup?" in r.stderr
    m.ctl("exchange", str(stick))
    r = s.ctl("exchange", str(stick))
    assert "received master-1/content release 3" in r.stdout
    assert coll(status(s), "content")["seq"] == 3
    assert tree_digest(s.deploy / "content") == tree_digest(src)


def test_a_restored_master_still_takes_the_schools_data(tmp_path: Path) -> None:
    """The school's statistics published after the backup are not lost: the school
    keeps them until the master acknowledges them, so the restored master
    receives them again."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key, "school-1")
    stick = tmp_path / "stick"
    stick.mkdir()
    write_tree(s.source("stats"), {"day1.csv": b"1"})
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    tarball = _backup(m.state, m.config, tmp_path / "backups")
    write_tree(s.source("stats"), {"day2.csv": b"2"})
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    s.ctl("exchange", str(stick))  # the ack for release 2 arrives: the school may prune it

    shutil.rmtree(m.state)
    m.config.unlink()
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tarball)], check=True)
    write_tree(s.source("stats"), {"day3.csv": b"3"})
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))  # release 3 arrives as a delta from 2, which it lacks
    r = s.ctl("exchange", str(stick))
    assert "restored from an older backup?" in r.stdout + r.stderr
    m.ctl("exchange", str(stick))
    got = m.deploy / "school-1" / "stats"
    assert sorted(p.name for p in got.iterdir()) == ["day1.csv", "day2.csv", "day3.csv"]


def test_an_older_answer_read_late_does_not_undo_a_confirmation(tmp_path: Path) -> None:
    """Two sticks read out of order: the older answer confirms less, which is old
    news, not a restored master; the school keeps the newer confirmation."""
    m, key = make_master(tmp_path)
    s = make_school(tmp_path, m, key, "school-1")
    a, b = tmp_path / "stick-a", tmp_path / "stick-b"
    a.mkdir()
    b.mkdir()
    write_tree(s.source("stats"), {"day1.csv": b"1"})
    s.ctl("exchange", str(a))
    m.ctl("exchange", str(a))  # an answer confirming stats release 1 waits on stick a
    time.sleep(1.1)  # pack times are whole seconds
    write_tree(s.source("stats"), {"day2.csv": b"2"})
    s.ctl("exchange", str(b))
    m.ctl("exchange", str(b))  # confirming release 2, on stick b
    s.ctl("exchange", str(b))
    with s.store(lock=False) as st:
        assert st.db.collection("stats").acked_seq == 2  # type: ignore[union-attr]
    r = s.ctl("exchange", str(a))
    assert "restored from an older backup?" not in r.stdout + r.stderr
    with s.store(lock=False) as st:
        assert st.db.collection("stats").acked_seq == 2  # type: ignore[union-attr]


def test_a_school_enrolled_after_the_backup_is_enrolled_again_by_hand(tmp_path: Path) -> None:
    """The restored master does not know a school enrolled after its backup: the
    school's packs are refused as unenrolled, with the state unchanged, until the
    admin enrolls its key again (docs/operations.md §H)."""
    m, key = make_master(tmp_path)
    tarball = _backup(m.state, m.config, tmp_path / "backups")
    s = make_school(tmp_path, m, key, "school-2")
    stick = tmp_path / "stick"
    stick.mkdir()
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    shutil.rmtree(m.state)
    m.config.unlink()
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tarball)], check=True)
    write_tree(s.source("stats"), {"day2.csv": b"2"})
    s.ctl("exchange", str(stick))
    r = m.ctl("exchange", str(stick), check=False)
    assert r.returncode == 1
    assert "school-2', which is not an enrolled school server" in r.stderr
    m.ctl("enroll", "school-2", s.ctl("key").stdout.strip())
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    got = m.deploy / "school-2" / "stats"
    assert sorted(p.name for p in got.iterdir()) == ["day2.csv"]

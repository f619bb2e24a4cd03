"""Small sticks: a release split into pack volumes that each stand alone."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from tests.conftest import Server, make_master, make_school, tree_digest, trusted_state, write_tree
from tests.crash.helpers import coll, gen_tree, pack_verifies, packs_in, status

VOL = "256KiB"


def _servers(tmp_path: Path) -> tuple[Server, Server, Path, Path]:
    m, key = make_master(tmp_path, "master-1", "--volume-size", VOL)
    s = make_school(tmp_path, m, key, "school-1", "--volume-size", VOL)
    stick = tmp_path / "stick"
    stick.mkdir()
    src = tmp_path / "content"
    gen_tree(src, seed=21, files=150, big=3)
    assert sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) > 3 << 20
    m.ctl("publish", "content", str(src))
    return m, s, stick, src


def test_volumes_each_stand_alone_and_all_together_give_the_release(tmp_path: Path) -> None:
    m, s, stick, src = _servers(tmp_path)
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    vols = packs_in(stick, "to-school-1")
    assert len(vols) >= 4
    for v in vols:
        assert v.stat().st_size <= 256 << 10, f"{v.name} is larger than the volume size"
        assert pack_verifies(v), f"{v.name} does not verify on its own"
    # The school's statistics go up in volumes too.
    rng = random.Random(5)
    write_tree(s.source("stats"), {f"log{i}.bin": rng.randbytes(300 << 10) for i in range(4)})
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    assert not packs_in(stick, "to-school-1")
    up = packs_in(stick, "to-master")
    assert len(up) >= 4
    for v in up:
        assert v.stat().st_size <= 256 << 10, f"{v.name} is larger than the volume size"
        assert pack_verifies(v), f"{v.name} does not verify on its own"
    m.ctl("exchange", str(stick))
    assert tree_digest(m.deploy / "school-1" / "stats") == tree_digest(s.source("stats"))
    s.ctl("exchange", str(stick))
    assert coll(status(s), "stats")["pending_bytes"] == 0
    s.ctl("verify")
    m.ctl("verify")


def test_volumes_imported_one_trip_at_a_time(tmp_path: Path) -> None:
    """Only some volumes reach the school each time: the release stays pending (the
    deployed content unchanged) until complete, and each new request makes the
    master send only what is still missing."""
    m, s, stick, src = _servers(tmp_path)
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    box = stick / "HARMONIC" / "to-school-1"
    vols = packs_in(stick, "to-school-1")
    sizes = {v.name: v.stat().st_size for v in vols}
    first_total = sum(sizes.values())
    aside = tmp_path / "aside"
    aside.mkdir()
    for v in vols:
        shutil.move(v, aside / v.name)

    # The first third of the volumes: taken, pending, nothing deployed.
    third = max(1, len(vols) // 3)
    for v in vols[:third]:
        shutil.move(aside / v.name, box / v.name)
    out = s.ctl("exchange", str(stick)).stdout
    assert "received part of" in out
    assert "received master-1/content" not in out
    assert tree_digest(s.deploy / "content") == "absent"
    c = coll(status(s), "content")
    assert c["seq"] == 0
    assert c["pending_bytes"] > 0
    s.ctl("verify")

    # The master answers the school's new request with only what is missing.
    for v in packs_in(stick, "to-school-1"):
        v.unlink()
    m.ctl("exchange", str(stick))
    second = packs_in(stick, "to-school-1")
    second_total = sum(v.stat().st_size for v in second)
    delivered = sum(sizes[v.name] for v in vols[:third])
    assert second_total < first_total - delivered // 2, (
        f"after {third} of {len(vols)} volumes the master still sends {second_total} of {first_total} bytes")
    assert len(second) < len(vols)

    # Again only some of them arrive; still pending, still nothing deployed.
    keep = tmp_path / "keep"
    keep.mkdir()
    half = max(1, len(second) // 2)
    for v in second[half:]:
        shutil.move(v, keep / v.name)
    s.ctl("exchange", str(stick))
    assert tree_digest(s.deploy / "content") == "absent"
    assert coll(status(s), "content")["pending_bytes"] > 0

    # The last volumes of the second answer come on a later trip.
    for v in packs_in(stick, "to-school-1"):
        v.unlink()
    for v in second[half:]:
        shutil.move(keep / v.name, box / v.name)
    out = s.ctl("exchange", str(stick)).stdout
    assert "received master-1/content release 1" in out
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    c = coll(status(s), "content")
    assert c["seq"] == 1
    assert c["pending_bytes"] == 0
    s.ctl("verify")

    # The rest of the first answer turns up late: harmless, nothing changes.
    before = trusted_state(s)
    for v in vols[third:]:
        shutil.move(aside / v.name, box / v.name)
    r = s.ctl("exchange", str(stick))
    assert r.returncode == 0
    assert "refused" not in r.stderr
    assert trusted_state(s)["deploy"] == before["deploy"]
    s.ctl("verify")


def test_volumes_in_any_order(tmp_path: Path) -> None:
    """Volumes arriving last-first still build the release exactly."""
    m, s, stick, src = _servers(tmp_path)
    s.ctl("exchange", str(stick))
    m.ctl("exchange", str(stick))
    box = stick / "HARMONIC" / "to-school-1"
    # The release's volumes: the one pack of many (shared by every school); the
    # school's own small pack beside it stays and is taken first.
    packs: dict[str, list[Path]] = {}
    for v in packs_in(stick, "to-school-1"):
        packs.setdefault(v.name.rsplit("-v", 1)[0], []).append(v)
    vols = max(packs.values(), key=len)
    assert len(vols) > 2
    aside = tmp_path / "aside"
    aside.mkdir()
    for v in vols:
        shutil.move(v, aside / v.name)
    for v in reversed(vols):
        shutil.move(aside / v.name, box / v.name)
        s.ctl("exchange", str(stick))
        for stray in packs_in(stick, "to-master"):
            stray.unlink()  # the requests are not carried in this test
        if v is not vols[0]:
            assert tree_digest(s.deploy / "content") == "absent"
    assert tree_digest(s.deploy / "content") == tree_digest(src)
    s.ctl("verify")

"""Packs cut short or damaged on the way (RELIABILITY.md C1, C2, C7), through
`harmonicctl exchange`: exit 1, one line naming each pack and why, nothing changed."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from harmonicd.core.pack import FOOTER_LEN, FRAME_HEAD, PREAMBLE
from tests.bad_input.helpers import (
    MASTER_ID,
    Synced,
    assert_unchanged,
    exchange,
    genuine_packs_for_school,
    inbox,
    pack_file_name,
    public_key,
    refusal,
    snapshot,
)


def _fresh_pack(sy: Synced, noise: int = 50_000) -> bytes:
    """A genuine pack of release 2, not yet seen by the school. With more than
    4 MiB of noise, its first frame is stored as it is (incompressible)."""
    (sy.content / "index.html").write_bytes(b"<h1>Release two</h1>\n")
    (sy.content / "new.bin").write_bytes(random.Random(2).randbytes(noise))
    assert sy.master.ctl("publish", "content", str(sy.content)).stdout.strip() == "2"
    packs = genuine_packs_for_school(sy.master, sy.tmp / "genuine")
    assert len(packs) == 1
    return packs[0].read_bytes()


def _layout(data: bytes) -> dict[str, tuple[int, int]]:
    """Regions of a pack: name -> (start, end)."""
    hlen = PREAMBLE.unpack_from(data)[3]
    out = {"magic": (0, 8), "version": (8, 10), "flags": (10, 12), "header length": (12, 16),
           "header": (PREAMBLE.size, PREAMBLE.size + hlen)}
    pos = PREAMBLE.size + hlen
    n = 0
    while True:
        typ, _raw, stored = FRAME_HEAD.unpack_from(data, pos)
        if typ == 0xFF:
            out["end frame head"] = (pos, pos + FRAME_HEAD.size)
            out["trailer"] = (pos + FRAME_HEAD.size, pos + FRAME_HEAD.size + stored)
            break
        n += 1
        out[f"frame {n} head"] = (pos, pos + FRAME_HEAD.size)
        out[f"frame {n} {'zstd' if typ == 1 else 'stored'}"] = (pos + FRAME_HEAD.size, pos + FRAME_HEAD.size + stored)
        pos += FRAME_HEAD.size + stored
    end = len(data)
    out["digest"] = (end - FOOTER_LEN, end - FOOTER_LEN + 32)
    out["signature"] = (end - FOOTER_LEN + 32, end - 8)
    out["end marker"] = (end - 8, end)
    return out


def test_pack_cut_short_anywhere(synced: Synced) -> None:
    data = _fresh_pack(synced)
    lay = _layout(data)
    cuts = {0, 1, len(data) - 1}
    for start, end in lay.values():  # every frame boundary, and one byte either side
        cuts |= {start, end, max(start - 1, 0), min(end + 1, len(data) - 1)}
    rnd = random.Random(1)
    cuts |= {rnd.randrange(len(data)) for _ in range(12)}
    cuts.discard(len(data))
    box = inbox(synced.school, synced.stick)
    files = []
    for c in sorted(cuts):
        f = box / pack_file_name(MASTER_ID, f"cut{c:08d}")
        f.write_bytes(data[:c])
        files.append(f)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f in files:
        refusal(p, f, r"incomplete")
        assert f.exists(), "a refused pack is left on the stick"
    assert_unchanged(synced.school, before)


def test_flipped_bits_everywhere(synced: Synced) -> None:
    data = _fresh_pack(synced, noise=(4 << 20) + 300_000)
    lay = _layout(data)
    assert any(k.endswith("stored") for k in lay), lay  # objects as they are: their hash is checked
    assert any(k.endswith("zstd") for k in lay), lay
    school_key = public_key(synced.school)
    rk = data.find(school_key)
    assert rk > 0
    # Region -> the reason the line must give.
    expect = {
        "magic": r"bad magic",
        "version": r"version .* not supported",
        "flags": r"features",
        "header": r"checksum does not match|header|not trust",
        "frame": r"checksum does not match|damaged|malformed|claims|frame|incomplete|disagree|trailer",
        "zstd": r"damaged|not a zstd frame|declares|window|checksum does not match|does not match its id|malformed"
                r"|cut short",
        "stored": r"does not match its id|malformed|cut short|checksum does not match",
        "end frame head": r"end frame|incomplete|unknown frame type|malformed|bytes after",
        "trailer": r"trailer|checksum does not match|malformed",
        "digest": r"checksum does not match",
        "signature": r"signature does not verify",
        "end marker": r"end marker",
    }
    rnd = random.Random(3)
    box = inbox(synced.school, synced.stick)
    cases: list[tuple[Path, str]] = []
    for region, (start, end) in lay.items():
        if region == "header length":
            continue
        key = next(k for k in expect if region == k or region.endswith(k) or
                   (k == "frame" and region.endswith("head") and region.startswith("frame")))
        positions = {start, end - 1, rnd.randrange(start, end)}
        for pos in sorted(positions):
            if region == "header" and rk <= pos < rk + 32:
                continue  # a flip in the recipient key makes it another server's pack: see test_trust
            bit = rnd.randrange(8)
            d = bytearray(data)
            d[pos] ^= 1 << bit
            f = box / pack_file_name(MASTER_ID, f"{region.replace(' ', '_')}-{pos:07d}-{bit}")
            f.write_bytes(bytes(d))
            cases.append((f, expect[key]))
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for f, why in cases:
        refusal(p, f, why)
    assert_unchanged(synced.school, before)
    # The genuine pack is still accepted afterwards: the refusals left nothing behind.
    for f, _ in cases:
        f.unlink()
    (box / pack_file_name(MASTER_ID, "genuine")).write_bytes(data)
    p = exchange(synced.school, synced.stick)
    assert p.returncode == 0, p.stderr
    assert (synced.school.deploy / "content" / "index.html").read_bytes() == b"<h1>Release two</h1>\n"


def test_mix_and_match_and_unsigned(synced: Synced) -> None:
    """Pack A's header with pack B's frames; a footer of zeros; a footer whose digest
    is right but whose signature is not; a genuine pack with bytes appended."""
    a = _fresh_pack(synced)
    shutil.rmtree(synced.tmp / "genuine")
    (synced.content / "more.txt").write_bytes(b"three\n")
    synced.master.ctl("publish", "content", str(synced.content))
    b = genuine_packs_for_school(synced.master, synced.tmp / "genuine")[0].read_bytes()
    la, lb = _layout(a), _layout(b)
    box = inbox(synced.school, synced.stick)
    mixed = a[:la["header"][1]] + b[lb["header"][1]:]
    zero_footer = a[:-FOOTER_LEN] + bytes(FOOTER_LEN - 8) + a[-8:]
    bad_sig = a[:la["signature"][0]] + bytes(64) + a[la["signature"][1]:]
    cases = {
        "mixed": (mixed, r"checksum does not match"),
        "unsigned": (zero_footer, r"checksum does not match"),
        "badsig": (bad_sig, r"signature does not verify"),
        "appended": (a + b"\0", r"after the end"),
        "doubled": (a + a, r"after the end"),
        "empty": (b"", r"incomplete"),
        "notapack": (b"PK\x03\x04 this is a zip file, not a pack" * 10, r"not a Harmonic pack"),
        "header-4gib": (PREAMBLE.pack(b"HRMNPACK", 1, 0, 0xFFFFFFFF) + a[PREAMBLE.size:],
                        r"claims 4294967295 bytes \(limit"),
        "version-9": (PREAMBLE.pack(b"HRMNPACK", 9, 0, 10) + a[PREAMBLE.size:], r"version 9 is not supported"),
    }
    files = {}
    for tag, (data, _why) in cases.items():
        files[tag] = box / pack_file_name(MASTER_ID, tag)
        files[tag].write_bytes(data)
    before = snapshot(synced.school)
    p = exchange(synced.school, synced.stick)
    for tag, (_data, why) in cases.items():
        refusal(p, files[tag], why)
    assert_unchanged(synced.school, before)


def test_damaged_pack_at_the_master(synced: Synced) -> None:
    """The same at the master: a school's genuine request, cut short and flipped."""
    m, s, stick = synced.master, synced.school, synced.stick
    (s.source("stats") / "day.json").write_text('{"logins": 3}')
    s.ctl("exchange", str(stick))
    box = inbox(m, stick, empty=False)
    [genuine] = list(box.glob("*.hpk"))
    data = genuine.read_bytes()
    genuine.rename(synced.tmp / genuine.name)
    files = []
    for i, cut in enumerate([0, 20, len(data) // 2, len(data) - FOOTER_LEN, len(data) - 1]):
        f = box / pack_file_name("school-1", f"cut{i}")
        f.write_bytes(data[:cut])
        files.append((f, r"incomplete"))
    for i, pos in enumerate([PREAMBLE.size + 3, len(data) // 2, len(data) - 40]):
        d = bytearray(data)
        d[pos] ^= 0x10
        f = box / pack_file_name("school-1", f"flip{i}")
        f.write_bytes(bytes(d))
        files.append((f, r"checksum|signature|damaged|malformed|header|does not match"))
    before = snapshot(m)
    p = exchange(m, stick)
    for f, why in files:
        refusal(p, f, why)
    assert_unchanged(m, before)

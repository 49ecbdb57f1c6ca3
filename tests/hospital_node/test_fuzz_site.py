"""Hostile input never crashes the node and never passes silently (issue 10, part 4).

Property-based (Hypothesis): each example copies a small real site (DICOM series written with
pydicom, a PNG tile, EHR and label CSVs), mutates the files of one "victim" case the way broken
exports and attackers do — header values that are text, NaN, inf, 0 or the wrong length, a
lying transfer syntax, truncation, flipped bytes, huge dimensions, links out of the root, FIFOs,
non-UTF-8 names, garbage site.json — and loads the site. Every example asserts:
- no exception escapes `load_site`;
- every problem has a stable code and a message; none is an internal error;
- the untouched case keeps its status (usable, same modalities, same label);
- a victim modality that survives is finite on the model grid, and a mutation that makes the
  volume wrong is reported (a NaN/zero slope never yields a "usable" CT);
- nothing in the site root changes (bytes and mtimes);
- peak traced memory stays under MEMORY_BUDGET (numpy, pydicom and Python allocations are
  traced; Pillow's decoder buffers are bounded by the pixel limit checked before decoding).
Examples per run: DICOM header 450 + file bytes 300 + filesystem/config 150 + PNG 150 = 1050.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EHR_HEADER, SMALL, ehr_row
from dicom_writer import snapshot, sphere_volume, write_csv, write_series, write_tile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hospital_node.dataset import load_site

MEMORY_BUDGET = 256 << 20
CODE = re.compile(r"[a-z_]+(\.[a-z_]+)+")
SHAPE, SPACING = (8, 24, 24), (2.5, 1.5, 1.5)
N_SCALE = float(os.environ.get("FEDSIGHT_FUZZ_SCALE", "1"))  # >1 for a longer local run


def fuzz(n: int) -> settings:
    return settings(max_examples=max(1, int(n * N_SCALE)), deadline=None, database=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))

HEADER_KEYWORDS = {
    # keyword: VR used when writing raw bytes
    "RescaleSlope": "DS", "RescaleIntercept": "DS", "PixelSpacing": "DS",
    "ImagePositionPatient": "DS", "ImageOrientationPatient": "DS", "SliceThickness": "DS",
    "GantryDetectorTilt": "DS", "Rows": "US", "Columns": "US", "BitsAllocated": "US",
    "BitsStored": "US", "PixelRepresentation": "US", "SamplesPerPixel": "US",
    "NumberOfFrames": "IS", "PixelPaddingValue": "SS", "Modality": "CS",
    "SOPClassUID": "UI", "SeriesInstanceUID": "UI", "ImageType": "CS",
    "SpecificCharacterSet": "CS", "SeriesNumber": "IS", "InstanceNumber": "IS",
}
TEXT_VALUES = st.sampled_from([
    "", "NaN", "nan", "inf", "-inf", "0", "-0", "1e-30", "1e30", "-1", "abc", "1\\2",
    "1\\2\\3", "1\\0\\0\\0\\1\\0", "1\\0\\0\\1\\0\\0", "0.5\\0.5", "1e308\\1e308", "\u00e9",
    "ISO_IR 999", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.2.1", "MR",
    "DERIVED\\SECONDARY", "ORIGINAL\\PRIMARY\\LOCALIZER", "65535", "1", "12", "3",
]) | st.text(alphabet=st.characters(codec="latin-1"), max_size=12)
US_VALUES = st.sampled_from([0, 1, 2, 3, 7, 8, 12, 16, 24, 32, 64, 255, 4096, 4097, 65535])
TRANSFER_SYNTAXES = st.sampled_from([
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.92", "1.2.3.4", ""])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "site"
    for cid in ("keep", "victim"):
        write_series(root / "ct" / cid, sphere_volume(SHAPE, SPACING, (4, 12, 12), 4.0), SPACING)
        write_tile(root / "pathology" / f"{cid}.png", size=64)
    write_csv(root / "ehr.csv", EHR_HEADER, [ehr_row("keep"), ehr_row("victim")])
    write_csv(root / "labels.csv", ["case_id", "label"], [["keep", 1], ["victim", 0]])
    (root / "site.json").write_text(json.dumps({"site_id": "fuzz"}))
    # Warm up: the first load imports MONAI, whose import-time allocations are not the
    # reader's memory (tracemalloc would count them against the budget).
    site = load_site(root, SMALL, use_cache=False)
    assert [c.case_id for c in site.cases] == ["keep", "victim"]
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared across examples: the untouched case is a cache hit (fast), every mutation is a
    # new key (its bytes differ), so each example still reads and checks the victim.
    return tmp_path_factory.mktemp("fuzz-cache")


def _fresh(template: Path, tmp: Path) -> Path:
    work = tmp / "w"
    if work.exists():
        _make_writable(work)
        shutil.rmtree(work)
    shutil.copytree(template, work / "site", symlinks=True)
    return work / "site"


def _make_writable(p: Path) -> None:
    for d, _, _ in os.walk(p):
        os.chmod(d, 0o755)


def _raw_set(path: Path, keyword: str, value: object) -> None:
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    vr = HEADER_KEYWORDS[keyword]
    if vr in ("US", "SS"):
        v = int(value) if isinstance(value, int) else 0
        if vr == "SS" and v > 32767:
            v -= 65536
        raw = v.to_bytes(2, "little", signed=vr == "SS")
    else:
        raw = str(value).encode("latin-1")
    if len(raw) % 2:
        raw += b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    pydicom.dcmwrite(path, ds, enforce_file_format=False)


def _load_and_check(root: Path, cache: Path, victim_bad: bool = False,
                    site_level: bool = False) -> None:
    """site_level: the mutation hit a site-wide file (site.json, a CSV), which may legitimately
    change every case (an unknown EHR schema excludes the EHR of all): only the safety
    properties are asserted then."""
    before = snapshot(root)
    tracemalloc.start()
    try:
        site = load_site(root, SMALL, cache)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BUDGET, f"peak traced memory {peak / 2**20:.0f} MiB"
    rep = site.report
    for p in rep.all_problems():
        assert CODE.fullmatch(p.code), p
        assert p.message and "internal" not in p.code
    keep = rep.case("keep")
    assert site_level or keep.modalities == ["ct", "path", "ehr"], keep.problems
    assert site_level or keep.label == 1
    for case in site.cases:
        for arr in (case.ct, case.path):
            assert arr is None or np.isfinite(arr).all()
    if victim_bad:
        victim = next((c for c in rep.cases if c.case_id == "victim"), None)
        assert victim is None or "ct" not in victim.modalities or victim.problems
    json.dumps(rep.to_json()).encode("utf-8")
    rep.render_table().encode("utf-8")
    assert snapshot(root) == before


@fuzz(450)
@given(data=st.data())
def test_fuzz_dicom_header_values(template: Path, cache: Path, tmp_path_factory, data) -> None:
    root = _fresh(template, tmp_path_factory.getbasetemp() / "hdr")
    files = sorted((root / "ct" / "victim").iterdir())
    n_edits = data.draw(st.integers(1, 3))
    bad = False
    for _ in range(n_edits):
        f = data.draw(st.sampled_from(files))
        kw = data.draw(st.sampled_from(sorted(HEADER_KEYWORDS)))
        value = data.draw(US_VALUES if HEADER_KEYWORDS[kw] in ("US", "SS") else TEXT_VALUES)
        _raw_set(f, kw, value)
        bad |= kw == "RescaleSlope" and str(value).strip().lower() in ("nan", "0", "-0", "inf")
    if data.draw(st.booleans()):
        f = data.draw(st.sampled_from(files))
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = data.draw(TRANSFER_SYNTAXES)  # a lying syntax
        try:
            pydicom.dcmwrite(f, ds, enforce_file_format=False)
        except (ValueError, NotImplementedError, AttributeError, OverflowError, TypeError):
            pass  # pydicom refuses to write some combinations: the file stays as it was
    _load_and_check(root, cache, victim_bad=bad)


@fuzz(300)
@given(data=st.data())
def test_fuzz_file_bytes(template: Path, cache: Path, tmp_path_factory, data) -> None:
    root = _fresh(template, tmp_path_factory.getbasetemp() / "bytes")
    target = data.draw(st.sampled_from(
        sorted((root / "ct" / "victim").iterdir()) + [root / "pathology" / "victim.png",
                                                      root / "ehr.csv", root / "labels.csv"]))
    raw = bytearray(target.read_bytes())
    op = data.draw(st.sampled_from(["truncate", "flip", "insert", "zero_tail"]))
    pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
    if op == "truncate":
        raw = raw[:pos]
    elif op == "flip":
        for _ in range(data.draw(st.integers(1, 16))):
            i = data.draw(st.integers(0, max(0, len(raw) - 1)))
            if raw:
                raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        raw[pos:] = bytes(len(raw) - pos)
    target.write_bytes(bytes(raw))
    # A broken CSV may take the untouched case's EHR/label with it (a row boundary moved).
    _load_and_check(root, cache, site_level=target.suffix == ".csv")


@fuzz(150)
@given(data=st.data())
def test_fuzz_filesystem_and_config(template: Path, cache: Path, tmp_path_factory,
                                    data) -> None:
    base = tmp_path_factory.getbasetemp() / "fs"
    root = _fresh(template, base)
    outside = base / "w" / "outside.bin"
    outside.write_bytes(b"\x00" * 300)
    victim_ct = root / "ct" / "victim"
    slices = sorted(victim_ct.iterdir())
    op = data.draw(st.sampled_from(["slice_link_out", "case_link_out", "fifo_tile",
                                    "dir_as_slice", "nonutf8", "site_json", "tile_dir",
                                    "link_loop", "dicomdir_junk"]))
    if op == "slice_link_out":
        slices[0].unlink()
        os.symlink(outside, slices[0])
    elif op == "case_link_out":
        shutil.rmtree(victim_ct)
        os.symlink(base, victim_ct)
    elif op == "fifo_tile":
        (root / "pathology" / "victim.png").unlink()
        os.mkfifo(root / "pathology" / "victim.png")
    elif op == "dir_as_slice":
        slices[1].unlink()
        slices[1].mkdir()
    elif op == "nonutf8":
        tail = data.draw(st.binary(max_size=4)).replace(b"\x00", b"").replace(b"/", b"")
        name = os.fsdecode(b"v\xff" + tail)
        shutil.copytree(victim_ct, root / "ct" / name)
    elif op == "site_json":
        doc = data.draw(st.sampled_from([
            "[1, 2]", "null", "\"x\"", "{\"site_id\": 5}", "{\"site_id\": [\"a\"]}",
            "{\"ehr_schema\": {}}", "[" * 100_000, "{\"a\": " * 50_000, "\xff\xfe",
            "{\"site_id\": \"\\u0000\"}", "{" + "\"k\": 1," * 5 + "}",
            "{\"ct_series\": {\"prefer\": \"x\"}}", "{\"ct_series\": [1]}",
            "{\"ct_series\": {\"min_slices\": true}}",
            "{\"ct_series\": {\"max_axial_deg\": NaN}}"]))
        (root / "site.json").write_bytes(doc.encode("utf-8", "surrogateescape"))
        _load_and_check(root, cache, site_level=True)
        return
    elif op == "tile_dir":
        (root / "pathology" / "victim.png").unlink()
        (root / "pathology" / "victim.png").mkdir()
    elif op == "link_loop":
        os.symlink(victim_ct, victim_ct / "loop")
    else:
        (victim_ct / "DICOMDIR").write_bytes(data.draw(st.binary(max_size=512)))
        (victim_ct / "sub").mkdir()
        (victim_ct / "sub" / "VENDOR").write_bytes(data.draw(st.binary(max_size=512)))
    _load_and_check(root, cache)


def _png_chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i + 8 <= len(raw):
        n = int.from_bytes(raw[i:i + 4], "big")
        out.append((raw[i + 4:i + 8], raw[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def _png(chunks: list[tuple[bytes, bytes]], fix_crc: bool) -> bytes:
    import zlib

    body = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        crc = zlib.crc32(kind + data) if fix_crc else 0
        body += len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")
    return body


@fuzz(150)
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3]), colour=st.sampled_from([0, 2, 3, 4, 6, 5]),
       fix_crc=st.booleans(), extra=st.binary(max_size=64))
def test_fuzz_png_headers(template: Path, cache: Path, tmp_path_factory, width: int,
                          height: int, depth: int, colour: int, fix_crc: bool,
                          extra: bytes) -> None:
    root = _fresh(template, tmp_path_factory.getbasetemp() / "png")
    tile = root / "pathology" / "victim.png"
    chunks = _png_chunks(tile.read_bytes())
    ihdr = (width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, colour])
            + chunks[0][1][10:])
    chunks[0] = (b"IHDR", ihdr)
    chunks.insert(1, (b"tEXt", b"k\x00" + extra))
    tile.write_bytes(_png(chunks, fix_crc))
    _load_and_check(root, cache)

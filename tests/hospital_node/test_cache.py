"""Preprocessed cache: hits on the second load, per-case invalidation, corrupt entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import SMALL
from dicom_writer import write_tile

from hospital_node.dataset import load_site


def test_second_load_hits_and_matches(good_site: Path, cache_dir: Path) -> None:
    first = load_site(good_site, SMALL, cache_dir)
    assert (first.cache_hits, first.cache_misses) == (0, 6)  # 3 cases x (ct, path)
    second = load_site(good_site, SMALL, cache_dir)
    assert (second.cache_hits, second.cache_misses) == (6, 0)
    for a, b in zip(first.cases, second.cases, strict=True):
        np.testing.assert_array_equal(a.ct, b.ct)
        np.testing.assert_array_equal(a.ct_affine, b.ct_affine)
        np.testing.assert_array_equal(a.path, b.path)
    assert first.report.to_json() == second.report.to_json()


def test_changed_file_invalidates_that_case_only(good_site: Path, cache_dir: Path) -> None:
    load_site(good_site, SMALL, cache_dir)
    write_tile(good_site / "pathology" / "c2.png", size=100)
    again = load_site(good_site, SMALL, cache_dir)
    assert (again.cache_hits, again.cache_misses) == (5, 1)


def test_corrupt_entry_recomputed(good_site: Path, cache_dir: Path) -> None:
    load_site(good_site, SMALL, cache_dir)
    entries = sorted(cache_dir.glob("*.npz"))
    assert len(entries) == 6 and not list(cache_dir.glob(".tmp-*"))
    entries[0].write_bytes(b"garbage")
    again = load_site(good_site, SMALL, cache_dir)
    assert (again.cache_hits, again.cache_misses) == (5, 1)
    assert len(again.cases) == 3
    assert load_site(good_site, SMALL, cache_dir).cache_hits == 6  # rewritten


def test_other_grid_is_another_entry(good_site: Path, cache_dir: Path) -> None:
    load_site(good_site, SMALL, cache_dir)
    from dataclasses import replace

    other = load_site(good_site, replace(SMALL, path_size=48), cache_dir)
    assert other.cache_hits == 0 and other.cases[0].path.shape == (3, 48, 48)


def test_file_hashes_are_remembered_and_a_same_size_rewrite_is_seen(tmp_path: Path) -> None:
    import hashlib
    import os
    import time

    from hospital_node.cache import FileHashes

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    memo = tmp_path / "cache" / "file-hashes.json"
    memo.parent.mkdir()
    first = FileHashes(memo)
    assert first.digest(f, "a.bin") == hashlib.sha256(b"x" * 100).hexdigest()
    first.save()
    again = FileHashes(memo)
    assert again.digest(f, "a.bin") == hashlib.sha256(b"x" * 100).hexdigest()
    assert (again.hashed, again.reused) == (0, 1)  # not read again
    time.sleep(0.05)  # kernel file timestamps tick in milliseconds
    st = f.stat()
    f.write_bytes(b"y" * 100)  # same size, and the old mtime put back
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = FileHashes(memo)
    assert changed.digest(f, "a.bin") == hashlib.sha256(b"y" * 100).hexdigest()
    assert changed.hashed == 1  # ctime moved: re-read
    memo.write_text("{not json")
    assert FileHashes(memo).digest(f, "a.bin") == hashlib.sha256(b"y" * 100).hexdigest()


def test_second_load_reads_no_source_file_for_hashing(good_site: Path, cache_dir: Path) -> None:
    import json

    load_site(good_site, SMALL, cache_dir)
    memo = json.loads((cache_dir / "file-hashes.json").read_text())
    n_files = len([p for p in (good_site / "ct").rglob("*") if p.is_file()]) + \
        len(list((good_site / "pathology").iterdir()))
    assert len(memo["files"]) == n_files
    assert not [k for k in memo["files"] if k.startswith("/")]  # relative to the site root

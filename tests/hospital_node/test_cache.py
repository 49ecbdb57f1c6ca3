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

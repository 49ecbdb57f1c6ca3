"""The real GE head series (shared/data/ct-head-ge): tilt and uneven gaps reported, not hidden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hospital_node.dicom_series import read_ct_series
from hospital_node.preprocess import ct_to_grid
from multimodal.grid import InputConfig

DATA = Path(__file__).parents[2].parent / "shared" / "data"
HEAD = DATA / "ct-head-ge"

pytestmark = pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})")


@pytest.fixture(scope="module")
def series():
    return read_ct_series(HEAD, DATA)


def test_one_series_sorted(series) -> None:
    assert series.usable, series.problems
    assert len(series.source_offsets) == 28
    assert np.all(np.diff(series.source_offsets) > 0)
    assert series.spacing[1:] == pytest.approx((0.4882812, 0.4882812))
    assert series.spacing[0] == pytest.approx(4.0, abs=0.01)  # median gap along the normal


def test_hu_plausible(series) -> None:
    hu = series.hu
    mid = hu[hu.shape[0] // 2]
    assert np.median(mid[:20, :20]) == pytest.approx(-1000, abs=30)  # air (padding -> air)
    brain = np.median(mid[220:290, 220:290])
    assert 15 < brain < 60
    assert np.percentile(hu, 99.9) > 700  # skull


def test_tilt_and_uneven_gaps_reported_with_values(series) -> None:
    by_code = {p.code: p for p in series.problems}
    tilt = by_code["ct.gantry_tilt"]
    assert not tilt.fatal and "18.5 deg" in tilt.message
    assert series.tilt_deg == pytest.approx(18.5, abs=0.1)
    gaps = by_code["ct.uneven_spacing"]
    assert not gaps.fatal
    for g in ("1.08", "4.0", "7.0"):
        assert g in gaps.message
    assert "ct.missing_slices" not in by_code
    assert by_code["dicom.not_dicom"].fatal is False  # the LICENSE file beside the slices
    assert set(by_code["dicom.identifying_tags"].field.split(",")) == {"PatientID", "PatientName"}


def test_sheared_affine_maps_each_slice_origin(series) -> None:
    # Affine column 0 follows the real stacking (z only); rows follow the tilted column direction.
    np.testing.assert_allclose(series.affine[:3, 0], [0, 0, 4.22], atol=0.01)
    np.testing.assert_allclose(series.affine[:3, 1] / 0.4882812, [0, 0.9483237, -0.3173047],
                               atol=1e-6)


def test_grid_is_air_outside_and_head_inside(series) -> None:
    grid, aff = ct_to_grid(series, InputConfig())
    assert grid.shape == (32, 64, 64) and grid.dtype == np.float32
    assert grid.min() >= -1 and grid.max() <= 1
    assert grid[0, 0, 0] == pytest.approx(-1.0)
    centre = aff @ [15.5, 31.5, 31.5, 1]
    vol_centre = series.affine @ np.append((np.array(series.hu.shape) - 1) / 2, 1)
    np.testing.assert_allclose(centre, vol_centre, atol=1e-6)

"""The CT series read back with pydicom: tags, geometry, Hounsfield units, nodules at the truth."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from synth.truth import load_truth
from tests.synth.conftest import SMALL

IDENTIFYING = (
    "PatientName",
    "PatientBirthDate",
    "PatientID",
    "OtherPatientIDs",
    "PatientAddress",
    "ReferringPhysicianName",
    "InstitutionName",
)


def read_series(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Slices sorted superior -> inferior and the (D, H, W) HU volume."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    slices.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices]
    )
    return slices, hu


def ct_cases(out: Path) -> list[tuple[str, str, Path]]:
    found = []
    for site in SMALL.sites:
        for d in sorted((out / site.site_id / "ct").iterdir()):
            found.append((site.site_id, d.name, d))
    return found


def test_tags_types_and_geometry(small_fed) -> None:
    out, _ = small_fed
    cases = ct_cases(out)
    assert cases
    study_uids = set()
    for site_id, _, folder in cases:
        site = next(s for s in SMALL.sites if s.site_id == site_id)
        slices, hu = read_series(folder)
        expected_n = round(SMALL.chest_length_mm / site.slice_thickness_mm)
        assert len(slices) == expected_n
        assert 30 <= expected_n <= 50
        series = {d.SeriesInstanceUID for d in slices}
        assert len(series) == 1
        assert len({d.SOPInstanceUID for d in slices}) == len(slices)
        study_uids.add(slices[0].StudyInstanceUID)
        zs = np.array([float(d.ImagePositionPatient[2]) for d in slices])
        np.testing.assert_allclose(-np.diff(zs), site.slice_thickness_mm, atol=1e-3)
        assert [int(d.InstanceNumber) for d in slices] == list(range(1, len(slices) + 1))
        for d in slices:
            assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert d.file_meta.MediaStorageSOPClassUID == CTImageStorage
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
            assert d.SOPClassUID == CTImageStorage and d.Modality == "CT"
            assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(d.PixelSpacing[0]) == pytest.approx(site.fov_mm / SMALL.ct_matrix)
            assert float(d.SliceThickness) == site.slice_thickness_mm
            assert float(d.SpacingBetweenSlices) == site.slice_thickness_mm
            assert float(d.RescaleIntercept) == -1024 and float(d.RescaleSlope) == 1
            assert d.pixel_array.dtype == np.int16 and d.PixelRepresentation == 1
            assert (d.Rows, d.Columns) == (SMALL.ct_matrix, SMALL.ct_matrix)
            for kw in IDENTIFYING:
                assert kw not in d, f"{folder}: {kw} present"
            assert d.PatientIdentityRemoved == "YES"
        assert hu.min() >= -1024 and hu.max() <= 3071
    assert len(study_uids) == len(cases)


def test_hounsfield_units_of_tissues(small_fed) -> None:
    out, _ = small_fed
    _, _, folder = ct_cases(out)[0]
    slices, hu = read_series(folder)
    mid = hu[len(hu) // 2]
    corner = mid[:8, :8]
    assert corner.mean() == pytest.approx(-1000, abs=15)  # air around the patient
    lung = mid[(mid < -700) & (mid > -950)]  # outside air is -1000 +- noise
    assert lung.size > 500
    assert np.median(lung) == pytest.approx(-850, abs=30)
    tissue = mid[(mid > -60) & (mid < 140)]
    assert np.median(tissue) == pytest.approx(40, abs=15)
    assert (mid > 500).sum() > 20  # spine / ribs


def test_nodule_at_truth_centre(small_fed) -> None:
    out, _ = small_fed
    checked = 0
    for site_id, cid, folder in ct_cases(out):
        truth = load_truth(out, site_id)[cid]
        assert "ct" in truth.modalities
        slices, hu = read_series(folder)
        x0, y0 = (float(v) for v in slices[0].ImagePositionPatient[:2])
        zs = np.array([float(d.ImagePositionPatient[2]) for d in slices])
        px = float(slices[0].PixelSpacing[0])
        for les in truth.lesions:
            x, y, z = les.centre_mm
            k, r, c = int(np.argmin(np.abs(zs - z))), round((y - y0) / px), round((x - x0) / px)
            if les.kind == "index":
                assert les.radius_mm >= SMALL.min_nodule_radius_mm
                assert hu[k, r, c] > -650, (cid, les, hu[k, r, c])  # lung would be ~-850
                assert hu[k, r, c] == pytest.approx(les.hu, abs=150)
                checked += 1
    assert checked >= 3


def test_index_nodule_grows_with_ct_score(small_fed) -> None:
    from synth.ct import render_ct

    site = SMALL.sites[0]
    radii = {}
    for s in (-0.5, 1.0, 2.5):
        rs = []
        for seed in range(8):
            _, _, les = render_ct(SMALL, site, s, np.random.default_rng(seed))
            rs += [x.radius_mm for x in les if x.kind == "index"]
        radii[s] = np.mean(rs)
    assert radii[-0.5] < radii[1.0] < radii[2.5]


def test_fast_slice_encoder_equals_pydicom_save_as(small_fed) -> None:
    out, _ = small_fed
    path = sorted(ct_cases(out)[0][2].glob("*.dcm"))[3]
    ds = pydicom.dcmread(path)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == path.read_bytes()

"""read_ct_series on series written by the tests: order, HU, affine, and each failure code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CT_SHAPE, CT_SPACING
from dicom_writer import sphere_volume, write_series
from pydicom.encaps import encapsulate

from hospital_node.dicom_series import read_ct_series


def _vol() -> np.ndarray:
    return sphere_volume(CT_SHAPE, CT_SPACING, (6, 20, 20), 5.0)


def codes(series) -> set[str]:
    return {p.code for p in series.problems}


def test_shuffled_files_sorted_by_position_with_hu_and_affine(tmp_path: Path) -> None:
    hu = _vol()
    hu[:, 0, 0] = np.arange(CT_SHAPE[0]) * 10.0 - 500  # slice index marker
    order = list(np.random.default_rng(0).permutation(CT_SHAPE[0]))
    write_series(tmp_path / "s", hu, CT_SPACING, origin=(-30, -30, 100), order=order)
    s = read_ct_series(tmp_path / "s")
    assert s.usable, s.problems
    np.testing.assert_allclose(s.hu, hu)  # exact HU after slope/intercept, in position order
    assert np.all(np.diff(s.source_offsets) > 0)
    assert s.spacing == (2.5, 1.5, 1.5)
    # voxel (z, y, x) -> (x, y, z) mm
    np.testing.assert_allclose(s.affine @ [2, 3, 4, 1], [-30 + 4 * 1.5, -30 + 3 * 1.5, 105, 1])
    assert codes(s) == set()


def test_missing_slices_is_fatal(tmp_path: Path) -> None:
    offs = [k * 2.5 for k in range(CT_SHAPE[0])]
    offs = offs[:5] + [o + 2.5 for o in offs[5:]]  # one slice lost after the 5th
    write_series(tmp_path / "s", _vol(), CT_SPACING, offsets=offs)
    s = read_ct_series(tmp_path / "s")
    assert not s.usable and "ct.missing_slices" in codes(s)
    assert "5.00 mm" in next(p.message for p in s.problems if p.code == "ct.missing_slices")


def test_uneven_spacing_warns_and_resamples(tmp_path: Path) -> None:
    offs = [0, 2.5, 5, 7.5, 10, 12.5, 14, 16.5, 19, 21.5, 24, 26.5]  # one 1.5 mm gap
    write_series(tmp_path / "s", _vol(), CT_SPACING, offsets=offs)
    s = read_ct_series(tmp_path / "s")
    assert s.usable and "ct.uneven_spacing" in codes(s)
    assert s.hu.shape[0] == int(26.5 // 2.5) + 1


def test_mr_series_is_not_ct(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _vol(), CT_SPACING, modality="MR")
    s = read_ct_series(tmp_path / "s")
    assert not s.usable and "dicom.not_ct" in codes(s)


def test_truncated_file_is_unreadable(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", _vol(), CT_SPACING)
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    s = read_ct_series(tmp_path / "s", tmp_path)
    assert not s.usable and "dicom.unreadable" in codes(s)
    assert any(p.file == "s/004.dcm" for p in s.problems)


def test_non_dicom_files_are_skipped_with_a_warning_never_sinking_the_series(tmp_path: Path
                                                                             ) -> None:
    write_series(tmp_path / "s", _vol(), CT_SPACING)
    (tmp_path / "s" / "notes.txt").write_text("scanner notes")
    (tmp_path / "s" / "999.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300)
    s = read_ct_series(tmp_path / "s")
    assert s.usable and s.hu.shape[0] == CT_SHAPE[0]
    prob = next(p for p in s.problems if p.code == "dicom.not_dicom")
    assert not prob.fatal and "1 more file" in prob.message


def test_two_series_in_one_folder_the_rule_picks_the_longer(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _vol(), CT_SPACING, origin=(-32, -32, 0))
    short = _vol()[:6]
    more = write_series(tmp_path / "t", short, CT_SPACING, origin=(-32, -32, 200))
    for p in more:
        p.rename(tmp_path / "s" / f"b{p.name}")
    s = read_ct_series(tmp_path / "s")
    assert s.usable and s.hu.shape[0] == CT_SHAPE[0]
    assert s.source_offsets[0] == pytest.approx(0.0)  # the 12-slice series at z=0, not z=200
    chosen = next(p for p in s.problems if p.code == "ct.series_chosen")
    assert "2 series" in chosen.message and "6 slices" in chosen.message


def test_identifying_tags_named_never_valued(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _vol(), CT_SPACING, identifying=True)
    s = read_ct_series(tmp_path / "s")
    assert s.usable
    prob = next(p for p in s.problems if p.code == "dicom.identifying_tags")
    assert not prob.fatal
    assert {"PatientName", "PatientID", "PatientBirthDate"} <= set(prob.field.split(","))
    assert "Doe" not in prob.message and "MRN-77" not in prob.message


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", _vol(), CT_SPACING)
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2: no decoder
    ds.PixelData = encapsulate([b"\xff\x4f" + b"\x00" * 62])
    ds["PixelData"].VR = "OB"
    pydicom.dcmwrite(paths[0], ds, enforce_file_format=True)
    s = read_ct_series(tmp_path / "s")
    assert not s.usable and "dicom.unsupported_transfer_syntax" in codes(s)


def test_tilt_tag_reported(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _vol(), CT_SPACING, tilt_tag=12.0)
    s = read_ct_series(tmp_path / "s")
    assert s.usable and "ct.gantry_tilt" in codes(s)


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    assert "ct.empty" in codes(read_ct_series(tmp_path / "e"))
    assert "ct.empty" in codes(read_ct_series(tmp_path / "nope"))

"""Shared fixtures: a small good site written with pydicom/Pillow, and a small input grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dicom_writer import sphere_volume, write_csv, write_series, write_tile

from multimodal.grid import InputConfig

torch.set_num_threads(1)  # 2 shared cores

SMALL = InputConfig(ct_shape=(12, 24, 24), ct_spacing=(4.0, 3.0, 3.0), path_size=32)
CT_SHAPE = (12, 40, 40)
CT_SPACING = (2.5, 1.5, 1.5)
EHR_HEADER = ["case_id", "age", "sex", "pack_years", "family_history", "cea", "bmi",
              "systolic_bp", "creatinine"]


def ehr_row(cid: str, age: object = 61) -> list[object]:
    return [cid, age, 1, 30, 0, 3.5, 25.1, 128, 0.9]


def write_good_case(root: Path, cid: str, *, ct: bool = True, path: bool = True) -> None:
    if ct:
        hu = sphere_volume(CT_SHAPE, CT_SPACING, (6, 20, 20), 5.0)
        write_series(root / "ct" / cid, hu, CT_SPACING)
    if path:
        write_tile(root / "pathology" / f"{cid}.png")


@pytest.fixture
def good_site(tmp_path: Path) -> Path:
    root = tmp_path / "site_a"
    for cid in ("c1", "c2", "c3"):
        write_good_case(root, cid)
    write_csv(root / "ehr.csv", EHR_HEADER, [ehr_row(c) for c in ("c1", "c2", "c3")])
    write_csv(root / "labels.csv", ["case_id", "label"], [["c1", 0], ["c2", 1], ["c3", 1]])
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"

"""ehr.csv / labels.csv parsing: each bad value gives its code and becomes missing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from conftest import EHR_HEADER, ehr_row
from dicom_writer import write_csv

from hospital_node.ehr import read_ehr, read_labels
from vocab.ehr_schema import CHEST_V1


def _codes(table, cid) -> dict[str, str]:
    return {p.code: p.message for p in table.case_problems.get(cid, [])}


def test_values_and_bad_values(tmp_path: Path) -> None:
    rows = [ehr_row("ok"), ehr_row("txt", "sixty"), ehr_row("old", 250), ehr_row("months", 720),
            ["crea", 70, 0, 10, 1, "", 24, 120, 97], ["sex2", 50, 2, 0, 0, 1, 22, 110, 1.0]]
    write_csv(tmp_path / "ehr.csv", EHR_HEADER, rows)
    t = read_ehr(tmp_path / "ehr.csv", CHEST_V1)
    np.testing.assert_allclose(t.values["ok"], [61, 1, 30, 0, 3.5, 25.1, 128, 0.9], rtol=1e-6)
    assert "ehr.not_a_number" in _codes(t, "txt") and math.isnan(t.values["txt"][0])
    msg = _codes(t, "old")["ehr.out_of_range"]
    assert "18-100" in msg and math.isnan(t.values["old"][0])
    assert "looks like months" in _codes(t, "months")["ehr.out_of_range"]
    assert "looks like µmol/L, expected mg/dL" in _codes(t, "crea")["ehr.out_of_range"]
    assert math.isnan(t.values["crea"][4])  # empty cell = missing, no problem
    assert "ehr.out_of_range" in _codes(t, "sex2")
    assert all(not p.fatal for ps in t.case_problems.values() for p in ps)


def test_duplicates_unknown_and_missing_columns(tmp_path: Path) -> None:
    header = [h for h in EHR_HEADER if h != "bmi"] + ["shoe_size"]
    rows = [["a", 61, 1, 30, 0, 3.5, 128, 0.9, 42], ["a", 62, 1, 30, 0, 3.5, 128, 0.9, 42],
            ["b", 50, 0, 0, 0, 1, 120, 1, 40], ["b", 50, 0, 0, 0, 1, 120, 1, 40],
            ["", 50, 0, 0, 0, 1, 120, 1, 40]]
    write_csv(tmp_path / "ehr.csv", header, rows)
    t = read_ehr(tmp_path / "ehr.csv", CHEST_V1)
    site = {p.code for p in t.problems}
    assert {"ehr.unknown_column", "ehr.missing_column", "ehr.missing_case_id"} <= site
    assert "a" not in t.values and _codes(t, "a").keys() == {"ehr.duplicate_case"}
    assert "b" in t.values and not t.case_problems["b"][0].fatal  # identical rows: kept once
    assert math.isnan(t.values["b"][CHEST_V1.names.index("bmi")])


def test_labels(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", ["case_id", "label"],
              [["a", 0], ["b", "Malignant"], ["c", "benign"], ["d", ""], ["e", "maybe"],
               ["f", 1], ["f", 0]])
    t = read_labels(tmp_path / "labels.csv")
    assert t.values == {"a": 0, "b": 1, "c": 0}
    assert "label.invalid" in _codes(t, "e") and "label.duplicate" in _codes(t, "f")


def test_semicolon_file_hint(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("case_id;label\na;1\n")
    t = read_labels(tmp_path / "labels.csv")
    assert t.values == {} and "semicolon" in t.problems[0].message

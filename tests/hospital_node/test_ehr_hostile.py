"""ehr.csv / labels.csv that are not what they claim: each a DataProblem with a code."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from conftest import EHR_HEADER, ehr_row
from dicom_writer import write_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hospital_node.ehr import MAX_LINE_CHARS, read_ehr, read_labels
from vocab.ehr_schema import CHEST_V1


def _site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir(exist_ok=True)
    return root


def _ehr(root: Path):
    return read_ehr(root / "ehr.csv", CHEST_V1, "ehr.csv", root=root)


def _codes(table) -> set[str]:
    return {p.code for p in table.problems}


def test_absent_file_is_no_ehr(tmp_path: Path) -> None:
    t = _ehr(_site(tmp_path))
    assert (t.values, t.problems) == ({}, [])


def test_directory_fifo_and_symlink_out_refused(tmp_path: Path) -> None:
    root = _site(tmp_path)
    (root / "ehr.csv").mkdir()
    assert "ehr.not_regular" in _codes(_ehr(root))
    os.rmdir(root / "ehr.csv")
    os.mkfifo(root / "ehr.csv")
    assert "ehr.not_regular" in _codes(_ehr(root))  # returns, never blocks
    os.unlink(root / "ehr.csv")
    write_csv(tmp_path / "other.csv", EHR_HEADER, [ehr_row("x")])
    (root / "ehr.csv").symlink_to(tmp_path / "other.csv")
    t = _ehr(root)
    assert "ehr.outside_root" in _codes(t) and t.values == {}
    (root / "labels.csv").mkdir()
    assert "label.not_regular" in _codes(read_labels(root / "labels.csv", root=root))


def test_header_only_and_empty(tmp_path: Path) -> None:
    root = _site(tmp_path)
    write_csv(root / "ehr.csv", EHR_HEADER, [])
    assert "ehr.no_rows" in _codes(_ehr(root))
    write_csv(root / "labels.csv", ["case_id", "label"], [])
    assert "label.no_rows" in _codes(read_labels(root / "labels.csv", root=root))


def test_duplicate_column_excludes_the_file(tmp_path: Path) -> None:
    root = _site(tmp_path)
    write_csv(root / "ehr.csv", [*EHR_HEADER, "age"], [[*ehr_row("a"), 99]])
    t = _ehr(root)
    (prob,) = [p for p in t.problems if p.code == "ehr.duplicate_column"]
    assert prob.field == "age" and "'age'" in prob.message and t.values == {}
    write_csv(root / "ehr.csv", [*EHR_HEADER, "note", "note"], [[*ehr_row("a"), 1, 2]])
    assert "a" in _ehr(root).values  # an ignored column twice does not matter
    write_csv(root / "labels.csv", ["case_id", "label", "label"], [["a", 0, 1]])
    t = read_labels(root / "labels.csv", root=root)
    assert "label.duplicate_column" in _codes(t) and t.values == {}


def test_non_ascii_digits_underscores_and_non_finite(tmp_path: Path) -> None:
    root = _site(tmp_path)
    rows = [ehr_row("arabic", "٦١"), ehr_row("fullwidth", "６１"), ehr_row("under", "6_1"),
            ehr_row("inf", "inf"), ehr_row("big", "1e999"), ehr_row("nan", "NaN"),
            ehr_row("ok", " 61.0 ")]
    write_csv(root / "ehr.csv", EHR_HEADER, rows)
    t = _ehr(root)
    for cid in ("arabic", "fullwidth"):
        assert {p.code for p in t.case_problems[cid]} == {"ehr.non_ascii_number"}
        assert math.isnan(t.values[cid][0])
    for cid in ("under", "inf", "big"):
        assert {p.code for p in t.case_problems[cid]} == {"ehr.not_a_number"}
        assert math.isnan(t.values[cid][0])
    assert "nan" not in t.case_problems and math.isnan(t.values["nan"][0])  # missing token
    assert t.values["ok"][0] == 61
    write_csv(root / "labels.csv", ["case_id", "label"], [["a", "１"], ["b", "1.0"]])
    lab = read_labels(root / "labels.csv", root=root)
    assert lab.values == {"b": 1} and "label.invalid" in {p.code for p in lab.case_problems["a"]}


def test_bom_encodings_nul_and_long_lines(tmp_path: Path) -> None:
    root = _site(tmp_path)
    text = ",".join(EHR_HEADER) + "\n" + ",".join(map(str, ehr_row("a"))) + "\n"
    (root / "ehr.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's UTF-8 BOM
    t = _ehr(root)
    assert "a" in t.values and not t.problems
    (root / "ehr.csv").write_bytes(text.encode("utf-16"))
    assert "ehr.encoding" in _codes(_ehr(root))
    (root / "ehr.csv").write_bytes(text.replace("61", "6é").encode("latin-1"))
    assert "ehr.encoding" in _codes(_ehr(root))
    (root / "ehr.csv").write_bytes(text.encode() + b"b,\x00\n")
    assert "ehr.unreadable" in _codes(_ehr(root))
    long_row = "c," + "1" * (MAX_LINE_CHARS + 10) + ",1,0,0,1,20,120,1\n"
    (root / "ehr.csv").write_text(text + long_row + ",".join(map(str, ehr_row("d"))) + "\n")
    t = _ehr(root)
    assert {"a", "d"} <= set(t.values) and "c" not in t.values
    assert any(p.code == "ehr.bad_row" and "line 3" in p.message for p in t.problems)
    huge_cell = 'e,"' + "1\n" * 70_000 + '",1,0,0,1,20,120,1\n'  # one quoted cell > csv limit
    (root / "ehr.csv").write_text(text + huge_cell)
    t = _ehr(root)
    assert "ehr.unreadable" in _codes(t) and "a" in t.values


CELL = st.one_of(
    st.sampled_from(["", "NA", "nan", "inf", "-inf", "1e999", "٣", "３", "1_0", "0", "1", "2",
                     "18", "100", "0.1", "20", "-5", "abc", '"', ",", "\n", "\x00", "\ufeff"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-1000, 1000).map(str),
    st.text(max_size=8),
)
ROW = st.lists(CELL, min_size=0, max_size=len(EHR_HEADER) + 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.just(EHR_HEADER), st.permutations(EHR_HEADER),
                        st.lists(st.sampled_from([*EHR_HEADER, "x", ""]), max_size=10)),
       rows=st.lists(ROW, max_size=6), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_readers_never_raise_and_values_are_in_range(tmp_path: Path, header, rows, raw,
                                                      use_raw) -> None:
    root = _site(tmp_path)
    if use_raw:
        (root / "ehr.csv").write_bytes(raw)
        (root / "labels.csv").write_bytes(raw)
    else:
        write_csv(root / "ehr.csv", header, rows)
        write_csv(root / "labels.csv", header[:2], [r[:2] for r in rows])
    t = _ehr(root)
    lab = read_labels(root / "labels.csv", root=root)
    for table in (t, lab):
        problems = table.problems + [p for ps in table.case_problems.values() for p in ps]
        assert all(p.code and "." in p.code for p in problems)
    for vec in t.values.values():
        assert vec.shape == (len(CHEST_V1.fields),) and vec.dtype == np.float32
        for v, f in zip(vec, CHEST_V1.fields, strict=True):
            assert math.isnan(v) or (np.float32(f.lo) <= v <= np.float32(f.hi))
            assert not math.isinf(v)
    assert all(v in (0, 1) for v in lab.values.values())

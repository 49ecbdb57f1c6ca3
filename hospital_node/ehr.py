"""Parse `ehr.csv` against an EhrSchema and `labels.csv`, with per-value checks.

Decisions: a bad value (text in a numeric field, out of range) makes only that field missing
(NaN) and is reported, since the model handles missing fields; when the value would fit the range
in a unit people often use instead, the message says so ("looks like µmol/L, expected mg/dL").
A row is dropped only when it cannot be attributed (empty case_id) or is malformed (wrong number
of cells). Two different rows for one case make that case's EHR unusable (we cannot tell which
is right); identical duplicates are reported and kept once. Labels: 0/1, benign/malignant,
negative/positive; a case without one is usable for inference but not for training
("label.missing"). Messages name the case id: they are for hospital IT only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vocab.ehr_schema import EhrSchema, FieldSpec
from vocab.errors import DataProblem
from vocab.site_layout import CASE_ID_COLUMN, LABEL_COLUMN

MISSING_TOKENS = {"", "na", "n/a", "nan", "null", "none", "?"}
# (field, expected unit) -> [(unit people often write instead, divide by this to convert)].
UNIT_HINTS: dict[tuple[str, str], list[tuple[str, float]]] = {
    ("age", "years"): [("months", 12.0)],
    ("creatinine", "mg/dL"): [("µmol/L", 88.4)],
    ("chol", "mg/dL"): [("mmol/L", 1 / 38.67)],
}
LABEL_WORDS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "negative": 0, "positive": 1}


@dataclass
class CsvTable:
    """values: case_id -> parsed value; case_problems: per case; problems: file-level."""

    values: dict[str, object] = field(default_factory=dict)
    case_problems: dict[str, list[DataProblem]] = field(default_factory=dict)
    problems: list[DataProblem] = field(default_factory=list)

    def add(self, case_id: str, problem: DataProblem) -> None:
        self.case_problems.setdefault(case_id, []).append(problem)


def _read_rows(path: Path, rel: str, required: str, table: CsvTable
               ) -> tuple[list[str], list[tuple[int, list[str]]]] | None:
    """Header and (line number, cells) rows, or None (with a problem) if unreadable."""
    prefix = "label" if required == LABEL_COLUMN else "ehr"
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        table.problems.append(DataProblem(f"{prefix}.unreadable",
                                          f"{rel}: cannot read ({type(e).__name__})", rel))
        return None
    if not rows:
        table.problems.append(DataProblem(f"{prefix}.missing_column", f"{rel}: empty file", rel))
        return None
    header = [h.strip() for h in rows[0]]
    missing = [c for c in (CASE_ID_COLUMN, required) if c and c not in header]
    if missing:
        hint = " (semicolon-separated? expected commas)" if ";" in rows[0][0] else ""
        table.problems.append(DataProblem(f"{prefix}.missing_column",
                                          f"{rel}: required column(s) {missing} missing{hint}",
                                          rel, ",".join(missing)))
        return None
    return header, [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]


def _parse_value(spec: FieldSpec, text: str, case_id: str, rel: str
                 ) -> tuple[float, DataProblem | None]:
    t = text.strip()
    if t.lower() in MISSING_TOKENS:
        return math.nan, None
    try:
        v = float(t)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        return math.nan, DataProblem("ehr.not_a_number", f"{rel}: case {case_id}: {spec.name} "
                                     f"is {t!r}, expected a number in {spec.unit}", rel,
                                     spec.name, fatal=False)
    if spec.levels:
        if v in spec.levels:
            return v, None
        return math.nan, DataProblem("ehr.out_of_range", f"{rel}: case {case_id}: {spec.name} = "
                                     f"{t}, allowed {list(spec.levels)} ({spec.unit})", rel,
                                     spec.name, fatal=False)
    if spec.lo <= v <= spec.hi:
        return v, None
    hint = ""
    for unit, factor in UNIT_HINTS.get((spec.name, spec.unit), []):
        if v > spec.hi and spec.lo <= v / factor <= spec.hi:
            hint = f" (looks like {unit}, expected {spec.unit})"
    return math.nan, DataProblem("ehr.out_of_range", f"{rel}: case {case_id}: {spec.name} = {t} "
                                 f"outside {spec.lo:g}-{spec.hi:g} {spec.unit}{hint}; treated as "
                                 "missing", rel, spec.name, fatal=False)


def read_ehr(path: Path, schema: EhrSchema, rel: str = "ehr.csv") -> CsvTable:
    """values: case_id -> (F,) float32 in schema order, NaN where missing or invalid."""
    table = CsvTable()
    parsed = _read_rows(path, rel, "", table)
    if parsed is None:
        return table
    header, rows = parsed
    unknown = [h for h in header if h != CASE_ID_COLUMN and h not in schema.names]
    if unknown:
        table.problems.append(DataProblem("ehr.unknown_column", f"{rel}: column(s) {unknown} "
                                          f"not in schema {schema.name!r}; ignored", rel,
                                          ",".join(unknown), fatal=False))
    absent = [n for n in schema.names if n not in header]
    if absent:
        table.problems.append(DataProblem("ehr.missing_column", f"{rel}: schema column(s) "
                                          f"{absent} missing; those fields are missing for "
                                          "every case", rel, ",".join(absent), fatal=False))
    col = {h: i for i, h in enumerate(header)}
    seen: dict[str, np.ndarray] = {}
    conflicted: set[str] = set()
    for line, cells in rows:
        if len(cells) != len(header):
            table.problems.append(DataProblem("ehr.bad_row", f"{rel}: line {line} has "
                                              f"{len(cells)} cells, header has {len(header)}; "
                                              "row ignored", rel))
            continue
        case_id = cells[col[CASE_ID_COLUMN]].strip()
        if not case_id:
            table.problems.append(DataProblem("ehr.missing_case_id", f"{rel}: line {line} has "
                                              "no case_id; row ignored", rel, CASE_ID_COLUMN))
            continue
        vec = np.full(len(schema.fields), np.nan, np.float32)
        row_problems = []
        for j, spec in enumerate(schema.fields):
            if spec.name in col:
                vec[j], prob = _parse_value(spec, cells[col[spec.name]], case_id, rel)
                if prob:
                    row_problems.append(prob)
        if case_id in seen:
            same = np.array_equal(seen[case_id], vec, equal_nan=True)
            if not same:
                conflicted.add(case_id)
            table.add(case_id, DataProblem("ehr.duplicate_case", f"{rel}: case {case_id} has "
                                           f"more than one row (line {line}); " + (
                                               "identical, kept once" if same else
                                               "they differ, EHR excluded for this case"),
                                           rel, CASE_ID_COLUMN, fatal=not same))
            continue
        seen[case_id] = vec
        for prob in row_problems:
            table.add(case_id, prob)
    table.values = {k: v for k, v in seen.items() if k not in conflicted}
    return table


def parse_label(text: str) -> int | None:
    t = text.strip().lower()
    if t in LABEL_WORDS:
        return LABEL_WORDS[t]
    try:
        v = float(t)
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else None


def read_labels(path: Path, rel: str = "labels.csv") -> CsvTable:
    """values: case_id -> 0/1. Empty labels are 'label.missing'; bad ones 'label.invalid'."""
    table = CsvTable()
    parsed = _read_rows(path, rel, LABEL_COLUMN, table)
    if parsed is None:
        return table
    header, rows = parsed
    ci, li = header.index(CASE_ID_COLUMN), header.index(LABEL_COLUMN)
    conflicted: set[str] = set()
    for line, cells in rows:
        if len(cells) <= max(ci, li):
            table.problems.append(DataProblem("label.bad_row", f"{rel}: line {line} is short; "
                                              "ignored", rel))
            continue
        case_id, text = cells[ci].strip(), cells[li].strip()
        if not case_id:
            table.problems.append(DataProblem("label.missing_case_id", f"{rel}: line {line} "
                                              "has no case_id; ignored", rel, CASE_ID_COLUMN))
            continue
        if not text:
            continue  # reported as label.missing by the dataset, like an absent row
        label = parse_label(text)
        if label is None:
            table.add(case_id, DataProblem("label.invalid", f"{rel}: case {case_id}: label "
                                           f"{text!r}, expected 0/1 or benign/malignant", rel,
                                           LABEL_COLUMN, fatal=False))
            continue
        if case_id in table.values and table.values[case_id] != label:
            conflicted.add(case_id)
            table.add(case_id, DataProblem("label.duplicate", f"{rel}: case {case_id} has "
                                           "conflicting labels; label dropped", rel,
                                           LABEL_COLUMN, fatal=False))
        table.values[case_id] = label
    for c in conflicted:
        table.values.pop(c, None)
    return table

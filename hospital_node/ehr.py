"""Parse `ehr.csv` against an EhrSchema and `labels.csv`, with per-value checks.

Decisions: a bad value (text in a numeric field, out of range) makes only that field missing
(NaN) and is reported, since the model handles missing fields; when the value would fit the range
in a unit people often use instead, the message says so ("looks like µmol/L, expected mg/dL").
A row is dropped only when it cannot be attributed (empty case_id) or is malformed (wrong number
of cells). Two different rows for one case make that case's EHR unusable (we cannot tell which
is right); identical duplicates are reported and kept once. Labels: 0/1, benign/malignant,
negative/positive; a case without one is usable for inference but not for training
("label.missing"). Messages name the case id: they are for hospital IT only.

The file itself is checked before it is read (hospital_node.site_files): it must be a regular file
inside the site root (a folder, FIFO or device named ehr.csv, or a symlink leaving the root, is
refused) of at most MAX_CSV_BYTES. What the whole file cannot be trusted for is a file-level
problem and the file's values are not used: not UTF-8 (a UTF-8 byte order mark is fine, UTF-16 is
named as such), a NUL byte, a column name twice (we never let "the last one win"), a header with
no rows. Numbers must be written in ASCII: Python's float() also accepts Arabic-Indic or
fullwidth digits and "1_000", which no hospital system exports on purpose.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hospital_node.site_files import check_file, read_bytes, rel_name
from vocab.ehr_schema import EhrSchema, FieldSpec
from vocab.errors import DataProblem
from vocab.site_layout import CASE_ID_COLUMN, LABEL_COLUMN

MAX_CSV_BYTES = 256 * 1024 * 1024  # an EHR extract of millions of rows fits many times over
MAX_LINE_CHARS = 64 * 1024  # one row of a few dozen numbers is < 1 KB; longer is not an EHR row
MAX_COLUMNS = 1024
MAX_ROWS = 2_000_000
MAX_ROW_PROBLEMS = 200  # file-level row problems listed per file; the rest are counted
MISSING_TOKENS = {"", "na", "n/a", "nan", "null", "none", "?"}
# ASCII decimal notation only (re.ASCII: \d is 0-9, not every Unicode digit).
ASCII_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# (field, expected unit) -> [(unit people often write instead, divide by this to convert)].
UNIT_HINTS: dict[tuple[str, str], list[tuple[str, float]]] = {
    ("age", "years"): [("months", 12.0)],
    ("creatinine", "mg/dL"): [("µmol/L", 88.4)],
    ("chol", "mg/dL"): [("mmol/L", 1 / 38.67)],
}
LABEL_WORDS = {"0": 0, "1": 1, "benign": 0, "malignant": 1, "negative": 0, "positive": 1}
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


@dataclass
class CsvTable:
    """values: case_id -> parsed value; case_problems: per case; problems: file-level."""

    values: dict[str, object] = field(default_factory=dict)
    case_problems: dict[str, list[DataProblem]] = field(default_factory=dict)
    problems: list[DataProblem] = field(default_factory=list)
    _row_problems: int = 0

    def add(self, case_id: str, problem: DataProblem) -> None:
        self.case_problems.setdefault(case_id, []).append(problem)

    def row_problem(self, problem: DataProblem) -> None:
        """A file-level problem about one row; listed up to MAX_ROW_PROBLEMS, then counted."""
        self._row_problems += 1
        if self._row_problems <= MAX_ROW_PROBLEMS:
            self.problems.append(problem)

    def finish(self, prefix: str, rel: str) -> None:
        extra = self._row_problems - MAX_ROW_PROBLEMS
        if extra > 0:
            self.problems.append(DataProblem(f"{prefix}.more_row_problems", f"{rel}: {extra} "
                                             "more row problems not listed", rel, fatal=False))


def _lines(text: str, table: CsvTable, prefix: str, rel: str) -> Iterator[str]:
    """The text's lines for csv.reader; an overlong line is reported and read as empty."""
    start, n = 0, 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        n += 1
        if end - start > MAX_LINE_CHARS:
            table.row_problem(DataProblem(f"{prefix}.bad_row", f"{rel}: line {n} is "
                                          f"{end - start} characters long (limit "
                                          f"{MAX_LINE_CHARS}); line ignored", rel))
            yield "\n"
        else:
            yield text[start:end]
        start = end


def _decode(data: bytes, prefix: str, rel: str) -> tuple[str | None, DataProblem | None]:
    if data.startswith(_UTF16_32_BOMS):
        return None, DataProblem(f"{prefix}.encoding", f"{rel}: UTF-16/32 text (byte order "
                                 "mark); save it as CSV in UTF-8", rel)
    try:
        text = data.decode("utf-8-sig")  # the UTF-8 byte order mark Excel writes is dropped
    except UnicodeDecodeError as e:
        return None, DataProblem(f"{prefix}.encoding", f"{rel}: not UTF-8 (first bad byte at "
                                 f"offset {e.start}); save it as CSV in UTF-8", rel)
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        return None, DataProblem(f"{prefix}.unreadable", f"{rel}: NUL byte on line {line} (a "
                                 "binary file, not a CSV text)", rel)
    return text, None


def _open(path: Path, root: Path, rel: str, prefix: str, table: CsvTable
          ) -> Iterator[tuple[int, list[str]]] | None:
    """csv rows (line number, cells) of a checked file, or None with a file-level problem."""
    checked = check_file(path, root, code_prefix=prefix, max_bytes=MAX_CSV_BYTES)
    if isinstance(checked, DataProblem):
        table.problems.append(DataProblem(checked.code, checked.message, rel))
        return None
    try:
        data = read_bytes(checked, MAX_CSV_BYTES)
    except OSError as e:
        table.problems.append(DataProblem(f"{prefix}.unreadable", f"{rel}: cannot read "
                                          f"({type(e).__name__})", rel))
        return None
    if len(data) > MAX_CSV_BYTES:  # grew after the check
        table.problems.append(DataProblem(f"{prefix}.too_large", f"{rel}: over "
                                          f"{MAX_CSV_BYTES} bytes; refused", rel))
        return None
    text, problem = _decode(data, prefix, rel)
    if problem is not None:
        table.problems.append(problem)
        return None
    reader = csv.reader(_lines(text or "", table, prefix, rel))

    def rows() -> Iterator[tuple[int, list[str]]]:
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # field over csv.field_size_limit, bad quoting
                table.problems.append(DataProblem(f"{prefix}.unreadable", f"{rel}: line "
                                                  f"{reader.line_num}: {e}; rest of the file "
                                                  "not read", rel))
                return
            yield reader.line_num, cells

    return rows()


def _read_rows(path: Path, root: Path, rel: str, required: str, table: CsvTable
               ) -> tuple[list[str], Iterator[tuple[int, list[str]]]] | None:
    """Header and an iterator of non-blank (line number, cells) rows, or None (with a problem)
    if the file cannot be used as a whole."""
    prefix = "label" if required == LABEL_COLUMN else "ehr"
    rows = _open(path, root, rel, prefix, table)
    if rows is None:
        return None
    first = next(rows, None)
    if first is None:
        if not any(p.file == rel and p.code.endswith(".unreadable") for p in table.problems):
            table.problems.append(DataProblem(f"{prefix}.missing_column", f"{rel}: empty file",
                                              rel))
        return None
    header = [h.strip() for h in first[1]]
    if len(header) > MAX_COLUMNS:
        table.problems.append(DataProblem(f"{prefix}.missing_column", f"{rel}: header has "
                                          f"{len(header)} columns (limit {MAX_COLUMNS})", rel))
        return None
    missing = [c for c in (CASE_ID_COLUMN, required) if c and c not in header]
    if missing:
        hint = " (semicolon-separated? expected commas)" if first[1] and ";" in first[1][0] \
            else ""
        table.problems.append(DataProblem(f"{prefix}.missing_column",
                                          f"{rel}: required column(s) {missing} missing{hint}",
                                          rel, ",".join(missing)))
        return None
    return header, ((n, r) for n, r in rows if any(c.strip() for c in r))


def _duplicate_columns(header: list[str], relevant: set[str], prefix: str, rel: str,
                       table: CsvTable) -> bool:
    """True (with a problem) when a column that matters appears twice: which one is right?"""
    dups = sorted({h for h in header if header.count(h) > 1 and h in relevant})
    if dups:
        table.problems.append(DataProblem(f"{prefix}.duplicate_column", f"{rel}: column(s) "
                                          f"{dups} appear more than once; the file is not used "
                                          "(cannot tell which column is right)", rel,
                                          ",".join(dups)))
    return bool(dups)


def _no_rows(prefix: str, rel: str, table: CsvTable) -> None:
    table.problems.append(DataProblem(f"{prefix}.no_rows", f"{rel}: a header but no rows",
                                      rel))


def _too_many_rows(prefix: str, rel: str, table: CsvTable) -> None:
    table.problems.append(DataProblem(f"{prefix}.too_many_rows", f"{rel}: more than {MAX_ROWS} "
                                      "rows; the rest not read", rel))


def _number(text: str) -> float | None:
    """The value of ASCII decimal text, None when it is not one."""
    return float(text) if ASCII_NUMBER.fullmatch(text) else None


def _parse_value(spec: FieldSpec, text: str, case_id: str, rel: str
                 ) -> tuple[float, DataProblem | None]:
    t = text.strip()
    if t.lower() in MISSING_TOKENS:
        return math.nan, None
    if any(ch.isdigit() and not ch.isascii() for ch in t):
        return math.nan, DataProblem("ehr.non_ascii_number", f"{rel}: case {case_id}: "
                                     f"{spec.name} has non-ASCII digits (e.g. Arabic-Indic or "
                                     "fullwidth); write numbers with 0-9; treated as missing",
                                     rel, spec.name, fatal=False)
    v = _number(t)
    if v is None or not math.isfinite(v):  # text, NaN/inf spelled out, or 1e999
        return math.nan, DataProblem("ehr.not_a_number", f"{rel}: case {case_id}: {spec.name} "
                                     f"is {t[:40]!r}, expected a number in {spec.unit}", rel,
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


def _where(path: Path, rel: str | None, root: Path | None) -> tuple[Path, str] | None:
    """(root, rel) of the file, or None when it does not exist at all (an optional file)."""
    root = path.parent if root is None else root
    if not path.exists() and not path.is_symlink():
        return None
    return root, rel if rel is not None else rel_name(path, root)


def read_ehr(path: Path, schema: EhrSchema, rel: str | None = None, *,
             root: Path | None = None) -> CsvTable:
    """values: case_id -> (F,) float32 in schema order, NaN where missing or invalid.

    path: the file (absent = no EHR, an empty table); root: the site root it must stay inside
    (default: its folder); rel: its name in messages (default: relative to root).
    """
    table = CsvTable()
    where = _where(path, rel, root)
    if where is None:
        return table
    root, rel = where
    parsed = _read_rows(path, root, rel, "", table)
    if parsed is None:
        return table
    header, rows = parsed
    if _duplicate_columns(header, {CASE_ID_COLUMN, *schema.names}, "ehr", rel, table):
        return table
    unknown = [h for h in header if h != CASE_ID_COLUMN and h not in schema.names]
    if unknown:
        table.problems.append(DataProblem("ehr.unknown_column", f"{rel}: column(s) "
                                          f"{[u[:40] for u in unknown[:20]]} not in schema "
                                          f"{schema.name!r}; ignored", rel,
                                          ",".join(unknown[:20]), fatal=False))
    absent = [n for n in schema.names if n not in header]
    if absent:
        table.problems.append(DataProblem("ehr.missing_column", f"{rel}: schema column(s) "
                                          f"{absent} missing; those fields are missing for "
                                          "every case", rel, ",".join(absent), fatal=False))
    col = {h: i for i, h in enumerate(header)}
    seen: dict[str, np.ndarray] = {}
    conflicted: set[str] = set()
    n_rows = 0
    for line, cells in rows:
        n_rows += 1
        if n_rows > MAX_ROWS:
            _too_many_rows("ehr", rel, table)
            break
        if len(cells) != len(header):
            table.row_problem(DataProblem("ehr.bad_row", f"{rel}: line {line} has "
                                          f"{len(cells)} cells, header has {len(header)}; "
                                          "row ignored", rel))
            continue
        case_id = cells[col[CASE_ID_COLUMN]].strip()
        if not case_id:
            table.row_problem(DataProblem("ehr.missing_case_id", f"{rel}: line {line} has "
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
    if n_rows == 0 and not any(p.code == "ehr.unreadable" for p in table.problems):
        _no_rows("ehr", rel, table)
    table.finish("ehr", rel)
    table.values = {k: v for k, v in seen.items() if k not in conflicted}
    return table


def parse_label(text: str) -> int | None:
    t = text.strip().lower()
    if t in LABEL_WORDS:
        return LABEL_WORDS[t]
    v = _number(t)  # "1.0" is fine, a fullwidth "１" is not
    return int(v) if v in (0.0, 1.0) else None


def read_labels(path: Path, rel: str | None = None, *, root: Path | None = None) -> CsvTable:
    """values: case_id -> 0/1. Empty labels are 'label.missing'; bad ones 'label.invalid'.

    path/root/rel as for read_ehr.
    """
    table = CsvTable()
    where = _where(path, rel, root)
    if where is None:
        return table
    root, rel = where
    parsed = _read_rows(path, root, rel, LABEL_COLUMN, table)
    if parsed is None:
        return table
    header, rows = parsed
    if _duplicate_columns(header, {CASE_ID_COLUMN, LABEL_COLUMN}, "label", rel, table):
        return table
    ci, li = header.index(CASE_ID_COLUMN), header.index(LABEL_COLUMN)
    conflicted: set[str] = set()
    n_rows = 0
    for line, cells in rows:
        n_rows += 1
        if n_rows > MAX_ROWS:
            _too_many_rows("label", rel, table)
            break
        if len(cells) <= max(ci, li):
            table.row_problem(DataProblem("label.bad_row", f"{rel}: line {line} is short; "
                                          "ignored", rel))
            continue
        case_id, text = cells[ci].strip(), cells[li].strip()
        if not case_id:
            table.row_problem(DataProblem("label.missing_case_id", f"{rel}: line {line} "
                                          "has no case_id; ignored", rel, CASE_ID_COLUMN))
            continue
        if not text:
            continue  # reported as label.missing by the dataset, like an absent row
        label = parse_label(text)
        if label is None:
            table.add(case_id, DataProblem("label.invalid", f"{rel}: case {case_id}: label "
                                           f"{text[:40]!r}, expected 0/1 or benign/malignant",
                                           rel, LABEL_COLUMN, fatal=False))
            continue
        if case_id in table.values and table.values[case_id] != label:
            conflicted.add(case_id)
            table.add(case_id, DataProblem("label.duplicate", f"{rel}: case {case_id} has "
                                           "conflicting labels; label dropped", rel,
                                           LABEL_COLUMN, fatal=False))
        table.values[case_id] = label
    if n_rows == 0 and not any(p.code == "label.unreadable" for p in table.problems):
        _no_rows("label", rel, table)
    table.finish("label", rel)
    for c in conflicted:
        table.values.pop(c, None)
    return table

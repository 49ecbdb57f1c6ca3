"""EHR schemas: the columns of `ehr.csv`, their units and valid ranges, as versioned data files.

The model's EHR encoder has one token per field of the schema; values are normalised with the
schema's fixed reference centre/scale (never with statistics pooled across hospitals, which would
need patient data to leave a site).

A schema is a TOML file (format: README.md "EHR schema files"); the shipped ones live in
`vocab/schemas/<id>.toml`. Loading is strict (unknown keys, wrong types, empty or inverted ranges,
non-finite numbers are `ConfigError`s naming the file, the field and the value) because the
coordinator and every hospital must agree on the schema exactly: `EhrSchema.content_hash` is what
they compare.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

from vocab.errors import ConfigError

FieldKind = Literal["numeric", "binary", "categorical"]
KINDS: Final = ("numeric", "binary", "categorical")
SCHEMA_DIR: Final = Path(__file__).resolve().parent / "schemas"
MAX_SCHEMA_BYTES: Final = 1_000_000
# Schema ids travel on the wire (round config, refusal messages): a short plain token only.
SCHEMA_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
FIELD_NAME_PATTERN: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
LOINC_PATTERN: Final = re.compile(r"\d{1,7}-\d")
_TOP_KEYS: Final = frozenset({"schema", "field"})
_SCHEMA_KEYS: Final = frozenset({"id", "version", "description"})
_FIELD_KEYS: Final = frozenset({"name", "unit", "kind", "lo", "hi", "center", "scale", "levels",
                                "loinc", "description", "convert"})
_CONVERT_KEYS: Final = frozenset({"unit", "factor"})


@dataclass(frozen=True)
class UnitConversion:
    """A unit the FHIR import accepts for a field: value_in_field_unit = value * factor."""

    unit: str  # UCUM code as written in Observation.valueQuantity.code (or .unit)
    factor: float


@dataclass(frozen=True)
class FieldSpec:
    """One EHR column.

    lo/hi: the physiologically possible range; a value outside it is an error, not an outlier.
    center/scale: fixed normalisation, (value - center) / scale, chosen from clinical references.
    levels: the allowed codes of a categorical/binary field (stored as numbers in the CSV).
    loinc: the LOINC code the FHIR import maps to this field ("" = not imported from FHIR).
    convert: other units the FHIR import converts from.
    """

    name: str
    unit: str
    kind: FieldKind
    lo: float
    hi: float
    center: float
    scale: float
    description: str
    levels: tuple[int, ...] = ()
    loinc: str = ""
    convert: tuple[UnitConversion, ...] = ()

    def normalise(self, value: float) -> float:
        return (value - self.center) / self.scale

    def canonical(self) -> dict[str, Any]:
        """What defines the field's meaning (descriptions are documentation, not hashed)."""
        return {"name": self.name, "unit": self.unit, "kind": self.kind, "lo": float(self.lo),
                "hi": float(self.hi), "center": float(self.center), "scale": float(self.scale),
                "levels": [int(v) for v in self.levels], "loinc": self.loinc,
                "convert": [{"unit": c.unit, "factor": float(c.factor)} for c in self.convert]}


@dataclass(frozen=True)
class EhrSchema:
    name: str  # the schema id, e.g. "chest-v1"
    fields: tuple[FieldSpec, ...]
    version: str = ""
    description: str = ""

    @property
    def id(self) -> str:
        return self.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"EHR schema {self.name!r} has no field {name!r}; fields: {self.names}")

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, every number a float: independent of the file's layout,
        comments, number spelling (18 vs 18.0) and descriptions, so a wording fix does not split
        a federation while any change of meaning (unit, range, code, normalisation) does."""
        doc = {"id": self.name, "version": self.version,
               "fields": [f.canonical() for f in self.fields]}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @cached_property
    def content_hash(self) -> str:
        """sha256 hex of `canonical_json()`: what coordinator and hospitals compare."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    @property
    def label(self) -> str:
        """`id@hash8`: names the schema in messages that may leave a hospital."""
        return f"{self.name}@{self.content_hash[:8]}"


# ---- loading --------------------------------------------------------------------------------


class _Where:
    """Builds ConfigErrors that name the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, what: str) -> ConfigError:
        return ConfigError(f"EHR schema {self.source}: {where}: {what}")


def _unknown(w: _Where, where: str, table: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise w.error(where, f"unknown key(s) {extra}; known: {sorted(allowed)}")


def _text(w: _Where, where: str, table: dict[str, Any], key: str, *, required: bool = True,
          pattern: re.Pattern[str] | None = None, max_len: int = 500) -> str:
    if key not in table:
        if required:
            raise w.error(where, f"{key!r} is required")
        return ""
    value = table[key]
    if not isinstance(value, str):
        raise w.error(where, f"{key} must be a string, got {type(value).__name__} {value!r}")
    if len(value) > max_len:
        raise w.error(where, f"{key} is longer than {max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise w.error(where, f"{key} = {value!r} does not match {pattern.pattern}")
    return value


def _number(w: _Where, where: str, table: dict[str, Any], key: str) -> float:
    if key not in table:
        raise w.error(where, f"{key!r} is required")
    value = table[key]
    # bool is an int subclass: `lo = true` must not read as 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise w.error(where, f"{key} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise w.error(where, f"{key} = {value!r} is not a finite number")
    return float(value)


def _levels(w: _Where, where: str, table: dict[str, Any], kind: str, lo: float, hi: float
            ) -> tuple[int, ...]:
    if "levels" not in table:
        if kind == "categorical":
            raise w.error(where, "a categorical field needs 'levels' (its allowed codes)")
        return (0, 1) if kind == "binary" else ()
    raw = table["levels"]
    if kind == "numeric":
        raise w.error(where, f"levels = {raw!r} given for a numeric field")
    if not isinstance(raw, list) or not raw:
        raise w.error(where, f"levels must be a non-empty list of integers, got {raw!r}")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int):
            raise w.error(where, f"level {v!r} is not an integer")
        if not lo <= v <= hi:
            raise w.error(where, f"level {v} outside the valid range {lo:g}-{hi:g}")
    if len(set(raw)) != len(raw):
        raise w.error(where, f"levels {raw!r} repeat a code")
    if kind == "binary" and sorted(raw) != [0, 1]:
        raise w.error(where, f"a binary field has levels [0, 1], got {raw!r}")
    return tuple(raw)


def _conversions(w: _Where, where: str, table: dict[str, Any], kind: str, unit: str
                 ) -> tuple[UnitConversion, ...]:
    raw = table.get("convert", [])
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise w.error(where, f"convert must be [[field.convert]] tables, got {raw!r}")
    if raw and kind != "numeric":
        raise w.error(where, f"unit conversions given for a {kind} field")
    out: list[UnitConversion] = []
    for i, c in enumerate(raw):
        cw = f"{where} convert #{i + 1}"
        _unknown(w, cw, c, _CONVERT_KEYS)
        cu = _text(w, cw, c, "unit", max_len=64)
        factor = _number(w, cw, c, "factor")
        if not cu.strip() or cu == unit:
            raise w.error(cw, f"unit {cu!r} is empty or the field's own unit")
        if factor <= 0:
            raise w.error(cw, f"factor = {factor!r} must be > 0")
        if any(o.unit == cu for o in out):
            raise w.error(cw, f"unit {cu!r} converted twice")
        out.append(UnitConversion(cu, factor))
    return tuple(out)


def _field(w: _Where, index: int, table: Any) -> FieldSpec:
    where = f"field #{index + 1}"
    if not isinstance(table, dict):
        raise w.error(where, f"expected a [[field]] table, got {table!r}")
    name = _text(w, where, table, "name", pattern=FIELD_NAME_PATTERN)
    where = f"field {name!r}"
    _unknown(w, where, table, _FIELD_KEYS)
    if name == "case_id":
        raise w.error(where, "'case_id' is the case column of ehr.csv, not a field")
    unit = _text(w, where, table, "unit", max_len=64)
    kind = _text(w, where, table, "kind")
    if kind not in KINDS:
        raise w.error(where, f"kind = {kind!r}, expected one of {list(KINDS)}")
    lo, hi = _number(w, where, table, "lo"), _number(w, where, table, "hi")
    if lo >= hi:
        raise w.error(where, f"lo = {lo:g} must be below hi = {hi:g}")
    center, scale = _number(w, where, table, "center"), _number(w, where, table, "scale")
    if scale <= 0:
        raise w.error(where, f"scale = {scale:g} must be > 0")
    levels = _levels(w, where, table, kind, lo, hi)
    loinc = _text(w, where, table, "loinc", required=False, pattern=LOINC_PATTERN)
    return FieldSpec(name, unit, kind, lo, hi, center, scale,  # type: ignore[arg-type]
                     _text(w, where, table, "description", required=False), levels, loinc,
                     _conversions(w, where, table, kind, unit))


def parse_schema(doc: dict[str, Any], source: str) -> EhrSchema:
    """An EhrSchema from a parsed TOML document; `source` names it in errors."""
    w = _Where(source)
    _unknown(w, "top level", doc, _TOP_KEYS)
    head = doc.get("schema")
    if not isinstance(head, dict):
        raise w.error("[schema]", "a [schema] table with id and version is required")
    _unknown(w, "[schema]", head, _SCHEMA_KEYS)
    sid = _text(w, "[schema]", head, "id", pattern=SCHEMA_ID_PATTERN)
    version = _text(w, "[schema]", head, "version", max_len=64)
    fields_raw = doc.get("field")
    if not isinstance(fields_raw, list) or not fields_raw:
        raise w.error("[[field]]", "at least one [[field]] table is required")
    fields = tuple(_field(w, i, t) for i, t in enumerate(fields_raw))
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            raise w.error(f"field {f.name!r}", "defined twice")
        seen.add(f.name)
    return EhrSchema(sid, fields, version,
                     _text(w, "[schema]", head, "description", required=False))


def parse_schema_bytes(data: bytes, source: str) -> EhrSchema:
    """An EhrSchema from a TOML file's bytes (size-checked by the caller's read)."""
    if len(data) > MAX_SCHEMA_BYTES:
        raise ConfigError(f"EHR schema {source}: over {MAX_SCHEMA_BYTES} bytes; refused")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"EHR schema {source}: not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"EHR schema {source}: invalid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"EHR schema {source}: nested too deeply") from None
    return parse_schema(doc, source)


def load_schema_file(path: Path | str) -> EhrSchema:
    """Read and validate one schema file: a regular file of at most MAX_SCHEMA_BYTES."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: what is opened below is what is checked
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"EHR schema {path}: not a regular file")
        if st.st_size > MAX_SCHEMA_BYTES:
            raise ConfigError(f"EHR schema {path}: {st.st_size} bytes, over the limit of "
                              f"{MAX_SCHEMA_BYTES}; refused")
        with path.open("rb") as f:
            data = f.read(MAX_SCHEMA_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"EHR schema {path}: cannot read ({type(e).__name__})") from None
    return parse_schema_bytes(data, str(path))


def _load_shipped() -> dict[str, EhrSchema]:
    out: dict[str, EhrSchema] = {}
    for path in sorted(SCHEMA_DIR.glob("*.toml")):
        schema = load_schema_file(path)
        if schema.name != path.stem:
            raise ConfigError(f"EHR schema {path}: id {schema.name!r} differs from the file "
                              f"name {path.stem!r}")
        out[schema.name] = schema
    return out


SCHEMAS: Final[dict[str, EhrSchema]] = _load_shipped()
CHEST_V1: Final = SCHEMAS["chest-v1"]
UCI_HEART: Final = SCHEMAS["uci-heart"]


def looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path


def get_schema(name_or_path: str | Path) -> EhrSchema:
    """A shipped schema by id, or a schema file by path (a path: contains '/' or ends in .toml).

    Unknown ids raise KeyError (as before); a bad file raises ConfigError.
    """
    if isinstance(name_or_path, Path) or looks_like_path(name_or_path):
        return load_schema_file(name_or_path)
    try:
        return SCHEMAS[name_or_path]
    except KeyError:
        raise KeyError(f"unknown EHR schema {name_or_path!r}; known: {sorted(SCHEMAS)} "
                       "(or a path to a .toml schema file)") from None

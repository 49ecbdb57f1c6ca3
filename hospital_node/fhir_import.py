"""FHIR R4 Bundles (JSON) -> `ehr.csv` in an EHR schema, reporting everything it did not map.

Parsing: each Bundle file is bounded (MAX_BUNDLE_BYTES) and JSON-decoded; the Bundle shell and
every Patient/Observation resource are validated with `fhir.resources` (its R4B models: 8.x ships
R5 as default, R4B and STU3; R4B reads R4 Patient/Observation/Bundle). A file that is not a FHIR
Bundle is a `DataError`; a bad resource inside one is reported and skipped.

Mapping (never guessed; what cannot be mapped is listed with a reason code):
- case_id: `Patient.id`, or with `id_system` the value of the Patient.identifier of that system.
- sex (when the schema has it): Patient.gender male = 1, female = 0; other/unknown are reported.
- age (when the schema has it): full years from Patient.birthDate to `as_of`, or without it to
  the patient's latest dated mapped Observation; a partial birthDate is reported, not rounded.
  Without a birthDate, an Observation with the age field's LOINC code (30525-0) is used.
- Observations by LOINC code (`http://loinc.org`) to the field with that `loinc`; status must be
  final, amended or corrected. A valueQuantity in the field's unit is used as is, one in a unit the
  schema lists under `convert` (UCUM code, else unit text) is multiplied by its factor, anything
  else is reported. Integer/boolean values only for categorical/binary fields. Values outside the
  field's range or levels are reported, not clipped.
- Several observations of one field for one patient: the latest (effectiveDateTime, else
  effectivePeriod end/start, else issued) wins; dated beats undated; different values at the same
  latest time are a conflict and the field is left empty.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vocab.ehr_schema import EhrSchema, FieldSpec
from vocab.errors import ConfigError, DataError
from vocab.site_layout import CASE_ID_COLUMN, EHR_FILE

MAX_BUNDLE_BYTES = 256 * 1024 * 1024
LOINC_SYSTEM = "http://loinc.org"
USABLE_STATUS = frozenset({"final", "amended", "corrected"})
GENDER_CODES = {"male": 1, "female": 0}
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?")


@dataclass(frozen=True)
class Skipped:
    """One thing not mapped: where (bundle file, resource), a stable code and a message."""

    bundle: str
    resource: str  # "Observation/<id>" or "entry <n>"
    code: str
    message: str


@dataclass(frozen=True)
class _Candidate:
    when: dt.datetime | None  # naive UTC; None = undated
    value: float
    source: str


@dataclass
class _Patient:
    case_id: str
    birth: dt.date | None = None
    sex: float | None = None
    obs: dict[str, list[_Candidate]] = field(default_factory=dict)


@dataclass
class ImportResult:
    rows: dict[str, dict[str, float]]  # case_id -> field -> value (mapped fields only)
    skipped: list[Skipped]
    n_patients: int = 0
    n_observations_used: int = 0

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.code] = counts.get(s.code, 0) + 1
        return dict(sorted(counts.items()))


def _validation_summary(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            loc = ".".join(str(x) for x in errs[0].get("loc", ())) or "(resource)"
            return f"{len(errs)} validation error(s), first at {loc}: {errs[0].get('msg', '')}"
    return type(e).__name__


def read_bundle(path: Path) -> list[dict[str, Any]]:
    """The entries of one Bundle file (validated shell); DataError naming the file otherwise."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        size = path.stat().st_size
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        if size > MAX_BUNDLE_BYTES:
            raise DataError(f"{path}: {size} bytes, over the limit of {MAX_BUNDLE_BYTES}")
        with path.open("rb") as f:
            # size + 1, not the limit + 1: read(n) allocates n bytes before reading.
            data = f.read(min(size, MAX_BUNDLE_BYTES) + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__})") from None
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        kind = doc.get("resourceType") if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f"{path}: not a FHIR Bundle (resourceType {kind!r})")
    entries = doc.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: Bundle.entry must be a list of objects")
    try:
        Bundle.model_validate({k: v for k, v in doc.items() if k != "entry"})
    except (ValidationError, ValueError) as e:
        raise DataError(f"{path}: not a valid FHIR Bundle ({_validation_summary(e)})") from None
    return entries


def _when(obs: Any) -> dt.datetime | None:
    for value in (obs.effectiveDateTime,
                  obs.effectivePeriod.end if obs.effectivePeriod else None,
                  obs.effectivePeriod.start if obs.effectivePeriod else None, obs.issued):
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value
        if isinstance(value, dt.date):
            return dt.datetime(value.year, value.month, value.day)
        m = _PARTIAL_DATE.fullmatch(str(value))  # "2020" / "2020-03": ordering only
        if m:
            return dt.datetime(int(m.group(1)), int(m.group(2) or 1), 1)
    return None


def _unit_factor(spec: FieldSpec, code: str | None, unit: str | None) -> float | None:
    for name in (code, unit):
        if not name:
            continue
        if name == spec.unit:
            return 1.0
        for c in spec.convert:
            if c.unit == name:
                return c.factor
    return None


def _value(obs: Any, spec: FieldSpec) -> tuple[float | None, str, str]:
    """(value in the field's unit, "", "") or (None, reason code, message)."""
    q = obs.valueQuantity
    if q is not None:
        if q.value is None:
            return None, "fhir.no_value", "valueQuantity without a value"
        if q.comparator:
            return None, "fhir.unsupported_value", f"value is a bound ({q.comparator}), not a " \
                "measurement"
        factor = _unit_factor(spec, q.code, q.unit)
        if factor is None and spec.kind != "numeric" and not (q.code or q.unit):
            factor = 1.0  # a code written as a unitless quantity
        if factor is None:
            known = [spec.unit, *(c.unit for c in spec.convert)]
            return None, "fhir.unit_without_conversion", f"unit {q.code or q.unit!r} has no " \
                f"conversion to {spec.unit!r} (schema lists {known})"
        return float(q.value) * factor, "", ""
    if obs.valueInteger is not None and spec.kind != "numeric":
        return float(obs.valueInteger), "", ""
    if obs.valueBoolean is not None and spec.kind == "binary":
        return float(obs.valueBoolean), "", ""
    kinds = [k for k in ("valueQuantity", "valueCodeableConcept", "valueString",
                         "valueBoolean", "valueInteger", "valueRange", "valueRatio",
                         "valueDateTime") if getattr(obs, k, None) is not None]
    return None, "fhir.unsupported_value", f"value type {kinds[0] if kinds else '(none)'} not " \
        f"supported for a {spec.kind} field"


def _check_range(spec: FieldSpec, v: float) -> str:
    if not math.isfinite(v):
        return f"{spec.name} value is not finite"
    if spec.levels and v not in spec.levels:
        return f"{spec.name} = {v:g} not one of {list(spec.levels)}"
    if not spec.levels and not spec.lo <= v <= spec.hi:
        return f"{spec.name} = {v:g} outside {spec.lo:g}-{spec.hi:g} {spec.unit}"
    return ""


class _Importer:
    def __init__(self, schema: EhrSchema, as_of: dt.date | None, id_system: str | None) -> None:
        self.schema, self.as_of, self.id_system = schema, as_of, id_system
        self.by_loinc = {f.loinc: f for f in schema.fields if f.loinc}
        self.patients: dict[str, _Patient] = {}  # case_id -> patient
        self.refs: dict[str, str] = {}  # "Patient/<id>" or fullUrl -> case_id
        self.skipped: list[Skipped] = []
        self.used = 0

    def skip(self, bundle: str, resource: str, code: str, message: str) -> None:
        self.skipped.append(Skipped(bundle, resource, code, message))

    def patient(self, bundle: str, where: str, full_url: str | None, raw: dict[str, Any]) -> None:
        from fhir.resources.R4B.patient import Patient
        from pydantic import ValidationError

        try:
            p = Patient.model_validate(raw)
        except (ValidationError, ValueError) as e:
            self.skip(bundle, where, "fhir.invalid_resource", _validation_summary(e))
            return
        where = f"Patient/{p.id}" if p.id else where
        if self.id_system:
            ids = [i.value for i in (p.identifier or []) if i.system == self.id_system and i.value]
            case_id = ids[0] if len(ids) == 1 else ""
            if len(ids) > 1:
                self.skip(bundle, where, "fhir.no_case_id", f"{len(ids)} identifiers of system "
                          f"{self.id_system}; cannot tell which is the case id")
                return
        else:
            case_id = p.id or ""
        if not case_id.strip():
            self.skip(bundle, where, "fhir.no_case_id", "no Patient.id" if not self.id_system
                      else f"no identifier of system {self.id_system}")
            return
        case_id = case_id.strip()
        pat = self.patients.setdefault(case_id, _Patient(case_id))
        for ref in (f"Patient/{p.id}" if p.id else None, full_url):
            if ref:
                self.refs[ref] = case_id
        if "sex" in self.schema.names and p.gender is not None:
            if p.gender in GENDER_CODES:
                sex = float(GENDER_CODES[p.gender])
                if pat.sex is not None and pat.sex != sex:
                    self.skip(bundle, where, "fhir.conflict", "gender differs between Patient "
                              "resources of one case; sex left empty")
                    pat.sex = math.nan
                elif pat.sex is None:
                    pat.sex = sex
            else:
                self.skip(bundle, where, "fhir.unmapped_gender", f"gender {p.gender!r} has no "
                          "code in the schema's sex field (0 = female, 1 = male)")
        if "age" in self.schema.names and p.birthDate is not None:
            if isinstance(p.birthDate, dt.date):
                pat.birth = p.birthDate
            else:
                self.skip(bundle, where, "fhir.partial_date", f"birthDate {p.birthDate} is "
                          "partial; age not computed")

    def observation(self, bundle: str, where: str, raw: dict[str, Any]) -> None:
        from fhir.resources.R4B.observation import Observation
        from pydantic import ValidationError

        try:
            o = Observation.model_validate(raw)
        except (ValidationError, ValueError) as e:
            self.skip(bundle, where, "fhir.invalid_resource", _validation_summary(e))
            return
        where = f"Observation/{o.id}" if o.id else where
        codes = [c.code for c in (o.code.coding or []) if c.system == LOINC_SYSTEM and c.code]
        spec = next((self.by_loinc[c] for c in codes if c in self.by_loinc), None)
        if spec is None:
            self.skip(bundle, where, "fhir.unknown_code", f"LOINC code(s) {codes or '(none)'} "
                      f"not in schema {self.schema.name}")
            return
        if o.status not in USABLE_STATUS:
            self.skip(bundle, where, "fhir.status", f"status {o.status!r}; only "
                      f"{sorted(USABLE_STATUS)} are used")
            return
        ref = o.subject.reference if o.subject is not None else None
        if not ref:
            self.skip(bundle, where, "fhir.missing_subject", "no subject reference")
            return
        case_id = self.refs.get(ref)
        if case_id is None:
            self.skip(bundle, where, "fhir.unknown_subject", f"subject {ref!r} is no Patient "
                      "in the given bundles")
            return
        value, code, message = _value(o, spec)
        if value is None:
            self.skip(bundle, where, code, f"{spec.name}: {message}")
            return
        problem = _check_range(spec, value)
        if problem:
            self.skip(bundle, where, "fhir.out_of_range", problem)
            return
        self.patients[case_id].obs.setdefault(spec.name, []).append(
            _Candidate(_when(o), value, f"{bundle}: {where}"))
        self.used += 1

    def rows(self) -> dict[str, dict[str, float]]:
        rows: dict[str, dict[str, float]] = {}
        for cid, pat in sorted(self.patients.items()):
            row: dict[str, float] = {}
            for name, cands in pat.obs.items():
                value = self._latest(cid, name, cands)
                if value is not None:
                    row[name] = value
            if pat.sex is not None and not math.isnan(pat.sex) and "sex" not in row:
                row["sex"] = pat.sex
            if pat.birth is not None:  # birthDate beats an "Age" observation
                age = self._age(cid, pat)
                if age is not None:
                    row["age"] = age
            rows[cid] = row
        return rows

    def _latest(self, cid: str, name: str, cands: list[_Candidate]) -> float | None:
        dated = [c for c in cands if c.when is not None]
        pool = dated or cands
        top = max(c.when for c in dated) if dated else None
        latest = [c for c in pool if c.when == top]
        if len({c.value for c in latest}) > 1:
            self.skip("", f"case {cid}", "fhir.conflict", f"{name}: {len(latest)} observations "
                      "at the same latest time with different values; left empty")
            return None
        return latest[0].value

    def _age(self, cid: str, pat: _Patient) -> float | None:
        assert pat.birth is not None
        ref = self.as_of
        if ref is None:
            whens = [c.when for cs in pat.obs.values() for c in cs if c.when is not None]
            ref = max(whens).date() if whens else None
        if ref is None:
            self.skip("", f"case {cid}", "fhir.no_reference_date", "age: no dated observation "
                      "to compute it at; give --as-of")
            return None
        b = pat.birth
        age = ref.year - b.year - ((ref.month, ref.day) < (b.month, b.day))
        problem = _check_range(self.schema.field("age"), float(age))
        if problem:
            self.skip("", f"case {cid}", "fhir.out_of_range", f"{problem} (from birthDate)")
            return None
        return float(age)


def import_bundles(paths: Iterable[Path], schema: EhrSchema, *, as_of: dt.date | None = None,
                   id_system: str | None = None) -> ImportResult:
    """Map the Patients and Observations of the bundles onto `schema` (see the module doc)."""
    imp = _Importer(schema, as_of, id_system)
    loaded = [(str(p), read_bundle(Path(p))) for p in paths]
    for kind in ("Patient", "Observation"):  # patients first: observations refer to them
        for name, entries in loaded:
            for i, entry in enumerate(entries):
                res = entry.get("resource")
                where = f"entry {i + 1}"
                if not isinstance(res, dict):
                    if kind == "Patient":
                        imp.skip(name, where, "fhir.invalid_resource", "entry has no resource")
                    continue
                rtype = res.get("resourceType")
                full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
                if rtype == kind == "Patient":
                    imp.patient(name, where, full_url, res)
                elif rtype == kind == "Observation":
                    imp.observation(name, where, res)
                elif kind == "Patient" and rtype not in ("Patient", "Observation"):
                    imp.skip(name, where, "fhir.unsupported_resource", f"resourceType "
                             f"{str(rtype)[:40]!r} is not imported")
    rows = imp.rows()
    return ImportResult(rows, imp.skipped, len(imp.patients), imp.used)


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.10g}"


def write_ehr_csv(result: ImportResult, schema: EhrSchema, out_dir: Path, *,
                  force: bool = False) -> Path:
    """`out_dir/ehr.csv` (case_id + the schema's columns, empty = missing), written atomically.
    An existing ehr.csv is replaced only with force (ConfigError otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / EHR_FILE
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([CASE_ID_COLUMN, *schema.names])
    for cid, row in result.rows.items():
        w.writerow([cid, *(_cell(row.get(n)) for n in schema.names)])
    tmp = target.with_name(f".{EHR_FILE}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, target)  # never a half-written ehr.csv
    return target

"""Load a hospital site: discover -> validate -> preprocess (cached) -> PreparedCase list + report.

Bad input never raises: a bad modality is excluded and reported, a case with no usable modality
is excluded, and the site's files are only ever opened for reading.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hospital_node.cache import CaseCache, default_cache_dir
from hospital_node.dicom_series import read_ct_series
from hospital_node.discover import CaseFiles, Discovery, discover
from hospital_node.pathology import read_tile
from hospital_node.preprocess import PREPROCESS_VERSION, ct_to_grid, path_to_tensor
from hospital_node.report import CaseReport, SiteReport
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from vocab.ehr_schema import CHEST_V1, SCHEMAS
from vocab.errors import DataError, DataProblem
from vocab.site_layout import SITE_FILE

log = logging.getLogger(__name__)
SITE_KEYS = {"site_id", "ehr_schema"}


@dataclass
class LoadedSite:
    site_id: str
    cases: list[PreparedCase]  # usable cases only
    report: SiteReport
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    ehr_schema: str
    problems: tuple[DataProblem, ...] = field(default=())


def read_site_config(root: Path) -> SiteConfig:
    """site.json if present (unknown keys and bad values reported), else the folder name."""
    site_id, schema = root.resolve().name, CHEST_V1.name
    path = root / SITE_FILE
    if not path.is_file():
        return SiteConfig(site_id, schema)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return SiteConfig(site_id, schema, (DataProblem(
            "site.bad_config", f"{SITE_FILE}: unreadable ({type(e).__name__}); using defaults",
            SITE_FILE, fatal=False),))
    if not isinstance(data, dict):
        return SiteConfig(site_id, schema, (DataProblem(
            "site.bad_config", f"{SITE_FILE}: expected a JSON object; using defaults", SITE_FILE,
            fatal=False),))
    problems = []
    unknown = sorted(set(data) - SITE_KEYS)
    if unknown:
        problems.append(DataProblem("site.bad_config", f"{SITE_FILE}: unknown key(s) {unknown}; "
                                    f"known: {sorted(SITE_KEYS)}", SITE_FILE, fatal=False))
    if isinstance(data.get("site_id"), str) and data["site_id"].strip():
        site_id = data["site_id"].strip()
    if "ehr_schema" in data:
        if data["ehr_schema"] in SCHEMAS:
            schema = data["ehr_schema"]
        else:
            problems.append(DataProblem("site.unknown_schema", f"{SITE_FILE}: ehr_schema "
                                        f"{data['ehr_schema']!r} not one of {sorted(SCHEMAS)}; "
                                        "EHR excluded", SITE_FILE, "ehr_schema"))
            schema = ""
    return SiteConfig(site_id, schema, tuple(problems))


class _CaseLoader:
    """Per-site state of one load: inputs, cache, root."""

    def __init__(self, root: Path, inputs: InputConfig, cache: CaseCache | None) -> None:
        self.root, self.inputs, self.cache = root, inputs, cache

    def _cached(self, kind: str, files: list[Path], compute) -> tuple[dict, list[DataProblem]]:
        if self.cache is None:
            return compute()
        key = self.cache.key(kind, files, self.root, self.inputs, PREPROCESS_VERSION)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        arrays, problems = compute()
        self.cache.put(key, arrays, problems)
        return arrays, problems

    def ct(self, folder: Path) -> tuple[dict, list[DataProblem]]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

        def compute() -> tuple[dict, list[DataProblem]]:
            series = read_ct_series(folder, self.root)
            if not series.usable:
                return {}, series.problems
            try:
                grid, affine = ct_to_grid(series, self.inputs)
            except DataError as e:
                rel = str(folder.relative_to(self.root))
                return {}, series.problems + [DataProblem("ct.preprocess_failed",
                                                          f"{rel}: {e}", rel)]
            return {"ct": grid, "ct_affine": affine,
                    "ct_tilt_deg": np.float64(series.tilt_deg)}, series.problems

        return self._cached("ct", files, compute)

    def path(self, file: Path) -> tuple[dict, list[DataProblem]]:
        def compute() -> tuple[dict, list[DataProblem]]:
            tile = read_tile(file, str(file.relative_to(self.root)))
            if not tile.usable or tile.rgb is None:
                return {}, tile.problems
            return {"path": path_to_tensor(tile.rgb, self.inputs)}, tile.problems

        return self._cached("path", [file], compute)


def _open_cache(root: Path, cache_dir: Path | None, use_cache: bool,
                problems: list[DataProblem]) -> CaseCache | None:
    if not use_cache:
        return None
    target = cache_dir if cache_dir is not None else default_cache_dir(root)
    try:
        return CaseCache(target, root)
    except OSError as e:
        # An unwritable cache slows training down but must not stop the node.
        problems.append(DataProblem("cache.unavailable", f"cache dir {target}: "
                                    f"{type(e).__name__}; running without cache", fatal=False))
        return None


def _load_case(cf: CaseFiles, disc: Discovery, loader: _CaseLoader, schema_ok: bool,
               site_id: str) -> tuple[PreparedCase, CaseReport]:
    cid = cf.case_id
    rep = CaseReport(cid, problems=list(cf.problems))
    case = PreparedCase(cid, site_id=site_id)
    if cf.ct_dir is not None:
        arrays, probs = loader.ct(cf.ct_dir)
        rep.problems.extend(probs)
        if "ct" in arrays:
            case.ct, case.ct_affine = arrays["ct"], arrays["ct_affine"]
            case.meta["ct_tilt_deg"] = float(arrays["ct_tilt_deg"])
        else:
            rep.excluded.append("ct")
    if cf.pathology is not None:
        arrays, probs = loader.path(cf.pathology)
        rep.problems.extend(probs)
        if "path" in arrays:
            case.path = arrays["path"]
        else:
            rep.excluded.append("path")
    elif any(p.code in ("case.duplicate", "path.unsupported_format") for p in cf.problems):
        rep.excluded.append("path")
    rep.problems.extend(disc.ehr.case_problems.get(cid, []))
    if cid in disc.ehr.values and schema_ok:
        case.ehr = np.asarray(disc.ehr.values[cid], dtype=np.float32)
    elif cid in disc.ehr.case_problems or (cid in disc.ehr.values and not schema_ok):
        rep.excluded.append("ehr")
    rep.problems.extend(disc.labels.case_problems.get(cid, []))
    label = disc.labels.values.get(cid)
    case.label = rep.label = int(label) if isinstance(label, int) else None
    if case.label is None and not any(p.code.startswith("label.") for p in rep.problems):
        rep.problems.append(DataProblem("label.missing", f"case {cid}: no label in labels.csv; "
                                        "usable for inference only, excluded from training",
                                        "labels.csv", fatal=False))
    rep.modalities = list(case.modalities())
    if not rep.modalities:
        what = "no usable modality" if rep.excluded else "no image or EHR data (label only)"
        rep.problems.append(DataProblem("case.no_data", f"case {cid}: {what}; case excluded"))
    return case, rep


def load_site(root: Path, inputs: InputConfig, cache_dir: Path | None = None, *,
              use_cache: bool = True) -> LoadedSite:
    """Every case of the site at `root`; usable ones as PreparedCase, all in the report."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"site data root {root} does not exist or is not a folder")
    cfg = read_site_config(root)
    problems = list(cfg.problems)
    schema_ok = cfg.ehr_schema == inputs.ehr_schema
    if cfg.ehr_schema and not schema_ok:
        problems.append(DataProblem("site.ehr_schema_mismatch", f"site EHR schema "
                                    f"{cfg.ehr_schema!r} differs from the model's "
                                    f"{inputs.ehr_schema!r}; EHR excluded", "site.json",
                                    "ehr_schema"))
    schema = SCHEMAS.get(cfg.ehr_schema or inputs.ehr_schema, CHEST_V1)
    disc = discover(root, schema)
    problems += disc.problems + disc.ehr.problems + disc.labels.problems
    cache = _open_cache(root, cache_dir, use_cache, problems)
    loader = _CaseLoader(root, inputs, cache)
    report = SiteReport(cfg.site_id, cfg.ehr_schema or "(none)", problems=problems)
    cases = []
    for cf in disc.cases.values():
        case, rep = _load_case(cf, disc, loader, schema_ok, cfg.site_id)
        report.cases.append(rep)
        if rep.usable:
            cases.append(case)
    hits, misses = (cache.hits, cache.misses) if cache else (0, 0)
    if cache is not None:
        cache.hashes.save()
    log.info("site loaded: %d cases, %d usable, %d trainable, cache %d hits / %d misses",
             len(report.cases), report.n_usable, report.n_trainable, hits, misses)
    return LoadedSite(cfg.site_id, cases, report, hits, misses)

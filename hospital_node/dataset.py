"""Load a hospital site: discover -> validate -> preprocess (cached) -> PreparedCase list + report.

Bad input never raises: a bad modality is excluded and reported, a case with no usable modality
is excluded, and the site's files are only ever opened for reading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hospital_node.cache import CaseCache, default_cache_dir
from hospital_node.ct_scan import scan_case
from hospital_node.dicom_series import read_case_ct
from hospital_node.discover import CaseFiles, Discovery, discover
from hospital_node.pathology import MAX_TILE_BYTES, read_tile
from hospital_node.preprocess import PREPROCESS_VERSION, ct_to_grid, path_to_tensor
from hospital_node.report import CaseReport, SiteReport
from hospital_node.series_choice import SeriesRule
from hospital_node.site_config import (  # noqa: F401  (re-exported)
    SITE_KEYS,
    SiteConfig,
    read_site_config,
)
from hospital_node.site_files import SiteFile, check_file, rel_name, walk_files
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from vocab.ehr_schema import CHEST_V1, EhrSchema, get_schema
from vocab.errors import ConfigError, DataError, DataProblem
from vocab.tasks import DEFAULT_TASK, labels_file

log = logging.getLogger(__name__)


@dataclass
class LoadedSite:
    site_id: str
    cases: list[PreparedCase]  # usable cases only
    report: SiteReport
    cache_hits: int = 0
    cache_misses: int = 0


class _CaseLoader:
    """Per-site state of one load: inputs, cache, root."""

    def __init__(self, root: Path, inputs: InputConfig, cache: CaseCache | None,
                 rule: SeriesRule) -> None:
        self.root, self.inputs, self.cache, self.rule = root, inputs, cache, rule

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
        # The cache key needs only the file list and bytes; headers are read on a miss.
        files = [f.path for f in walk_files(folder, self.root) if isinstance(f, SiteFile)]

        def compute() -> tuple[dict, list[DataProblem]]:
            series = read_case_ct(scan_case(folder, self.root), self.rule)
            if not series.usable:
                return {}, series.problems
            try:
                grid, affine = ct_to_grid(series, self.inputs)
            except DataError as e:
                rel = rel_name(folder, self.root)
                return {}, series.problems + [DataProblem("ct.preprocess_failed",
                                                          f"{rel}: {e}", rel)]
            return {"ct": grid, "ct_affine": affine,
                    "ct_tilt_deg": np.float64(series.tilt_deg),
                    "ct_region": np.str_(series.body_region)}, series.problems

        # The series rule decides what is read: a different rule is a different entry. The
        # folder is in the key too: problems name it, and a folder whose files are all refused
        # (a link out of the root) has no file to tell it apart from another such folder.
        rel = rel_name(folder, self.root)
        return self._cached(f"ct:{rel}:{self.rule!r}", files, compute)

    def path(self, file: Path) -> tuple[dict, list[DataProblem]]:
        checked = check_file(file, self.root, code_prefix="path", max_bytes=MAX_TILE_BYTES)
        if isinstance(checked, DataProblem):
            return {}, [checked]

        def compute() -> tuple[dict, list[DataProblem]]:
            tile = read_tile(checked.path, checked.rel)
            if not tile.usable or tile.rgb is None:
                return {}, tile.problems
            try:
                tensor = path_to_tensor(tile.rgb, self.inputs)
            except DataError as e:
                return {}, tile.problems + [DataProblem("path.preprocess_failed",
                                                        f"{checked.rel}: {e}", checked.rel)]
            return {"path": tensor}, tile.problems

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
            # entries cached before the region was recorded have none: no header verdict
            case.ct_region = str(arrays["ct_region"]) if "ct_region" in arrays else ""
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
        rep.problems.append(DataProblem("label.missing", f"case {cid}: no label in "
                                        f"{disc.labels_rel}; usable for inference only, "
                                        "excluded from training", disc.labels_rel, fatal=False))
    rep.modalities = list(case.modalities())
    if not rep.modalities:
        what = "no usable modality" if rep.excluded else "no image or EHR data (label only)"
        rep.problems.append(DataProblem("case.no_data", f"case {cid}: {what}; case excluded"))
    return case, rep


def _model_schema(inputs: InputConfig) -> EhrSchema | None:
    try:
        return get_schema(inputs.ehr_schema)
    except (KeyError, ConfigError):
        return None


def load_site(root: Path, inputs: InputConfig, cache_dir: Path | None = None, *,
              use_cache: bool = True, rule: SeriesRule | None = None,
              task: str | None = None) -> LoadedSite:
    """Every case of the site at `root`; usable ones as PreparedCase, all in the report.
    task: whose labels the cases carry (vocab.tasks; default: the first task, labels.csv)."""
    if not Path(root).is_dir():
        raise DataError(f"site data root {root} does not exist or is not a folder")
    # Resolved once: the site root may itself be a link (/data -> /mnt/pacs-export), and every
    # file the stages hand on is resolved, so names and cache keys are relative to the real root.
    root = Path(root).resolve()
    cfg = read_site_config(root)
    problems = list(cfg.problems)
    model_schema = _model_schema(inputs)
    # Same schema = same content hash (a hospital's own copy of a shipped schema file agrees).
    schema_ok = (cfg.schema is not None and model_schema is not None
                 and cfg.schema_hash == model_schema.content_hash)
    if cfg.schema is not None and not schema_ok:
        theirs = model_schema.label if model_schema is not None else repr(inputs.ehr_schema)
        problems.append(DataProblem("site.ehr_schema_mismatch", f"site EHR schema "
                                    f"{cfg.schema.label} differs from the model's {theirs}; "
                                    "EHR excluded", "site.json", "ehr_schema"))
    schema = cfg.schema or model_schema or CHEST_V1
    disc = discover(root, schema, labels_file(task or DEFAULT_TASK))
    problems += disc.problems + disc.ehr.problems + disc.labels.problems
    cache = _open_cache(root, cache_dir, use_cache, problems)
    loader = _CaseLoader(root, inputs, cache, rule or cfg.series_rule)
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

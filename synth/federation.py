"""Write a whole synthetic federation: one site data root per hospital, truth beside them.

<out>/federation.json          site ids, sizes and every knob (no per-patient data)
<out>/<site_id>/               a site data root (vocab.site_layout), what a node reads
<out>/<site_id>/labels/fibrosis.csv   second disease (SynthConfig.tasks has "fibrosis")
<out>/_truth/<site_id>/truth.json   latents, Bayes probabilities, lesions, atypia regions
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synth.config import LabelModel, SiteConfig, SynthConfig
from synth.ct import render_ct, write_series
from synth.ehr import SCHEMA, draw_ehr, format_value
from synth.model import LATENTS, Draw, auc, draw_fibrosis, draw_site, oracle_scores, rng_for
from synth.pathology import render_tile
from synth.truth import CaseTruth, LesionTruth, save_truth
from vocab.errors import ConfigError
from vocab.site_layout import (
    CASE_ID_COLUMN,
    CT_DIR,
    EHR_FILE,
    LABEL_COLUMN,
    LABELS_FILE,
    PATHOLOGY_DIR,
    SITE_FILE,
    TRUTH_DIR,
)
from vocab.tasks import labels_file

MANIFEST = "federation.json"
GENERATOR = "fedsight.synth"
FORMAT_VERSION = 1
# Random streams per case (the last element of rng_for's key), so one modality's draws never
# shift another's.
_S_CASE, _S_CT, _S_PATH, _S_EHR = 0, 1, 2, 3
# Second disease: its own per-case streams after the nodule ones, and its site-level latents from
# key (site, 0, 1) -- case streams have case >= 1 and the nodule latents use (site, 0) -- so
# turning fibrosis on never changes a nodule draw.
_S_FIB_CT, _S_FIB_PATH, _S_FIB_EHR = 4, 5, 6
_FIB_LATENT_KEY = (0, 1)
_S_LABELLED = 7  # whether a case's labels are written (SynthConfig.labelled_fraction < 1)
FIBROSIS = "fibrosis"
# SynthConfig fields that exist only for the second disease: left out of the manifest when it is
# off, so a one-task federation.json stays byte-identical to what earlier versions wrote.
_TASK_ONLY_FIELDS = ("tasks", "fibrosis_model", "fibrosis_coupling")
_TASK_ONLY_SITE_FIELDS = ("fibrosis_prevalence",)
# Likewise written only when not the default (every label written).
_DEFAULT_ONLY_FIELDS = {"labelled_fraction": 1.0}


def case_id_for(site: SiteConfig, index: int) -> str:
    """Pseudonymous case id: site letter(s) + running number, e.g. 'a-c0001' for site_a."""
    return f"{site.site_id.removeprefix('site_')}-c{index + 1:04d}"


def _prepare_out(out: Path) -> None:
    """Create out, or clear a previous synth output there; refuse anything else."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    manifest = out / MANIFEST
    try:
        doc = json.loads(manifest.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        doc = {}
    if doc.get("generator") != GENERATOR:
        raise ConfigError(
            f"refusing to write into {out}: it is not empty ({len(entries)} entries, e.g. "
            f"{entries[0]!r}) and not a previous synthetic federation (no {MANIFEST} from "
            f"{GENERATOR}); choose a new or empty folder"
        )
    ours = {MANIFEST, TRUTH_DIR, *(s["site_id"] for s in doc.get("sites", []))}
    foreign = [e for e in entries if e not in ours]
    if foreign:
        raise ConfigError(
            f"refusing to overwrite {out}: besides a previous synthetic federation it holds "
            f"{foreign[:3]} which the generator did not write"
        )
    for e in entries:  # only what the manifest says we wrote
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _generate_site(
    cfg: SynthConfig, index: int, out: Path
) -> tuple[dict[str, Any], list[CaseTruth]]:
    site = cfg.sites[index]
    root = out / site.site_id
    root.mkdir()
    draw = draw_site(site, cfg.label_model, rng_for(cfg.seed, index, 0))
    fib: Draw | None = None
    if FIBROSIS in cfg.tasks:
        fib = draw_fibrosis(
            draw,
            site.fibrosis_prevalence,
            cfg.fibrosis_model,
            cfg.fibrosis_coupling,
            rng_for(cfg.seed, index, *_FIB_LATENT_KEY),
        )
    has_path_dir = site.path_missing_rate < 1.0
    if has_path_dir:
        (root / PATHOLOGY_DIR).mkdir()
    (root / CT_DIR).mkdir()

    truths: list[CaseTruth] = []
    ehr_rows, label_rows, fib_rows = [], [], []
    unlabelled: list[str] = []
    for j in range(site.n_cases):
        cid = case_id_for(site, j)
        labelled = cfg.labelled_fraction >= 1.0 or (
            float(rng_for(cfg.seed, index, j + 1, _S_LABELLED).random()) < cfg.labelled_fraction
        )
        if not labelled:
            unlabelled.append(cid)
        r_case = rng_for(cfg.seed, index, j + 1, _S_CASE)
        has_ct = bool(r_case.random() >= site.ct_missing_rate)
        has_path = bool(r_case.random() >= site.path_missing_rate)
        when = dt.datetime(2024, 1, 1, 7, 0, 0) + dt.timedelta(
            days=int(r_case.integers(0, 365)), minutes=int(r_case.integers(0, 11 * 60))
        )
        s_ct, s_path, s_ehr = (float(v) for v in draw.scores[j])
        t_ct = t_path = t_ehr = None  # fibrosis scores; None = task off
        if fib is not None:
            t_ct, t_path, t_ehr = (float(v) for v in fib.scores[j])

        def fib_rng(purpose: int, j: int = j) -> np.random.Generator | None:
            return None if fib is None else rng_for(cfg.seed, index, j + 1, purpose)

        modalities = []
        lesions: tuple[LesionTruth, ...] = ()
        if has_ct:
            hu, geom, les = render_ct(
                cfg, site, s_ct, rng_for(cfg.seed, index, j + 1, _S_CT), t_ct, fib_rng(_S_FIB_CT)
            )
            write_series(
                root / CT_DIR / cid,
                hu,
                geom,
                uid_key=[GENERATOR, str(cfg.seed), site.site_id, cid],
                when=when,
                site=site,
            )
            lesions = tuple(
                LesionTruth(
                    tuple(round(c, 3) for c in x.centre_mm),
                    x.radius_mm,
                    x.kind,
                    x.hu,
                    x.spiculation,
                )
                for x in les
            )
            modalities.append("ct")
        bbox = None
        if has_path:
            tile, bbox = render_tile(
                site,
                s_path,
                cfg.path_tile_px,
                rng_for(cfg.seed, index, j + 1, _S_PATH),
                t_path,
                fib_rng(_S_FIB_PATH),
            )
            # compress_level 3: noisy tiles barely shrink further, and level 6 doubles encode time
            Image.fromarray(tile, "RGB").save(root / PATHOLOGY_DIR / f"{cid}.png", compress_level=3)
            modalities.append("path")
        ehr = draw_ehr(
            site, s_ehr, rng_for(cfg.seed, index, j + 1, _S_EHR), t_ehr, fib_rng(_S_FIB_EHR)
        )
        modalities.append("ehr")
        ehr_rows.append([cid, *(format_value(k, ehr[k]) for k in SCHEMA.names)])
        if labelled:
            label_rows.append([cid, str(int(draw.label[j]))])
        tasks: dict[str, dict[str, Any]] = {}
        if fib is not None:
            if labelled:
                fib_rows.append([cid, str(int(fib.label[j]))])
            tasks[FIBROSIS] = _task_truth(fib, j)
        truths.append(
            CaseTruth(
                case_id=cid,
                site_id=site.site_id,
                latents={k: round(float(v), 6) for k, v in zip(LATENTS, draw.z[j], strict=True)},
                scores={
                    "s_ct": round(s_ct, 6),
                    "s_path": round(s_path, 6),
                    "s_ehr": round(s_ehr, 6),
                },
                logit=round(float(draw.logit[j]), 6),
                bayes_prob=round(float(draw.bayes_prob[j]), 6),
                label=int(draw.label[j]),
                modalities=tuple(modalities),
                lesions=lesions,
                atypia_bbox=bbox,
                ehr=ehr,
                tasks=tasks,
            )
        )

    _write_csv(root / EHR_FILE, [CASE_ID_COLUMN, *SCHEMA.names], ehr_rows)
    _write_csv(root / LABELS_FILE, [CASE_ID_COLUMN, LABEL_COLUMN], label_rows)
    extra: dict[str, Any] = {"b0": round(draw.b0, 6), "path_tile_px": cfg.path_tile_px}
    if cfg.labelled_fraction < 1.0:
        extra["unlabelled"] = unlabelled
    if fib is not None:
        fib_file = root / labels_file(FIBROSIS)
        fib_file.parent.mkdir(exist_ok=True)
        _write_csv(fib_file, [CASE_ID_COLUMN, LABEL_COLUMN], fib_rows)
        extra["b0_tasks"] = {FIBROSIS: round(fib.b0, 6)}
    (root / SITE_FILE).write_text(
        json.dumps({"site_id": site.site_id, "ehr_schema": SCHEMA.name}, indent=2) + "\n"
    )
    save_truth(out, site.site_id, truths, extra)
    n_pos = int(draw.label.sum())
    summary = {
        "site_id": site.site_id,
        "n_cases": site.n_cases,
        "n_ct": sum("ct" in t.modalities for t in truths),
        "n_path": sum("path" in t.modalities for t in truths),
        "n_ehr": len(truths),
        "n_malignant": n_pos,
        "prevalence_target": site.prevalence,
        "prevalence_observed": round(n_pos / site.n_cases, 4),
    }
    if cfg.labelled_fraction < 1.0:
        summary["n_unlabelled"] = len(unlabelled)
    if fib is not None:  # only then: a one-task manifest keeps its bytes
        n_fib = int(fib.label.sum())
        summary["tasks"] = {
            FIBROSIS: {
                "n_positive": n_fib,
                "prevalence_target": site.fibrosis_prevalence,
                "prevalence_observed": round(n_fib / site.n_cases, 4),
            }
        }
    return summary, truths


def _task_truth(d: Draw, j: int) -> dict[str, Any]:
    """Truth of case j for a further task, with the same keys as the nodule fields of CaseTruth."""
    return {
        "latents": {k: round(float(v), 6) for k, v in zip(LATENTS, d.z[j], strict=True)},
        "scores": {
            k: round(float(v), 6)
            for k, v in zip(("s_ct", "s_path", "s_ehr"), d.scores[j], strict=True)
        },
        "logit": round(float(d.logit[j]), 6),
        "bayes_prob": round(float(d.bayes_prob[j]), 6),
        "label": int(d.label[j]),
    }


def _config_doc(cfg: SynthConfig) -> dict[str, Any]:
    """asdict(cfg) for the manifest; second-disease knobs only when that disease is on."""
    doc = asdict(cfg)
    for k, default in _DEFAULT_ONLY_FIELDS.items():
        if doc[k] == default:
            del doc[k]
    if FIBROSIS not in cfg.tasks:
        for k in _TASK_ONLY_FIELDS:
            del doc[k]
        for site in doc["sites"]:
            for k in _TASK_ONLY_SITE_FIELDS:
                del site[k]
    else:
        doc["tasks"] = list(cfg.tasks)
    return doc


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate(cfg: SynthConfig, out: Path, workers: int = 1) -> dict[str, Any]:
    """Write the federation described by cfg into out and return a summary.

    out must be new, empty, or a previous synthetic federation (which is replaced).
    workers: processes, one site each; the bytes written do not depend on it (every case draws
    from its own random stream). > 1 uses spawn, so a calling script needs the usual
    `if __name__ == "__main__":` guard (console scripts have it).
    """
    out = Path(out)
    _prepare_out(out)
    workers = max(1, min(workers, cfg.n_sites, os.cpu_count() or 1))
    if workers == 1:
        results = [_generate_site(cfg, i, out) for i in range(cfg.n_sites)]
    else:
        # spawn, not fork: the caller may hold torch/BLAS threads, which fork can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # largest sites first so the processes finish together
            order = sorted(range(cfg.n_sites), key=lambda i: -cfg.sites[i].n_cases)
            futures = {i: pool.submit(_generate_site, cfg, i, out) for i in order}
            results = [futures[i].result() for i in range(cfg.n_sites)]
    sites = [s for s, _ in results]
    truths = [t for _, ts in results for t in ts]
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "ehr_schema": SCHEMA.name,
        "sites": sites,
        "config": _config_doc(cfg),
    }
    summary: dict[str, Any] = {
        "out": str(out),
        "seed": cfg.seed,
        "n_sites": cfg.n_sites,
        "total_cases": sum(s["n_cases"] for s in sites),
        "cases_per_modality": {
            "ct": sum(s["n_ct"] for s in sites),
            "path": sum(s["n_path"] for s in sites),
            "ehr": sum(s["n_ehr"] for s in sites),
        },
        "sites": sites,
        "oracle_auc": oracle_aucs(
            cfg.label_model,
            [(t.logit, t.latents, t.scores, t.label) for t in truths],
        ),
    }
    if len(cfg.tasks) > 1:
        summary["oracle_auc_tasks"] = manifest["oracle_auc_tasks"] = {
            FIBROSIS: oracle_aucs(
                cfg.fibrosis_model,
                [
                    (d["logit"], d["latents"], d["scores"], d["label"])
                    for d in (t.tasks[FIBROSIS] for t in truths)
                ],
            )
        }
        manifest["tasks"] = list(cfg.tasks)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return summary


def oracle_aucs(
    lm: LabelModel, rows: list[tuple[float, dict[str, float], dict[str, float], int]]
) -> dict[str, float]:
    """Pooled AUC ceilings of one task: Bayes (all latents) and each modality combination's
    oracle. rows: (logit, latents, scores, label) per case under that task's model lm."""
    y = np.array([r[3] for r in rows])
    if len(y) == 0 or y.min() == y.max():
        return {}
    scores = np.array([[r[2]["s_ct"], r[2]["s_path"], r[2]["s_ehr"]] for r in rows])
    logit = np.array([r[0] for r in rows])
    res = {"bayes": round(auc(logit, y), 4)}
    # within-site b0 differs, so add each case's b0 back for a pooled ranking
    b0 = logit - np.array(
        [np.dot([lm.a, lm.b, lm.c, lm.d], [r[1][k] for k in LATENTS]) for r in rows]
    )
    for name, s in oracle_scores(scores, lm).items():
        res[name] = round(auc(s + b0, y), 4)
    return res

"""`fedsight adapt`: a new task from a hospital's labelled cases, on top of a stored base version.

Everything the request names is checked before any training starts (the task file, the base
checkpoint, each site's labels file and EHR schema, the number of labelled cases and both
classes); the base version is only read (its sha256 is checked before and after). The result is
a new version in a model store, carrying the task, the base it came from and the method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.store import ModelStore, sha256_file
from hospital_node.dataset import load_site
from hospital_node.splits import split_of
from multimodal.adapt import AdaptConfig, AdaptResult, adapt, check_cases
from multimodal.checkpoint import load_checkpoint, save_checkpoint
from multimodal.data import PreparedCase
from multimodal.metrics import auc
from multimodal.train import as_batch
from vocab.errors import ConfigError, DataError
from vocab.tasks import Task, get_task

MODEL = "model.pt"


@dataclass(frozen=True)
class AdaptRequest:
    base: Path  # model.pt, or a store version folder holding one
    task: str  # a shipped task id or a task file path
    sites: tuple[Path, ...]
    store: Path
    cases: int = 0  # 0 = every labelled training case; else a seeded sample of this many
    config: AdaptConfig = field(default_factory=AdaptConfig)
    split_seed: int = 0  # the nodes' split seed: training cases only, test cases held out
    cache_dir: Path | None = None


@dataclass
class AdaptReport:
    version_id: str
    task: str
    method: str
    n_train: int
    test_auc: dict[str, float | None]  # site -> AUC on its held-out cases (None: one class)
    seconds: float


def _base_checkpoint(base: Path) -> Path:
    ckpt = base / MODEL if base.is_dir() else base
    if not ckpt.is_file():
        raise ConfigError(f"base model {base}: no {MODEL} there")
    return ckpt


def _site_cases(root: Path, task: Task, inputs: Any, req: AdaptRequest
                ) -> tuple[str, list[PreparedCase], list[PreparedCase]]:
    """(site id, labelled training cases, labelled held-out cases) of one site for `task`."""
    if not (root / task.labels_file).is_file():
        raise DataError(f"site {root}: no {task.labels_file} (labels of task {task.id!r}); "
                        f"this site cannot take part in adapting to it")
    site = load_site(root, inputs, req.cache_dir, task=task.id)
    if any(p.code == "site.ehr_schema_mismatch" for p in site.report.problems):
        raise DataError(f"site {root}: its EHR schema ({site.report.ehr_schema}) is not the one "
                        f"task {task.id!r} reads ({task.ehr_schema})")
    labelled = [c for c in site.cases if c.label is not None]
    train = [c for c in labelled if split_of(c.case_id, req.split_seed) == "train"]
    test = [c for c in labelled if split_of(c.case_id, req.split_seed) == "test"]
    return site.site_id, train, test


def run_adapt(req: AdaptRequest) -> AdaptReport:
    task = get_task(req.task)
    ckpt = _base_checkpoint(req.base)
    digest = sha256_file(ckpt)
    base = load_checkpoint(ckpt)
    if task.ehr_schema != base.cfg.inputs.ehr_schema:
        raise ConfigError(f"task {task.id!r} reads EHR schema {task.ehr_schema!r}, the base "
                          f"model {ckpt} was trained on {base.cfg.inputs.ehr_schema!r}")
    if not req.sites:
        raise ConfigError("adapt needs at least one --site")
    per_site = [_site_cases(Path(r), task, base.cfg.inputs, req) for r in req.sites]
    train = [c for _, tr, _ in per_site for c in tr]
    if req.cases:
        if req.cases > len(train):
            raise ConfigError(f"--cases {req.cases}: only {len(train)} labelled training "
                              f"case(s) of task {task.id!r} at the given site(s)")
        train = random.Random(req.config.seed).sample(train, req.cases)
    check_cases(train, task.id, req.config.min_cases)
    res = adapt(base, train, task.id, req.config)
    aucs = {sid: _auc(res, test) for sid, _, test in per_site}
    if sha256_file(ckpt) != digest:  # nothing here writes it; a guard against regressions
        raise ConfigError(f"base model {ckpt} changed while adapting; new version not stored")
    meta = {"task": task.id, "tasks": list(res.model.cfg.tasks), "kind": "adapted",
            "base": {"version": req.base.name if req.base.is_dir() else "", "sha256": digest},
            "adapt": {**req.config.to_dict(), "n_cases": res.n_cases,
                      "n_sites": len(req.sites), "trainable_arrays": len(res.trainable),
                      "seconds": round(res.seconds, 1)},
            "metrics": {"task": task.id, "test_auc": aucs}}
    store = ModelStore(req.store)
    version = store.add_version(lambda p: save_checkpoint(res.model, p, meta=meta), meta)
    return AdaptReport(version.id, task.id, res.method, res.n_cases, aucs, res.seconds)


def _auc(res: AdaptResult, cases: list[PreparedCase]) -> float | None:
    labels = [c.label for c in cases]
    if len(set(labels)) < 2:
        return None
    with torch.no_grad():
        logit = res.model(as_batch(res.model, cases)).logit
    return round(float(auc(np.array(labels), logit.numpy())), 4)

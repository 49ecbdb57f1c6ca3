"""What a hospital does for the federation, with no Flower types: find its data, train locally
from the global weights, evaluate on its held-out split, report data statistics.

Everything returned here is meant to leave the hospital: weights, counts and aggregate metrics
only (vocab.records lists the keys). Case ids stay inside: they are used only to pick the fixed
train/test split (hospital_node.splits).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hospital_node.privacy import NODE_KEYS as PRIVACY_KEYS
from hospital_node.privacy import Ledger, PrivacySettings, default_ledger
from vocab import records as K
from vocab.errors import ConfigError, DataError, EhrSchemaMismatch
from vocab.json_config import json_object
from vocab.transport import check_transport, pack_update

# Node config keys (flower-supernode --node-config); simulation adds partition-id/num-partitions.
DATA_DIR, SITE_ID_KEY, CACHE_DIR = "data-dir", "site-id", "cache-dir"
WORKER_SOCKET = "worker-socket"  # hospital_node.worker's socket (set by `fedsight node start`)
MODELS_DIR = "models-dir"  # published versions held here (federated adaptation finds its base)
NODE_KEYS = frozenset({DATA_DIR, SITE_ID_KEY, CACHE_DIR, WORKER_SOCKET, MODELS_DIR,
                       "partition-id", "num-partitions"}) | PRIVACY_KEYS
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class NodeSettings:
    """This hospital's own configuration (parsed once from Flower's node config)."""

    data_dir: Path
    site_id: str = ""  # "" = take it from site.json / the folder name
    cache_dir: Path | None = None
    privacy: PrivacySettings | None = None  # None: the defaults (hospital_node.privacy)
    models_dir: Path | None = None  # published versions (hospital_node.published)

    @classmethod
    def from_configs(cls, node_config: dict[str, Any], run_config: dict[str, Any]
                     ) -> NodeSettings:
        unknown = sorted(set(node_config) - NODE_KEYS)
        if unknown:
            raise ConfigError(f"unknown node-config key(s) {unknown}; known: {sorted(NODE_KEYS)}")
        cache = node_config.get(CACHE_DIR) or run_config.get("cache-dir") or ""
        if DATA_DIR in node_config:
            data = Path(str(node_config[DATA_DIR]))
        elif "partition-id" in node_config:  # simulation: the i-th site of the federation folder
            data = site_of_partition(str(run_config.get("federation-dir", "")),
                                     int(node_config["partition-id"]))
        else:
            raise ConfigError(f"node config needs {DATA_DIR!r} (the site data root)")
        if cache and "partition-id" in node_config and CACHE_DIR not in node_config:
            cache = str(Path(cache) / data.name)  # one cache per simulated site
        cache_path = Path(cache) if cache else None
        # simulation: the virtual hospitals share the run config's folder
        models = node_config.get(MODELS_DIR) or run_config.get("models-dir") or ""
        return cls(data, str(node_config.get(SITE_ID_KEY, "")), cache_path,
                   PrivacySettings.from_node_config(node_config, data, cache_path),
                   Path(str(models)) if models else None)

    def ledger(self) -> Ledger:
        return Ledger(self.privacy or PrivacySettings(default_ledger(self.data_dir,
                                                                     self.cache_dir)))


def site_of_partition(federation_dir: str, partition_id: int) -> Path:
    if not federation_dir:
        raise ConfigError("simulation needs run config 'federation-dir' (folder of site roots)")
    root = Path(federation_dir)
    sites = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not 0 <= partition_id < len(sites):
        raise ConfigError(f"partition-id {partition_id} but {root} has {len(sites)} site folders")
    return sites[partition_id]


@dataclass(frozen=True)
class RoundConfig:
    """The coordinator's per-round instructions (ConfigRecord 'config')."""

    server_round: int = 0
    stage: int = 2
    local_epochs: int = K.DEFAULT_LOCAL_EPOCHS
    lr: float = K.DEFAULT_LR
    batch_size: int = K.DEFAULT_BATCH_SIZE
    model_json: str = "{}"
    train_json: str = "{}"
    seed: int = 0
    max_cases: int = 0
    proximal_mu: float = 0.0
    ehr_schema: str = ""  # the federation's EHR schema id ("" = take it from the model config)
    ehr_schema_hash: str = ""  # its content hash (sha256 hex)
    dp_noise_multiplier: float = 0.0  # DP-SGD (multimodal.dp); both 0 = off
    dp_max_grad_norm: float = 0.0
    transport: str = "fp32"  # vocab.transport: fp32 | fp16 (updates up as float16)
    sparse_experts: bool = False  # leave out experts this hospital routed no token to
    task: str = ""  # whose labels train ("" = the model's first task)
    adapt: str = "none"  # vocab.records.ADAPT_METHODS
    base_sha256: str = ""  # the base version (adapt rounds)
    pretrain_json: str = ""  # non-empty: a self-supervised pretraining round (its config)

    def __post_init__(self) -> None:
        # Wire values: echoed in a refusal that goes back to the coordinator, so keep them plain.
        from vocab.ehr_schema import SCHEMA_ID_PATTERN

        if self.ehr_schema and not SCHEMA_ID_PATTERN.fullmatch(str(self.ehr_schema)):
            raise ConfigError(f"round config ehr-schema {str(self.ehr_schema)[:80]!r} is not a "
                              "schema id")
        check_transport(str(self.transport))
        if self.task:
            from vocab.tasks import check_task_id

            check_task_id(self.task)
        if self.adapt not in K.ADAPT_METHODS or (self.adapt != "none" and not (
                self.task and _SHA256.fullmatch(str(self.base_sha256)))):
            raise ConfigError("round config adapt needs one of none|lora|head, and with lora or "
                              "head a task and base-sha256 (sha256 hex)")
        if self.pretrain_json and (self.adapt != "none" or self.task):
            raise ConfigError("round config pretrain-json takes no task or adapt")
        if bool(self.ehr_schema) != bool(self.ehr_schema_hash) or (
                self.ehr_schema_hash and not _SHA256.fullmatch(str(self.ehr_schema_hash))):
            raise ConfigError("round config needs ehr-schema and ehr-schema-hash (sha256 hex) "
                              "together")

    @classmethod
    def from_record(cls, config: dict[str, Any]) -> RoundConfig:
        names = {K.SERVER_ROUND: "server_round", K.STAGE: "stage",
                 K.LOCAL_EPOCHS: "local_epochs", K.LR: "lr", K.BATCH_SIZE: "batch_size",
                 K.MODEL_JSON: "model_json", K.TRAIN_JSON: "train_json", K.SEED: "seed",
                 K.MAX_CASES: "max_cases", K.PROXIMAL_MU: "proximal_mu",
                 K.EHR_SCHEMA: "ehr_schema", K.EHR_SCHEMA_HASH: "ehr_schema_hash",
                 K.DP_NOISE_MULTIPLIER: "dp_noise_multiplier",
                 K.DP_MAX_GRAD_NORM: "dp_max_grad_norm", K.TRANSPORT: "transport",
                 K.SPARSE_EXPERTS: "sparse_experts", K.TASK: "task", K.ADAPT: "adapt",
                 K.BASE_SHA256: "base_sha256", K.PRETRAIN_JSON: "pretrain_json"}
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ConfigError(f"unknown round config key(s) {unknown}; known: {sorted(names)}")
        kw = {names[k]: v for k, v in config.items()}
        for key in ("lr", "proximal_mu", "dp_noise_multiplier", "dp_max_grad_norm"):
            if key in kw:
                kw[key] = float(kw[key])
        return cls(**kw)

    def model_config(self) -> Any:
        from multimodal.config import ModelConfig

        return ModelConfig.from_dict(json_object(self.model_json, "model-json"))

    def train_config(self) -> Any:
        from multimodal.config import TrainConfig

        base = TrainConfig.from_dict(json_object(self.train_json, "train-json"))
        return base.replace(epochs=self.local_epochs, lr=self.lr, batch_size=self.batch_size,
                            seed=self.seed * 1000 + self.server_round,
                            fedprox_mu=self.proximal_mu or base.fedprox_mu,
                            dp_noise_multiplier=self.dp_noise_multiplier,
                            dp_max_grad_norm=self.dp_max_grad_norm)



def check_ehr_schema(node: NodeSettings, cfg: RoundConfig) -> None:
    """Refuse (EhrSchemaMismatch, a message safe to send) unless this site's EHR schema is the
    federation's: same id and same content hash. Without the round keys (an older coordinator)
    the federation's schema is the one the model config names."""
    from hospital_node.site_config import read_site_config
    from vocab.ehr_schema import get_schema

    if cfg.ehr_schema:
        fed_id, fed_hash = cfg.ehr_schema, cfg.ehr_schema_hash
    else:
        fed = get_schema(cfg.model_config().inputs.ehr_schema)
        fed_id, fed_hash = fed.name, fed.content_hash
    site = read_site_config(node.data_dir).schema
    if site is None or site.name != fed_id or site.content_hash != fed_hash:
        raise EhrSchemaMismatch(site.label if site is not None else "none",
                                f"{fed_id}@{fed_hash[:8]}")


@functools.lru_cache(maxsize=4)
def _load(data_dir: Path, inputs: Any, cache_dir: Path | None, task: str = "") -> Any:
    """One load per process, site and task (simulation reuses worker processes across rounds)."""
    from hospital_node.dataset import load_site

    return load_site(data_dir, inputs, cache_dir, task=task or None)


@dataclass(frozen=True)
class SiteData:
    site_id: str
    train: list[Any]  # PreparedCase, labelled, split "train"
    test: list[Any]  # PreparedCase, labelled, split "test"
    summary: dict[str, int]  # counts only


def site_data(node: NodeSettings, inputs: Any, seed: int, max_cases: int = 0,
              task: str = "") -> SiteData:
    """The site's labelled cases of `task` ("" = the first task) on the fixed split, with
    clinician feedback on that task applied to the training split
    (hospital_node.feedback_labels)."""
    from hospital_node.feedback_labels import apply_feedback, read_feedback_labels
    from hospital_node.splits import split_of
    from vocab.tasks import DEFAULT_TASK, labels_file

    if task and task != DEFAULT_TASK and not (node.data_dir / labels_file(task)).is_file():
        raise NoTaskLabels(f"this hospital has no labels for task {task!r}; it sits the "
                           f"round out")
    site = _load(node.data_dir, inputs, node.cache_dir, task)
    feedback = read_feedback_labels(node.data_dir, task or DEFAULT_TASK)
    cases = sorted((c for c in site.cases if c.label is not None or c.case_id in feedback),
                   key=lambda c: c.case_id)
    if max_cases > 0:
        cases = cases[:max_cases]
    split = apply_feedback(cases, feedback, lambda cid: split_of(cid, seed))
    train, test = split.train, split.test
    cases = train + test  # without held-out cases that only feedback labelled
    summary = {
        "cases-total": len(site.report.cases), "cases-usable": site.report.n_usable,
        "cases-excluded": len(site.report.cases) - site.report.n_usable,
        "cases-train": len(train), "cases-test": len(test),
        "positives-train": sum(c.label == 1 for c in train),
        "positives-test": sum(c.label == 1 for c in test),
        "with-ct": sum(c.ct is not None for c in cases),
        "with-path": sum(c.path is not None for c in cases),
        "with-ehr": sum(c.ehr is not None for c in cases),
        "feedback-train": split.feedback_train, "feedback-changed": split.feedback_changed,
    }
    return SiteData(node.site_id or site.site_id, train, test, summary)


class NoTaskLabels(DataError):
    """This hospital keeps no labels for the round's task (it sits the round out)."""


def _model(cfg: RoundConfig, state: dict[str, Any], node: NodeSettings | None = None) -> Any:
    """The round's model: the received arrays, on top of the locally held base version in an
    adaptation round; it serves the round's task."""
    from multimodal.model import FedsightModel

    model = FedsightModel(cfg.model_config())
    if cfg.adapt != "none":
        from hospital_node.published import base_state

        base = base_state(node.models_dir if node else None, cfg.base_sha256)
        own = model.state_dict()
        state = {k: v for k, v in base.items() if k in own} | dict(state)
    model.load_state_dict(state, strict=True)
    if cfg.task:
        model.use_task(cfg.task)
    return model


@dataclass(frozen=True)
class TrainOutcome:
    state: dict[str, Any]  # torch state_dict after local training
    metrics: dict[str, float]  # whitelisted keys only (vocab.records)
    global_step: int  # optimiser steps so far at this node (router-noise anneal)


def train(node: NodeSettings, cfg: RoundConfig, state: dict[str, Any], start_step: int = 0,
          run_id: int = 0) -> TrainOutcome:
    """Local training from the global weights. With DP-SGD the hospital's ledger is checked
    first (PrivacyRefusal: budget, DP required, broken ledger) and the round recorded before the
    update is returned; the reply then carries no training loss or expert token counts (they
    are computed from the data outside the DP mechanism)."""
    from multimodal.dp import plan
    from multimodal.train import train_local

    if cfg.pretrain_json:
        from hospital_node.pretrain_round import pretrain

        return pretrain(node, cfg, state, start_step)
    model = _model(cfg, state, node)
    data = site_data(node, model.cfg.inputs, cfg.seed, cfg.max_cases, cfg.task)
    if not data.train:
        raise DataError("no labelled training case at this site")
    if cfg.adapt != "none":
        return _train_adapter(model, cfg, data, set(state), start_step)
    tcfg = cfg.train_config()
    ledger = node.ledger()
    ledger.check(plan(len(data.train), tcfg.batch_size, tcfg.epochs, tcfg.dp_noise_multiplier)
                 if tcfg.dp else None, len(data.train))
    global_state = {k: v.detach().clone() for k, v in state.items()} \
        if cfg.proximal_mu > 0 else None
    result = train_local(model, data.train, tcfg, global_state=global_state,
                         stage=cfg.stage, start_step=start_step)
    last = result.history[-1] if result.history else {}
    metrics: dict[str, float] = {
        K.NUM_EXAMPLES: float(result.n_examples),
        K.TRAIN_LOSS: float(last.get("loss", math.nan)),
        K.TRAIN_SECONDS: float(result.seconds),
    }
    if result.dp is not None:
        del metrics[K.TRAIN_LOSS]
        metrics[K.DP_EPSILON] = ledger.record(run_id, cfg.server_round, result.dp)
        metrics[K.DP_DELTA] = ledger.settings.delta
    elif result.expert_counts is not None:
        for (layer, expert), count in _cells(result.expert_counts.tolist()):
            metrics[f"{K.EXPERT_TOKENS_PREFIX}.{layer}.{expert}"] = float(count)
    return TrainOutcome(model.state_dict(), metrics, result.global_step)


def _train_adapter(model: Any, cfg: RoundConfig, data: SiteData, keys: set[str],
                   start_step: int) -> TrainOutcome:
    """An adaptation round: only the received arrays (the task's adapters and head) train and
    return; the base stays as this hospital holds it."""
    import time

    from multimodal.adapt import AdaptConfig, train_head

    if cfg.dp_noise_multiplier or cfg.dp_max_grad_norm:
        raise ConfigError("DP-SGD is not built for adaptation rounds")
    t0 = time.perf_counter()
    acfg = AdaptConfig(method=cfg.adapt, epochs=max(cfg.local_epochs, 1), lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=cfg.seed * 1000 + cfg.server_round)
    history = train_head(model, data.train, cfg.task, acfg, keys)
    metrics = {K.NUM_EXAMPLES: float(len(data.train)),
               K.TRAIN_LOSS: float(history[-1]["loss"]) if history else math.nan,
               K.TRAIN_SECONDS: time.perf_counter() - t0}
    own = model.state_dict()
    return TrainOutcome({k: own[k] for k in keys}, metrics, start_step)


def unchanged_experts(local: dict[str, Any], received: dict[str, Any]) -> list[str]:
    """Routed-expert arrays bit-for-bit as received (this site sent them no token, and nothing
    else moved them): what a sparse-experts round leaves out of the reply."""
    import numpy as np

    return [k for k, v in local.items() if K.expert_of(k) is not None
            and np.array_equal(v, received[k].astype(v.dtype))]


def _cells(rows: list[list[float]]) -> list[tuple[tuple[int, int], float]]:
    return [((i, j), v) for i, row in enumerate(rows) for j, v in enumerate(row)]


def evaluate(node: NodeSettings, cfg: RoundConfig, state: dict[str, Any]
             ) -> dict[str, Any]:
    """Held-out loss / AUC / accuracy of the global model at this site (NaN when undefined),
    and the calibration sums (lists of floats) of its held-out cases."""
    import torch
    import torch.nn.functional as F

    from hospital_node.splits import calibration_fold
    from multimodal.calibration import grid_stats
    from multimodal.evaluate import predict_logits
    from multimodal.metrics import auc, threshold_metrics

    if cfg.pretrain_json:
        from hospital_node.pretrain_round import evaluate_objective

        return evaluate_objective(node, cfg, state)
    model = _model(cfg, state, node)
    data = site_data(node, model.cfg.inputs, cfg.seed, cfg.max_cases, cfg.task)
    n = len(data.test)
    out = {K.NUM_EXAMPLES: float(n), K.N_EVAL: float(n), K.LOSS: math.nan, K.AUC: math.nan,
           K.ACCURACY: math.nan}
    if n == 0:
        return out
    logits, labels = predict_logits(model, data.test)
    prob = torch.sigmoid(logits).numpy()
    y = labels.numpy()
    out[K.LOSS] = float(F.binary_cross_entropy_with_logits(logits, labels))
    out[K.AUC] = auc(y, prob)
    out[K.ACCURACY] = threshold_metrics(y, prob, 0.5)["accuracy"]
    # Sums for federated temperature scaling of this model (coordinator picks T); raw logits:
    # the model's own temperature is the coordinator's to set.
    folds = [calibration_fold(c.case_id, cfg.seed) for c in data.test]
    stats = grid_stats(logits, labels, folds).to_lists()
    out.update({K.CALIB_NLL: stats["nll"], K.CALIB_N: stats["n"], K.CALIB_BINS: stats["bins"]})
    return out


def statistics(node: NodeSettings, cfg: RoundConfig) -> tuple[str, dict[str, float]]:
    """(site id, counts) for the coordinator's data-statistics query."""
    inputs = cfg.model_config().inputs  # same grid as training: the loaded site is reused
    try:
        data = site_data(node, inputs, cfg.seed, cfg.max_cases, cfg.task)
    except NoTaskLabels:  # identified all the same; its train/evaluate replies will say why
        data = site_data(node, inputs, cfg.seed, cfg.max_cases)
        return data.site_id, {"cases-total": float(data.summary["cases-total"]),
                              "cases-train": 0.0, "cases-test": 0.0}
    return data.site_id, {k: float(v) for k, v in data.summary.items()}


@dataclass(frozen=True)
class TaskRequest:
    """One message's work, as plain data (what the ClientApp hands to run_task or the worker)."""

    kind: str  # train | evaluate | query
    node_config: dict[str, Any]
    run_config: dict[str, Any]
    config: dict[str, Any]  # the coordinator's ConfigRecord
    arrays: dict[str, Any] | None = None  # global model as numpy arrays (train, evaluate)
    start_step: int = 0  # optimiser steps this node has done before (train)
    run_id: int = 0  # the Flower run (recorded in the privacy ledger)


@dataclass(frozen=True)
class TaskResult:
    metrics: dict[str, Any]  # floats; lists of floats for calibration sums
    arrays: dict[str, Any] | None = None  # numpy arrays (train)
    site_id: str = ""  # query
    global_step: int = 0  # train


def run_task(req: TaskRequest) -> TaskResult:
    """Dispatch one request. A query starts each federated run (the coordinator identifies its
    hospitals), so it drops the memoised site: a long-lived process sees this month's data."""
    node = NodeSettings.from_configs(req.node_config, req.run_config)
    cfg = RoundConfig.from_record(req.config)
    if req.kind == "query":
        _load.cache_clear()
        site_id, counts = statistics(node, cfg)
        return TaskResult(counts, site_id=site_id)
    if req.arrays is None:
        raise ConfigError(f"a {req.kind} request needs the global model arrays")
    check_ehr_schema(node, cfg)  # before any data is read: a wrong schema must not train
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in req.arrays.items()}
    if req.kind == "evaluate":
        return TaskResult(evaluate(node, cfg, state))
    if req.kind == "train":
        out = train(node, cfg, state, start_step=req.start_step, run_id=req.run_id)
        local = {k: v.detach().cpu().numpy() for k, v in out.state.items()}
        arrays = pack_update(local, req.arrays, check_transport(cfg.transport),
                             unchanged_experts(local, req.arrays) if cfg.sparse_experts else ())
        return TaskResult(out.metrics, arrays, global_step=out.global_step)
    raise ConfigError(f"unknown task kind {req.kind!r}; expected train|evaluate|query")

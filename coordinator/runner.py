"""One federated training run on a Flower Grid: run the strategy, store every round's model and
record (coordinator.run_state), resume an interrupted run. A round that stored no model (too few
usable updates, or a secure-aggregation round whose protocol halted: "secagg-failed") is
recorded with its status and every selected hospital's outcome; the next round starts from the
last stored model. Called by the ServerApp (coordinator.server_app)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from coordinator.adaptation import AdaptPlan, plan_adaptation
from coordinator.journal import ACCEPTED
from coordinator.pretraining import PretrainPlan, initial_model_state, plan_pretraining
from coordinator.privacy_record import privacy_block
from coordinator.run_state import RunState
from coordinator.settings import RunSettings
from coordinator.store import ModelStore, Version
from coordinator.strategy import PerExpertFedAvg, build_strategy, record_bytes
from vocab import audit
from vocab import records as K
from vocab.errors import ConfigError

log = logging.getLogger("flwr.fedsight")
VERSION_FORMAT = "fedsight-version/1"
ACTOR = "coordinator"  # who the audit log names for runs and rounds


def model_config(settings: RunSettings) -> Any:
    from multimodal.config import ModelConfig

    return ModelConfig.from_dict(settings.json_overrides("model_json"))


def write_model(state: dict[str, torch.Tensor], cfg: Any, path: Path,
                temperature: float = 1.0, task: str = "",
                temperatures: dict[str, float] | None = None,
                checkpoint_meta: dict[str, Any] | None = None) -> None:
    """model.pt in multimodal.checkpoint's format (the UI loads it with load_checkpoint);
    `temperature`: the round's federated fit for `task` (default the first task; 1.0 =
    uncalibrated, meta says which); `temperatures`: the other tasks' (an adapted base's);
    `checkpoint_meta`: kept in the checkpoint (a pretraining version's kind and projectors)."""
    from multimodal.checkpoint import save_checkpoint
    from multimodal.model import FedsightModel

    model = FedsightModel(cfg)
    model.load_state_dict(state, strict=True)
    model.temperatures = {t: float(v) for t, v in (temperatures or {}).items() if t in cfg.tasks}
    model.use_task(task or cfg.task)
    model.temperature = float(temperature)
    save_checkpoint(model, path, meta=checkpoint_meta)


def read_state(version: Version) -> dict[str, torch.Tensor]:
    from multimodal.checkpoint import read_checkpoint

    return read_checkpoint(version.model_path)["state_dict"]


def train_config_record(settings: RunSettings, plan: AdaptPlan | None = None,
                        pre: PretrainPlan | None = None) -> ConfigRecord:
    """What every hospital needs each round (the strategy adds server-round, stage, mu), with the
    federation's EHR schema id and content hash: a node whose site schema differs refuses. An
    adaptation round adds the task, the method, the base's hash and the adapted architecture;
    a pretraining round the pretraining config."""
    from vocab.ehr_schema import get_schema

    schema = get_schema(model_config(settings).inputs.ehr_schema)
    extra: dict[str, Any] = {}
    if settings.task:
        extra[K.TASK] = settings.task
    if plan is not None:
        extra |= {K.ADAPT: plan.method, K.BASE_SHA256: plan.base_sha256,
                  K.MODEL_JSON: json.dumps(plan.cfg.to_dict())}
    if pre is not None:
        extra[K.PRETRAIN_JSON] = pre.config_json()
    return ConfigRecord({
        K.LOCAL_EPOCHS: settings.local_epochs, K.LR: settings.lr,
        K.BATCH_SIZE: settings.batch_size, K.MODEL_JSON: settings.model_json,
        K.TRAIN_JSON: settings.train_json, K.SEED: settings.seed, K.MAX_CASES: settings.max_cases,
        K.EHR_SCHEMA: schema.name, K.EHR_SCHEMA_HASH: schema.content_hash,
        K.DP_NOISE_MULTIPLIER: settings.dp_noise_multiplier,
        K.DP_MAX_GRAD_NORM: settings.dp_max_grad_norm,
    } | extra)


@dataclass
class RunOutcome:
    run_id: str
    versions: list[str]
    rounds_completed: int
    status: str


def _start_state(store: ModelStore, settings: RunSettings, flwr_run_id: int
                 ) -> tuple[RunState, RunSettings]:
    """A new run's state, or with settings.resume the latest unfinished run of the store (and
    that run's own settings: its model, not this config's)."""
    if not settings.resume:
        run_id = f"{settings.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{flwr_run_id}"
        return RunState(run_id, settings.to_run_config(), settings.num_rounds), settings
    stored = store.latest_unfinished_run()
    if stored is None:
        raise ConfigError(f"resume: no unfinished run in store {settings.store_dir!r}")
    run = RunState.from_dict(stored)
    log.info("resuming run %s after round %d (version %s)", run.run_id, run.rounds_completed,
             run.last_version)
    return run, RunSettings.from_run_config({**run.config, "resume": True})


def run_federated(grid: Grid, settings: RunSettings, flwr_run_id: int = 0) -> RunOutcome:
    store = ModelStore(settings.store_dir)
    run, settings = _start_state(store, settings, flwr_run_id)
    plan = plan_adaptation(settings, store)
    cfg = plan.cfg if plan is not None else model_config(settings)
    if plan is None and settings.task and settings.task != cfg.task:
        raise ConfigError(f"task {settings.task!r}: the model's first task is {cfg.task!r}; "
                          f"train another task with adapt = lora|head (or a model-json task)")
    pre = plan_pretraining(settings, cfg, store)
    state = _start_arrays(store, settings, run, cfg, plan, pre)
    offset = run.rounds_completed
    run.flwr_run_ids.append(flwr_run_id)
    run.status, run.finished, run.ended_reason = "running", None, ""
    store.write_run(run.to_dict())
    trail = store.audit_log
    trail.append(audit.RUN_STARTED, ACTOR, {
        "run_id": run.run_id, "flwr_run_id": flwr_run_id, "resumed": settings.resume,
        "after_round": offset, "num_rounds": settings.num_rounds,
        "strategy": settings.strategy, "aggregation": settings.aggregation,
        "robust_aggregation": settings.robust_aggregation,
        "secure_aggregation": settings.secure_aggregation})

    strategy = build_strategy(settings, run)
    on_round_end = _round_end_hook(store, strategy, settings, cfg, run, plan, pre)
    remaining = settings.num_rounds - offset
    try:
        if remaining > 0:
            strategy.start(grid, initial_arrays=ArrayRecord(state), num_rounds=remaining,
                           timeout=settings.round_timeout,
                           train_config=train_config_record(settings, plan, pre),
                           evaluate_config=train_config_record(settings, plan, pre),
                           evaluate_fn=on_round_end)
    except BaseException as e:
        # The error's type only: its text may quote anything a library put into it.
        run.status, run.finished, run.ended_reason = "failed", time.time(), type(e).__name__
        try:
            store.write_run(run.to_dict())
            trail.append(audit.RUN_FAILED, ACTOR, {
                "run_id": run.run_id, "error": type(e).__name__,
                "rounds_completed": run.rounds_completed})
        except (audit.AuditError, OSError) as audit_error:  # keep the run's error the one raised
            log.error("run %s failed and could not be recorded: %s", run.run_id, audit_error)
        raise
    run.status, run.finished = "completed", time.time()
    store.write_run(run.to_dict())
    trail.append(audit.RUN_FINISHED, ACTOR, {
        "run_id": run.run_id, "rounds_completed": run.rounds_completed,
        "versions": list(run.versions)})
    return RunOutcome(run.run_id, run.versions, run.rounds_completed, run.status)


def _start_arrays(store: ModelStore, settings: RunSettings, run: RunState, cfg: Any,
                  plan: AdaptPlan | None, pre: PretrainPlan | None) -> dict[str, torch.Tensor]:
    """The arrays of the run's first (or resumed) round: only those that travel in an adaptation
    or pretraining run (a stored version is complete), else the whole model."""
    if run.last_version:
        version = store.get(run.last_version)
        if pre is not None:
            return pre.resume_arrays(version.model_path)
        state = read_state(version)
        return {k: state[k] for k in plan.initial} if plan is not None else state
    if plan is not None:
        return plan.initial
    if pre is not None:
        return pre.initial
    return initial_model_state(settings, cfg, store)


def _round_end_hook(store: ModelStore, strategy: PerExpertFedAvg, settings: RunSettings,
                    cfg: Any, run: RunState, plan: AdaptPlan | None = None,
                    pre: PretrainPlan | None = None):
    """evaluate_fn for Strategy.start: called after each round's evaluation; stores the model
    (when the round aggregated) and the round's record, every selected hospital named."""

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the starting model is the parent version (or the seeded init)
        rec = strategy.journal[strategy.round_offset + server_round]
        entry: dict[str, Any] = {"round": rec.round, "status": rec.status,
                                 "seconds": rec.seconds, "version": None,
                                 "hospitals": rec.outcomes()}
        if rec.status == "aggregated":
            meta = {
                "format": VERSION_FORMAT, "round": rec.round, "run_id": run.run_id,
                "parent": run.last_version, "strategy": settings.strategy,
                "aggregation": settings.aggregation,
                "robust_aggregation": settings.robust_aggregation,
                "config": {"run": settings.to_run_config(), "model": cfg.to_dict()},
                "metrics": {"hospitals": {h: r.eval for h, r in rec.hospitals.items() if r.eval},
                            "pooled": rec.pooled,
                            "train": {h: r.train for h, r in rec.hospitals.items() if r.train}},
                "screening": {h: {"outcome": r.outcome, "accepted": r.outcome == ACCEPTED,
                                  "reason": r.reason, "update_norm": r.update_norm,
                                  "cosine": r.cosine}
                              for h, r in rec.hospitals.items() if r.selected},
                "bytes": {h: {"down": r.bytes_down, "up": r.bytes_up}
                          for h, r in rec.hospitals.items()},
                "round_seconds": rec.seconds, "model_bytes": record_bytes(arrays),
                "privacy": privacy_block(
                    store.get(run.last_version).meta if run.last_version else None, rec,
                    settings.dp_noise_multiplier, settings.dp_max_grad_norm),
            }
            if settings.secure_aggregation:
                # what the secure sum revealed (coordinator.secure_agg); no per-hospital
                # update_norm / cosine / num-examples exist under SecAgg+
                meta["secure_aggregation"] = dict(
                    getattr(strategy, "secure_rounds", {}).get(rec.round, {}))
            # None: too few held-out cases reported calibration sums; the version says so and
            # the app calls its probabilities uncalibrated (ui.model_source)
            meta["calibration"] = rec.calibration or None
            temperature = float(rec.calibration.get("temperature", 1.0))
            state = arrays.to_torch_state_dict()
            temps: dict[str, float] = {}
            ck_meta: dict[str, Any] | None = None
            if plan is not None:
                state, temps = plan.full_state(state), plan.base_temperatures
                meta |= plan.meta()
            if pre is not None:
                ck_meta, state = pre.checkpoint_meta(state), pre.full_state(state)
                meta |= pre.meta()
            version = store.add_version(lambda p: write_model(
                state, cfg, p, temperature, settings.task, temps, ck_meta), meta)
            run.last_version = version.id
            run.versions.append(version.id)
            entry["version"] = version.id
            log.info("round %d: stored model version %s", rec.round, version.id)
        run.rounds_completed = rec.round
        run.rounds.append(entry)
        store.write_run(run.to_dict())
        store.audit_log.append(audit.ROUND_COMPLETED, ACTOR, rec.audit_data(
            run.run_id, entry["version"], record_bytes(arrays)))
        return MetricRecord({k: v for k, v in rec.pooled.items() if v == v})

    return on_round_end

"""One federated training run on a Flower Grid: identify hospitals, run the strategy, store every
round's model, resume an interrupted run. Called by the ServerApp (coordinator.server_app)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

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


def initial_state(settings: RunSettings) -> dict[str, torch.Tensor]:
    from multimodal.model import build_model

    return build_model(model_config(settings), seed=settings.seed).state_dict()


def write_model(state: dict[str, torch.Tensor], cfg: Any, path: Path) -> None:
    """model.pt in multimodal.checkpoint's format (the UI loads it with load_checkpoint)."""
    from multimodal.checkpoint import save_checkpoint
    from multimodal.model import FedsightModel

    model = FedsightModel(cfg)
    model.load_state_dict(state, strict=True)
    save_checkpoint(model, path)


def read_state(version: Version) -> dict[str, torch.Tensor]:
    from multimodal.checkpoint import read_checkpoint

    return read_checkpoint(version.model_path)["state_dict"]


def train_config_record(settings: RunSettings) -> ConfigRecord:
    """What every hospital needs each round (the strategy adds server-round, stage, mu), with the
    federation's EHR schema id and content hash: a node whose site schema differs refuses."""
    from vocab.ehr_schema import get_schema

    schema = get_schema(model_config(settings).inputs.ehr_schema)
    return ConfigRecord({
        K.LOCAL_EPOCHS: settings.local_epochs, K.LR: settings.lr,
        K.BATCH_SIZE: settings.batch_size, K.MODEL_JSON: settings.model_json,
        K.TRAIN_JSON: settings.train_json, K.SEED: settings.seed, K.MAX_CASES: settings.max_cases,
        K.EHR_SCHEMA: schema.name, K.EHR_SCHEMA_HASH: schema.content_hash,
    })


def identify_hospitals(grid: Grid, node_ids: list[int], settings: RunSettings,
                       stats: dict[str, dict[str, float]]) -> dict[int, str]:
    """Ask nodes for their site id and data statistics (counts only)."""
    content = RecordDict({K.CONFIG: ConfigRecord({
        K.SEED: settings.seed, K.MAX_CASES: settings.max_cases, K.MODEL_JSON: settings.model_json,
    })})
    msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
            for n in node_ids]
    names: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=settings.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error() or K.SITE not in reply.content.config_records:
            log.warning("node %d did not identify itself; it is logged as node-%d", node, node)
            continue
        site = str(reply.content[K.SITE].get(K.SITE_ID, ""))
        if not K.SITE_ID_PATTERN.fullmatch(site) or site in names.values():
            site = f"{site[:32]}-node-{node}" if K.SITE_ID_PATTERN.fullmatch(site[:32]) \
                else f"node-{node}"
        names[node] = site
        if K.METRICS in reply.content.metric_records:
            stats[site] = {k: float(v) for k, v in reply.content[K.METRICS].items()
                           if K.is_allowed_metric(k, "query")}
            log.info("hospital %s: %s", site, stats[site])
    return names


@dataclass
class RunOutcome:
    run_id: str
    versions: list[str]
    rounds_completed: int
    status: str


def run_federated(grid: Grid, settings: RunSettings, flwr_run_id: int = 0) -> RunOutcome:
    store = ModelStore(settings.store_dir)
    offset, parent, run = 0, None, None
    if settings.resume:
        run = store.latest_unfinished_run()
        if run is None:
            raise ConfigError(f"resume: no unfinished run in store {settings.store_dir!r}")
        offset, parent = int(run["rounds_completed"]), run.get("last_version")
        settings = RunSettings.from_run_config({**run["config"], "resume": True})
        log.info("resuming run %s after round %d (version %s)", run["run_id"], offset, parent)
    cfg = model_config(settings)  # after resume: the interrupted run's model, not this config's
    state = read_state(store.get(parent)) if parent else initial_state(settings)
    if run is None:
        run = {"run_id": f"{settings.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{flwr_run_id}",
               "config": settings.to_run_config(), "started": time.time(), "status": "running",
               "num_rounds": settings.num_rounds, "rounds_completed": 0, "last_version": None,
               "versions": [], "rounds": [], "hospitals": {}}
    run["flwr_run_ids"] = [*run.get("flwr_run_ids", []), flwr_run_id]
    run["status"] = "running"
    store.write_run(run)
    trail = store.audit_log
    trail.append(audit.RUN_STARTED, ACTOR, {
        "run_id": run["run_id"], "flwr_run_id": flwr_run_id, "resumed": settings.resume,
        "after_round": offset, "num_rounds": settings.num_rounds,
        "strategy": settings.strategy, "aggregation": settings.aggregation})

    stats: dict[str, dict[str, float]] = run["hospitals"]
    strategy = build_strategy(
        settings, lambda g, ids: identify_hospitals(g, ids, settings, stats), round_offset=offset)
    on_round_end = _round_end_hook(store, strategy, settings, cfg, run)
    remaining = settings.num_rounds - offset
    try:
        if remaining > 0:
            strategy.start(grid, initial_arrays=ArrayRecord(state), num_rounds=remaining,
                           timeout=settings.round_timeout,
                           train_config=train_config_record(settings),
                           evaluate_config=train_config_record(settings),
                           evaluate_fn=on_round_end)
    except BaseException as e:
        # The error's type only: its text may quote anything a library put into it.
        try:
            trail.append(audit.RUN_FAILED, ACTOR, {
                "run_id": run["run_id"], "error": type(e).__name__,
                "rounds_completed": run["rounds_completed"]})
        except audit.AuditError as audit_error:  # keep the run's own error the one raised
            log.error("run %s failed and could not be audited: %s", run["run_id"], audit_error)
        raise
    run["status"] = "completed"
    run["finished"] = time.time()
    store.write_run(run)
    trail.append(audit.RUN_FINISHED, ACTOR, {
        "run_id": run["run_id"], "rounds_completed": run["rounds_completed"],
        "versions": list(run["versions"])})
    return RunOutcome(run["run_id"], run["versions"], run["rounds_completed"], run["status"])


def _round_end_hook(store: ModelStore, strategy: PerExpertFedAvg, settings: RunSettings,
                    cfg: Any, run: dict[str, Any]):
    """evaluate_fn for Strategy.start: called after each round's evaluation; stores the model."""

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the starting model is the parent version (or the seeded init)
        rec = strategy.journal[strategy.round_offset + server_round]
        entry = {"round": rec.round, "status": rec.status, "seconds": rec.seconds,
                 "version": None}
        if rec.status == "aggregated":
            meta = {
                "format": VERSION_FORMAT, "round": rec.round, "run_id": run["run_id"],
                "parent": run["last_version"], "strategy": settings.strategy,
                "aggregation": settings.aggregation,
                "config": {"run": settings.to_run_config(), "model": cfg.to_dict()},
                "metrics": {"hospitals": {h: r.eval for h, r in rec.hospitals.items() if r.eval},
                            "pooled": rec.pooled,
                            "train": {h: r.train for h, r in rec.hospitals.items() if r.train}},
                "screening": {h: {"accepted": r.accepted, "reason": r.reason,
                                  "update_norm": r.update_norm}
                              for h, r in rec.hospitals.items()},
                "bytes": {h: {"down": r.bytes_down, "up": r.bytes_up}
                          for h, r in rec.hospitals.items()},
                "round_seconds": rec.seconds, "model_bytes": record_bytes(arrays),
            }
            state = arrays.to_torch_state_dict()
            version = store.add_version(lambda p: write_model(state, cfg, p), meta)
            run["last_version"] = version.id
            run["versions"].append(version.id)
            entry["version"] = version.id
            log.info("round %d: stored model version %s", rec.round, version.id)
        run["rounds_completed"] = rec.round
        run["rounds"].append(entry)
        store.write_run(run)
        store.audit_log.append(audit.ROUND_COMPLETED, ACTOR, rec.audit_data(
            run["run_id"], entry["version"], record_bytes(arrays)))
        return MetricRecord({k: v for k, v in rec.pooled.items() if v == v})

    return on_round_end

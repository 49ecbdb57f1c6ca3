"""Federated adaptation to a new task (run config adapt = lora | head): the base version stays
at every hospital, only the new task's adapter and head arrays travel (docs/adaptation.md).

The coordinator builds the adapted architecture from the base (multimodal.adapt), starts the
rounds from the fresh adapter/head arrays, and stores each round's version as base + arrays, so
a stored version is a complete two-task model like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from coordinator.settings import RunSettings
from coordinator.store import ModelStore, sha256_file
from vocab.errors import ConfigError


@dataclass(frozen=True)
class AdaptPlan:
    task: str
    method: str
    base_version: str  # store version id, "" for a model.pt path
    base_sha256: str
    base_state: dict[str, torch.Tensor]
    base_temperatures: dict[str, float]
    cfg: Any  # the adapted ModelConfig
    initial: dict[str, torch.Tensor]  # the arrays that travel, at their initial values

    def full_state(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """base + the round's arrays: the complete model of a version."""
        return {**self.base_state, **arrays}

    def meta(self) -> dict[str, Any]:
        return {"task": self.task, "tasks": list(self.cfg.tasks), "kind": "adapted",
                "base": {"version": self.base_version, "sha256": self.base_sha256},
                "adapt": {"method": self.method, "federated": True,
                          "arrays": sorted(self.initial)}}


def plan_adaptation(settings: RunSettings, store: ModelStore) -> AdaptPlan | None:
    """None for an ordinary run; else the base (read only), the adapted config and the arrays
    that travel. ConfigError naming the base when it cannot take the task."""
    if settings.adapt == "none":
        return None
    from multimodal.adapt import AdaptConfig, build_adapted, trainable_keys
    from multimodal.checkpoint import load_checkpoint
    from vocab.tasks import get_task

    task = get_task(settings.task)
    path, version = store.resolve(settings.adapt_base, "adapt-base")
    digest = sha256_file(path) if path.is_file() else ""
    base = load_checkpoint(path)
    if task.ehr_schema != base.cfg.inputs.ehr_schema:
        raise ConfigError(f"task {task.id!r} reads EHR schema {task.ehr_schema!r}; base "
                          f"{path} was trained on {base.cfg.inputs.ehr_schema!r}")
    acfg = AdaptConfig(method=settings.adapt, seed=settings.seed)
    model = build_adapted(base, task.id, acfg)
    keys = trainable_keys(model, task.id, settings.adapt)
    own = model.state_dict()
    return AdaptPlan(task.id, settings.adapt, version, digest,
                     {k: v for k, v in base.state_dict().items() if k in own},
                     base.task_temperatures(), model.cfg, {k: own[k] for k in keys})

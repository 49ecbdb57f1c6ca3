"""Adapt a trained (federated) model to a new task from a few labelled cases.

Methods (AdaptConfig.method):
- "lora":    the base frozen; low-rank adapters on the blocks (multimodal.lora) + a new head.
- "head":    the base frozen; only a new head on the fused features.
- "full":    every weight trained, starting from the base (new head; the base's task is gone).
- "scratch": the same architecture from a fresh initialisation (the baseline the claim is
             measured against).
"lora" and "head" keep the base task's head and weights untouched, so the result serves both
tasks; "full" and "scratch" serve only the new one. The base model object is never modified.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from multimodal.config import ModelConfig, TrainConfig, _from_dict, _to_dict
from multimodal.data import PreparedCase
from multimodal.losses import masked_bce
from multimodal.model import FedsightModel, build_model
from multimodal.train import (
    _deterministic,
    as_batch,
    augment,
    ehr_field_dropout,
    modality_dropout,
    train_local,
)
from vocab.errors import ConfigError

METHODS = ("lora", "head", "full", "scratch")


@dataclass(frozen=True)
class AdaptConfig:
    """One adaptation run. Sizes chosen for ~50 cases on two cores (docs/benchmarks.md)."""

    method: str = "lora"
    epochs: int = 40  # head/lora: cheap steps over a frozen base
    full_epochs: int = 12  # full/scratch: the ordinary training loop (TrainConfig.epochs)
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    # Fewer labelled cases than this (or a single class) are refused before training starts.
    min_cases: int = 10
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("attn", "experts", "shared", "router")
    modality_dropout: float = 0.3
    ehr_field_dropout: float = 0.5
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adapt method must be one of {list(METHODS)}, got "
                              f"{self.method!r}")
        if self.epochs < 1 or self.full_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("adapt: epochs, full_epochs, batch_size >= 1 and lr > 0")
        if self.min_cases < 2:
            raise ConfigError(f"adapt: min_cases must be >= 2, got {self.min_cases}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaptConfig:
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class AdaptResult:
    model: FedsightModel
    method: str
    task: str
    n_cases: int
    trainable: list[str]  # state-dict keys that training changed (may change)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def adapted_config(base: ModelConfig, task: str, acfg: AdaptConfig) -> ModelConfig:
    """The new version's architecture."""
    if task in base.tasks:
        raise ConfigError(f"the base model already has a head for task {task!r} (tasks "
                          f"{list(base.tasks)}); adapt it to a task it does not have")
    if acfg.method in ("full", "scratch"):
        return base.replace(task=task, extra_tasks=(), lora_tasks=())
    if base.fusion != "moe":
        raise ConfigError(f"method {acfg.method!r} adds a head on the fused tokens: the base "
                          f"must have fusion 'moe', not {base.fusion!r}")
    lora = (task,) if acfg.method == "lora" else ()
    return base.replace(extra_tasks=(*base.extra_tasks, task),
                        lora_tasks=(*base.lora_tasks, *lora), lora_rank=acfg.lora_rank,
                        lora_alpha=acfg.lora_alpha, lora_targets=acfg.lora_targets)


def trainable_keys(model: FedsightModel, task: str, method: str) -> list[str]:
    """State-dict keys that adaptation trains (and, federated, the only arrays that travel)."""
    keys = list(model.state_dict())
    if method in ("full", "scratch"):
        return keys
    prefixes = [f"task_heads.{task}."] + ([f"adapters.{task}."] if method == "lora" else [])
    return [k for k in keys if any(k.startswith(p) for p in prefixes)]


def build_adapted(base: FedsightModel, task: str, acfg: AdaptConfig) -> FedsightModel:
    """The untrained new model: base weights copied (not shared) where the method keeps them."""
    cfg = adapted_config(base.cfg, task, acfg)
    model = build_model(cfg, seed=acfg.seed).eval()
    if acfg.method == "scratch":
        return model
    own = model.state_dict()
    base_state = base.state_dict()
    if acfg.method == "full":  # a fresh head; the base's heads and adapters are dropped
        new = {k for k in own if k.startswith("head.")}
        base_state = {k: v for k, v in base_state.items()
                      if not k.startswith(("head.", "task_heads.", "adapters."))}
    else:  # the new task's head (and adapters) start fresh; everything else is the base's
        new = set(trainable_keys(model, task, acfg.method))
    missing = sorted(set(own) - set(base_state) - new)
    if missing:
        raise ConfigError(f"the base model lacks {len(missing)} weight(s) the adapted model "
                          f"expects (e.g. {missing[:3]}); is it a fedsight model of this "
                          f"architecture?")
    model.load_state_dict({k: v.clone() for k, v in base_state.items() if k in own}
                          | {k: own[k] for k in new}, strict=True)
    # the kept tasks keep their calibration; the new task has none until one is fitted
    model.temperatures = {t: v for t, v in base.task_temperatures().items() if t in cfg.tasks}
    model.use_task(model.serve_task)
    return model


def check_cases(cases: Sequence[PreparedCase], task: str, min_cases: int) -> None:
    """Refuse too few labelled cases, or only one class, before any training."""
    labels = [c.label for c in cases if c.label is not None]
    if len(labels) < min_cases:
        raise ConfigError(f"task {task!r}: {len(labels)} labelled case(s), at least {min_cases} "
                          f"needed to adapt")
    if len(set(labels)) < 2:
        raise ConfigError(f"task {task!r}: all {len(labels)} labelled cases have label "
                          f"{labels[0]}; adapting needs both classes")


def adapt(base: FedsightModel, cases: Sequence[PreparedCase], task: str,
          acfg: AdaptConfig) -> AdaptResult:
    """Train a new version for `task` from `cases` (labels of that task) by acfg.method."""
    check_cases(cases, task, acfg.min_cases)
    t0 = time.perf_counter()
    model = build_adapted(base, task, acfg)
    keys = trainable_keys(model, task, acfg.method)
    if acfg.method in ("full", "scratch"):
        tcfg = TrainConfig(epochs=acfg.full_epochs, batch_size=acfg.batch_size, seed=acfg.seed,
                           modality_dropout=acfg.modality_dropout,
                           ehr_field_dropout=acfg.ehr_field_dropout, augment=acfg.augment)
        res = train_local(model, cases, tcfg)
        history = res.history
    else:
        history = train_head(model, cases, task, acfg, set(keys))
    model.use_task(task)
    return AdaptResult(model, acfg.method, task, sum(c.label is not None for c in cases), keys,
                       time.perf_counter() - t0, history)


def train_head(model: FedsightModel, cases: Sequence[PreparedCase] | Any, task: str,
               acfg: AdaptConfig, keys: set[str]) -> list[dict[str, float]]:
    """Train only the parameters named in `keys` on the fused loss of `task` (the rest frozen;
    router noise off: the routing of a frozen base should stay the one it learned)."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in keys)
    trainable = [p for n, p in params.items() if n in keys]
    full = as_batch(model, cases)
    full = full.select(torch.isfinite(full.label).nonzero().squeeze(1))
    n, mods = len(full), model.cfg.modalities
    torch.manual_seed(acfg.seed)
    gen = torch.Generator().manual_seed(acfg.seed)
    opt = torch.optim.AdamW(trainable, lr=acfg.lr, weight_decay=acfg.weight_decay)
    model.set_router_noise_scale(0.0)
    model.train()
    history: list[dict[str, float]] = []
    try:
        with _deterministic():
            for epoch in range(acfg.epochs):
                total, nb = 0.0, 0
                for idx in torch.randperm(n, generator=gen).split(acfg.batch_size):
                    b = full.select(idx)
                    if acfg.augment:
                        b = augment(b, gen)
                    b = ehr_field_dropout(b, acfg.ehr_field_dropout, gen)
                    b = modality_dropout(b, acfg.modality_dropout, mods, gen)
                    out = model(b, task=task)
                    loss = masked_bce(out.logit, b.label, torch.ones_like(b.label, dtype=bool))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    opt.step()
                    total, nb = total + float(loss.detach()), nb + 1
                history.append({"epoch": float(epoch), "loss": total / max(nb, 1)})
    finally:
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
    return history

"""Evaluation: metrics per site and pooled, for every modality combination, plus expert load.

`evaluate(model, cases_by_site) -> EvalReport` takes PreparedCases (or Batches) per site; loading
a site from disk is the caller's job (hospital_node), so this module stays free of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from multimodal.calibration import fit_temperature
from multimodal.data import Batch, PreparedCase
from multimodal.metrics import all_metrics
from multimodal.model import EXPERT_GROUPS, FedsightModel
from multimodal.train import as_batch
from vocab.json_config import json_safe
from vocab.modalities import MODALITIES, combo_name, modality_combinations

POOLED = "pooled"
AS_AVAILABLE = "available"  # every case with whatever modalities it has


@torch.no_grad()
def predict_logits(model: FedsightModel, data: Sequence[PreparedCase] | Batch,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N,), labels (N,)) in eval mode; logits are uncalibrated."""
    batch = as_batch(model, data)
    model.eval()
    out = [model(batch.select(idx)).logit for idx in torch.arange(len(batch)).split(batch_size)]
    return torch.cat(out), batch.label


def fit_model_temperature(model: FedsightModel, data: Sequence[PreparedCase] | Batch) -> float:
    """Fit the model's temperature on validation cases (LBFGS on NLL) and store it in the model."""
    logits, labels = predict_logits(model, data)
    model.temperature = fit_temperature(logits, labels)
    return model.temperature


@dataclass
class MetricRow:
    site: str
    combo: str  # "available" or a modality combination such as "ct+ehr"
    n: int
    n_pos: int
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    ece: float  # temperature 1
    ece_calibrated: float  # with the model's temperature


@dataclass
class EvalReport:
    rows: list[MetricRow]
    threshold: float
    temperature: float
    # group ("all", "fusion", "ct", ...) -> (n_blocks, n_experts) share of that group's tokens
    expert_load: dict[str, list[list[float]]] = field(default_factory=dict)
    expert_summary: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # baselines etc. added by callers

    def row(self, site: str, combo: str) -> MetricRow | None:
        for r in self.rows:
            if r.site == site and r.combo == combo:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=indent)

    def to_markdown(self) -> str:
        f = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
            else f"{v:.3f}"  # noqa: E731
        lines = [f"Threshold {self.threshold:.2f}, temperature {self.temperature:.3f}.", "",
                 "| site | modalities | n | pos | AUC | acc | sens | spec | ECE | ECE (T) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.site} | {r.combo} | {r.n} | {r.n_pos} | {f(r.auc)} | "
                         f"{f(r.accuracy)} | {f(r.sensitivity)} | {f(r.specificity)} | "
                         f"{f(r.ece)} | {f(r.ece_calibrated)} |")
        if self.expert_summary:
            lines += ["", "Expert load: " + ", ".join(f"{k} {f(v)}"
                                                     for k, v in self.expert_summary.items())]
        return "\n".join(lines)


def expert_load(counts_by_group: torch.Tensor) -> tuple[dict[str, list[list[float]]],
                                                         dict[str, float]]:
    """(n_blocks, G, E) token counts -> per-group shares and a summary (min share, max/mean)."""
    c = counts_by_group.double()
    load: dict[str, list[list[float]]] = {}
    total = c.sum(1)  # (n_blocks, E)
    for name, cnt in [("all", total)] + [(g, c[:, i]) for i, g in enumerate(EXPERT_GROUPS)]:
        s = cnt.sum(-1, keepdim=True)
        load[name] = (cnt / s.clamp_min(1)).tolist()
    share = total / total.sum(-1, keepdim=True).clamp_min(1)  # (n_blocks, E)
    summary = {"min_share": float(share.min()) if share.numel() else math.nan,
               "max_over_mean": float((share.max(-1).values * share.shape[-1]).max())
               if share.numel() else math.nan}
    return load, summary


def _metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
             threshold: float) -> dict[str, float]:
    y = labels.numpy().astype(bool)
    p = torch.sigmoid(logits).numpy()
    p_cal = torch.sigmoid(logits / temperature).numpy()
    return all_metrics(y, p, p_cal, threshold)


def evaluate(
    model: FedsightModel,
    cases_by_site: dict[str, Sequence[PreparedCase] | Batch],
    threshold: float = 0.5,
    combos: Sequence[tuple[str, ...]] | None = None,
    batch_size: int = 32,
) -> EvalReport:
    """Metrics per site and pooled, for cases as available and every modality combination.

    For combination C, the cases that have every modality of C are used with all other
    modalities masked out (present=False). Threshold metrics use the calibrated probability.
    Expert load is counted over the "available" pass of every site.
    """
    combos = list(combos) if combos is not None else modality_combinations()
    model.eval()
    t = float(model.temperature)
    batches = {s: as_batch(model, d) for s, d in cases_by_site.items()}
    batches = {s: b.select(torch.isfinite(b.label).nonzero().squeeze(1))
               for s, b in batches.items()}
    rows: list[MetricRow] = []
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    model.reset_expert_counts()
    for combo_key in [AS_AVAILABLE] + [combo_name(c) for c in combos]:
        if combo_key != AS_AVAILABLE:  # combination eval should not count towards expert load
            saved = model.expert_counts(by_group=True)
        for site, b in batches.items():
            if combo_key == AS_AVAILABLE:
                sub = b
            else:
                need = torch.tensor([m in combo_key.split("+") for m in MODALITIES])
                has = (b.present() | ~need).all(1)
                sub = b.select(has.nonzero().squeeze(1)).only(set(combo_key.split("+")))
            if len(sub) == 0:
                continue
            logits, labels = predict_logits(model, sub, batch_size)
            pooled.setdefault(combo_key, []).append((logits, labels))
            rows.append(_row(site, combo_key, logits, labels, t, threshold))
        if combo_key != AS_AVAILABLE:
            model.reset_expert_counts()
            model._counts += saved
    for combo_key, parts in pooled.items():
        logits = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        rows.append(_row(POOLED, combo_key, logits, labels, t, threshold))
    load, summary = ({}, {})
    if model.cfg.fusion == "moe":
        load, summary = expert_load(model.expert_counts(by_group=True))
    return EvalReport(rows, threshold, t, load, summary)


def _row(site: str, combo: str, logits: torch.Tensor, labels: torch.Tensor, t: float,
         threshold: float) -> MetricRow:
    m = _metrics(logits, labels, t, threshold)
    return MetricRow(site, combo, int(len(labels)), int(labels.sum()), m["auc"], m["accuracy"],
                     m["sensitivity"], m["specificity"], m["ece"], m["ece_calibrated"])

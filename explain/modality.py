"""How much each modality moved the prediction (exact Shapley values), and which experts ran.

The value of a set S of present modalities is the calibrated logit with every other modality
replaced by the model's learned missing-modality tokens. Shapley values over the present
modalities are exact (all 2^n subsets, n <= 3, one batched forward) and sum to
v(all present) - v(none present).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch

from explain.tokens import EncoderTokens, image_tokens, repeat_batch, replay_encoders
from multimodal.data import Batch
from multimodal.model import FedsightModel
from vocab.modalities import MODALITIES


@dataclass(frozen=True)
class SubsetValue:
    """The model's output with only `modalities` present (the rest as missing tokens)."""

    modalities: tuple[str, ...]
    logit: float  # calibrated
    probability: float


@dataclass(frozen=True)
class ExpertUse:
    """One routed expert of one MoE block for this case.

    tokens: how many of the case's tokens this expert processed (each token goes to top_k);
    by_source: those tokens by origin ("fusion", "ct", "path", "ehr", "missing");
    fusion: True when the fusion token (the one the diagnosis head reads) was routed here.
    """

    block: int
    expert: int
    tokens: int
    by_source: tuple[tuple[str, int], ...]
    fusion: bool


def present_modalities(model: FedsightModel, batch: Batch) -> tuple[str, ...]:
    flags = {"ct": batch.ct_present, "path": batch.path_present, "ehr": batch.ehr_present}
    return tuple(m for m in MODALITIES if m in model.cfg.modalities and bool(flags[m][0]))


@torch.no_grad()
def subset_values(model: FedsightModel, batch: Batch, tokens: EncoderTokens | None = None,
                  ehr_fields: bool = False
                  ) -> tuple[list[SubsetValue], list[ExpertUse], torch.Tensor | None]:
    """One batched pass (image encoders replayed) that yields:

    - v(S) for every subset S of the case's present modalities (empty set first, full set last);
    - the expert routing of the full set (the case as it is);
    - with `ehr_fields`, per EHR field: v(all) - v(all, that field marked missing) (F,) - the same
      numbers as Captum FeatureAblation with the missing-field baseline
      (`explain.attribution.ehr_ablation`, checked in tests), without two extra passes.
    """
    present = present_modalities(model, batch)
    subsets = [s for k in range(len(present) + 1) for s in combinations(present, k)]
    n = len(subsets)
    n_fields = batch.ehr.shape[1] if ehr_fields and "ehr" in present else 0
    b = repeat_batch(batch, n + n_fields)
    keep = torch.tensor([[m in s for m in MODALITIES] for s in subsets]
                        + [[True] * len(MODALITIES)] * n_fields)  # (n + F, 3)
    b = b.with_present(b.present() & keep)
    if n_fields:
        drop = torch.cat([torch.zeros(n, n_fields, dtype=torch.bool),
                          torch.eye(n_fields, dtype=torch.bool)])  # (n + F, F)
        b.ehr_observed = b.ehr_observed & ~drop
    tokens = image_tokens(model, batch) if tokens is None else tokens
    with replay_encoders(model, tokens, ("ct", "path")):
        logit = model(b).logit / float(model.temperature)  # (n + F,)
    experts = _experts_used(model, batch, row=n - 1, n_rows=n + n_fields)
    prob = torch.sigmoid(logit[:n])
    values = [SubsetValue(s, float(lg), float(p)) for s, lg, p in zip(subsets, logit[:n], prob,
                                                                       strict=True)]
    ehr = None
    if n_fields:
        ehr = (logit[n - 1] - logit[n:]) * batch.ehr_observed[0]  # (F,), 0 for missing fields
    return values, experts, ehr


def shapley(values: list[SubsetValue]) -> dict[str, float]:
    """Exact Shapley value of each modality from the subset table (calibrated-logit units)."""
    table = {frozenset(v.modalities): v.logit for v in values}
    players = max(values, key=lambda v: len(v.modalities)).modalities
    n = len(players)
    out: dict[str, float] = {}
    for i in players:
        others = [p for p in players if p != i]
        phi = 0.0
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in combinations(others, k):
                phi += w * (table[frozenset(s) | {i}] - table[frozenset(s)])
        out[i] = phi
    return out


def _experts_used(model: FedsightModel, batch: Batch, row: int, n_rows: int
                  ) -> list[ExpertUse]:
    """Routing of row `row` (the case with all its modalities) of the last forward's
    `n_rows`-row batch, in every MoE block."""
    if model.cfg.fusion != "moe":
        return []
    present = set(present_modalities(model, batch))
    source = ["fusion"]
    for m in model.cfg.modalities:
        source += [m if m in present else "missing"] * model.n_tokens[m]
    out: list[ExpertUse] = []
    for i, block in enumerate(model.blocks):
        idx = block.moe.last_indices.view(n_rows, len(source), -1)[row]  # (T, k)
        per: dict[int, dict[str, int]] = {}
        for t, chosen in enumerate(idx.tolist()):
            for e in chosen:
                per.setdefault(e, {}).setdefault(source[t], 0)
                per[e][source[t]] += 1
        fusion_experts = set(idx[0].tolist())
        for e, by in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
            out.append(ExpertUse(i, e, sum(by.values()), tuple(sorted(by.items())),
                                 e in fusion_experts))
    return out

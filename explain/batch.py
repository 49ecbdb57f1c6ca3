"""Several cases explained in one set of passes (the app's micro-batches; `explain_cases`).

What batches, and why the results equal the one-case passes (tests compare them):

- the gradient pass (CT / pathology maps): one forward of every case and one backward of the
  sum of their calibrated logits. A case's logit depends only on its own row (GroupNorm in the
  encoders, per-patient expert capacity in the MoE, no cross-row attention), so the gradient of
  the sum at a case's activations is that case's own gradient;
- the subset pass (modality Shapley values, EHR field ablations, expert routing): every case's
  variant rows concatenated into one forward, each row replaying its own case's image tokens.

Nothing is left per case except the cheap numpy post-processing (upsampled maps, CT location,
Shapley arithmetic over the subset table).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from explain.attribution import _calibrated_logit, resolve_layer
from explain.modality import ExpertUse, SubsetValue, _experts_used, present_modalities
from explain.tokens import EncoderTokens, capture_tokens, repeat_batch
from multimodal.data import Batch
from multimodal.model import FedsightModel
from vocab.errors import ConfigError
from vocab.modalities import MODALITIES


def _rows(batch: Batch, i: int) -> Batch:
    return batch.select(torch.tensor([i]))


def batch_gradcam(model: FedsightModel, batch: Batch, layers: dict[str, str],
                  methods: dict[str, str] | None = None
                  ) -> tuple[list[dict[str, np.ndarray]], list[EncoderTokens]]:
    """`joint_gradcam` for every row of `batch` at once: per row, modality -> upsampled signed
    map (for the modalities of `layers` the row has), and the row's image-encoder tokens
    ((1, T, D) each) for the subset pass to replay."""
    methods = methods or {}
    bad = {m: v for m, v in methods.items() if v not in ("gradcam", "grad_x_act")}
    if bad:
        raise ConfigError(f"map method must be gradcam or grad_x_act, got {bad}")
    n = len(batch)
    flags = {"ct": batch.ct_present, "path": batch.path_present}
    names = [m for m in ("ct", "path") if m in layers and bool(flags[m].any())]
    acts: dict[str, torch.Tensor] = {}
    hooks = [resolve_layer(model, layers[m]).register_forward_hook(
        lambda _m, _i, o, k=m: acts.__setitem__(k, o)) for m in names]
    enc: dict[str, torch.Tensor] = {}
    inputs = {"ct": batch.ct, "path": batch.path}
    try:
        with torch.enable_grad(), capture_tokens(model, enc, all_rows=True):
            x = {m: inputs[m].clone().requires_grad_(True) for m in names}
            logit = _calibrated_logit(model, batch, **x)  # (B,)
            grads = torch.autograd.grad(logit.sum(), [acts[m] for m in names]) if names else ()
    finally:
        for h in hooks:
            h.remove()
    maps: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for m, g in zip(names, grads, strict=True):
        a = acts[m].detach()  # (P, C, *spatial): rows that have the modality, in order
        if methods.get(m, "gradcam") == "grad_x_act":
            cam = (g * a).sum(1, keepdim=True)
        else:
            w = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)
            cam = (w * a).sum(1, keepdim=True)  # (P, 1, *spatial)
        size = tuple(inputs[m].shape[2:])
        mode = "trilinear" if cam.dim() == 5 else "bilinear"
        up = F.interpolate(cam, size=size, mode=mode, align_corners=False)
        for j, row in enumerate(flags[m].nonzero().squeeze(1).tolist()):
            maps[row][m] = up[j, 0].numpy().astype(np.float32)
    tokens: list[EncoderTokens] = [{} for _ in range(n)]
    for m, t in enc.items():
        for j, row in enumerate(flags[m].nonzero().squeeze(1).tolist()):
            tokens[row][m] = t[j:j + 1]
    return maps, tokens


class _RowTokens(nn.Module):
    """Stands in for an encoder in the subset pass: returns each present row's own tokens."""

    def __init__(self, rows: torch.Tensor, present: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.present = rows, present  # (R, T, D), (R,) bool

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.rows[self.present]  # the model encodes exactly the present rows, in order
        if out.shape[0] != inputs[0].shape[0]:
            raise RuntimeError(f"row replay got {inputs[0].shape[0]} rows, expected "
                               f"{out.shape[0]}")
        return out


@torch.no_grad()
def batch_subset_values(model: FedsightModel, batch: Batch, tokens: Sequence[EncoderTokens],
                        ) -> list[tuple[list[SubsetValue], list[ExpertUse], torch.Tensor | None]]:
    """`modality.subset_values(..., ehr_fields=True)` of every row of `batch` in one forward:
    the rows' variants are concatenated, each replaying its own case's encoder tokens."""
    parts, plan = [], []
    for i in range(len(batch)):
        one = _rows(batch, i)
        present = present_modalities(model, one)
        subsets = [s for k in range(len(present) + 1) for s in combinations(present, k)]
        n = len(subsets)
        n_fields = one.ehr.shape[1] if "ehr" in present else 0
        b = repeat_batch(one, n + n_fields)
        keep = torch.tensor([[m in s for m in MODALITIES] for s in subsets]
                            + [[True] * len(MODALITIES)] * n_fields)
        b = b.with_present(b.present() & keep)
        if n_fields:
            drop = torch.cat([torch.zeros(n, n_fields, dtype=torch.bool),
                              torch.eye(n_fields, dtype=torch.bool)])
            b.ehr_observed = b.ehr_observed & ~drop
        parts.append(b)
        plan.append((one, subsets, n, n_fields))
    big = Batch(**{k: torch.cat([getattr(p, k) for p in parts]) for k in batch.__dict__})
    n_rows = len(big)
    saved: dict[str, nn.Module] = {}
    try:
        for m in ("ct", "path"):
            if m not in model.encoders:
                continue
            have = [t[m] for t in tokens if m in t]
            if not have:
                continue  # no case has it: the encoder is never called
            filler = torch.zeros_like(have[0])  # rows of cases without it are never encoded
            rows = [tok.get(m, filler).expand(n + nf, -1, -1)
                    for (_o, _s, n, nf), tok in zip(plan, tokens, strict=True)]
            saved[m] = model.encoders[m]
            flag = big.ct_present if m == "ct" else big.path_present
            model.encoders[m] = _RowTokens(torch.cat(rows), flag.clone())
        logit = model(big).logit / float(model.temperature)  # (R,)
    finally:
        for m, e in saved.items():
            model.encoders[m] = e
    out = []
    start = 0
    for one, subsets, n, n_fields in plan:
        lg = logit[start:start + n + n_fields]
        experts = _experts_used(model, one, row=start + n - 1, n_rows=n_rows)
        prob = torch.sigmoid(lg[:n])
        values = [SubsetValue(s, float(v), float(p)) for s, v, p in zip(subsets, lg[:n], prob,
                                                                         strict=True)]
        ehr = (lg[n - 1] - lg[n:]) * one.ehr_observed[0] if n_fields else None
        out.append((values, experts, ehr))
        start += n + n_fields
    return out

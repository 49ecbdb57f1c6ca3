"""Training losses: masked BCE, FedProx proximal term, and loss-ratio modality weighting."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_bce(logit: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over rows where mask is True and the label is known; 0 if none."""
    m = mask & torch.isfinite(label)
    if not bool(m.any()):
        return logit.sum() * 0.0  # keeps the graph (and DDP-style hooks) happy
    return F.binary_cross_entropy_with_logits(logit[m], label[m])


def fedprox_term(model: nn.Module, global_state: dict[str, torch.Tensor], mu: float
                 ) -> torch.Tensor:
    """FedProx: mu/2 * ||w - w_global||^2 over trainable parameters present in global_state."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad and name in global_state:
            total = total + (p - global_state[name].to(p.dtype)).pow(2).sum()
    return 0.5 * mu * total


class LossRatioWeighting:
    """Per-modality loss weights that follow each modality's convergence (GradNorm-lite).

    Each modality m has its own auxiliary loss L_m (its encoder + head). With r_m = L_m(now) /
    L_m(first epoch), the inverse training rate of GradNorm, the weights are
        w_m = M * r_m^alpha / sum_j r_j^alpha        (mean weight 1)
    so a modality that has already converged (loss fell fast) gets less weight and a lagging one
    gets more. Why this method: it counters modality imbalance (a fast, easy modality such as EHR
    starving a slow 3D CT encoder, the problem OGM-GE targets) at zero extra cost -- no extra
    forward/backward passes (GradNorm proper needs per-task gradient norms), no held-out split
    (gradient blending needs one, and small hospitals can't spare it), and no assumption that the
    fused head is a sum of per-modality logits (OGM-GE's contribution score; our fusion is
    attention + MoE). The state is local to one training run, so it also works per federated round.
    """

    def __init__(self, modalities: tuple[str, ...], alpha: float = 1.0,
                 enabled: bool = True) -> None:
        self.modalities, self.alpha, self.enabled = modalities, alpha, enabled
        self.initial: dict[str, float] = {}
        self.current: dict[str, float] = {}

    def update(self, epoch_losses: dict[str, float]) -> None:
        for m, v in epoch_losses.items():
            if not math.isfinite(v) or v <= 0:
                continue
            self.initial.setdefault(m, v)
            self.current[m] = v

    def weights(self) -> dict[str, float]:
        ms = self.modalities
        if not self.enabled or any(m not in self.current for m in ms):
            return {m: 1.0 for m in ms}
        r = {m: (self.current[m] / self.initial[m]) ** self.alpha for m in ms}
        s = sum(r.values())
        return {m: min(max(len(ms) * r[m] / s, 0.2), 5.0) for m in ms}

"""Mixture-of-experts feed-forward layer (DeepSeek-V3 / Mixtral style).

`Router` returns (weights, indices); experts are small MLPs; the loop visits only experts that got
tokens; the auxiliary losses are free functions. Router math runs in float32.

Load balance: the Switch/GShard loss alone (and DeepSeek-V3's selection bias, also tried) gave
balanced load only *averaged over training steps*: at any one set of weights the router sent
every patient's CT tokens to the same two experts, because a patient's tokens form a few tight
clusters (one per modality) that a bias or a loss can only move as a whole (measured: one expert
at 3.6x the mean share at evaluation, another at 0.001, while the training-time average was
within 10%). So selection is capacity-limited *within each patient* (Batch Prioritized Routing,
Riquelme et al. 2021, applied per sample): a patient's tokens choose their top-k experts in order
of router confidence, and an expert that already holds `capacity` of this patient's token slots
is skipped. That bounds every expert's share by capacity / (T * k / E) for every patient, it is
deterministic, and it depends on the patient's own tokens only (never on other patients in the
batch). The mixing weights are the router probabilities of the chosen experts, renormalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_balancing_loss(router_probs: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss: E * sum_e f_e * P_e (1.0 when perfectly balanced).

    router_probs: (N, E) softmax over experts; expert_mask: (N, k, E) or (N, E) one-hot dispatch.
    f_e = share of dispatched (token, slot) pairs sent to expert e; P_e = mean router prob of e.
    """
    n_experts = router_probs.shape[-1]
    mask = expert_mask.float()
    if mask.dim() == 3:
        mask = mask.sum(1)  # (N, E)
    f = mask.sum(0) / mask.sum().clamp_min(1.0)  # (E,)
    p = router_probs.float().mean(0)  # (E,)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits (N, E)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Token slots one expert may take from one sample: ceil(factor * T * k / E), raised until
    the last token of a sample is sure to find k experts with room."""
    cap = max(1, math.ceil(factor * n_tokens * top_k / n_experts))
    while n_experts - (n_tokens - 1) * top_k // cap < top_k:
        cap += 1
    return cap


@torch.no_grad()
def capacity_topk(probs: torch.Tensor, top_k: int, capacity: int) -> torch.Tensor:
    """Per-sample capacity-limited top-k: probs (B, T, E) -> expert indices (B, T, k).

    Tokens of a sample are visited in order of their highest probability (ties: token order);
    each takes its k most probable experts among those holding fewer than `capacity` of the
    sample's slots. Vectorised over the batch; a Python loop over the T token positions only.
    """
    b, t, e = probs.shape
    order = probs.amax(-1).argsort(dim=1, descending=True, stable=True)  # (B, T)
    dev = probs.device
    rows = torch.arange(b, device=dev)
    load = torch.zeros(b, e, dtype=torch.long, device=dev)
    out = torch.empty(b, t, top_k, dtype=torch.long, device=dev)
    ones = torch.ones(b, top_k, dtype=torch.long, device=dev)
    for j in range(t):
        tok = order[:, j]  # (B,)
        p = probs[rows, tok].masked_fill(load >= capacity, -1.0)  # (B, E); full experts last
        idx = p.topk(top_k, dim=-1).indices  # (B, k)
        out[rows, tok] = idx
        load.scatter_add_(1, idx, ones)
    return out


class Router(nn.Module):
    """Linear gate in float32 with optional training-only noise; top-k renormalised weights;
    per-sample expert capacity when capacity_factor > 0 (module docstring)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, noise: str = "none",
                 noise_std: float = 1.0, capacity_factor: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d_model, dtype=torch.float32) * 0.02)
        self.top_k, self.noise, self.noise_std = top_k, noise, noise_std
        self.capacity_factor = capacity_factor
        self.noise_scale = 1.0  # set by the training loop's anneal schedule; 0 = no noise
        # set by multimodal.lora: x (N, D) float32 -> a task adapter's (N, E) logit delta or None
        self.logit_delta: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        """x: (B, T, D) (samples of T tokens) or (N, D) (one sample) -> weights (N, k),
        indices (N, k), probs (N, E), logits (N, E) with N = B * T."""
        samples = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
        x = samples.reshape(-1, x.shape[-1])
        logits = F.linear(x.float(), self.weight)  # (N, E) float32
        if self.logit_delta is not None:
            delta = self.logit_delta(x.float())
            logits = logits if delta is None else logits + delta
        sel = logits
        if self.training and self.noise != "none" and self.noise_scale > 0:
            if self.noise == "gaussian":
                sel = logits + torch.randn_like(logits) * self.noise_std * self.noise_scale
            else:  # gumbel
                u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
                sel = logits - torch.log(-torch.log(u)) * self.noise_std * self.noise_scale
        probs = sel.softmax(dim=-1)  # (N, E)
        if self.capacity_factor > 0:
            b, t = samples.shape[:2]
            cap = expert_capacity(t, probs.shape[-1], self.top_k, self.capacity_factor)
            indices = capacity_topk(probs.detach().view(b, t, -1), self.top_k, cap)
            indices = indices.view(b * t, self.top_k)  # (N, k)
        else:
            indices = probs.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(-1, indices)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights, indices, probs, logits


class Expert(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """Routed experts (top-k of n) + optional always-on shared expert.

    Input (B, T, D): B samples (patients) of T tokens, the unit of expert capacity; (N, D) is
    one sample. After each forward: `last_aux` holds (balance, z) losses; `last_indices` (N, k)
    the experts each token went to (the model turns these into per-expert token counts).
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int,
                 shared_expert: bool = True, noise: str = "none", noise_std: float = 1.0,
                 capacity_factor: float = 0.0) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.router = Router(d_model, n_experts, top_k, noise, noise_std, capacity_factor)
        self.experts = nn.ModuleList(Expert(d_model, hidden) for _ in range(n_experts))
        self.shared = Expert(d_model, hidden) if shared_expert else None
        self.last_aux: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        weights, indices, probs, logits = self.router(x)  # (N, k), (N, k), (N, E), (N, E)
        x = x.reshape(-1, shape[-1])  # (N, D)
        # Dispatch (DeepSeek/Mixtral style): sort the N*k (token, slot) pairs by expert, run each
        # expert that got tokens once on its contiguous slice, scatter-add back weighted.
        k = indices.shape[1]
        flat = indices.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)  # (N*k,)
        tok = order // k  # token of each sorted pair
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        xs = x.index_select(0, tok)  # (N*k, D)
        ys, start = [], 0
        for e, c in enumerate(counts):
            if c:  # experts without tokens are skipped
                ys.append(self.experts[e](xs[start:start + c]))
                start += c
        y = torch.cat(ys) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # (N*k, D)
        out = torch.zeros_like(x).index_add(0, tok, y)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(x)
        mask = F.one_hot(indices, self.n_experts)  # (N, k, E)
        self.last_aux = (load_balancing_loss(probs, mask), router_z_loss(logits))
        self.last_indices = indices.detach()
        return out.reshape(shape)

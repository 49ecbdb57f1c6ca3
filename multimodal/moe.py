"""Mixture-of-experts feed-forward layer (DeepSeek-V3 / Mixtral style).

`Router` returns (weights, indices); experts are small MLPs; the loop visits only experts that got
tokens; the auxiliary losses are free functions. Router math runs in float32.
"""

from __future__ import annotations

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


class Router(nn.Module):
    """Linear gate in float32 with optional training-only noise; top-k renormalised weights."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, noise: str = "none",
                 noise_std: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d_model, dtype=torch.float32) * 0.02)
        self.top_k, self.noise, self.noise_std = top_k, noise, noise_std
        self.noise_scale = 1.0  # set by the training loop's anneal schedule; 0 = no noise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        """x: (N, D) -> weights (N, k), indices (N, k), probs (N, E), logits (N, E)."""
        logits = F.linear(x.float(), self.weight)  # (N, E) float32
        sel = logits
        if self.training and self.noise != "none" and self.noise_scale > 0:
            if self.noise == "gaussian":
                sel = logits + torch.randn_like(logits) * self.noise_std * self.noise_scale
            else:  # gumbel
                u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
                sel = logits - torch.log(-torch.log(u)) * self.noise_std * self.noise_scale
        probs = sel.softmax(dim=-1)  # (N, E)
        weights, indices = probs.topk(self.top_k, dim=-1)  # (N, k)
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

    After each forward: `last_aux` holds (balance, z) losses; `last_indices` (N, k) the experts
    each token went to (the model turns these into per-expert token counts).
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int,
                 shared_expert: bool = True, noise: str = "none", noise_std: float = 1.0) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.router = Router(d_model, n_experts, top_k, noise, noise_std)
        self.experts = nn.ModuleList(Expert(d_model, hidden) for _ in range(n_experts))
        self.shared = Expert(d_model, hidden) if shared_expert else None
        self.last_aux: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, indices, probs, logits = self.router(x)  # (N, k), (N, k), (N, E), (N, E)
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

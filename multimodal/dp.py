"""Record-level differential privacy for local training (DP-SGD) and its accounting, on Opacus.

What Opacus does here: per-sample clipping, Gaussian noise and the step (its `DPOptimizer`), and
the privacy accounting (its RDP accountant). What it cannot do for this model: compute the
per-sample gradients with its hooks (`GradSampleModule`, "hooks", "functorch" or
"ew"/ExpandedWeights modes). Those hooks see each *layer's* batch dimension and require it to be
the sample dimension; in fedsight it is not for two kinds of layers:

- the routed experts (multimodal.moe): an expert's Linear layers run on the tokens routed to it,
  gathered from many patients (their batch dimension is tokens, of varying count);
- the modality encoders (multimodal.model): each runs only on the cases that have the modality
  (its batch dimension is the present cases, not the batch).

Replacing them with batch-preserving equivalents (every expert on every token; every encoder on
every case with zero inputs) would change the model and cost 8x in the experts. Instead the
per-sample gradients are computed exactly, by one backward pass per case (`per_sample_grads`),
which is valid for every layer because one case's forward never depends on another case's
(GroupNorm not BatchNorm, per-sample expert capacity, per-case losses). Measured cost of local
training: x2.8-3.6 the batched pass for the multimodal model, x7.5-8.3 for the tiny EHR-only
model, which pays the per-case Python overhead in full (docs/benchmarks.md, "Privacy").

Sampling is Poisson (each case joins each step's batch with probability q = batch / n), as the
RDP analysis assumes. Batch composition and noise come from a generator seeded from the OS's
entropy at the hospital, never from the coordinator's round seed: a coordinator that knew the
seed could subtract the noise. (Opacus's secure_mode, which defends the floating-point attacks on
Gaussian sampling, needs torchcsprng, unavailable for the pinned torch; docs/privacy.md.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vocab.errors import ConfigError

ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant (Mironov 2017; Mironov et al. 2019)


@dataclass(frozen=True)
class DPSpend:
    """One training run's privacy parameters (what the accountant needs; no data)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def epsilon(history: Sequence[DPSpend | tuple[float, float, int]], delta: float) -> float:
    """Cumulative epsilon at `delta` of every run in `history` (composed by Opacus's RDP
    accountant); 0.0 for an empty history."""
    from opacus.accountants import RDPAccountant

    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    steps = [h.as_tuple() if isinstance(h, DPSpend) else tuple(h) for h in history]
    steps = [s for s in steps if s[2] > 0]
    if not steps:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in steps]
    return float(acc.get_epsilon(delta=delta))


def plan(n_cases: int, batch_size: int, epochs: int, noise_multiplier: float) -> DPSpend:
    """The spend of `epochs` epochs over n_cases with Poisson batches of expected size
    batch_size (steps per epoch = ceil(n / batch), as Opacus's DPDataLoader)."""
    if n_cases <= 0:
        return DPSpend(noise_multiplier, 0.0, 0)
    q = min(1.0, batch_size / n_cases)
    return DPSpend(noise_multiplier, q, epochs * math.ceil(n_cases / batch_size))


def secure_generator() -> torch.Generator:
    """A generator seeded from the OS entropy pool (not reproducible, on purpose)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_batch(n: int, sample_rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the cases that join this step's batch (each with probability sample_rate)."""
    return (torch.rand(n, generator=gen) < sample_rate).nonzero().squeeze(1)


def per_sample_grads(params: Sequence[torch.nn.Parameter], n: int,
                     loss_of: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample gradients, (n, *p.shape) per parameter, by one backward pass per case:
    loss_of(i) is case i's own loss (computed on a batch of that case alone). A parameter case i
    does not reach (an expert it routed no token to, an absent modality's encoder) gets zeros."""
    out = [torch.zeros((n, *p.shape), dtype=p.dtype) for p in params]
    for i in range(n):
        grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
        for buf, g in zip(out, grads, strict=True):
            if g is not None:
                buf[i] = g
    return out


class DPStep:
    """Clip each case's gradient to max_grad_norm, sum, add N(0, (noise * max_grad_norm)^2),
    divide by the expected batch size, then step the wrapped optimiser (Opacus's DPOptimizer).
    `extra_grad` (e.g. FedProx's term, which reads no data) is added after the noise."""

    def __init__(self, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, gen: torch.Generator) -> None:
        from opacus.optimizers import DPOptimizer

        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                               max_grad_norm=max_grad_norm,
                               expected_batch_size=max(1, expected_batch_size),
                               loss_reduction="mean", generator=gen)

    def step(self, grad_samples: Sequence[torch.Tensor],
             extra_grad: Callable[[], None] | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        for p, g in zip(self.params, grad_samples, strict=True):
            p.grad_sample = g
        if self.opt.pre_step():
            if extra_grad is not None:
                extra_grad()
            self.opt.original_optimizer.step()

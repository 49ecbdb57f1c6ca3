"""Temperature scaling (Guo et al. 2017): one scalar T, probability = sigmoid(logit / T).

Two ways to fit T:
- `fit_temperature`: LBFGS on the NLL of one set of cases (a locally trained model).
- Federated (`grid_stats` at each hospital, `fit_federated` at the coordinator): every hospital
  sends, for each temperature of the fixed grid `T_GRID`, the summed NLL of its held-out cases
  and reliability-bin sums (count, sum of p, sum of y per bin) - never a case's logit or label.
  Held-out cases are split in two folds by a hash of the case id; the coordinator picks the T
  that minimises the pooled NLL of all folds (stored in the version) and reports the ECE of each
  fold at the T fitted on the *other* fold (cross-fitting: an ECE measured on the cases T was
  fitted on would be optimistic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F

# 2^(k/8), k = -16..24: 0.25 .. 8 in steps of ~9%; contains 1 exactly (k = 0).
T_GRID: Final = tuple(float(2.0 ** (k / 8)) for k in range(-16, 25))
T_ONE: Final = T_GRID.index(1.0)
N_BINS: Final = 10  # equal-width probability bins, as multimodal.metrics.ece
FOLDS: Final = 2


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature minimising the BCE of logits / T on (validation) cases; 1.0 if undefined."""
    keep = torch.isfinite(labels) & torch.isfinite(logits)
    x, y = logits[keep].double(), labels[keep].double()
    if x.numel() < 2 or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0)


@dataclass(frozen=True)
class GridStats:
    """Sums one hospital (or a pool of them) releases for federated temperature scaling.

    nll: (FOLDS, len(T_GRID)) summed BCE; n: (FOLDS,) cases; bins: (FOLDS, len(T_GRID),
    N_BINS, 3) per bin (count, sum of probability, sum of label)."""

    nll: np.ndarray
    n: np.ndarray
    bins: np.ndarray

    @staticmethod
    def empty() -> GridStats:
        t = len(T_GRID)
        return GridStats(np.zeros((FOLDS, t)), np.zeros(FOLDS), np.zeros((FOLDS, t, N_BINS, 3)))

    def __add__(self, other: GridStats) -> GridStats:
        return GridStats(self.nll + other.nll, self.n + other.n, self.bins + other.bins)

    def to_lists(self) -> dict[str, list[float]]:
        return {"nll": self.nll.ravel().tolist(), "n": self.n.ravel().tolist(),
                "bins": self.bins.ravel().tolist()}

    @staticmethod
    def from_lists(nll: Sequence[float], n: Sequence[float], bins: Sequence[float]) -> GridStats:
        """Parse a hospital's reply; ValueError naming the part that has the wrong size or
        impossible values (the coordinator drops that hospital's calibration, not the round)."""
        t = len(T_GRID)
        arrays = {"nll": (np.asarray(nll, float), (FOLDS, t)),
                  "n": (np.asarray(n, float), (FOLDS,)),
                  "bins": (np.asarray(bins, float), (FOLDS, t, N_BINS, 3))}
        out = {}
        for name, (a, shape) in arrays.items():
            if a.size != math.prod(shape):
                raise ValueError(f"calibration {name}: {a.size} values, expected "
                                 f"{math.prod(shape)}")
            if not np.isfinite(a).all() or (a < 0).any():
                raise ValueError(f"calibration {name}: negative or non-finite values")
            out[name] = a.reshape(shape)
        s = GridStats(out["nll"], out["n"], out["bins"])
        counts = s.bins[..., 0].sum(axis=2)  # (FOLDS, T): every T bins every case once
        if not np.allclose(counts, s.n[:, None]) or (s.bins[..., 1:] > s.bins[..., :1] + 1e-6
                                                     ).any():
            raise ValueError("calibration bins: counts do not add up to the cases")
        return s


def grid_stats(logits: torch.Tensor, labels: torch.Tensor, folds: Sequence[int]) -> GridStats:
    """One hospital's sums over its held-out cases (fold of each case: 0 or 1)."""
    x = logits.detach().double().reshape(-1)
    y = labels.detach().double().reshape(-1)
    f = np.asarray(folds, int)
    if not (len(f) == x.numel() == y.numel()):
        raise ValueError(f"{x.numel()} logits, {y.numel()} labels, {len(f)} folds")
    out = GridStats.empty()
    temps = torch.tensor(T_GRID, dtype=torch.float64)
    z = x[None, :] / temps[:, None]  # (T, N)
    nll = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").numpy()
    p = torch.sigmoid(z).numpy()
    b = np.minimum((p * N_BINS).astype(int), N_BINS - 1)  # bin index, p = 1 in the last bin
    yn = y.numpy()
    for k in range(FOLDS):
        m = f == k
        out.n[k] = m.sum()
        out.nll[k] = nll[:, m].sum(axis=1)
        for ti in range(len(T_GRID)):
            out.bins[k, ti, :, 0] = np.bincount(b[ti, m], minlength=N_BINS)
            out.bins[k, ti, :, 1] = np.bincount(b[ti, m], weights=p[ti, m], minlength=N_BINS)
            out.bins[k, ti, :, 2] = np.bincount(b[ti, m], weights=yn[m], minlength=N_BINS)
    return out


def ece_of_bins(bins: np.ndarray) -> float:
    """Expected calibration error from (N_BINS, 3) bin sums; NaN without cases."""
    n = bins[:, 0].sum()
    return float(np.abs(bins[:, 1] - bins[:, 2]).sum() / n) if n > 0 else math.nan


def ece_noise_floor(bins: np.ndarray) -> float:
    """The ECE a perfectly calibrated model would show on these cases by chance alone:
    per bin E|sum y - sum p| with sum y ~ sum of Bernoulli(p), in the normal approximation
    sqrt(2 / pi) * sqrt(n p (1 - p)) at the bin's mean p (an upper bound on the variance)."""
    n = bins[:, 0].sum()
    if n <= 0:
        return math.nan
    cnt = np.maximum(bins[:, 0], 1e-12)
    pbar = np.clip(bins[:, 1] / cnt, 0.0, 1.0)
    sd = np.sqrt(bins[:, 0] * pbar * (1 - pbar))
    return float(math.sqrt(2 / math.pi) * sd.sum() / n)


def _best(nll: np.ndarray, n: float) -> int:
    """Grid index of the lowest NLL; T = 1 when there are no cases to fit on."""
    return int(np.argmin(nll)) if n > 0 else T_ONE


@dataclass(frozen=True)
class FederatedFit:
    temperature: float
    n: int
    # per hospital (and "pooled"): ece_before (T=1, all held-out cases), ece_after (cross-fitted),
    # ece_floor (what a perfectly calibrated model would show on as many cases), n
    ece: dict[str, dict[str, float]]
    # pooled reliability bins at T=1 and at the fitted T ((N_BINS, 3) lists), for the diagram
    bins_before: list[list[float]]
    bins_after: list[list[float]]

    def to_meta(self) -> dict[str, object]:
        return {"method": "federated temperature scaling", "temperature": self.temperature,
                "grid": [T_GRID[0], T_GRID[-1], len(T_GRID)], "n": self.n,
                "ece_bins": N_BINS, "hospitals": {k: v for k, v in self.ece.items()
                                                  if k != "pooled"},
                "pooled": self.ece["pooled"], "reliability": {
                    "before": self.bins_before, "after": self.bins_after}}


def fit_federated(per_hospital: Mapping[str, GridStats], min_cases: int = 20
                  ) -> FederatedFit | None:
    """T from the pooled NLL over the grid; per-hospital ECE before (T=1) and after (fold k
    scored at the T fitted on the pooled other fold). None with fewer than `min_cases` held-out
    cases in all or no positive/negative mix (T would be noise)."""
    if not per_hospital:
        return None
    pool = sum(per_hospital.values(), GridStats.empty())
    total = int(pool.n.sum())
    labels_pos = pool.bins[:, T_ONE, :, 2].sum()
    if total < min_cases or labels_pos in (0, total):
        return None
    best = _best(pool.nll.sum(axis=0), total)
    # the T each fold is scored at: fitted on the other fold, pooled over hospitals
    cross = [_best(pool.nll[1 - k], pool.n[1 - k]) for k in range(FOLDS)]

    def report(s: GridStats) -> dict[str, float]:
        after = sum(s.bins[k, cross[k]] for k in range(FOLDS))
        return {"ece_before": ece_of_bins(s.bins[:, T_ONE].sum(axis=0)),
                "ece_after": ece_of_bins(after), "ece_floor": ece_noise_floor(after),
                "n": float(s.n.sum())}

    ece = {h: report(s) for h, s in sorted(per_hospital.items())}
    ece["pooled"] = report(pool)
    after = sum(pool.bins[k, cross[k]] for k in range(FOLDS))
    return FederatedFit(T_GRID[best], total, ece, pool.bins[:, T_ONE].sum(axis=0).tolist(),
                        np.asarray(after).tolist())

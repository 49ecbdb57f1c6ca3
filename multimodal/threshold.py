"""Decision thresholds chosen by a task's policy (vocab.tasks.ThresholdPolicy) on labelled
validation cases: "youden" (max sensitivity + specificity), "sensitivity" / "specificity" (the
threshold that keeps at least `value` of it, as specific / as sensitive as that allows).

Candidates are the midpoints between adjacent distinct probabilities (plus one below the lowest
and one above the highest): every threshold between two observed probabilities makes the same
decisions on the validation cases, and the midpoint is the one least tied to either case.
A decision is positive when probability >= threshold, as everywhere in fedsight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from vocab.tasks import ThresholdPolicy

FITTED: Final = ("youden", "sensitivity", "specificity")
_EDGE: Final = 1e-6  # thresholds stay inside (0, 1), as ExplainConfig requires


class TooFewCases(ValueError):
    """The validation cases cannot support a fitted threshold (counts in the message)."""


@dataclass(frozen=True)
class ThresholdFit:
    """threshold: the probability at or above which the decision is positive; policy/target: the
    task's policy and its value; n / n_pos: validation cases (all / label 1); sensitivity,
    specificity: reached on those cases at `threshold` (NaN where there were none)."""

    threshold: float
    policy: str
    target: float
    n: int
    n_pos: int
    sensitivity: float
    specificity: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(prob: np.ndarray) -> np.ndarray:
    """Midpoints between adjacent distinct probabilities, one below the lowest, one above the
    highest (ascending, inside (0, 1))."""
    u = np.unique(np.asarray(prob, dtype=np.float64))
    c = np.concatenate([[u[0] / 2], (u[:-1] + u[1:]) / 2, [(u[-1] + 1) / 2]])
    return np.clip(c, _EDGE, 1 - _EDGE)


def rates(prob: np.ndarray, label: np.ndarray, thresholds: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, specificity) of prob >= t for every t in `thresholds`."""
    y = np.asarray(label).astype(bool)
    pos = np.sort(np.asarray(prob, dtype=np.float64)[y])
    neg = np.sort(np.asarray(prob, dtype=np.float64)[~y])
    # positives at or above t / negatives below t, by binary search on the sorted scores
    sens = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / max(len(pos), 1)
    spec = np.searchsorted(neg, thresholds, side="left") / max(len(neg), 1)
    return sens, spec


def fit_threshold(policy: ThresholdPolicy, prob: Any, label: Any, *, min_cases: int = 20,
                  min_per_class: int = 5) -> ThresholdFit:
    """The policy's threshold on these cases. "fixed" needs no cases (its rates are measured
    when there are some); the fitted policies raise TooFewCases below `min_cases` cases or
    `min_per_class` of either class."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(label).reshape(-1).astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities for {y.size} labels")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must be finite and in [0, 1]")
    n, n_pos = int(y.size), int(y.sum())
    if policy.policy == "fixed":
        t = float(policy.value)
    elif policy.policy in FITTED:
        if n < min_cases or min(n_pos, n - n_pos) < min_per_class:
            raise TooFewCases(f"{n} labelled validation cases ({n_pos} positive, {n - n_pos} "
                              f"negative); the {policy.policy} policy needs at least "
                              f"{min_cases} with {min_per_class} of each class")
        t = _fitted(policy, p, y)
    else:
        raise ValueError(f"unknown threshold policy {policy.policy!r}")
    sens, spec = rates(p, y, np.array([t])) if n else (np.array([math.nan]),) * 2
    return ThresholdFit(t, policy.policy, float(policy.value), n, n_pos,
                        float(sens[0]) if n_pos else math.nan,
                        float(spec[0]) if n - n_pos else math.nan)


def _fitted(policy: ThresholdPolicy, p: np.ndarray, y: np.ndarray) -> float:
    c = candidates(p)
    sens, spec = rates(p, y, c)
    if policy.policy == "youden":
        j = sens + spec
        return float(c[np.flatnonzero(j >= j.max() - 1e-12)[-1]])  # ties: the highest
    if policy.policy == "sensitivity":  # sensitivity falls as t rises: the highest that keeps it
        ok = np.flatnonzero(sens >= policy.value - 1e-12)
        return float(c[ok[-1]] if ok.size else c[0])  # none: only probabilities of exactly 0
    # specificity rises with t: the lowest that reaches it
    ok = np.flatnonzero(spec >= policy.value - 1e-12)
    return float(c[ok[0]] if ok.size else c[-1])  # none: only probabilities of exactly 1

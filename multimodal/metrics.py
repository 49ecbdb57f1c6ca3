"""Binary classification metrics on numpy arrays (probabilities of the positive class)."""

from __future__ import annotations

import math

import numpy as np


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank statistic (ties count 1/2); NaN with one class only."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _rank_average(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5
                      ) -> dict[str, float]:
    """Accuracy, sensitivity (TPR) and specificity (TNR) of prob >= threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(prob) >= threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "accuracy": (tp + tn) / len(y) if len(y) else math.nan,
        "sensitivity": tp / n_pos if n_pos else math.nan,
        "specificity": tn / n_neg if n_neg else math.nan,
    }


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al.): the predicted label's confidence max(p, 1-p) in
    n_bins equal-width bins over [0, 1]; sum of |accuracy - confidence| weighted by bin size."""
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    pred = prob >= 0.5
    conf = np.where(pred, prob, 1.0 - prob)
    correct = pred == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inb = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inb.any():
            total += inb.mean() * abs(correct[inb].mean() - conf[inb].mean())
    return float(total)


def all_metrics(y: np.ndarray, prob: np.ndarray, prob_cal: np.ndarray | None = None,
                threshold: float = 0.5) -> dict[str, float]:
    """AUC, threshold metrics (on calibrated probs when given), ECE raw and calibrated."""
    p = prob if prob_cal is None else prob_cal
    out = {"auc": auc(y, prob), **threshold_metrics(y, p, threshold), "ece": ece(y, prob)}
    out["ece_calibrated"] = ece(y, prob_cal) if prob_cal is not None else math.nan
    return out

"""Federated temperature scaling: the sums a hospital sends reproduce, pooled, what a central fit
on all held-out cases would find; the ECE from bins equals a per-case computation; malformed
sums are refused with ValueError and nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from multimodal.calibration import (
    FOLDS,
    N_BINS,
    T_GRID,
    T_ONE,
    GridStats,
    ece_noise_floor,
    ece_of_bins,
    fit_federated,
    fit_temperature,
    grid_stats,
)


def overconfident(n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Labels drawn from sigmoid(z); the model reports scale * z (overconfident for scale > 1,
    so the right temperature is `scale`)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    y = torch.bernoulli(torch.sigmoid(z), generator=g)
    folds = torch.randint(0, 2, (n,), generator=g).tolist()
    return scale * z, y, folds


def ece_by_case(p: np.ndarray, y: np.ndarray) -> float:
    """Positive-class ECE written per case: |mean p - mean y| per equal-width bin, weighted."""
    total = 0.0
    for lo in np.arange(N_BINS) / N_BINS:
        hi = lo + 1 / N_BINS
        inb = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if inb.any():
            total += inb.mean() * abs(p[inb].mean() - y[inb].mean())
    return float(total)


def test_grid_contains_one_and_is_increasing() -> None:
    assert T_GRID[T_ONE] == 1.0 and list(T_GRID) == sorted(T_GRID)


def test_sums_match_a_direct_computation_per_fold() -> None:
    x, y, folds = overconfident(300, 2.0, 0)
    s = grid_stats(x, y, folds)
    f = np.asarray(folds)
    for k in range(FOLDS):
        m = torch.from_numpy(f == k)
        assert s.n[k] == int(m.sum())
        for ti in (0, T_ONE, len(T_GRID) - 1):
            ref = F.binary_cross_entropy_with_logits(x[m] / T_GRID[ti], y[m], reduction="sum")
            assert s.nll[k, ti] == pytest.approx(float(ref), rel=1e-9)
            p = torch.sigmoid(x[m] / T_GRID[ti]).numpy()
            assert ece_of_bins(s.bins[k, ti]) == pytest.approx(ece_by_case(p, y[m].numpy()),
                                                               abs=1e-12)


def test_pooled_sums_of_two_hospitals_equal_the_sums_of_all_cases() -> None:
    x, y, folds = overconfident(200, 1.5, 1)
    a = grid_stats(x[:70], y[:70], folds[:70])
    b = grid_stats(x[70:], y[70:], folds[70:])
    allc = grid_stats(x, y, folds)
    pooled = a + b
    assert np.allclose(pooled.nll, allc.nll) and np.array_equal(pooled.n, allc.n)
    assert np.allclose(pooled.bins, allc.bins)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_federated_fit_recovers_the_temperature_and_lowers_the_ece(scale: float) -> None:
    x, y, folds = overconfident(4000, scale, 2)
    hospitals = {h: grid_stats(x[i::4], y[i::4], folds[i::4]) for i, h in enumerate("abcd")}
    fit = fit_federated(hospitals)
    assert fit is not None and fit.n == 4000
    # the grid's argmin lies within half a grid step of the central LBFGS optimum
    central = fit_temperature(x, y)
    assert abs(math.log2(fit.temperature) - math.log2(central)) <= 1 / 16 + 1e-9
    assert abs(math.log2(fit.temperature) - math.log2(scale)) < 0.15
    pooled = fit.ece["pooled"]
    assert pooled["ece_after"] < 0.03
    if scale != 1.0:
        assert pooled["ece_after"] < pooled["ece_before"]
    assert set(fit.ece) == {"a", "b", "c", "d", "pooled"}
    meta = fit.to_meta()
    assert meta["temperature"] == fit.temperature and len(meta["reliability"]["after"]) == N_BINS


def test_too_few_cases_or_one_class_gives_no_fit() -> None:
    x, y, folds = overconfident(15, 2.0, 3)
    assert fit_federated({"a": grid_stats(x, y, folds)}) is None
    x, _, folds = overconfident(100, 2.0, 3)
    assert fit_federated({"a": grid_stats(x, torch.zeros(100, dtype=torch.float64),
                                          folds)}) is None
    assert fit_federated({}) is None


def test_a_hospitals_lists_round_trip() -> None:
    x, y, folds = overconfident(50, 2.0, 4)
    s = grid_stats(x, y, folds)
    back = GridStats.from_lists(**s.to_lists())
    assert np.array_equal(back.nll, s.nll) and np.array_equal(back.bins, s.bins)


VALID = grid_stats(*overconfident(60, 2.0, 5)).to_lists()


@settings(max_examples=1500, deadline=None)
@given(part=st.sampled_from(["nll", "n", "bins"]), index=st.integers(0, 10_000),
       value=st.floats(allow_nan=True, allow_infinity=True),
       cut=st.integers(-2, 2))
def test_malformed_sums_are_refused_with_value_error(part: str, index: int, value: float,
                                                     cut: int) -> None:
    """A valid reply with one value replaced and/or its length changed: refused with a
    ValueError naming the part, or accepted only if still consistent."""
    lists = {k: list(v) for k, v in VALID.items()}
    target = lists[part]
    target[index % len(target)] = value
    if cut > 0:
        target.extend([0.0] * cut)
    elif cut < 0:
        del target[cut:]
    try:
        s = GridStats.from_lists(**lists)
    except ValueError as e:
        assert str(e).startswith("calibration ")
        return
    assert np.isfinite(s.nll).all() and (s.nll >= 0).all()
    assert np.allclose(s.bins[..., 0].sum(axis=2), s.n[:, None])
    assert (s.bins[..., 1:] <= s.bins[..., :1] + 1e-6).all()


@pytest.mark.parametrize("n", [40, 160, 2000])
def test_noise_floor_matches_simulated_calibrated_labels(n: int) -> None:
    """The formula against labels drawn from the model's own probabilities (a calibrated
    model), mean ECE over 2000 draws computed per case."""
    rng = np.random.default_rng(n)
    p = 1 / (1 + np.exp(-rng.normal(0, 1.5, n)))
    sims = [ece_by_case(p, (rng.random(n) < p).astype(float)) for _ in range(2000)]
    b = np.minimum((p * N_BINS).astype(int), N_BINS - 1)
    bins = np.stack([np.bincount(b, minlength=N_BINS), np.bincount(b, weights=p,
                     minlength=N_BINS), np.zeros(N_BINS)], axis=1)
    # the normal approximation is looser for few cases per bin
    assert ece_noise_floor(bins) == pytest.approx(np.mean(sims), rel=0.12 if n >= 160 else 0.3)

"""Thresholds chosen by a task's policy, against a reference computed another way: every
decision rule "p >= u" for the observed probabilities u (and "nobody positive"), scored with
multimodal.metrics.threshold_metrics, the fitted policy's optimum picked by a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimodal.metrics import threshold_metrics
from multimodal.threshold import TooFewCases, candidates, fit_threshold
from vocab.tasks import ThresholdPolicy

# Probabilities strictly inside (0, 1), with ties (drawn from a coarse grid half of the time).
_prob = st.one_of(st.floats(1e-4, 1 - 1e-4), st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]))
_cases = st.lists(st.tuples(_prob, st.booleans()), min_size=12, max_size=80).filter(
    lambda cs: 5 <= sum(y for _, y in cs) <= len(cs) - 5)


def _reference(policy: ThresholdPolicy, p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The decisions (p >= u) of the policy's choice among all distinct rules, by a loop."""
    rules = [p >= u for u in sorted(set(p.tolist()))] + [np.zeros_like(y)]  # ascending u
    scored = []
    for d in rules:
        m = threshold_metrics(y, d.astype(float), 0.5)
        scored.append((d, m["sensitivity"], m["specificity"]))
    if policy.policy == "sensitivity":
        ok = [d for d, se, _ in scored if se >= policy.value - 1e-12]
        return ok[-1]  # the strictest rule that keeps the sensitivity
    if policy.policy == "specificity":
        ok = [d for d, _, sp in scored if sp >= policy.value - 1e-12]
        return ok[0]  # the most sensitive rule that reaches the specificity
    best = max(se + sp for _, se, sp in scored)
    return next(d for d, se, sp in reversed(scored) if se + sp >= best - 1e-12)


@settings(max_examples=1500, deadline=None)
@given(_cases, st.sampled_from(["youden", "sensitivity", "specificity"]),
       st.floats(0.05, 0.95))
def test_fitted_threshold_makes_the_reference_decisions(cases, policy, value):
    p = np.array([c[0] for c in cases])
    y = np.array([c[1] for c in cases])
    pol = ThresholdPolicy(policy, value)
    fit = fit_threshold(pol, p, y, min_cases=10, min_per_class=5)
    assert 0.0 < fit.threshold < 1.0
    np.testing.assert_array_equal(p >= fit.threshold, _reference(pol, p, y))
    m = threshold_metrics(y, p, fit.threshold)
    assert fit.sensitivity == pytest.approx(m["sensitivity"])
    assert fit.specificity == pytest.approx(m["specificity"])
    assert (fit.n, fit.n_pos) == (len(y), int(y.sum()))
    if policy == "sensitivity":
        assert fit.sensitivity >= value - 1e-12
    if policy == "specificity":
        assert fit.specificity >= value - 1e-12
    # the threshold sits strictly between observed probabilities (no case on the boundary),
    # where two of them are far enough apart in floating point to have a midpoint
    if np.diff(np.unique(p)).min(initial=1.0) > 1e-9:
        assert not np.any(p == fit.threshold)


def test_sensitivity_policy_by_hand():
    # positives 0.9 0.8 0.7 0.6 0.2; negatives 0.65 0.5 0.4 0.3 0.1
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.4, 0.3, 0.1])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    # sensitivity 0.8 = 4 of 5 positives: the highest rule keeping 0.6 positive is t in
    # (0.5, 0.6]: midpoint 0.55
    fit = fit_threshold(ThresholdPolicy("sensitivity", 0.8), p, y, min_cases=10)
    assert fit.threshold == pytest.approx(0.55)
    assert (fit.sensitivity, fit.specificity) == (0.8, 0.8)
    # specificity 1.0 would need every negative below t: t above 0.65 -> midpoint 0.675
    fit = fit_threshold(ThresholdPolicy("specificity", 0.99), p, y, min_cases=10)
    assert fit.threshold == pytest.approx(0.675)
    assert (fit.sensitivity, fit.specificity) == (0.6, 1.0)


def test_fixed_policy_needs_no_cases_and_reports_rates_when_given():
    fit = fit_threshold(ThresholdPolicy("fixed", 0.3), [], [])
    assert fit.threshold == 0.3 and fit.n == 0 and math.isnan(fit.sensitivity)
    fit = fit_threshold(ThresholdPolicy("fixed", 0.3), [0.2, 0.4, 0.9], [0, 1, 0])
    assert (fit.sensitivity, fit.specificity) == (1.0, 0.5)


def test_too_few_cases_is_refused_with_the_counts():
    with pytest.raises(TooFewCases, match=r"12 labelled validation cases \(3 positive, 9 "
                       r"negative\); the youden policy needs at least 20 with 5 of each"):
        fit_threshold(ThresholdPolicy("youden", 0.5), np.linspace(0.1, 0.9, 12),
                      [1, 1, 1] + [0] * 9)


def test_probabilities_of_exactly_zero_and_one_stay_inside_the_open_interval():
    p = np.array([0.0] * 6 + [1.0] * 6)
    y = np.array([0, 1] * 6)
    for pol in ("youden", "sensitivity", "specificity"):
        t = fit_threshold(ThresholdPolicy(pol, 0.9), p, y, min_cases=10).threshold
        assert 0.0 < t < 1.0
    c = candidates(p)
    assert c.min() > 0 and c.max() < 1


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="finite and in"):
        fit_threshold(ThresholdPolicy("fixed", 0.5), [0.2, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        fit_threshold(ThresholdPolicy("fixed", 0.5), [0.2, 0.3, 0.4], [0, 1])

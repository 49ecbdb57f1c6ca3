"""Robust aggregation (coordinator.robust): Flower's median, trimmed mean and (Multi)Krum applied
per parameter group, checked against numpy computed here; and what each does to an attacker."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import Update, aggregate
from coordinator.robust import RobustRule, combiner
from coordinator.settings import RunSettings
from tests.coordinator.test_aggregation import E, state
from vocab.errors import ConfigError

EXPERT = f"{E}.0.fc1.weight"


def updates(values: list[float], tokens: list[float]) -> list[Update]:
    return [Update(f"h{i}", state(v), 10 * (i + 1), {(0, 0): t})
            for i, (v, t) in enumerate(zip(values, tokens, strict=True))]


def test_median_per_group_matches_numpy_and_keeps_unused_experts() -> None:
    g = state(0.0, experts=(9.0, 9.0))
    ups = updates([1.0, 2.0, 4.0, 100.0], tokens=[5.0, 5.0, 0.0, 5.0])
    out = aggregate(ups, g, per_expert=True, combine=combiner(RobustRule("median")))
    shared = "blocks.0.attn.qkv.weight"
    np.testing.assert_allclose(out[shared], np.median([1.0, 2.0, 4.0, 100.0]))  # 3.0
    # expert 0: only the three hospitals that routed tokens to it -> median(1, 2, 100) = 2
    np.testing.assert_allclose(out[EXPERT], 2.0)
    np.testing.assert_array_equal(out[f"{E}.1.fc1.weight"], g[f"{E}.1.fc1.weight"])
    assert out[shared].dtype == np.float32 and out["bn.num_batches_tracked"].dtype == np.int64
    assert out["bn.num_batches_tracked"].shape == ()


def test_trimmed_mean_drops_one_at_each_end_of_four() -> None:
    g = state(0.0)
    ups = updates([1.0, 2.0, 4.0, 100.0], tokens=[5.0] * 4)
    out = aggregate(ups, g, per_expert=True, combine=combiner(RobustRule("trimmed-mean", 0.25)))
    np.testing.assert_allclose(out["blocks.0.attn.qkv.weight"], 3.0)  # mean(2, 4)


def test_multikrum_leaves_the_far_update_out_and_weights_the_rest() -> None:
    g = state(0.0)
    ups = updates([1.0, 1.2, 0.9, 50.0], tokens=[5.0] * 4)
    out = aggregate(ups, g, per_expert=False,
                    combine=combiner(RobustRule("multikrum", byzantine=1)))
    examples = np.array([10.0, 20.0, 30.0])  # h0..h2 (h3 is the one left out)
    want = float(np.dot(examples / examples.sum(), [1.0, 1.2, 0.9]))
    np.testing.assert_allclose(out["blocks.0.attn.qkv.weight"], want, rtol=1e-6)
    krum = aggregate(ups, g, per_expert=False, combine=combiner(RobustRule("krum")))
    # Krum: one update, the one with the closest neighbours (1.0: 0.1 from 0.9, 0.2 from 1.2)
    np.testing.assert_allclose(krum["blocks.0.attn.qkv.weight"], 1.0)


def test_groups_of_two_fall_back_to_the_weighted_mean() -> None:
    g = state(0.0)
    ups = updates([1.0, 3.0, 5.0], tokens=[0.0, 10.0, 30.0])
    out = aggregate(ups, g, per_expert=True, combine=combiner(RobustRule("median")))
    np.testing.assert_allclose(out[EXPERT], (3.0 * 10 + 5.0 * 30) / 40)


def test_robust_settings_are_checked() -> None:
    assert RunSettings.from_run_config({"robust-aggregation": "median"}).robust_rule.name == \
        "median"
    with pytest.raises(ConfigError, match="robust-aggregation must be one of"):
        RunSettings.from_run_config({"robust-aggregation": "mean"})
    with pytest.raises(ConfigError, match="robust-beta"):
        RunSettings.from_run_config({"robust-beta": 0.5})

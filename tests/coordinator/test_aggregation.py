"""Screening and per-expert aggregation on numpy state dicts with MoE-style names."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.aggregation import (
    Update,
    aggregate,
    expert_of,
    parse_expert_tokens,
    screen_updates,
    update_norm,
)

E = "blocks.0.moe.experts"


def state(v: float, experts: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    e0, e1 = experts or (v, v)
    return {
        "blocks.0.attn.qkv.weight": np.full((2, 2), v, np.float32),
        f"{E}.0.fc1.weight": np.full((2,), e0, np.float32),
        f"{E}.1.fc1.weight": np.full((2,), e1, np.float32),
        "blocks.0.moe.router.weight": np.full((2, 2), v, np.float32),
        "bn.num_batches_tracked": np.array(int(v), np.int64),
    }


def test_expert_names_are_recognised() -> None:
    assert expert_of("blocks.1.moe.experts.7.fc2.bias") == (1, 7)
    assert expert_of("model.blocks.0.moe.experts.12.fc1.weight") == (0, 12)
    assert expert_of("blocks.0.moe.shared.fc1.weight") is None
    assert expert_of("blocks.0.moe.router.weight") is None
    assert parse_expert_tokens({"expert-tokens.0.1": 5, "num-examples": 3}) == {(0, 1): 5.0}


def test_per_expert_weights_by_tokens_and_keeps_unused_experts() -> None:
    g = state(0.0, experts=(9.0, 9.0))
    a = Update("a", state(1.0, experts=(1.0, 1.0)), 10, {(0, 0): 30, (0, 1): 0})
    b = Update("b", state(3.0, experts=(3.0, 3.0)), 30, {(0, 0): 10, (0, 1): 0})
    out = aggregate([a, b], g, per_expert=True)
    # shared by examples: (1*10 + 3*30) / 40 = 2.5
    np.testing.assert_allclose(out["blocks.0.attn.qkv.weight"], 2.5)
    np.testing.assert_allclose(out["blocks.0.moe.router.weight"], 2.5)
    # expert 0 by tokens: (1*30 + 3*10) / 40 = 1.5; expert 1 unused -> global copy 9
    np.testing.assert_allclose(out[f"{E}.0.fc1.weight"], 1.5)
    np.testing.assert_allclose(out[f"{E}.1.fc1.weight"], 9.0)
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert out[f"{E}.0.fc1.weight"].dtype == np.float32


def test_examples_mode_is_plain_fedavg() -> None:
    g = state(0.0)
    a = Update("a", state(1.0), 10, {(0, 0): 30})
    b = Update("b", state(3.0), 30, {(0, 0): 10})
    out = aggregate([a, b], g, per_expert=False)
    for key in g:
        if key != "bn.num_batches_tracked":
            np.testing.assert_allclose(out[key], 2.5)


def test_screening_rejects_non_finite_and_malformed() -> None:
    g = state(0.0)
    bad = state(1.0)
    bad[f"{E}.0.fc1.weight"][0] = np.nan
    short = {k: v for k, v in state(1.0).items() if "router" not in k}
    verdicts = screen_updates([Update("ok", state(1.0), 5), Update("nan", bad, 5),
                               Update("short", short, 5), Update("empty", state(1.0), 0)], g)
    by = {v.hospital: v for v in verdicts}
    assert by["ok"].accepted
    assert not by["nan"].accepted and "non-finite" in by["nan"].reason
    assert not by["short"].accepted and "do not match" in by["short"].reason
    assert not by["empty"].accepted and "num-examples" in by["empty"].reason


def test_norm_outlier_is_flagged_with_reason() -> None:
    g = state(0.0)
    ups = [Update(h, state(v), 5) for h, v in [("a", 1.0), ("b", 1.1), ("c", 0.9),
                                                ("d", 50.0)]]
    by = {v.hospital: v for v in screen_updates(ups, g)}
    assert [h for h, v in by.items() if not v.accepted] == ["d"]
    assert "outlier" in by["d"].reason and math.isfinite(by["d"].norm)


def test_honest_spread_of_three_is_not_flagged() -> None:
    g = state(0.0)
    ups = [Update(h, state(v), 5) for h, v in [("a", 1.0), ("b", 1.05), ("c", 1.6)]]
    assert all(v.accepted for v in screen_updates(ups, g))


def test_two_updates_are_never_flagged_as_outliers() -> None:
    g = state(0.0)
    ups = [Update("a", state(1.0), 5), Update("b", state(100.0), 5)]
    assert all(v.accepted for v in screen_updates(ups, g))


def test_update_norm_ignores_integer_buffers() -> None:
    assert update_norm(state(1.0), state(0.0)) == pytest.approx(math.sqrt(4 + 2 + 2 + 4))

"""Per-expert aggregation on numpy state dicts with MoE-style names."""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import (
    Update,
    aggregate,
    expert_of,
    parse_expert_tokens,
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


def test_dp_updates_without_token_counts_merge_experts_by_examples() -> None:
    """A DP reply carries no token counts: experts are then averaged by examples (not frozen at
    the global copy, which would leave them untrained for a whole DP run)."""
    g = state(0.0, experts=(9.0, 9.0))
    a = Update("a", state(1.0, experts=(1.0, 5.0)), 10)
    b = Update("b", state(3.0, experts=(3.0, 1.0)), 30, {(0, 0): 10, (0, 1): 0})
    out = aggregate([a, b], g, per_expert=True)
    np.testing.assert_allclose(out[f"{E}.0.fc1.weight"], 2.5)  # (1*10 + 3*30) / 40
    np.testing.assert_allclose(out[f"{E}.1.fc1.weight"], 2.0)  # (5*10 + 1*30) / 40

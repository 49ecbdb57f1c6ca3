"""Screening (coordinator.screening): malformed, non-finite, oversized, free-riding and
misdirected updates are left out with a reason; honest spreads are not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.aggregation import Update
from coordinator.screening import ScreenRule, direction_scores, screen_updates, update_norm
from tests.coordinator.test_aggregation import E, state


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


def federation(seed: int = 0, d: int = 4000) -> tuple[dict[str, np.ndarray],
                                                      dict[str, dict[str, np.ndarray]]]:
    """Global model + four honest hospitals: a shared descent direction plus each hospital's own
    noise (pairwise cosine ~0.5); 'small' moves a quarter as far (like a hospital without
    pathology, whose update norm is naturally smaller)."""
    rng = np.random.default_rng(seed)
    g = {"enc.weight": rng.normal(size=d).astype(np.float32),
         f"{E}.0.fc1.weight": rng.normal(size=d // 4).astype(np.float32),
         "bn.num_batches_tracked": np.array(3, np.int64)}
    common = {k: rng.normal(size=v.shape) for k, v in g.items() if k != "bn.num_batches_tracked"}
    out = {}
    for h in ("a", "b", "c", "small"):
        step = 0.025 if h == "small" else 0.1
        out[h] = {k: (v + step * (common[k] + rng.normal(size=v.shape))).astype(np.float32)
                  if k in common else v + 1 for k, v in g.items()}
    return g, out


TOKENS = {(0, 0): 10.0}


def test_sign_flipped_x10_small_hospital_passes_size_but_not_direction() -> None:
    """The issue's attack: the hospital with the naturally small update flips and scales it."""
    g, hs = federation()
    hs["small"] = {k: (g[k] - 10 * (v - g[k])).astype(v.dtype)
                   if v.dtype == np.float32 else v for k, v in hs["small"].items()}
    ups = [Update(h, st, 10, TOKENS) for h, st in hs.items()]
    size_only = {v.hospital: v for v in screen_updates(ups, g, ScreenRule(min_cosine=-1.0))}
    assert all(v.accepted for v in size_only.values())  # what screening did before
    by = {v.hospital: v for v in screen_updates(ups, g)}
    assert [h for h, v in by.items() if not v.accepted] == ["small"]
    assert "does not go the federation's way" in by["small"].reason
    assert by["small"].cosine < -0.3 and min(by[h].cosine for h in "abc") > 0.3


def test_honest_federations_are_not_flagged() -> None:
    for seed in range(20):
        g, hs = federation(seed)
        verdicts = screen_updates([Update(h, st, 10, TOKENS) for h, st in hs.items()], g)
        assert all(v.accepted for v in verdicts), (seed, verdicts)


def test_free_rider_sending_the_global_model_back_is_flagged() -> None:
    g, hs = federation()
    hs["c"] = {k: v.copy() for k, v in g.items()}
    by = {v.hospital: v for v in screen_updates(
        [Update(h, st, 10, TOKENS) for h, st in hs.items()], g)}
    assert [h for h, v in by.items() if not v.accepted] == ["c"]
    assert "came back (nearly) unchanged" in by["c"].reason and by["c"].norm == 0.0


def test_random_update_of_honest_size_is_flagged() -> None:
    g, hs = federation()
    rng = np.random.default_rng(7)
    norm = update_norm(hs["a"], g)
    noise = {k: rng.normal(size=v.shape) for k, v in g.items() if v.dtype == np.float32}
    scale = norm / math.sqrt(sum(float(np.sum(n * n)) for n in noise.values()))
    hs["a"] = {k: (g[k] + scale * noise[k]).astype(np.float32) if k in noise else v
               for k, v in hs["a"].items()}
    by = {v.hospital: v for v in screen_updates(
        [Update(h, st, 10, TOKENS) for h, st in hs.items()], g)}
    assert [h for h, v in by.items() if not v.accepted] == ["a"]
    assert abs(by["a"].cosine) < 0.2


def test_an_attack_on_one_expert_only_is_seen_per_expert() -> None:
    """Shared parameters honest, the expert's parameters flipped: the expert layer, judged among
    the hospitals that routed tokens to it, pulls the attacker's score down; with fewer than
    three users that expert is not judged at all."""
    g, hs = federation()
    honest = direction_scores([Update(h, st, 10, TOKENS) for h, st in hs.items()], g)
    key = f"{E}.0.fc1.weight"
    hs["b"][key] = (g[key] - 3 * (hs["b"][key] - g[key])).astype(np.float32)
    ups = [Update(h, st, 10, TOKENS) for h, st in hs.items()]
    scores = direction_scores(ups, g)
    assert scores["b"] < honest["b"] - 0.2
    assert scores["b"] < min(scores[h] for h in ("a", "c", "small")) - 0.2
    few = [Update(u.hospital, u.state, 10, TOKENS if u.hospital in "ab" else {}) for u in ups]
    few_honest = [Update(h, st, 10, TOKENS if h in "ab" else {})
                  for h, st in federation()[1].items()]
    assert direction_scores(few, g)["b"] == pytest.approx(direction_scores(few_honest, g)["b"])


def test_a_hospital_that_did_not_train_a_layer_is_not_judged_on_it() -> None:
    """A hospital without pathology leaves the pathology encoder unchanged: that layer must not
    count against it (it would read as 'unrelated direction')."""
    g, hs = federation()
    hs["small"]["enc.weight"] = g["enc.weight"].copy()
    scores = direction_scores([Update(h, st, 10, TOKENS) for h, st in hs.items()], g)
    assert scores["small"] > 0.3  # judged on the expert layer it did train


def test_direction_needs_three_updates() -> None:
    g, hs = federation()
    flipped = {k: (g[k] - (v - g[k])).astype(v.dtype) if v.dtype == np.float32 else v
               for k, v in hs["a"].items()}
    ups = [Update("a", flipped, 10, TOKENS), Update("b", hs["b"], 10, TOKENS)]
    assert all(v.accepted for v in screen_updates(ups, g))

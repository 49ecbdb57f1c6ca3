"""Per-expert aggregation on plain numpy state dicts (no Flower types); screening is in
coordinator.screening.

Per-expert aggregation (DESIGN.md section 5): a routed expert's parameters are averaged with the
hospitals' token counts for that expert as weights (an expert no hospital routed a token to keeps
the global copy); every other parameter is averaged by number of examples.

Expert parameters are recognised by name: `...blocks.{layer}.moe.experts.{expert}....`, and
their token counts arrive as metric keys `expert-tokens.{layer}.{expert}` (vocab.records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vocab.records import EXPERT_TOKENS_PREFIX, expert_of

State = Mapping[str, np.ndarray]
__all__ = ["expert_of"]  # re-exported: the naming rule lives with the wire keys (vocab.records)


def expert_token_key(layer: int, expert: int) -> str:
    return f"{EXPERT_TOKENS_PREFIX}.{layer}.{expert}"


def parse_expert_tokens(metrics: Mapping[str, float]) -> dict[tuple[int, int], float]:
    """`expert-tokens.{layer}.{expert}` metric entries -> {(layer, expert): count}."""
    out: dict[tuple[int, int], float] = {}
    prefix = EXPERT_TOKENS_PREFIX + "."
    for key, value in metrics.items():
        if key.startswith(prefix):
            layer, expert = key[len(prefix):].split(".")
            out[(int(layer), int(expert))] = float(value)
    return out


@dataclass(frozen=True)
class Update:
    """One hospital's reply to a training round."""

    hospital: str  # site id (or node id) - never patient data
    state: State
    num_examples: int
    expert_tokens: Mapping[tuple[int, int], float] = field(default_factory=dict)


def unused_expert_keys(updates: Sequence[Update], global_state: State) -> frozenset[str]:
    """Expert parameters no update routed a token to (per-expert aggregation keeps them)."""
    used = {e for u in updates for e, n in u.expert_tokens.items() if n > 0}
    return frozenset(k for k in global_state if (e := expert_of(k)) is not None and e not in used)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`value` in the dtype of `like` (integer/bool buffers rounded first)."""
    if np.issubdtype(like.dtype, np.integer) or like.dtype == np.bool_:
        value = np.rint(value)
    return np.asarray(value).astype(like.dtype)


Combine = Callable[[Sequence[State], np.ndarray], dict[str, np.ndarray]]


def weighted_mean(states: Sequence[State], weights: np.ndarray) -> dict[str, np.ndarray]:
    """FedAvg's rule on one group of parameters: the weighted mean, in float64."""
    w = weights / weights.sum()
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        acc = np.zeros(np.shape(states[0][key]), dtype=np.float64)
        for s, wi in zip(states, w, strict=True):
            acc += s[key].astype(np.float64) * wi
        out[key] = acc
    return out


def parameter_groups(updates: Sequence[Update], global_state: State, per_expert: bool
                     ) -> list[tuple[list[str], list[int], np.ndarray]]:
    """(keys, indices of the contributing updates, their weights) per aggregation group: every
    non-expert parameter with all updates weighted by examples; with per_expert, each routed
    expert with the updates that routed tokens to it, weighted by those tokens (an expert nobody
    used is no group: it keeps the global copy). An update without token counts (a DP round:
    counts are data statistics outside the DP mechanism) makes every expert one group weighted by
    examples, like the rest."""
    per_expert = per_expert and all(u.expert_tokens for u in updates)
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)
    shared: list[str] = []
    experts: dict[tuple[int, int], list[str]] = {}
    for key in global_state:
        which = expert_of(key) if per_expert else None
        if which is None:
            shared.append(key)
        else:
            experts.setdefault(which, []).append(key)
    groups = [(shared, list(range(len(updates))), examples)] if shared else []
    for which, keys in experts.items():
        tokens = np.array([u.expert_tokens.get(which, 0.0) for u in updates], np.float64)
        users = [i for i, t in enumerate(tokens) if t > 0]
        if users:
            groups.append((keys, users, tokens[users]))
    return groups


def aggregate(updates: Sequence[Update], global_state: State, per_expert: bool = True,
              combine: Combine = weighted_mean) -> dict[str, np.ndarray]:
    """Merge accepted updates group by group (parameter_groups) with `combine` (default: the
    weighted mean; coordinator.robust has median, trimmed mean, (Multi-)Krum). Dtypes follow the
    global model; integer buffers (e.g. BatchNorm's num_batches_tracked) are rounded."""
    if not updates:
        raise ValueError("aggregate() needs at least one update")
    out = {key: g.copy() for key, g in global_state.items()}
    for keys, idx, weights in parameter_groups(updates, global_state, per_expert):
        merged = combine([{k: updates[i].state[k] for k in keys} for i in idx], weights)
        for key in keys:
            # reshape: Flower's Array turns a 0-d buffer into shape (1,)
            out[key] = cast_like(np.reshape(merged[key], global_state[key].shape),
                                 global_state[key])
    return out

"""Update screening and per-expert aggregation on plain numpy state dicts (no Flower types).

Per-expert aggregation (DESIGN.md section 5): a routed expert's parameters are averaged with the
hospitals' token counts for that expert as weights (an expert no hospital routed a token to keeps
the global copy); every other parameter is averaged by number of examples.

Expert parameters are recognised by name: `...blocks.{layer}.moe.experts.{expert}....`, and
their token counts arrive as metric keys `expert-tokens.{layer}.{expert}` (vocab.records).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vocab.records import EXPERT_TOKENS_PREFIX

State = Mapping[str, np.ndarray]
_EXPERT_PARAM = re.compile(r"(?:^|\.)blocks\.(\d+)\.moe\.experts\.(\d+)\.")


def expert_of(param_name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed-expert parameter, None for anything else."""
    m = _EXPERT_PARAM.search(param_name)
    return (int(m.group(1)), int(m.group(2))) if m else None


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


@dataclass(frozen=True)
class Verdict:
    hospital: str
    accepted: bool
    norm: float  # L2 norm of (local - global) over floating-point arrays; nan if not computable
    reason: str = ""  # why it was left out (empty when accepted)


def update_norm(state: State, global_state: State) -> float:
    total = 0.0
    for key, g in global_state.items():
        if np.issubdtype(g.dtype, np.floating):
            d = state[key].astype(np.float64) - g.astype(np.float64)
            total += float(np.sum(d * d))
    return math.sqrt(total)


def _structural_problem(u: Update, global_state: State) -> str:
    if set(u.state) != set(global_state):
        missing = sorted(set(global_state) - set(u.state))[:3]
        extra = sorted(set(u.state) - set(global_state))[:3]
        return f"arrays do not match the global model (missing {missing}, unexpected {extra})"
    for key, g in global_state.items():
        if u.state[key].shape != g.shape:
            return f"array {key!r} has shape {u.state[key].shape}, global has {g.shape}"
    if u.num_examples <= 0:
        return f"num-examples is {u.num_examples}"
    for key, a in u.state.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            return f"non-finite values in array {key!r}"
    if any(not math.isfinite(v) or v < 0 for v in u.expert_tokens.values()):
        return "non-finite or negative expert token counts"
    return ""


def screen_updates(updates: Sequence[Update], global_state: State, z_max: float = 3.5,
                   ratio_max: float = 3.0) -> list[Verdict]:
    """Reject malformed/non-finite updates, then flag norm outliers among the rest.

    Outlier rule: robust z = 0.6745 * (norm - median) / MAD above z_max AND norm above
    ratio_max * median. The ratio guard keeps a federation of three honest hospitals, whose MAD
    can be tiny, from flagging the largest one; with fewer than 3 finite updates nothing is
    flagged (there is no majority to compare against).
    """
    verdicts: dict[str, Verdict] = {}
    norms: dict[str, float] = {}
    for u in updates:
        problem = _structural_problem(u, global_state)
        if problem:
            verdicts[u.hospital] = Verdict(u.hospital, False, math.nan, problem)
            continue
        n = update_norm(u.state, global_state)
        if not math.isfinite(n):
            verdicts[u.hospital] = Verdict(u.hospital, False, n, "update norm is not finite")
            continue
        norms[u.hospital] = n
    if len(norms) >= 3:
        values = np.array(list(norms.values()))
        med = float(np.median(values))
        mad = float(np.median(np.abs(values - med)))
        scale = max(mad, 1e-12 * max(med, 1.0))
        for h, n in norms.items():
            z = 0.6745 * (n - med) / scale
            if z > z_max and n > ratio_max * med:
                verdicts[h] = Verdict(h, False, n, f"update norm {n:.4g} is an outlier (median "
                                      f"{med:.4g}, robust z {z:.1f} > {z_max})")
    for h, n in norms.items():
        verdicts.setdefault(h, Verdict(h, True, n))
    return [verdicts[u.hospital] for u in updates]


def unused_expert_keys(updates: Sequence[Update], global_state: State) -> frozenset[str]:
    """Expert parameters no update routed a token to (per-expert aggregation keeps them)."""
    used = {e for u in updates for e, n in u.expert_tokens.items() if n > 0}
    return frozenset(k for k in global_state if (e := expert_of(k)) is not None and e not in used)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`value` in the dtype of `like` (integer/bool buffers rounded first)."""
    if np.issubdtype(like.dtype, np.integer) or like.dtype == np.bool_:
        value = np.rint(value)
    return np.asarray(value).astype(like.dtype)


def aggregate(updates: Sequence[Update], global_state: State, per_expert: bool = True
              ) -> dict[str, np.ndarray]:
    """Weighted average of accepted updates (see module doc). Dtypes follow the global model;
    integer buffers (e.g. BatchNorm's num_batches_tracked) are averaged then rounded."""
    if not updates:
        raise ValueError("aggregate() needs at least one update")
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for key, g in global_state.items():
        weights = examples
        which = expert_of(key) if per_expert else None
        if which is not None:
            weights = np.array([u.expert_tokens.get(which, 0.0) for u in updates], np.float64)
            if weights.sum() <= 0:
                out[key] = g.copy()  # no hospital routed a token here: keep the global copy
                continue
        acc = np.zeros(g.shape, dtype=np.float64)
        for u, w in zip(updates, weights / weights.sum(), strict=True):
            acc += u.state[key].astype(np.float64) * w
        out[key] = cast_like(acc, g)
    return out

"""Update screening: which hospitals' updates a round may merge, each verdict with its reason.

Checks, cheapest first, on plain numpy state dicts (no Flower types):

1. structure: the arrays match the global model, counts are sane, every value is finite;
2. size: the update norm's robust z-score (median/MAD) above `z_max` AND more than `ratio_max`
   x the median norm (the ratio guard keeps three honest hospitals with a tiny MAD apart);
3. no-op: an update below `free_ratio` x the median norm of the others changed nothing that
   matters: a free-rider sending the global model back (it would dilute the average for free);
4. direction (direction_scores): layer by layer, the cosine between the hospital's update
   (local - global) and the coordinate-wise median of the other hospitals' updates (Yin et al.,
   ICML 2018: a median is not moved by one attacker), averaged with each layer's consensus as
   weight; routed experts among the hospitals that used them. Below `min_cosine` the update
   does not go the federation's way: sign-flipped, random, partly label-flipped. Size alone
   cannot see this: a hospital without pathology has a naturally small norm, so its
   sign-flipped update x10 still looked ordinary. Honest hospitals with unusual data can score
   low too (measured in docs/benchmarks.md): such a round leaves them out, with the reason.

Checks 2-4 need at least three finite updates (with two there is no majority to compare with).
Reasons hold numbers and parameter names only: they go to the store and the audit log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation import State, Update, expert_of


@dataclass(frozen=True)
class ScreenRule:
    """Thresholds of the screening checks (RunSettings screen-* keys)."""

    z_max: float = 3.5
    ratio_max: float = 3.0
    free_ratio: float = 0.01
    min_cosine: float = 0.1


@dataclass(frozen=True)
class Verdict:
    hospital: str
    accepted: bool
    norm: float  # L2 norm of (local - global) over floating-point arrays; nan if not computable
    reason: str = ""  # why it was left out (empty when accepted)
    cosine: float = math.nan  # direction score (check 4); nan when not computed


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


def _size_outliers(norms: Mapping[str, float], rule: ScreenRule) -> dict[str, str]:
    values = np.array(list(norms.values()))
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    scale = max(mad, 1e-12 * max(med, 1.0))
    out: dict[str, str] = {}
    for h, n in norms.items():
        z = 0.6745 * (n - med) / scale
        if z > rule.z_max and n > rule.ratio_max * med:
            out[h] = (f"update norm {n:.4g} is an outlier (median {med:.4g}, robust z {z:.1f} > "
                      f"{rule.z_max})")
        others = [v for k, v in norms.items() if k != h]
        ref = float(np.median(others))
        if h not in out and ref > 0 and n < rule.free_ratio * ref:
            out[h] = (f"update norm {n:.3g} is under {rule.free_ratio:g} x the others' median "
                      f"{ref:.3g}: the model came back (nearly) unchanged")
    return out


def _deltas(updates: Sequence[Update], global_state: State, keys: Sequence[str]
            ) -> np.ndarray:
    """(hospitals, parameters) float32 matrix of local - global over `keys`."""
    return np.stack([np.concatenate([
        (u.state[k].astype(np.float32) - global_state[k].astype(np.float32)).ravel()
        for k in keys]) for u in updates])


def _cosines_to_median(deltas: np.ndarray) -> np.ndarray:
    """Cosine of each row with the coordinate-wise median of the OTHER rows (0 for a zero row).

    Leave-one-out on purpose: a median that includes the row itself leans towards an extreme
    row wherever the honest rows disagree (measured: a sign-flipped x10 update scored +0.37
    against the median of all four, negative against the median of the other three).
    """
    out = np.zeros(len(deltas))
    norms = np.linalg.norm(deltas, axis=1)
    for i in range(len(deltas)):
        ref = np.median(np.delete(deltas, i, axis=0), axis=0)
        denom = float(norms[i] * np.linalg.norm(ref))
        out[i] = float(deltas[i] @ ref) / denom if denom > 0 else 0.0
    return out


TRAINED_FRACTION = 0.1


def _trained(norms: np.ndarray) -> np.ndarray:
    """Which hospitals trained a layer: its update there is at least TRAINED_FRACTION of the
    others' median. A hospital without data for a modality still moves that encoder a little
    (decoupled weight decay shrinks every weight, ~lr x decay x |w|, while a trained layer moves
    ~lr per weight under Adam); that drift carries no direction to judge."""
    out = np.zeros(len(norms), dtype=bool)
    for i in range(len(norms)):
        others = float(np.median(np.delete(norms, i))) if len(norms) > 1 else 0.0
        out[i] = norms[i] > 0 and norms[i] >= TRAINED_FRACTION * others
    return out


def direction_scores(updates: Sequence[Update], global_state: State) -> dict[str, float]:
    """Per hospital: how far its update agrees with the federation where the federation agrees.

    Layer by layer (parameters grouped by module: the name without its last component), among
    the hospitals that trained the layer (_trained; for a routed expert: that routed tokens to
    it), each hospital's cosine to the coordinate-wise median of the others; for that hospital
    the layer counts with weight max(0, median of the others' cosines - 2/sqrt(layer size)),
    their consensus beyond what random directions would show. The score is the
    consensus-weighted mean of a hospital's cosines: near 1 agreeing, near 0 unrelated (a random
    direction), negative opposed. Layers where fewer than three hospitals take part, or that
    have no consensus, do not count; a hospital with no counted layer gets no score (no verdict).
    """
    layers: dict[str, list[str]] = {}
    for k, g in global_state.items():
        if np.issubdtype(g.dtype, np.floating):
            layers.setdefault(k.rsplit(".", 1)[0], []).append(k)
    num = {u.hospital: 0.0 for u in updates}
    den = dict(num)
    for keys in layers.values():
        e = expert_of(keys[0])
        members = [u for u in updates if e is None or u.expert_tokens.get(e, 0.0) > 0]
        if len(members) < 3:
            continue
        deltas = _deltas(members, global_state, keys)
        moved = _trained(np.linalg.norm(deltas, axis=1))
        if int(moved.sum()) < 3:
            continue
        members = [u for u, m in zip(members, moved, strict=True) if m]
        cos = _cosines_to_median(deltas[moved])
        chance = 2.0 / math.sqrt(deltas.shape[1])  # 2 sd of the cosine of random directions
        for i, u in enumerate(members):
            # The layer's consensus among the OTHER hospitals (with its own cosine in the
            # median, a random update would weight up the layers it happens to match), counted
            # only beyond chance: a 1-weight layer's cosine is a coin flip (+-1).
            weight = max(0.0, float(np.median(np.delete(cos, i))) - chance)
            num[u.hospital] += weight * float(cos[i])
            den[u.hospital] += weight
    return {h: num[h] / den[h] for h in num if den[h] > 0}


def screen_updates(updates: Sequence[Update], global_state: State,
                   rule: ScreenRule = ScreenRule()) -> list[Verdict]:
    """One verdict per update, in order (see the module doc for the checks)."""
    verdicts: dict[str, Verdict] = {}
    finite: list[Update] = []
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
        finite.append(u)
    if len(norms) >= 3:
        for h, why in _size_outliers(norms, rule).items():
            verdicts[h] = Verdict(h, False, norms[h], why)
    # Direction among the updates of ordinary size: an oversized one would dominate the
    # others' median when only three are left.
    cosines = direction_scores([u for u in finite if u.hospital not in verdicts], global_state)
    if len(cosines) >= 3:
        for h, c in cosines.items():
            if h not in verdicts and c < rule.min_cosine:
                verdicts[h] = Verdict(h, False, norms[h], (
                    f"update does not go the federation's way: direction score {c:.3f} "
                    f"(consensus-weighted cosine to the others' median update) < "
                    f"{rule.min_cosine:g}"), c)
    for h, n in norms.items():
        verdicts.setdefault(h, Verdict(h, True, n, "", cosines.get(h, math.nan)))
    return [verdicts[u.hospital] for u in updates]

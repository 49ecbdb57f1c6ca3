"""Robust aggregation rules from Flower's own strategies, applied per parameter group.

Flower's FedMedian, FedTrimmedAvg and (Multi)Krum aggregate whole replies; fedsight aggregates
per group (coordinator.aggregation.parameter_groups: the shared parameters over all accepted
hospitals, each routed expert over the hospitals that used it). So each rule here is the
strategy's own aggregation step, called on one group at a time:

- median: FedMedian's coordinate-wise `np.median` over the group's updates (unweighted);
- trimmed-mean: FedTrimmedAvg's `trim_mean` (drops the `beta` fraction at each end per
  coordinate; with 4 hospitals beta must be >= 0.25 to drop anything);
- krum / multikrum: MultiKrum's `select_multikrum` picks the update(s) closest to their
  neighbours (assuming `byzantine` attackers), then Flower's `aggregate_arrayrecords` takes the
  weighted mean of those. Krum selects one; MultiKrum keeps n - byzantine.

A group with fewer than 3 contributors falls back to the weighted mean: no rule can outvote an
attacker among two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from coordinator.aggregation import Combine, State, weighted_mean

RobustName = Literal["none", "median", "trimmed-mean", "krum", "multikrum"]
ROBUST_NAMES: tuple[str, ...] = ("none", "median", "trimmed-mean", "krum", "multikrum")
_WEIGHT = "weight"


@dataclass(frozen=True)
class RobustRule:
    name: RobustName = "none"
    beta: float = 0.25  # trimmed-mean: fraction cut at each end
    byzantine: int = 1  # krum/multikrum: attackers assumed among the hospitals


def _stack(states: Sequence[State], key: str) -> np.ndarray:
    return np.stack([np.asarray(s[key], dtype=np.float64) for s in states])


def _krum(states: Sequence[State], weights: np.ndarray, rule: RobustRule, select: int
          ) -> dict[str, np.ndarray]:
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                   for k, v in s.items()}),
                            "metrics": MetricRecord({_WEIGHT: float(w)})})
                for s, w in zip(states, weights, strict=True)]
    chosen = select_multikrum(contents, num_malicious_nodes=rule.byzantine,
                              num_nodes_to_select=select)
    merged = aggregate_arrayrecords(chosen, _WEIGHT)
    return {k: a.numpy() for k, a in merged.items()}


def combiner(rule: RobustRule) -> Combine:
    """The per-group aggregation function for `rule` (coordinator.aggregation.aggregate)."""
    if rule.name == "none":
        return weighted_mean

    def combine(states: Sequence[State], weights: np.ndarray) -> dict[str, np.ndarray]:
        if len(states) < 3:
            return weighted_mean(states, weights)
        if rule.name == "median":
            return {k: np.median(_stack(states, k), axis=0) for k in states[0]}
        if rule.name == "trimmed-mean":
            return {k: trim_mean(_stack(states, k), rule.beta) for k in states[0]}
        select = 1 if rule.name == "krum" else max(1, len(states) - rule.byzantine)
        return _krum(states, weights, rule, select)

    return combine

"""Hostile updates, generated: whatever hospitals send (NaN, inf, 1e38, zeros, wrong shapes, odd
token counts, any number of hospitals), screening never raises, gives every update a verdict
(a reason whenever it is refused), never accepts a non-finite one, and the merge of what it
accepts (plain and robust) stays finite with the global model's shapes and dtypes."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.aggregation import Update, aggregate
from coordinator.robust import RobustRule, combiner
from coordinator.screening import screen_updates
from tests.coordinator.test_aggregation import state

VALUES = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf, 1e38,
                                                            0.0]))


@st.composite
def update(draw: st.DrawFn, name: str) -> Update:
    s = state(0.0)
    out = {}
    for k, v in s.items():
        if v.dtype == np.int64:
            out[k] = np.array(draw(st.integers(0, 10)), np.int64)
        elif draw(st.integers(0, 30)) == 0:  # wrong shape now and then
            out[k] = np.zeros((3,), np.float32)
        else:
            out[k] = np.array(draw(st.lists(VALUES, min_size=v.size, max_size=v.size)),
                              np.float32).reshape(v.shape)
    tokens = {(0, e): draw(st.one_of(st.floats(0, 100), st.sampled_from([math.nan, -1.0])))
              for e in (0, 1)}
    return Update(name, out, draw(st.integers(-1, 50)), tokens)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 6).flatmap(lambda n: st.tuples(*[update(f"h{i}") for i in range(n)])),
       st.sampled_from(["none", "median", "trimmed-mean", "multikrum"]))
def test_screening_and_merge_never_fail_on_hostile_updates(ups: tuple[Update, ...],
                                                          rule: str) -> None:
    g = state(0.0)
    verdicts = screen_updates(list(ups), g)
    assert [v.hospital for v in verdicts] == [u.hospital for u in ups]
    for u, v in zip(ups, verdicts, strict=True):
        if not v.accepted:
            assert v.reason
        else:
            assert all(np.all(np.isfinite(a)) for a in u.state.values())
            assert u.num_examples > 0
    accepted = [u for u, v in zip(ups, verdicts, strict=True) if v.accepted]
    if accepted:
        merged = aggregate(accepted, g, per_expert=True, combine=combiner(RobustRule(rule)))
        for k, a in merged.items():
            assert a.shape == g[k].shape and a.dtype == g[k].dtype
            assert np.all(np.isfinite(a)), k

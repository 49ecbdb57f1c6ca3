"""explain_cases (one gradient pass + one subset pass for several cases) equals explain_case
per case: a batch's results are the single-case results (float tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explain.config import ExplainConfig
from explain.explanation import Explanation, explain_case, explain_cases
from tests.explain.fixtures import make_case, tiny_model

COMBOS = [("ct", "path", "ehr"), ("ct",), ("path", "ehr"), ("ehr",), ("ct", "ehr"),
          ("ct", "path"), ("path",)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def assert_same(a: Explanation, b: Explanation) -> None:
    assert a.present == b.present and a.missing == b.missing
    assert a.probability == pytest.approx(b.probability, abs=1e-5)
    assert a.logit == pytest.approx(b.logit, abs=1e-4)
    for x, y in ((a.ct_map, b.ct_map), (a.path_map, b.path_map)):
        assert (x is None) == (y is None)
        if x is not None:
            scale = max(float(np.abs(y).max()), 1e-6)
            np.testing.assert_allclose(x, y, atol=1e-4 * scale, rtol=1e-3)
    assert a.ct_top_slice == b.ct_top_slice
    assert (a.ct_location is None) == (b.ct_location is None)
    if a.ct_location is not None:
        assert a.ct_location.voxel == b.ct_location.voxel
    assert [s.modalities for s in a.subsets] == [s.modalities for s in b.subsets]
    np.testing.assert_allclose([s.logit for s in a.subsets], [s.logit for s in b.subsets],
                               atol=1e-4)
    assert a.modality_contrib.keys() == b.modality_contrib.keys()
    for k in a.modality_contrib:
        assert a.modality_contrib[k] == pytest.approx(b.modality_contrib[k], abs=1e-4)
    assert [(f.name, f.value) for f in a.ehr] == [(f.name, f.value) for f in b.ehr]
    np.testing.assert_allclose([f.contribution for f in a.ehr],
                               [f.contribution for f in b.ehr], atol=1e-4)
    assert a.experts == b.experts


@pytest.mark.parametrize("ct_method", ["grad_x_act", "gradcam"])
def test_batch_of_mixed_cases_equals_single_calls(model, ct_method):
    cfg = ExplainConfig(ct_method=ct_method) if ct_method == "grad_x_act" else ExplainConfig(
        ct_layer="encoders.ct.stages.0", ct_method="gradcam")
    cases = [make_case(c, seed=i, cid=f"c{i}") for i, c in enumerate(COMBOS)]
    batched = explain_cases(model, cases, cfg, "v1")
    assert len(batched) == len(cases)
    for case, b in zip(cases, batched, strict=True):
        assert_same(b, explain_case(model, case, cfg, "v1"))
        assert b.model_version == "v1" and b.timings_ms["batch"] == len(cases)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(COMBOS), min_size=1, max_size=4), st.integers(0, 1000))
def test_any_batch_composition_equals_single_calls(model, combos, seed):
    cfg = ExplainConfig()
    cases = [make_case(c, seed=seed + i, cid=f"c{i}") for i, c in enumerate(combos)]
    for case, b in zip(cases, explain_cases(model, cases, cfg), strict=True):
        assert_same(b, explain_case(model, case, cfg))


def test_batch_does_not_leak_between_cases(model):
    """A case's result does not depend on its batch mates (the same case alone vs with others)."""
    cfg = ExplainConfig()
    target = make_case(("ct", "path", "ehr"), seed=7, cid="t")
    alone = explain_cases(model, [target], cfg)[0]
    mates = [make_case(c, seed=50 + i, cid=f"m{i}") for i, c in enumerate(COMBOS)]
    with_mates = explain_cases(model, [*mates[:3], target, *mates[3:]], cfg)[3]
    assert_same(with_mates, alone)


def test_empty_and_training_mode(model):
    assert explain_cases(model, [], ExplainConfig()) == []
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            explain_cases(model, [make_case(("ehr",))], ExplainConfig())
    finally:
        model.eval()

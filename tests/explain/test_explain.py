"""Properties of the explanations (not snapshots): shapes, exactness, consistency."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from explain.answers import QUESTIONS, answer, pct, signed
from explain.config import ExplainConfig
from explain.explanation import Explanation, case_batch, explain_case
from tests.explain.fixtures import TINY_INPUTS, make_case, tiny_model
from vocab.modalities import modality_combinations

torch.set_num_threads(1)
CFG = ExplainConfig()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _logit(model, batch) -> float:
    with torch.no_grad():
        return float(model(batch).logit[0]) / model.temperature


@pytest.mark.parametrize("combo", modality_combinations(), ids=lambda c: "+".join(c))
def test_attribution_shapes_every_combination(model, combo):
    e = explain_case(model, make_case(combo), CFG)
    assert e.present == combo
    if "ct" in combo:
        assert e.ct_map is not None and e.ct_map.shape == TINY_INPUTS.ct_shape
        assert np.isfinite(e.ct_map).all() and np.abs(e.ct_map).max() > 0
        assert 0 <= e.ct_top_slice < TINY_INPUTS.ct_shape[0]
    else:
        assert e.ct_map is None and e.ct_location is None
    s = TINY_INPUTS.path_size
    assert (e.path_map is not None and e.path_map.shape == (s, s)) == ("path" in combo)
    assert (len(e.ehr) == 8) == ("ehr" in combo)
    assert set(e.modality_contrib) == set(combo)
    assert len(e.subsets) == 2 ** len(combo)


@pytest.mark.parametrize("combo", [("ct", "path", "ehr"), ("ct", "ehr"), ("path",)],
                         ids=lambda c: "+".join(c))
def test_modality_shapley_sums_to_difference_from_all_missing(model, combo):
    case = make_case(combo, seed=3)
    e = explain_case(model, case, CFG)
    batch = case_batch(model, case)
    full, none = _logit(model, batch), _logit(model, batch.only(()))
    assert e.logit == pytest.approx(full, abs=1e-5)
    assert sum(e.modality_contrib.values()) == pytest.approx(full - none, abs=1e-4)
    # every subset value equals a plain forward with the other modalities missing
    for sv in e.subsets:
        assert sv.logit == pytest.approx(_logit(model, batch.only(sv.modalities)), abs=1e-4)


def test_ehr_contribution_is_value_vs_missing_field(model):
    from explain.attribution import ehr_ablation

    case = make_case(("ct", "ehr"), seed=5)
    e = explain_case(model, case, CFG)
    batch = case_batch(model, case)
    full = _logit(model, batch)
    # the batched pass gives what Captum FeatureAblation gives with the missing-field baseline
    captum = ehr_ablation(model, batch)
    assert np.allclose([f.contribution for f in e.ehr], captum, atol=1e-4)
    for i, f in enumerate(e.ehr):
        if f.value is None:
            assert f.contribution == 0.0
            continue
        obs = batch.ehr_observed.clone()
        obs[0, i] = False
        b = case_batch(model, case)
        b.ehr_observed = obs
        assert f.contribution == pytest.approx(full - _logit(model, b), abs=1e-4)


def test_ct_map_depends_on_the_input(model):
    a = explain_case(model, make_case(("ct",), seed=1), CFG).ct_map
    b = explain_case(model, make_case(("ct",), seed=2), CFG).ct_map
    assert not np.allclose(a, b)


def _allowed_numbers(e: Explanation) -> set[str]:
    """Every number an answer may quote, formatted as the answer helpers format them."""
    probs = [e.probability, e.threshold, e.uncertain_band, abs(e.probability - e.threshold),
             *(s.probability for s in e.subsets)]
    if e.ct_location is not None:
        probs.append(e.ct_location.slice_share)
    nums = {pct(p) for p in probs}
    nums |= {signed(v) for v in e.modality_contrib.values()}
    nums |= {signed(f.contribution) for f in e.ehr}
    nums.add(f"{e.temperature:.2f}")
    if e.ct_map is not None and e.ct_location is not None:
        d, h, w = e.ct_location.voxel
        nums |= {str(e.ct_top_slice + 1), str(e.ct_map.shape[0]), str(d + 1), str(h + 1),
                 str(w + 1)}
        if e.ct_location.mm is not None:
            nums |= {f"{v:.0f}" for v in e.ct_location.mm}
    return nums


@pytest.mark.parametrize("combo", [("ct", "path", "ehr"), ("ct",), ("path", "ehr")],
                         ids=lambda c: "+".join(c))
def test_answers_quote_the_explanation(model, combo):
    e = explain_case(model, make_case(combo, seed=7), CFG)
    allowed = _allowed_numbers(e)
    for q in QUESTIONS:
        text = answer(e, q)
        quoted = re.findall(r"[+-]?\d+(?:\.\d+)?%?", text)
        assert quoted or "no CT" in text or "no pathology" in text, (q, text)
        for num in quoted:
            assert num in allowed or num.lstrip("+-") in allowed, (q, num, text)
    # the headline numbers are really there
    assert pct(e.probability) in answer(e, "How sure is it?")
    if "path" in combo:
        without = e.subset(tuple(m for m in e.present if m != "path"))
        assert pct(without.probability) in answer(e, "what if we had no pathology")
        assert signed(e.modality_contrib["path"]) in answer(e, "What did the pathology add?")


def test_free_text_routing(model):
    e = explain_case(model, make_case(("ct", "path", "ehr")), CFG)
    assert answer(e, "where is the nodule?") == answer(e, "Where in the CT?")
    assert answer(e, "what if there were no pathology") == answer(
        e, "What if we had no pathology?")
    assert answer(e, "tell me a joke").startswith("I can answer")


def test_experts_are_the_routing_of_the_case_as_it_is(model):
    case = make_case(("ct", "path", "ehr"), seed=11)
    e = explain_case(model, case, CFG)
    with torch.no_grad():
        model(case_batch(model, case))
    for i, block in enumerate(model.blocks):
        idx = block.moe.last_indices  # (T, k) of the plain forward
        want = {int(x): int((idx == x).sum()) for x in idx.unique()}
        got = {u.expert: u.tokens for u in e.experts if u.block == i}
        assert got == want
        assert {u.expert for u in e.experts if u.block == i and u.fusion} == set(
            idx[0].tolist())


@pytest.mark.parametrize("ct_method", ["grad_x_act", "gradcam"])
@pytest.mark.parametrize("combo", [("ct", "path", "ehr"), ("ct",), ("path", "ehr")],
                         ids=lambda c: "+".join(c))
def test_joint_maps_equal_captum(model, combo, ct_method):
    """The app's one-pass maps equal Captum's LayerGradientXActivation (CT, default) or
    LayerGradCam (CT at a conv stage; pathology) computed on their own."""
    from explain.attribution import ct_grad_x_activation, ct_gradcam, path_gradcam

    cfg = CFG if ct_method == "grad_x_act" else ExplainConfig(ct_layer="encoders.ct.stages.0",
                                                              ct_method="gradcam")
    case = make_case(combo, seed=13)
    e = explain_case(model, case, cfg)
    batch = case_batch(model, case)
    if "ct" in combo:
        ref = (ct_grad_x_activation if ct_method == "grad_x_act" else ct_gradcam)(
            model, batch, cfg.ct_layer)
        assert np.abs(ref).max() > 0
        assert np.allclose(e.ct_map, ref, atol=1e-6 * max(1.0, np.abs(ref).max()) + 1e-9)
    if "path" in combo:
        ref = path_gradcam(model, batch, cfg.path_layer)
        assert np.allclose(e.path_map, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-12)


def test_explain_config_rejects_unknown_map_method_and_layer(model):
    from vocab.errors import ConfigError

    with pytest.raises(ConfigError, match="'saliency'"):
        ExplainConfig(ct_method="saliency")
    with pytest.raises(ConfigError, match="encoders.ct.nope"):
        explain_case(model, make_case(("ct",), seed=2), ExplainConfig(ct_layer="encoders.ct.nope"))

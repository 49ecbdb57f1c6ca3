"""The app's decision threshold: the operator's, the task's fixed value, or the task's policy
fitted on the site's held-out labelled cases (the nodes' split) - and the card says which."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hospital_node.splits import split_of
from multimodal.metrics import threshold_metrics
from tests.explain.fixtures import make_case, tiny_model
from ui.operating_point import choose_operating_point
from vocab.tasks import ThresholdPolicy, get_task

FIB = get_task("fibrosis")  # policy: sensitivity >= 0.9


def _cases(n: int, seed: int = 0) -> list:
    """EHR-only cases labelled by the model's own score plus noise (so the policy has signal)."""
    model = tiny_model()
    cases = [make_case(("ehr",), seed=seed * 1000 + i, cid=f"case{i:04d}") for i in range(n)]
    rng = np.random.default_rng(seed)
    from multimodal.evaluate import predict_logits

    logits, _ = predict_logits(model, cases)
    z = (logits - logits.mean()) / (logits.std() + 1e-9)
    for c, zi in zip(cases, z.tolist(), strict=True):
        c.label = int(zi + rng.normal(0, 0.7) > 0)
    return cases


def test_policy_is_fitted_on_the_held_out_split_only_and_reaches_its_sensitivity():
    model = tiny_model()
    cases = _cases(200)
    op = choose_operating_point(FIB, model, cases, split_seed=3)
    test = [c for c in cases if split_of(c.case_id, 3) == "test"]
    assert op.source == "fitted" and op.fit is not None
    assert op.fit.n == len(test) and op.fit.n_pos == sum(c.label for c in test)
    # the reference: the same cases' calibrated probabilities, computed by a plain forward
    from multimodal.train import as_batch

    with torch.no_grad():
        prob = torch.sigmoid(model(as_batch(model, test)).logit / model.temperature).double()
        prob = prob.numpy()  # float64: a float32 array would round the 1e-9 step below away
    y = np.array([c.label for c in test])
    m = threshold_metrics(y, prob, op.threshold)
    assert m["sensitivity"] >= 0.9 and m["sensitivity"] == pytest.approx(op.fit.sensitivity)
    # the highest such threshold: the next held-out positive above it would drop below 0.9
    above = np.sort(prob[(y == 1) & (prob >= op.threshold)])
    assert threshold_metrics(y, prob, float(above[0]) + 1e-9)["sensitivity"] < 0.9
    assert f"{100 * op.threshold:.1f}%, chosen for sensitivity of at least 90.0%" in op.summary
    assert f"on {len(test)} held-out cases at this hospital" in op.summary
    # another split seed: other held-out cases, another fit
    other = choose_operating_point(FIB, model, cases, split_seed=4)
    assert other.fit is not None and (other.fit.n, other.threshold) != (op.fit.n, op.threshold)


def test_too_few_held_out_cases_fall_back_to_the_default_and_say_so():
    cases = _cases(30)
    n_test = sum(split_of(c.case_id, 0) == "test" for c in cases)
    op = choose_operating_point(FIB, tiny_model(), cases)
    assert op.source == "default" and op.threshold == 0.5 and op.fit is None
    assert "not the task's policy" in op.summary and f"there are {n_test} (" in op.summary
    assert "sensitivity at this threshold is unknown" in op.summary
    unlabelled = [dataclasses.replace(c, label=None) for c in _cases(200)]
    op = choose_operating_point(FIB, tiny_model(), unlabelled)
    assert op.source == "default" and "there are 0 (0 fibrotic ILD)" in op.summary


def test_operator_and_fixed_task_thresholds():
    cases = _cases(200)
    op = choose_operating_point(FIB, tiny_model(), cases, operator=0.3)
    assert (op.source, op.threshold) == ("operator", 0.3)
    assert "set by the operator" in op.summary and "policy (sensitivity" in op.summary
    nod = get_task("nodule")  # fixed 0.5
    op = choose_operating_point(nod, tiny_model(), cases)
    assert (op.source, op.threshold) == ("task", 0.5) and "fixed by the task (nodule)" in op.summary
    op = choose_operating_point(nod, tiny_model(), cases, operator=0.5)
    assert "not applied" not in op.summary  # the operator's value is the policy's
    youden = dataclasses.replace(FIB, threshold=ThresholdPolicy("youden", 0.5))
    op = choose_operating_point(youden, tiny_model(), cases)
    assert op.source == "fitted" and "Youden" in op.summary

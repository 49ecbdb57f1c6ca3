"""The served task's decision threshold and the card's sentence about it.

In order: the operator's `--threshold`; the task file's fixed value (vocab.tasks, policy
"fixed"); the task's policy (youden / sensitivity / specificity) fitted on **this hospital's own
held-out labelled cases** of the task (the nodes' fixed split, hospital_node.splits: cases no
federated round trained on) with the served version's calibrated probabilities
(multimodal.threshold). A policy that cannot be fitted here (too few such cases) falls back to
50 % and the card says so, so that the decision never claims an operating point it does not have.
The fit runs at app start, inside the hospital: nothing leaves it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch

from explain.answers import pct
from hospital_node.splits import split_of
from multimodal.data import PreparedCase
from multimodal.evaluate import predict_logits
from multimodal.model import FedsightModel
from multimodal.threshold import ThresholdFit, TooFewCases, fit_threshold
from vocab.tasks import Task, ThresholdPolicy

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD: Final = 0.5


@dataclass(frozen=True)
class OperatingPoint:
    """threshold: the served decision's threshold; source: "operator", "task" (fixed by the task
    file), "fitted" (the task's policy on this hospital's held-out cases) or "default" (the
    policy could not be fitted); summary: the card's sentence; fit: the fit, where one ran."""

    threshold: float
    source: str
    summary: str
    fit: ThresholdFit | None = None


def describe(policy: ThresholdPolicy) -> str:
    """The policy in a clinician's words."""
    if policy.policy == "youden":
        return "the best sensitivity + specificity (Youden)"
    if policy.policy in ("sensitivity", "specificity"):
        return f"{policy.policy} of at least {pct(policy.value)}"
    return f"a fixed {pct(policy.value)}"


def held_out(cases: Sequence[PreparedCase], split_seed: int) -> list[PreparedCase]:
    """The labelled cases of the nodes' held-out split."""
    return [c for c in cases if c.label is not None and split_of(c.case_id, split_seed) == "test"]


def choose_operating_point(task: Task, model: FedsightModel, cases: Sequence[PreparedCase],
                           split_seed: int = 0, operator: float | None = None,
                           min_cases: int = 20, min_per_class: int = 5) -> OperatingPoint:
    """The threshold the app decides with. `cases`: the site's cases labelled for `task`;
    `model`: serving `task` (its temperature is the calibrated probability's)."""
    policy = task.threshold
    if operator is not None:
        note = "" if policy == ThresholdPolicy("fixed", operator) else \
            f"; the task's policy ({describe(policy)}) is not applied"
        return OperatingPoint(operator, "operator", f"{pct(operator)}, set by the operator "
                              f"(`--threshold`){note}.")
    if policy.policy == "fixed":
        return OperatingPoint(policy.value, "task",
                              f"{pct(policy.value)}, fixed by the task ({task.id}).")
    test = held_out(cases, split_seed)
    n_pos = sum(c.label == 1 for c in test)
    try:
        if len(test) < min_cases or min(n_pos, len(test) - n_pos) < min_per_class:
            raise TooFewCases  # checked before any forward pass; fit_threshold rechecks
        logits, labels = predict_logits(model, test)
        prob = torch.sigmoid(logits / model.temperature).numpy()
        fit = fit_threshold(policy, prob, labels.numpy(), min_cases=min_cases,
                            min_per_class=min_per_class)
    except TooFewCases:
        log.info("threshold: %s not fitted (%d held-out labelled cases, %d positive)",
                 policy.policy, len(test), n_pos)
        return OperatingPoint(DEFAULT_THRESHOLD, "default", (
            f"**{pct(DEFAULT_THRESHOLD)}, a default — not the task's policy** "
            f"({describe(policy)}): fitting it needs at least {min_cases} held-out cases "
            f"labelled for {task.id} at this hospital with {min_per_class} of each class; "
            f"there are {len(test)} ({n_pos} {task.positive}). The sensitivity at this "
            "threshold is unknown."))
    return OperatingPoint(fit.threshold, "fitted", (
        f"{pct(fit.threshold)}, chosen for {describe(policy)} on {fit.n} held-out cases at "
        f"this hospital ({fit.n_pos} {task.positive}): sensitivity {pct(fit.sensitivity)}, "
        f"specificity {pct(fit.specificity)} on those cases (the cases it was chosen on: expect "
        "a little less on new patients)."), fit)

"""Clinician feedback (`<site>/feedback.db`, written by the clinician app) as training labels.

Policy, applied by `hospital_node.task.site_data` at every round:
- the latest feedback on a case sets that case's label when the case is in the *training* split:
  it corrects a registry label (labels.csv) or labels a case the registry left unlabelled;
- held-out cases keep their registry label, so per-round held-out metrics stay comparable across
  rounds and a clinician's correction of a case can never leak into that case's own evaluation;
- an unreadable store is reported locally and the round trains on labels.csv alone.

Only counts leave the hospital (`feedback-train`, `feedback-changed` in the data statistics).
The store is opened read-only: the node never writes hospital files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vocab.errors import DataError
from vocab.feedback_store import FeedbackStore

log = logging.getLogger(__name__)


def read_feedback_labels(site_root: Path, task: str = "nodule") -> dict[str, int]:
    """case_id -> label of `task` from the site's feedback store; {} when absent or
    unreadable."""
    try:
        return FeedbackStore.at_site(site_root).labels(task)
    except DataError as e:
        # Local log only (the node's own console): the store path is the hospital's own.
        log.warning("clinician feedback not used this round: %s", e)
        return {}


@dataclass(frozen=True)
class LabelledCases:
    train: list[Any]  # PreparedCase with the label to train on
    test: list[Any]  # PreparedCase with its registry label
    feedback_train: int  # training cases whose label comes from feedback
    feedback_changed: int  # ... of which the registry label differed or was missing


def apply_feedback(cases: Sequence[Any], feedback: dict[str, int],
                   split: Callable[[str], str]) -> LabelledCases:
    """Split `cases` (PreparedCase) by `split(case_id)` and apply `feedback` to the train split.

    Cases without any label (neither registry nor feedback) are left out. The input cases are
    not modified (they may be shared with a cache); relabelled ones are copies.
    """
    train, test = [], []
    n_fb = n_changed = 0
    for c in sorted(cases, key=lambda c: c.case_id):
        part = split(c.case_id)
        if part == "train" and c.case_id in feedback:
            n_fb += 1
            if c.label != feedback[c.case_id]:
                n_changed += 1
                c = dataclasses.replace(c, label=feedback[c.case_id])
        if c.label is None:
            continue
        (train if part == "train" else test).append(c)
    return LabelledCases(train, test, n_fb, n_changed)

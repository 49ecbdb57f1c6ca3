"""Clinician feedback becomes next-round training labels at the node (train split only), read
without touching any hospital file."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from hospital_node.splits import split_of
from hospital_node.task import NodeSettings, site_data
from multimodal.grid import InputConfig
from vocab.feedback_store import Feedback, FeedbackStore

INPUTS = InputConfig(ct_shape=(8, 16, 16), ct_spacing=(32.0, 20.0, 20.0), path_size=32,
                     ehr_schema="chest-v1")


@pytest.fixture(scope="module")
def source_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=3, sizes=(16,)), out)
    return out / "site_a"


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def labels_of(cases: list) -> dict[str, int]:
    return {c.case_id: c.label for c in cases}


def test_feedback_relabels_train_cases_only(source_site: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "site_a"
    shutil.copytree(source_site, site)
    # One case loses its registry label: feedback alone can make it trainable.
    with (site / "labels.csv").open() as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    train_ids = [r[0] for r in body if split_of(r[0], 0) == "train"]
    test_ids = [r[0] for r in body if split_of(r[0], 0) == "test"]
    assert len(train_ids) >= 3 and test_ids, "fixture needs both splits"
    unlabelled = train_ids[2]
    with (site / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header] + [r for r in body if r[0] != unlabelled])
    node = NodeSettings(data_dir=site, cache_dir=tmp_path / "cache")

    before = site_data(node, INPUTS, seed=0)
    assert unlabelled not in labels_of(before.train)
    assert before.summary["feedback-train"] == before.summary["feedback-changed"] == 0
    reg = labels_of(before.train) | labels_of(before.test)

    store = FeedbackStore.at_site(site)
    flip, agree, held_out = train_ids[0], train_ids[1], test_ids[0]
    store.add(Feedback(flip, "v1", 0.4, reg[flip], "disagree", corrected_label=1 - reg[flip]))
    store.add(Feedback(agree, "v1", 0.4, reg[agree], "agree"))
    store.add(Feedback(unlabelled, "v1", 0.9, 1, "agree"))
    store.add(Feedback(held_out, "v1", 0.5, reg[held_out], "disagree",
                       corrected_label=1 - reg[held_out]))
    files = digest(site)

    after = site_data(node, INPUTS, seed=0)
    train, test = labels_of(after.train), labels_of(after.test)
    assert train[flip] == 1 - reg[flip]  # corrected by the clinician
    assert train[agree] == reg[agree]
    assert train[unlabelled] == 1  # labelled by feedback alone
    assert test[held_out] == reg[held_out]  # held-out labels never come from feedback
    assert {k: v for k, v in train.items() if k not in (flip, unlabelled)} == \
        {k: v for k, v in labels_of(before.train).items() if k != flip}
    assert after.summary["feedback-train"] == 3 and after.summary["feedback-changed"] == 2
    assert after.summary["cases-train"] == before.summary["cases-train"] + 1
    assert after.summary["positives-train"] == sum(train.values())
    assert digest(site) == files  # reading feedback modified nothing, feedback.db included
    # the cached cases were not relabelled in place
    again = site_data(NodeSettings(data_dir=site, cache_dir=tmp_path / "cache"), INPUTS, seed=0)
    assert labels_of(again.train) == train

    # An unreadable store: a local warning, and the round trains on the registry labels.
    (site / "feedback.db").write_bytes(b"this is not a sqlite database" * 40)
    with caplog.at_level(logging.WARNING):
        broken = site_data(node, INPUTS, seed=0)
    assert labels_of(broken.train) == labels_of(before.train)
    assert labels_of(broken.test) == labels_of(before.test)
    assert any("feedback not used" in r.getMessage() for r in caplog.records)

"""Task files: the shipped ones load; any other document is a Task or a ConfigError naming the
file and key (Hypothesis over generated documents); labels paths; feedback store migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vocab.errors import ConfigError
from vocab.feedback_store import Feedback, FeedbackStore
from vocab.tasks import Task, get_task, known_tasks, labels_file, parse_task

GOOD = {"task": {"id": "sepsis", "description": "d", "positive": "p", "negative": "n",
                 "condition": "c", "ehr_schema": "chest-v1", "modalities": ["ehr", "ct"]},
        "threshold": {"policy": "youden", "value": 0.5}}


def test_shipped_tasks_and_label_paths() -> None:
    assert set(known_tasks()) >= {"nodule", "fibrosis"}
    nod, fib = get_task("nodule"), get_task("fibrosis")
    assert (nod.positive, nod.negative, nod.condition) == ("malignant", "benign", "malignancy")
    assert nod.labels_file == "labels.csv" and fib.labels_file == "labels/fibrosis.csv"
    assert fib.threshold.policy == "sensitivity" and fib.threshold.value == 0.9
    t = parse_task(GOOD, "x.toml")
    assert t.modalities == ("ct", "ehr")  # canonical order
    for bad in ("../etc", "Nodule", "", "a" * 40):
        with pytest.raises(ConfigError):
            labels_file(bad)
    with pytest.raises(ConfigError, match="unknown task 'sepsis'"):
        get_task("sepsis")


def test_task_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[task]\nid = "x"\nprettty = 1\n')
    with pytest.raises(ConfigError, match=r"t\.toml.*\[task\].*prettty"):
        get_task(f)
    f.write_text("[task\n")
    with pytest.raises(ConfigError, match="unreadable"):
        get_task(f)
    doc = {**GOOD, "threshold": {"policy": "fixed", "value": 1.5}}
    with pytest.raises(ConfigError, match=r"threshold\.value.*1\.5"):
        parse_task(doc, "y.toml")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=12)


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(["task", "threshold", "x"]),
                       st.one_of(_values, st.fixed_dictionaries(
                           {}, optional={k: _values for k in GOOD["task"]})), max_size=3))
def test_any_document_is_a_task_or_a_config_error(doc: dict) -> None:
    try:
        t = parse_task(doc, "fuzz.toml")
    except ConfigError as e:
        assert "fuzz.toml" in str(e)
    else:
        assert isinstance(t, Task) and t.id and t.modalities


def test_feedback_store_from_before_tasks_reads_as_the_first_task(tmp_path: Path) -> None:
    path = tmp_path / "feedback.db"
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_utc TEXT NOT NULL, case_id TEXT NOT NULL, model_version TEXT NOT NULL,
        probability REAL NOT NULL, decision INTEGER NOT NULL, verdict TEXT NOT NULL,
        corrected_label INTEGER, comment TEXT NOT NULL DEFAULT '', user TEXT NOT NULL DEFAULT '');
        INSERT INTO feedback (created_utc, case_id, model_version, probability, decision, verdict)
        VALUES ('2026-01-01', 'c1', 'v1', 0.8, 1, 'agree');""")
    con.commit()
    con.close()
    store = FeedbackStore(path)
    assert store.labels() == {"c1": 1} and store.labels("fibrosis") == {}  # read-only read
    store.add(Feedback("c1", "v2", 0.2, 0, "disagree", 1, task="fibrosis"))
    assert store.labels() == {"c1": 1} and store.labels("fibrosis") == {"c1": 1}
    assert [r.task for r in store.all()] == ["nodule", "fibrosis"]
    with pytest.raises(Exception, match="task id"):
        Feedback("c1", "v", 0.5, 1, "agree", task="DROP TABLE")

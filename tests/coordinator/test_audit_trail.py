"""The coordinator's audit log: promotions, rollbacks and completed rounds land in
<store>/audit.jsonl as a valid chain, with hospital names and reasons but no case ids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord

from cli.main import main
from coordinator.journal import HospitalRound, RoundRecord
from coordinator.run_state import RunState
from coordinator.runner import _round_end_hook
from coordinator.settings import RunSettings
from coordinator.store import AUDIT, ModelStore
from tests.coordinator.test_store_schedule_settings import add
from vocab import audit
from vocab.audit import AuditError, read_events, verify


def test_promote_and_rollback_are_audited(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = add(store, b"one", {"a": 0.8})
    second = add(store, b"two", {"a": 0.81}, rnd=2)
    store.promote(first.id, actor="ops")
    assert main(["models", "promote", second.id[:4], "--store", str(tmp_path)]) == 0
    assert main(["models", "rollback", "--store", str(tmp_path)]) == 0
    assert verify(tmp_path / AUDIT).ok
    events = list(read_events(tmp_path / AUDIT))
    assert [e.kind for e in events] == [audit.MODEL_PROMOTED, audit.MODEL_PROMOTED,
                                        audit.MODEL_ROLLED_BACK]
    assert events[0].actor == "ops" and events[1].actor  # the CLI names the OS user
    assert events[1].data["version"] == second.id and events[1].data["previous"] == first.id
    assert events[2].data == {"version": first.id, "previous": second.id}


def test_a_broken_audit_log_blocks_promotion(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = add(store, b"one", {"a": 0.8})
    (tmp_path / AUDIT).write_bytes(b'{"seq":1,')  # torn
    with pytest.raises(AuditError, match="line 1: the last line is torn"):
        store.promote(v.id)
    assert store.clinical()["version"] is None


def test_each_completed_round_is_one_entry(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    rec = RoundRecord(round=3, started=100.0, finished=130.0, status="too-few-hospitals")
    rec.hospitals = {
        "h-north": HospitalRound(selected=True, outcome="accepted", bytes_down=10, bytes_up=9),
        "h-south": HospitalRound(selected=True, outcome="rejected",
                                 reason="update norm 9.1 > 3.0 x median", bytes_down=10,
                                 bytes_up=9),
        "h-west": HospitalRound(selected=True, outcome="dropped",
                                reason="no reply before the round timeout", bytes_down=10),
        "h-east": HospitalRound(bytes_down=10)}  # asked to evaluate only
    rec.pooled = {"auc": 0.8, "loss": float("nan"), "n": 30.0}
    strategy = SimpleNamespace(journal={3: rec}, round_offset=2)
    run = RunState("run-1", {}, num_rounds=4, rounds_completed=2)
    hook = _round_end_hook(store, strategy, RunSettings(), None, run)  # type: ignore[arg-type]
    hook(1, ArrayRecord())
    (event,) = read_events(tmp_path / AUDIT)
    assert event.kind == audit.ROUND_COMPLETED and event.actor == "coordinator"
    d = event.data
    assert (d["run_id"], d["round"], d["version"], d["seconds"]) == ("run-1", 3, None, 30.0)
    assert d["selected"] == ["h-north", "h-south", "h-west"]
    assert d["accepted"] == ["h-north"]
    assert d["dropped"] == {"h-west": "no reply before the round timeout"}
    assert d["rejected"] == {"h-south": "update norm 9.1 > 3.0 x median"}
    # The run record (what `coordinator run` and the chaos test read) names every selected one.
    (stored,) = store.list_runs()
    assert stored["rounds_completed"] == 3
    assert stored["rounds"][0]["hospitals"] == {
        "h-north": {"outcome": "accepted", "reason": ""},
        "h-south": {"outcome": "rejected", "reason": "update norm 9.1 > 3.0 x median"},
        "h-west": {"outcome": "dropped", "reason": "no reply before the round timeout"}}
    assert d["bytes"]["h-south"] == {"down": 10, "up": 9}
    assert d["pooled"] == {"auc": 0.8, "loss": None, "n": 30.0}


def test_runs_are_audited_started_finished_failed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from coordinator import runner
    from coordinator.strategy import PerExpertFedAvg

    monkeypatch.setattr(runner, "initial_model_state", lambda s, c, st: {"w": torch.zeros(2)})
    monkeypatch.setattr(PerExpertFedAvg, "start", lambda self, grid, **kw: None)
    settings = RunSettings(store_dir=str(tmp_path), num_rounds=2, run_name="audit")
    outcome = runner.run_federated(None, settings, flwr_run_id=7)  # type: ignore[arg-type]

    def boom(self: PerExpertFedAvg, grid: object, **kw: object) -> None:
        raise RuntimeError("lost hospital a-c0001")

    monkeypatch.setattr(PerExpertFedAvg, "start", boom)
    with pytest.raises(RuntimeError):
        runner.run_federated(None, settings, flwr_run_id=8)  # type: ignore[arg-type]
    assert verify(tmp_path / AUDIT).ok
    events = list(read_events(tmp_path / AUDIT))
    assert [e.kind for e in events] == [audit.RUN_STARTED, audit.RUN_FINISHED,
                                        audit.RUN_STARTED, audit.RUN_FAILED]
    started = events[0].data
    assert (started["run_id"], started["flwr_run_id"], started["num_rounds"],
            started["resumed"]) == (outcome.run_id, 7, 2, False)
    assert events[1].data["run_id"] == outcome.run_id
    assert events[3].data["error"] == "RuntimeError"
    failed = [r for r in ModelStore(tmp_path).list_runs() if 8 in r["flwr_run_ids"]]
    assert failed[0]["status"] == "failed" and failed[0]["ended_reason"] == "RuntimeError"
    assert "a-c0001" not in (tmp_path / AUDIT).read_text()  # error text is not logged

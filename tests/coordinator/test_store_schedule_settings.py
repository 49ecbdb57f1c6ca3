"""Model store (versions, promote/rollback), run settings (schedule: tests/ops)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import RunSettings
from coordinator.store import ModelStore, StoreError
from vocab.errors import ConfigError


def add(store: ModelStore, payload: bytes, auc: dict[str, float], rnd: int = 1):
    meta = {"round": rnd, "run_id": "r", "metrics": {
        "hospitals": {h: {"auc": v, "n": 10} for h, v in auc.items()}, "pooled": {}}}
    return store.add_version(lambda p: p.write_bytes(payload), meta)


def test_versions_are_content_hashed_and_ordered(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = add(store, b"one", {"a": 0.8})
    v2 = add(store, b"two", {"a": 0.8}, rnd=2)
    assert v1.id.startswith("0001-") and v2.id.startswith("0002-")
    assert v1.meta["sha256"].startswith(v1.id.split("-")[1])
    assert [v.id for v in store.list_versions()] == [v1.id, v2.id]
    assert store.get(v2.id[:4]).id == v2.id  # unique prefix
    store.verify(v1)
    (v1.path / "model.pt").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="does not match"):
        store.verify(v1)
    assert not list(tmp_path.glob("versions/.new-*"))  # no half-written versions left


def test_promotion_refuses_a_worse_hospital_and_says_which(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    good = add(store, b"good", {"a": 0.80, "b": 0.90})
    worse_b = add(store, b"worse", {"a": 0.85, "b": 0.80})
    fine = add(store, b"fine", {"a": 0.79, "b": 0.91})
    store.promote(good.id)
    with pytest.raises(StoreError, match=r"hospital b: auc 0.800 vs clinical 0.900"):
        store.promote(worse_b.id, margin=0.02)
    assert store.clinical()["version"] == good.id
    store.promote(fine.id, margin=0.02)  # a within the margin
    assert store.rollback().id == good.id
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback()
    store.promote(worse_b.id, force=True)
    assert store.clinical()["history"][-1]["forced"] is True


def test_settings_reject_unknown_keys_and_bad_types() -> None:
    s = RunSettings.from_run_config({"num-rounds": 2, "lr": 1, "strategy": "fedadam"})
    assert s.num_rounds == 2 and s.lr == 1.0 and s.strategy == "fedadam"
    with pytest.raises(ConfigError, match="unknown run-config key 'num-round'"):
        RunSettings.from_run_config({"num-round": 2})
    with pytest.raises(ConfigError, match="'num-rounds' must be int"):
        RunSettings.from_run_config({"num-rounds": "2"})
    with pytest.raises(ConfigError, match="strategy must be"):
        RunSettings.from_run_config({"strategy": "krum"})
    with pytest.raises(ConfigError, match="model-json is not valid JSON"):
        RunSettings.from_run_config({"model-json": "{nope"})


def test_a_stopped_run_stays_stopped_against_its_stopped_serverapps_late_write(
        tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    run = {"run_id": "r-1", "status": "running", "flwr_run_ids": [11], "rounds": [],
           "started": 1.0}
    store.write_run(run)
    store.end_run("r-1", "stopped", "interrupted by the operator")
    # the ServerApp that `flwr stop` has not reached yet stores one more round
    store.write_run({**run, "rounds": [{"round": 1}], "rounds_completed": 1})
    [got] = store.list_runs()
    assert (got["status"], got["ended_reason"]) == ("stopped", "interrupted by the operator")
    assert got["rounds"] == [{"round": 1}] and got["rounds_completed"] == 1  # its record kept
    # a resume serves the run with a new Flower run: it runs again
    store.write_run({**got, "status": "running", "flwr_run_ids": [11, 12]})
    assert store.list_runs()[0]["status"] == "running"

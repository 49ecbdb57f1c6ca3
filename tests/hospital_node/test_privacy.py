"""A hospital's privacy ledger and budget (hospital_node.privacy), alone and through the real
ClientApp: refusals carry a fixed sentence, a broken ledger blocks training and is never reset."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from hospital_node.privacy import Ledger, PrivacySettings
from multimodal.dp import DPSpend, epsilon
from tests.hospital_node.test_client_app import (  # noqa: F401
    config,
    global_arrays,
    identity,
    message,
    site,
)
from vocab import records as K
from vocab.errors import ConfigError, PrivacyRefusal

SPEND = DPSpend(1.0, 0.1, 50)


def test_ledger_composes_every_run_with_opacus_and_survives_reopening(tmp_path: Path) -> None:
    s = PrivacySettings(tmp_path / "ledger.jsonl", budget=0.0, delta=1e-5)
    ledger = Ledger(s)
    assert ledger.entries() == [] and ledger.spent() == 0.0
    first = ledger.record(run=1, server_round=1, spend=SPEND)
    second = Ledger(s).record(run=2, server_round=1, spend=DPSpend(2.0, 0.2, 30))
    assert first == pytest.approx(epsilon([SPEND], 1e-5))
    assert second == pytest.approx(epsilon([SPEND, DPSpend(2.0, 0.2, 30)], 1e-5))
    assert second > first
    rows = Ledger(s).entries()
    assert [(r.run, r.round, r.steps, r.epsilon) for r in rows] == [(1, 1, 50, first),
                                                                    (2, 1, 30, second)]


def test_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    one, two = epsilon([SPEND], 1e-5), epsilon([SPEND, SPEND], 1e-5)
    ledger = Ledger(PrivacySettings(tmp_path / "l.jsonl", budget=(one + two) / 2))
    assert ledger.check(SPEND, 100) == pytest.approx(one)
    ledger.record(1, 1, SPEND)
    before = (tmp_path / "l.jsonl").read_bytes()
    with pytest.raises(PrivacyRefusal) as err:
        ledger.check(SPEND, 100)
    assert str(err.value) == PrivacyRefusal.EXHAUSTED
    assert not re.search(r"\d", str(err.value))  # no numbers leave the hospital
    assert (tmp_path / "l.jsonl").read_bytes() == before
    with pytest.raises(PrivacyRefusal, match="only with differential privacy"):
        ledger.check(None, 100)
    with pytest.raises(PrivacyRefusal, match="delta is above 1/n"):
        Ledger(PrivacySettings(tmp_path / "m.jsonl", delta=0.01)).check(SPEND, 1000)


@pytest.mark.parametrize("damage", ["edit", "delete", "torn", "folder"])
def test_a_broken_ledger_blocks_training_and_is_left_as_it_is(tmp_path: Path,
                                                              damage: str) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(PrivacySettings(path, budget=100.0))
    for r in range(3):
        ledger.record(1, r + 1, SPEND)
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "edit":  # someone lowers the noise-free history: fewer steps
        lines[1] = lines[1].replace(b'"steps":50', b'"steps":5')
        path.write_bytes(b"".join(lines))
    elif damage == "delete":
        path.write_bytes(lines[0] + lines[2])
    elif damage == "torn":
        path.write_bytes(b"".join(lines)[:-7])
    else:
        path.unlink()
        path.mkdir()
    before = path.read_bytes() if path.is_file() else None
    for spend in (SPEND, None):
        with pytest.raises(PrivacyRefusal) as err:
            ledger.check(spend, 100)
        assert str(err.value) == PrivacyRefusal.LEDGER
    with pytest.raises(PrivacyRefusal):
        ledger.record(1, 4, SPEND)
    assert (path.read_bytes() if path.is_file() else None) == before


def test_node_privacy_settings_are_checked_where_they_enter(tmp_path: Path) -> None:
    s = PrivacySettings.from_node_config({"privacy-budget": 3, "privacy-delta": 1e-6},
                                         tmp_path / "site", tmp_path / "cache")
    assert (s.budget, s.delta, s.ledger) == (3.0, 1e-6, tmp_path / "cache" / "privacy-ledger.jsonl")
    with pytest.raises(ConfigError, match="privacy-budget must be a number, got 'lots'"):
        PrivacySettings.from_node_config({"privacy-budget": "lots"}, tmp_path, None)
    with pytest.raises(ConfigError, match="privacy-delta must be in"):
        PrivacySettings.from_node_config({"privacy-delta": 2}, tmp_path, None)
    with pytest.raises(ConfigError, match="privacy-budget must be a finite"):
        PrivacySettings.from_node_config({"privacy-budget": math.inf}, tmp_path, None)


def dp_config(noise: float = 1.0) -> ConfigRecord:
    c = config()
    c[K.DP_NOISE_MULTIPLIER], c[K.DP_MAX_GRAD_NORM] = noise, 1.0
    return c


def test_client_app_trains_with_dp_records_the_round_and_refuses_past_the_budget(
        site: Path, tmp_path: Path) -> None:  # noqa: F811
    from hospital_node.client_app import NodeTaskError, app

    ledger = tmp_path / "outside-site" / "ledger.jsonl"
    node = {"data-dir": str(site), "cache-dir": str(tmp_path / "cache"),
            "privacy-ledger": str(ledger), "privacy-budget": 30.0}
    ctx = Context(run_id=7, node_id=3, state=RecordDict(), run_config={}, node_config=node)
    sent = RecordDict({K.ARRAYS: global_arrays(), K.CONFIG: dp_config()})
    reply = app(message("train", sent), ctx)
    m = reply.content[K.METRICS]
    assert m[K.DP_DELTA] == 1e-5 and 0 < m[K.DP_EPSILON] <= 30.0
    assert K.TRAIN_LOSS not in m  # a loss is computed from the data outside DP
    assert not [k for k in m if k.startswith(K.EXPERT_TOKENS_PREFIX)]
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(e["data"]["run"], e["data"]["round"]) for e in entries] == [(7, 1)]
    assert entries[0]["data"]["epsilon"] == pytest.approx(m[K.DP_EPSILON])
    # the same round again is past a budget between one and two such rounds
    spent = DPSpend(*(entries[0]["data"][k] for k in ("noise_multiplier", "sample_rate", "steps")))
    node["privacy-budget"] = (m[K.DP_EPSILON] + epsilon([spent, spent], 1e-5)) / 2
    ctx = Context(run_id=8, node_id=3, state=RecordDict(), run_config={}, node_config=node)
    with pytest.raises(NodeTaskError) as err:
        app(message("train", sent), ctx)
    assert str(err.value) == f"fedsight-node: train failed (PrivacyRefusal: " \
                             f"{PrivacyRefusal.EXHAUSTED})"
    assert len(ledger.read_text().splitlines()) == 1  # nothing spent, nothing recorded
    # without DP the budgeted hospital refuses
    plain = RecordDict({K.ARRAYS: global_arrays(), K.CONFIG: config()})
    with pytest.raises(NodeTaskError, match="only with differential privacy"):
        app(message("train", plain), ctx)

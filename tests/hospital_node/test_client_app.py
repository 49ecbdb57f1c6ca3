"""The ClientApp called in-process: every outgoing record holds only arrays and whitelisted
aggregate metrics; failures leave the hospital without file names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from vocab import records as K

TINY = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_experts": 4, "top_k": 2,
        "expert_hidden": 16, "ct_channels": [8], "ehr_hidden": 8,
        "inputs": {"ct_shape": [8, 16, 16], "ct_spacing": [32.0, 20.0, 20.0], "path_size": 32,
                   "ehr_schema": "chest-v1"}}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=5, sizes=(10,)), out)
    return out / "site_a"


@pytest.fixture(autouse=True)
def identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


def config(stage: int = 2) -> ConfigRecord:
    return ConfigRecord({K.SERVER_ROUND: 1, K.STAGE: stage, K.LOCAL_EPOCHS: 1, K.LR: 0.002,
                         K.BATCH_SIZE: 8, K.MODEL_JSON: json.dumps(TINY), K.TRAIN_JSON: "{}",
                         K.SEED: 0, K.MAX_CASES: 0})


def context(site: Path, tmp_path: Path) -> Context:
    return Context(run_id=7, node_id=3, state=RecordDict(), run_config={},
                   node_config={"data-dir": str(site), "cache-dir": str(tmp_path / "cache")})


def message(kind: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=3, message_type=kind)


def global_arrays() -> ArrayRecord:
    from multimodal.config import ModelConfig
    from multimodal.model import build_model

    return ArrayRecord(build_model(ModelConfig.from_dict(TINY), seed=0).state_dict())


def local_strings(site: Path) -> list[str]:
    """Case ids and file names of the site: none may appear in any reply."""
    names = [p.name for p in site.rglob("*") if p.is_file()]
    ids = [ln.split(",")[0] for ln in (site / "labels.csv").read_text().splitlines()[1:]]
    return sorted({*names, *ids, str(site)})


def assert_clean(reply: Message, kind: str, site: Path) -> None:
    content = reply.content
    allowed_arrays = {K.ARRAYS} if kind == "train" else set()
    assert set(content.array_records) == allowed_arrays
    assert set(content.metric_records) == {K.METRICS}
    assert set(content.config_records) == ({K.SITE} if kind == "query" else set())
    for key, value in content[K.METRICS].items():
        assert K.is_allowed_metric(key, kind), f"{kind} reply carries metric {key!r}"
        if key in K.CALIB_KEYS:  # sums over held-out cases (multimodal.calibration)
            assert kind == "evaluate" and all(isinstance(v, float) for v in value)
        else:
            assert isinstance(value, int | float)
    if kind == "query":
        assert dict(content[K.SITE]) == {K.SITE_ID: "site_a"}
    text = repr({k: dict(v) for k, v in content.config_records.items()}) + \
        repr({k: dict(v) for k, v in content.metric_records.items()}) + \
        repr(list(content.array_records.get(K.ARRAYS, {}).keys()))
    leaked = [s for s in local_strings(site) if s in text]
    assert not leaked, f"{kind} reply leaks {leaked[:3]}"


def test_every_reply_holds_only_arrays_and_whitelisted_aggregates(site: Path,
                                                                  tmp_path: Path) -> None:
    from hospital_node.client_app import app

    ctx = context(site, tmp_path)
    q = app(message("query", RecordDict({K.CONFIG: config()})), ctx)
    assert_clean(q, "query", site)
    assert q.content[K.METRICS]["cases-train"] + q.content[K.METRICS]["cases-test"] == 10

    arrays = global_arrays()
    t = app(message("train", RecordDict({K.ARRAYS: arrays, K.CONFIG: config()})), ctx)
    assert_clean(t, "train", site)
    metrics = t.content[K.METRICS]
    assert metrics[K.NUM_EXAMPLES] == q.content[K.METRICS]["cases-train"]
    tokens = {k: v for k, v in metrics.items() if k.startswith(K.EXPERT_TOKENS_PREFIX)}
    assert len(tokens) == 4 and sum(tokens.values()) > 0
    assert list(t.content[K.ARRAYS].keys()) == list(arrays.keys())
    assert ctx.state[ "fedsight-node"]["global-step"] > 0  # node-local, not in the reply

    e = app(message("evaluate", RecordDict({K.ARRAYS: t.content[K.ARRAYS],
                                            K.CONFIG: config()})), ctx)
    assert_clean(e, "evaluate", site)
    m = e.content[K.METRICS]
    assert m[K.N_EVAL] == q.content[K.METRICS]["cases-test"]
    assert math.isfinite(m[K.LOSS])


def test_stage_one_reports_no_expert_tokens(site: Path, tmp_path: Path) -> None:
    from hospital_node.client_app import app

    t = app(message("train", RecordDict({K.ARRAYS: global_arrays(), K.CONFIG: config(1)})),
            context(site, tmp_path))
    tokens = [v for k, v in t.content[K.METRICS].items() if k.startswith("expert-tokens")]
    assert tokens and sum(tokens) == 0  # encoders only: the coordinator keeps global experts


def test_failure_leaves_without_local_details(tmp_path: Path) -> None:
    from hospital_node.client_app import NodeTaskError, app

    secret = tmp_path / "patient_0042_scans"
    ctx = Context(run_id=7, node_id=3, state=RecordDict(), run_config={},
                  node_config={"data-dir": str(secret)})
    with pytest.raises(NodeTaskError) as err:
        app(message("query", RecordDict({K.CONFIG: config()})), ctx)
    assert "patient_0042" not in str(err.value)
    assert str(err.value).startswith("fedsight-node: query failed (")

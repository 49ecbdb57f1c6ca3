"""Coordinator and node agree on the EHR schema (id + content hash) or the node refuses, with a
reason that is safe to send: schema ids and hashes only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_client_app import TINY, global_arrays

from vocab import records as K
from vocab.ehr_schema import CHEST_V1, UCI_HEART
from vocab.errors import ConfigError


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=5, sizes=(10,)), out)
    return out / "site_a"  # site.json: ehr_schema chest-v1


@pytest.fixture(autouse=True)
def identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


def config(schema_id: str, schema_hash: str) -> ConfigRecord:
    return ConfigRecord({K.SERVER_ROUND: 1, K.STAGE: 2, K.LOCAL_EPOCHS: 1, K.LR: 0.002,
                         K.BATCH_SIZE: 8, K.MODEL_JSON: json.dumps(TINY), K.TRAIN_JSON: "{}",
                         K.SEED: 0, K.MAX_CASES: 0, K.EHR_SCHEMA: schema_id,
                         K.EHR_SCHEMA_HASH: schema_hash})


def train_message(cfg: ConfigRecord) -> Message:
    return Message(content=RecordDict({K.ARRAYS: global_arrays(), K.CONFIG: cfg}),
                   dst_node_id=3, message_type="train")


def context(site: Path, tmp_path: Path) -> Context:
    return Context(run_id=7, node_id=3, state=RecordDict(), run_config={},
                   node_config={"data-dir": str(site), "cache-dir": str(tmp_path / "cache")})


def test_mismatching_node_refuses_with_a_public_reason(site: Path, tmp_path: Path) -> None:
    from coordinator.strategy import _NODE_REASON
    from hospital_node.client_app import NodeTaskError, app

    for cfg in (config(UCI_HEART.name, UCI_HEART.content_hash),
                config(CHEST_V1.name, "0" * 64)):  # same id, another version of it
        with pytest.raises(NodeTaskError) as err:
            app(train_message(cfg), context(site, tmp_path))
        msg = str(err.value)
        assert f"this hospital's EHR schema {CHEST_V1.label} differs" in msg, msg
        assert str(site) not in msg and "site_a" not in msg
        # the coordinator logs this reason as it is (not reduced to an error code)
        assert _NODE_REASON.search(f"<class 'x'>:<'{msg}'>").group(0) == msg
    assert f"federation's {UCI_HEART.label}" in str(
        pytest.raises(NodeTaskError, app, train_message(config(UCI_HEART.name,
                                                                UCI_HEART.content_hash)),
                      context(site, tmp_path)).value)


def test_matching_node_trains(site: Path, tmp_path: Path) -> None:
    from hospital_node.client_app import app

    reply = app(train_message(config(CHEST_V1.name, CHEST_V1.content_hash)),
                context(site, tmp_path))
    assert reply.content[K.METRICS][K.NUM_EXAMPLES] > 0


def test_site_with_unusable_schema_refuses(site: Path, tmp_path: Path) -> None:
    import shutil

    from hospital_node.task import NodeSettings, RoundConfig, check_ehr_schema
    from vocab.errors import EhrSchemaMismatch

    root = tmp_path / "copy"
    shutil.copytree(site, root)
    (root / "site.json").write_text('{"ehr_schema": ["chest-v1"]}')
    node = NodeSettings(root)
    with pytest.raises(EhrSchemaMismatch, match="schema none differs"):
        check_ehr_schema(node, RoundConfig(ehr_schema="chest-v1",
                                           ehr_schema_hash=CHEST_V1.content_hash))
    (root / "site.json").write_text('{"ehr_schema": "uci-heart"}')
    with pytest.raises(EhrSchemaMismatch):  # no round keys: the model config's schema counts
        check_ehr_schema(node, RoundConfig(model_json=json.dumps(TINY)))


@pytest.mark.parametrize("record", [
    {K.EHR_SCHEMA: "chest-v1"},  # hash missing
    {K.EHR_SCHEMA: "chest-v1", K.EHR_SCHEMA_HASH: "abc"},
    {K.EHR_SCHEMA: "../../etc/passwd", K.EHR_SCHEMA_HASH: "0" * 64},
])
def test_round_config_rejects_bad_schema_keys(record: dict) -> None:
    from hospital_node.task import RoundConfig

    with pytest.raises(ConfigError):
        RoundConfig.from_record(record)


def test_coordinator_sends_the_model_configs_schema() -> None:
    from coordinator.runner import train_config_record
    from coordinator.settings import RunSettings

    tiny = {**TINY, "inputs": {**TINY["inputs"], "ehr_schema": "uci-heart"}}
    rec = train_config_record(RunSettings(model_json=json.dumps(tiny)))
    assert rec[K.EHR_SCHEMA] == "uci-heart" and rec[K.EHR_SCHEMA_HASH] == UCI_HEART.content_hash

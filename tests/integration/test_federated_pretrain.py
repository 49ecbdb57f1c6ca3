"""Federated self-supervised pretraining through real Flower (simulation runtime, our
SuperLink): three synthetic hospitals whose patients are mostly unlabelled. Only the image
encoders and their projectors travel (recorded bytes down and up equal their size); the VICReg
objective on the hospitals' held-out cases falls over the rounds, and against a reference
computed here on the same fixed views; the rest of each stored version is the seeded init; the
version is refused for serving; a task run then starts from it (init-encoders)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord

from coordinator.pretraining import HEADS_KEY, plan_pretraining
from coordinator.settings import RunSettings
from coordinator.store import ModelStore
from coordinator.strategy import record_bytes
from hospital_node.dataset import load_site
from hospital_node.splits import split_of
from multimodal.checkpoint import load_checkpoint, read_checkpoint
from multimodal.config import ModelConfig
from multimodal.model import FedsightModel, build_model
from multimodal.pretrain import HEADS_PREFIX, PretrainConfig, SSLHeads, objective
from ops.cluster import simulate
from tests.integration.tiny import TINY_MODEL_SMALL_GRID as TINY_MODEL
from vocab.errors import CheckpointError

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PRE = {"proj_dim": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from synth.config import SynthConfig
    from synth.federation import generate

    tmp = tmp_path_factory.mktemp("fedpre")
    fed = tmp / "federation"
    generate(SynthConfig.default(n_sites=3, seed=23, sizes=(28, 28, 20),
                                 labelled_fraction=0.25), fed)
    return {"tmp": tmp, "fed": fed, "store": ModelStore(tmp / "store")}


def _held_out_objective(world: dict, encoders: dict, heads: dict) -> float:
    """The objective on every hospital's held-out image cases, computed here (one pool, the
    same fixed views for both models)."""
    cfg = ModelConfig.from_dict(TINY_MODEL)
    model = build_model(cfg, seed=0)
    model.load_state_dict({**model.state_dict(), **encoders})
    pcfg = PretrainConfig.from_dict(PRE)
    h = SSLHeads(model, pcfg)
    h.load_state_dict(heads)
    cases = [c for s in sorted(world["fed"].glob("site_*"))
             for c in load_site(s, cfg.inputs, None, use_cache=False).cases
             if split_of(c.case_id, 0) == "test"]
    return sum(objective(model, h, cases, pcfg, seed=99).values())


def test_federated_pretraining_moves_only_encoders_and_lowers_the_objective(world: dict) -> None:
    store = world["store"]
    cfg = {"num-rounds": 3, "local-epochs": 2, "min-hospitals": 2, "run-name": "pre",
           "model-json": json.dumps(TINY_MODEL), "store-dir": str(store.root),
           "federation-dir": str(world["fed"]), "cache-dir": str(world["tmp"] / "cache"),
           "pretrain": True, "pretrain-json": json.dumps(PRE)}
    res = simulate(world["tmp"] / "coord", cfg, num_nodes=3)
    assert res.status == "finished:completed", res
    versions = [v for v in store.list_versions() if v.meta.get("kind") == "pretrained"]
    assert [v.meta["round"] for v in versions] == [1, 2, 3]

    plan = plan_pretraining(RunSettings.from_run_config(cfg), ModelConfig.from_dict(TINY_MODEL),
                            store)
    assert plan is not None
    n_bytes = record_bytes(ArrayRecord(plan.initial))
    full = build_model(ModelConfig.from_dict(TINY_MODEL), seed=0).state_dict()
    # the EHR encoder, the fusion blocks and the heads exist and stay home (bytes below)
    stay = record_bytes(ArrayRecord({k: v for k, v in full.items() if k not in plan.initial}))
    assert stay > 0
    pooled = []
    for v in versions:
        meta = v.meta
        assert meta["model_bytes"] == n_bytes and meta["calibration"] is None
        for site, b in meta["bytes"].items():  # train + evaluate down; up: + 3 float metrics
            assert b["down"] == 2 * n_bytes and b["up"] == n_bytes + 3 * 8, site
        assert all(s["outcome"] == "accepted" for s in meta["screening"].values())
        pooled.append(meta["metrics"]["pooled"]["loss"])
    assert pooled[-1] < pooled[0], pooled  # the hospitals' held-out objective, by round

    last = read_checkpoint(versions[-1].model_path)
    state = last["state_dict"]
    for k, value in full.items():  # outside the encoders: the seeded init, bit for bit
        if k not in plan.initial:
            assert torch.equal(state[k], value), k
    enc = {k: state[k] for k in plan.initial if not k.startswith(HEADS_PREFIX)}
    init_enc = {k: v for k, v in plan.initial.items() if not k.startswith(HEADS_PREFIX)}
    init_heads = {k[len(HEADS_PREFIX):]: v for k, v in plan.initial.items()
                  if k.startswith(HEADS_PREFIX)}
    before = _held_out_objective(world, init_enc, init_heads)
    after = _held_out_objective(world, enc, last["meta"][HEADS_KEY])
    assert after < 0.9 * before, (before, after)
    with pytest.raises(CheckpointError, match="pretraining version"):
        load_checkpoint(versions[-1].model_path)

    # a task run from the pretrained encoders: one round, its version a diagnosis model
    task_cfg = {k: v for k, v in cfg.items() if not k.startswith("pretrain")}
    task_cfg |= {"num-rounds": 1, "run-name": "task", "init-encoders": versions[-1].id}
    res = simulate(world["tmp"] / "coord2", task_cfg, num_nodes=3)
    assert res.status == "finished:completed", res
    [tv] = [v for v in store.list_versions() if v.meta["run_id"].startswith("task-")]
    model: FedsightModel = load_checkpoint(tv.model_path)
    got = model.state_dict()
    # it started from the pretrained encoders: one round moved them less than pretraining did
    keys = [k for k in enc if got[k].is_floating_point()]
    d_pre = sum(float((got[k] - enc[k]).norm()) for k in keys)
    d_init = sum(float((got[k] - init_enc[k]).norm()) for k in keys)
    assert d_pre < d_init, (d_pre, d_init)
    assert tv.meta["config"]["run"]["init-encoders"] == versions[-1].id

"""Federated LoRA adaptation through real Flower (simulation runtime, our SuperLink): three
synthetic hospitals with two diseases, one of them without labels for the new task. Only the
adapter and head arrays travel (the version's recorded bytes, down and up, equal their size);
the hospital without labels says so and sits the rounds out; each stored version is the base +
the arrays, answering the first task exactly as the base did."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flwr.app import ArrayRecord

from coordinator.store import ModelStore
from coordinator.strategy import record_bytes
from hospital_node.dataset import load_site
from multimodal.adapt import trainable_keys
from multimodal.checkpoint import load_checkpoint, save_checkpoint
from multimodal.config import ModelConfig
from multimodal.model import build_model
from multimodal.train import as_batch
from ops.cluster import simulate
from tests.integration.tiny import TINY_MODEL_SMALL_GRID as TINY_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from synth.config import SynthConfig
    from synth.federation import generate

    tmp = tmp_path_factory.mktemp("fedadapt")
    fed = tmp / "federation"
    generate(SynthConfig.default(n_sites=3, seed=13, sizes=(30, 30, 12),
                                 tasks=("nodule", "fibrosis")), fed)
    shutil.rmtree(fed / "site_c" / "labels")  # this hospital keeps no fibrosis labels
    base = build_model(ModelConfig.from_dict(TINY_MODEL), seed=0)
    base.temperature = 1.25
    store = ModelStore(tmp / "store")
    v = store.add_version(lambda p: save_checkpoint(base, p), {"round": 1, "task": "nodule"})
    return {"tmp": tmp, "fed": fed, "store": store, "base": v}


def test_federated_lora_sends_only_adapter_and_head_arrays(world: dict) -> None:
    store, base_v = world["store"], world["base"]
    cfg = {"num-rounds": 2, "local-epochs": 2, "min-hospitals": 2, "run-name": "adapt",
           "model-json": json.dumps(TINY_MODEL), "store-dir": str(store.root),
           "federation-dir": str(world["fed"]), "cache-dir": str(world["tmp"] / "cache"),
           "task": "fibrosis", "adapt": "lora", "adapt-base": base_v.id,
           "models-dir": str(store.versions_dir)}
    res = simulate(world["tmp"] / "coord", cfg, num_nodes=3)
    assert res.status == "finished:completed", res
    versions = [v for v in store.list_versions() if v.meta.get("task") == "fibrosis"]
    assert [v.meta["round"] for v in versions] == [1, 2]

    base = load_checkpoint(base_v.model_path)
    new = load_checkpoint(versions[-1].model_path, task="fibrosis")
    keys = trainable_keys(new, "fibrosis", "lora")
    state = new.state_dict()
    # what Flower's records weigh (npy bytes incl. each array's header), built here directly
    n_bytes = record_bytes(ArrayRecord({k: state[k] for k in keys}))
    full_bytes = record_bytes(ArrayRecord(base.state_dict()))
    assert n_bytes < 0.25 * full_bytes
    for v in versions:
        meta = v.meta
        assert meta["base"] == {"version": base_v.id, "sha256": base_v.meta["sha256"]}
        assert meta["adapt"]["method"] == "lora" and meta["adapt"]["arrays"] == sorted(keys)
        assert meta["model_bytes"] == n_bytes
        trained = {h: b for h, b in meta["bytes"].items() if b["up"]}
        assert set(trained) == {"site_a", "site_b"}
        for b in trained.values():  # down: train + evaluate messages; up: + 3 float metrics
            assert b["down"] == 2 * n_bytes and b["up"] == n_bytes + 3 * 8
        assert meta["screening"]["site_c"]["outcome"] != "accepted"
        assert "NoTaskLabels" in meta["screening"]["site_c"]["reason"]
    # the stored version = the base + the trained arrays: first task bit-identical
    first = load_checkpoint(versions[-1].model_path, task="nodule")
    assert first.temperature == 1.25
    cases = load_site(world["fed"] / "site_a", base.cfg.inputs, None, use_cache=False).cases[:6]
    b = as_batch(base, cases)
    with torch.no_grad():
        assert torch.equal(first(b).logit, base(b).logit)
        moved = [k for k in keys if k.startswith("adapters.") and "B" in k.rsplit(".", 1)[-1]
                 and new.state_dict()[k].abs().max() > 0]
        assert moved, "no LoRA B matrix moved from zero"
    assert base_v.meta["sha256"] == store.get(base_v.id).meta["sha256"]
    store.verify(store.get(base_v.id))

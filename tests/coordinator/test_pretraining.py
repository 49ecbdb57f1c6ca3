"""Federated pretraining without Flower: what the coordinator sends (encoders + projectors
only), what a hospital does with it (every image case, labelled or not; only those arrays
change), the stored version (refused for serving, resumable, and the start of a task run), and
the refusals of run configs that cannot pretrain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator import pretraining
from coordinator.pretraining import PretrainPlan, plan_pretraining, with_pretrained_encoders
from coordinator.runner import train_config_record, write_model
from coordinator.settings import RunSettings
from coordinator.store import ModelStore
from hospital_node.task import TaskRequest, run_task
from multimodal.checkpoint import PRETRAINED_KIND, load_checkpoint, save_checkpoint
from multimodal.config import ModelConfig
from multimodal.model import build_model
from multimodal.pretrain import HEADS_PREFIX, encoder_keys
from tests.integration.tiny import TINY_MODEL_SMALL_GRID as TINY
from vocab import records as K
from vocab.errors import CheckpointError, ConfigError

PRE_JSON = json.dumps({"proj_dim": 16, "batch_size": 8})


def _settings(tmp: Path, **kw: object) -> RunSettings:
    kw = {"pretrain_json": PRE_JSON, **kw}
    return RunSettings(store_dir=str(tmp / "store"), model_json=json.dumps(TINY), pretrain=True,
                       **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("pre") / "fed"
    generate(SynthConfig.default(1, seed=17, sizes=(24,), labelled_fraction=0.25), out)
    return out / "site_a"


def test_kind_is_the_checkpoint_modules() -> None:
    assert pretraining.KIND == PRETRAINED_KIND


def test_plan_sends_only_the_image_encoders_and_projectors(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    cfg = ModelConfig.from_dict(TINY)
    plan = plan_pretraining(s, cfg, ModelStore(tmp_path / "store"))
    assert plan is not None and plan.modalities == ("ct", "path")
    model = build_model(cfg, seed=0)
    enc = set(encoder_keys(model, ("ct", "path")))
    assert enc and {k for k in plan.initial if not k.startswith(HEADS_PREFIX)} == enc
    assert any(k.startswith(HEADS_PREFIX + "proj.ct.") for k in plan.initial)
    assert not any(k.startswith(("encoders.ehr.", "blocks.", "head")) for k in plan.initial)
    # the rest of the model is the seeded init, bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(plan.base_state[k], v), k
    rec = train_config_record(s, None, plan)
    assert json.loads(str(rec[K.PRETRAIN_JSON]))["proj_dim"] == 16
    assert K.TASK not in rec and K.ADAPT not in rec


@pytest.mark.parametrize("extra, match", [
    ({"task": "fibrosis"}, "reads no labels"),
    ({"secure_aggregation": True}, "not built with secure-aggregation"),
    ({"strategy": "fedadam"}, "fedadam"),
    ({"pretrain_json": "{\"epochs\": 0}"}, "epochs >= 1"),
])
def test_run_configs_that_cannot_pretrain_are_refused(tmp_path: Path, extra: dict,
                                                      match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        s = _settings(tmp_path, **extra)
        plan_pretraining(s, ModelConfig.from_dict(TINY), ModelStore(tmp_path / "store"))


def test_init_encoders_with_adapt_is_refused() -> None:
    with pytest.raises(ConfigError, match="init-encoders starts a new model"):
        RunSettings(init_encoders="0001-x", task="fibrosis", adapt="lora", adapt_base="0001-y")


def _node_request(site: Path, kind: str, arrays: dict, rnd: int = 1) -> TaskRequest:
    s = RunSettings(model_json=json.dumps(TINY), pretrain=True, pretrain_json=PRE_JSON,
                    local_epochs=2)
    plan_cfg = dict(train_config_record(s, None, _plan(s)))
    plan_cfg[K.SERVER_ROUND] = rnd
    return TaskRequest(kind, {"data-dir": str(site)}, {}, plan_cfg,
                       {k: v.numpy() for k, v in arrays.items()})


def _plan(s: RunSettings) -> PretrainPlan | None:
    return plan_pretraining(s, ModelConfig.from_dict(TINY), ModelStore(Path("/nonexistent")))


def test_a_hospital_pretrains_on_every_image_case_and_changes_only_those_arrays(
        site: Path) -> None:
    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of

    s = RunSettings(model_json=json.dumps(TINY), pretrain=True, pretrain_json=PRE_JSON)
    plan = _plan(s)
    assert plan is not None
    before = run_task(_node_request(site, "evaluate", plan.initial))
    out = run_task(_node_request(site, "train", plan.initial))
    assert out.arrays is not None and set(out.arrays) == set(plan.initial)
    moved = [k for k in out.arrays if not torch.equal(torch.from_numpy(out.arrays[k]),
                                                      plan.initial[k])]
    assert any(k.startswith("encoders.ct.") for k in moved)
    assert any(k.startswith(HEADS_PREFIX) for k in moved)
    # every case with an image, labelled or not, on the task rounds' train split
    cfg = ModelConfig.from_dict(TINY)
    cases = load_site(site, cfg.inputs, None, use_cache=False).cases
    imaged = [c for c in cases if (c.ct is not None or c.path is not None)
              and split_of(c.case_id, 0) == "train"]
    labelled = [c for c in imaged if c.label is not None]
    assert out.metrics[K.NUM_EXAMPLES] == len(imaged) > len(labelled)
    assert set(out.metrics) == {K.NUM_EXAMPLES, K.TRAIN_LOSS, K.TRAIN_SECONDS}
    after = run_task(_node_request(site, "evaluate", {k: torch.from_numpy(v)
                                                      for k, v in out.arrays.items()}))
    assert before.metrics[K.N_EVAL] == after.metrics[K.N_EVAL] >= 2
    assert after.metrics[K.AUC] != after.metrics[K.AUC]  # NaN: no labels read
    # the held-out objective on fixed views fell after one round of local pretraining
    assert after.metrics[K.LOSS] < before.metrics[K.LOSS]


def test_a_hospital_refuses_arrays_that_are_not_the_pretraining_set(site: Path) -> None:
    s = RunSettings(model_json=json.dumps(TINY), pretrain=True, pretrain_json=PRE_JSON)
    plan = _plan(s)
    assert plan is not None
    full = build_model(ModelConfig.from_dict(TINY), seed=0).state_dict()
    with pytest.raises(ConfigError, match="unexpected"):
        run_task(_node_request(site, "train", {**plan.initial, **full}))


def _stored(tmp_path: Path) -> tuple[ModelStore, object, object]:
    s = _settings(tmp_path)
    cfg = ModelConfig.from_dict(TINY)
    store = ModelStore(tmp_path / "store")
    plan = plan_pretraining(s, cfg, store)
    assert plan is not None
    arrays = {k: v + 0.01 for k, v in plan.initial.items()}  # "trained"
    v = store.add_version(lambda p: write_model(plan.full_state(arrays), cfg, p,
                                                checkpoint_meta=plan.checkpoint_meta(arrays)),
                          {"round": 1, **plan.meta()})
    return store, plan, (v, arrays)


def test_a_pretraining_version_is_refused_for_serving_and_resumes_with_its_projectors(
        tmp_path: Path) -> None:
    store, plan, (v, arrays) = _stored(tmp_path)
    with pytest.raises(CheckpointError, match="self-supervised pretraining version"):
        load_checkpoint(v.model_path)  # the app, `fedsight evaluate` and `adapt --base` use it
    resumed = plan.resume_arrays(v.model_path)
    assert set(resumed) == set(arrays)
    for k in arrays:
        assert torch.equal(resumed[k], arrays[k]), k


def test_a_task_run_starts_from_the_pretrained_encoders_only(tmp_path: Path) -> None:
    store, _, (v, arrays) = _stored(tmp_path)
    cfg = ModelConfig.from_dict(TINY)
    task_settings = RunSettings(store_dir=str(store.root), model_json=json.dumps(TINY),
                                init_encoders=v.id, seed=0)
    state = pretraining.initial_model_state(task_settings, cfg, store)
    seeded = build_model(cfg, seed=0).state_dict()
    for k, value in state.items():
        if k in arrays:
            assert torch.equal(value, arrays[k]), k
        else:  # EHR encoder, fusion, heads: the seeded init
            assert torch.equal(value, seeded[k]), k
    # a version that is not a pretraining one, and a folder that is no version, are refused
    plain = store.add_version(lambda p: save_checkpoint(build_model(cfg, seed=1), p), {})
    with pytest.raises(ConfigError, match="is not a pretraining version"):
        with_pretrained_encoders(build_model(cfg, seed=0), plain.id, store)
    with pytest.raises(ConfigError, match="init-encoders 'no-such'"):
        with_pretrained_encoders(build_model(cfg, seed=0), "no-such", store)
    # encoders of another architecture do not fit
    other = ModelConfig.from_dict({**TINY, "ct_channels": [4]})
    with pytest.raises(ConfigError, match="do not fit"):
        with_pretrained_encoders(build_model(other, seed=0), v.id, store)

"""Tasks, LoRA adapters and adaptation: exact no-op at start, by-hand reference, only the
adapter/head arrays change, two-task checkpoints round-trip, refusals before training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multimodal import lora
from multimodal.adapt import AdaptConfig, adapt, build_adapted, trainable_keys
from multimodal.checkpoint import load_checkpoint, save_checkpoint
from multimodal.config import TrainConfig
from multimodal.data import collate
from multimodal.model import build_model
from multimodal.train import train_local
from tests.multimodal.conftest import tiny_config, toy_cases
from vocab.errors import CheckpointError, ConfigError

NEW = "fibrosis"


def _batch(model, cases):
    inp = model.cfg.inputs
    return collate(cases, model.schema, inp.ct_shape, inp.path_size)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    model = build_model(tiny_config(), seed=0)
    # 8 epochs: a base that knows the toy signal (3 epochs left features a new head could not
    # use: held-out AUC of LoRA 0.62 on 3, 0.89 on 8)
    train_local(model, toy_cases(48, 1), TrainConfig(epochs=8, stage1_epochs=1, augment=False))
    model.temperature = 1.7
    return model


def _flipped(cases):
    """The new task: the toy signal's opposite on the same patients (a related task)."""
    return [dataclasses.replace(c, label=1 - c.label) for c in cases]


def test_fresh_adapters_are_an_exact_no_op(base) -> None:
    cases = toy_cases(12, 2)
    b = _batch(base, cases)
    ref = base(b).logit
    lo = build_adapted(base, NEW, AdaptConfig(method="lora"))
    hd = build_adapted(base, NEW, AdaptConfig(method="head"))
    hd.task_heads[NEW].load_state_dict(lo.task_heads[NEW].state_dict())
    assert torch.equal(lo(b, task="nodule").logit, ref)  # the base task: bit-identical
    assert torch.equal(lo(b, task=NEW).logit, hd(b, task=NEW).logit)  # B = 0: adapters add 0
    # with non-zero adapters the new task moves, the base task still does not
    with torch.no_grad():
        for p in lo.adapters[NEW].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(lo(b, task=NEW).logit, hd(b, task=NEW).logit, atol=1e-4)
    assert torch.equal(lo(b, task="nodule").logit, ref)
    assert lo.temperatures == {"nodule": 1.7}


def test_adapted_layers_equal_a_by_hand_low_rank_update(base) -> None:
    model = build_adapted(base, NEW, AdaptConfig(method="lora", lora_rank=3, lora_alpha=6.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapters[NEW].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    layers = lora.target_layers(model, model.cfg.lora_targets)
    kinds = {type(m).__name__ for m in layers.values()}
    assert kinds == {"Linear", "Router"}
    assert any(".experts." in n for n in layers) and any("attn.qkv" in n for n in layers)
    for name, mod in layers.items():
        x = torch.randn(5, mod.weight.shape[1], generator=gen)
        ad = model.adapters[NEW][name.replace(".", "__")]
        w = mod.weight.detach().double() + 2.0 * ad.B.detach().double() @ ad.A.detach().double()
        model._computing = NEW
        try:
            if type(mod).__name__ == "Router":
                got = mod(x)[3]  # float32 gate logits
                want = F.linear(x.double(), w)
            else:
                got = mod(x)
                want = F.linear(x.double(), w, mod.bias.detach().double())
        finally:
            model._computing = model.cfg.task
        np.testing.assert_allclose(got.detach().double().numpy(), want.numpy(), rtol=1e-4,
                                   atol=1e-4, err_msg=name)
        base_out = mod(x)[3] if type(mod).__name__ == "Router" else mod(x)
        assert not torch.allclose(base_out, got, atol=1e-3), name  # inactive: no delta


@pytest.mark.parametrize("method", ["lora", "head", "full", "scratch"])
def test_only_the_methods_arrays_change_and_the_base_is_untouched(base, method) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cases = _flipped(toy_cases(40, 3))
    acfg = AdaptConfig(method=method, epochs=8, full_epochs=3, augment=False)
    res = adapt(base, cases, NEW, acfg)
    after = res.model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert base.cfg.tasks == ("nodule",) and base.temperature == 1.7
    keys = set(trainable_keys(res.model, NEW, method))
    if method in ("lora", "head"):
        changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
        assert changed == set(), changed  # every shared weight is the base's, bit for bit
        assert keys and all(k.startswith((f"task_heads.{NEW}.", f"adapters.{NEW}."))
                            for k in keys)
        assert any(k.startswith(f"adapters.{NEW}.") for k in keys) == (method == "lora")
        assert res.model.cfg.tasks == ("nodule", NEW)
        b = _batch(base, cases[:8])
        assert torch.equal(res.model(b, task="nodule").logit, base(b).logit)
    else:
        assert res.model.cfg.tasks == (NEW,) and set(keys) == set(after)
    assert res.model.serve_task == NEW and res.n_cases == 40
    # training did something for the new task: its loss on these cases (eval mode, no dropout
    # or router noise) fell from the weights adapt() started from
    start = build_adapted(base, NEW, acfg)
    b = _batch(base, cases)
    with torch.no_grad():
        loss = {name: float(F.binary_cross_entropy_with_logits(
            m.eval()(b, task=NEW).logit, b.label)) for name, m in (("start", start),
                                                                   ("end", res.model))}
    assert loss["end"] < loss["start"], loss


def test_adaptation_learns_the_new_task_on_held_out_cases(base) -> None:
    train, test = _flipped(toy_cases(60, 4)), _flipped(toy_cases(60, 5))
    res = adapt(base, train, NEW, AdaptConfig(method="lora", epochs=30, augment=False))
    b = _batch(res.model, test)
    p = torch.sigmoid(res.model(b).logit).detach().numpy()
    y = b.label.numpy()
    auc = (p[y == 1][:, None] > p[y == 0][None, :]).mean()
    assert auc > 0.75, auc


def test_two_task_checkpoint_round_trips(base, tmp_path) -> None:
    res = adapt(base, _flipped(toy_cases(30, 6)), NEW,
                AdaptConfig(method="lora", epochs=3, augment=False))
    res.model.temperature = 0.8  # the new task's (served) temperature
    path = save_checkpoint(res.model, tmp_path / "m.pt")
    b = _batch(base, toy_cases(10, 7))
    new = load_checkpoint(path, task=NEW)
    first = load_checkpoint(path)
    assert first.serve_task == "nodule" and first.temperature == 1.7
    assert new.serve_task == NEW and new.temperature == 0.8
    assert torch.equal(new(b).logit, res.model(b).logit)
    assert torch.equal(first(b).logit, base(b).logit)
    with pytest.raises(CheckpointError, match="no head for task 'sepsis'"):
        load_checkpoint(path, task="sepsis")


def test_a_checkpoint_from_before_tasks_still_loads(base, tmp_path) -> None:
    path = save_checkpoint(base, tmp_path / "old.pt")
    ck = torch.load(path, weights_only=True)
    for k in ("task", "extra_tasks", "lora_tasks", "lora_rank", "lora_alpha", "lora_targets"):
        del ck["model_config"][k]
    del ck["temperatures"]
    torch.save(ck, path)
    m = load_checkpoint(path, expected=base.cfg)
    assert m.cfg.tasks == ("nodule",) and m.temperature == 1.7


def test_refusals_before_training(base) -> None:
    cases = _flipped(toy_cases(20, 8))
    with pytest.raises(ConfigError, match="5 labelled case.*at least 10"):
        adapt(base, cases[:5], NEW, AdaptConfig())
    one_class = [dataclasses.replace(c, label=1) for c in cases]
    with pytest.raises(ConfigError, match="both classes"):
        adapt(base, one_class, NEW, AdaptConfig())
    with pytest.raises(ConfigError, match="already has a head for task 'nodule'"):
        adapt(base, cases, "nodule", AdaptConfig())
    late = build_model(tiny_config(fusion="late"), seed=0)
    with pytest.raises(ConfigError, match="fusion 'moe'"):
        adapt(late, cases, NEW, AdaptConfig(method="lora"))
    with pytest.raises(ConfigError, match="adapt method"):
        AdaptConfig(method="prompt")
    with pytest.raises(ConfigError, match="lora_tasks"):
        tiny_config(lora_tasks=(NEW,))

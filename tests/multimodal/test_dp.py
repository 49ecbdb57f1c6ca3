"""DP-SGD (multimodal.dp): exact per-sample gradients, Opacus's clipping and noise, and the
accounting against Opacus's own PrivacyEngine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimodal.config import TrainConfig
from multimodal.data import collate
from multimodal.dp import DPSpend, DPStep, epsilon, per_sample_grads, plan
from multimodal.model import build_model
from multimodal.train import _loss, train_local
from tests.multimodal.conftest import TINY_INPUTS, tiny_config, toy_cases
from vocab.errors import ConfigError
from vocab.modalities import MODALITIES


def test_epsilon_matches_opacus_privacy_engine_on_a_real_training() -> None:
    """Our bookkeeping (plan: Poisson rate batch/n, ceil(n/batch) steps per epoch) composed
    over three 'monthly' runs gives the epsilon Opacus's PrivacyEngine reports after training
    the same three runs with its own Poisson DataLoader."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n, batch, sigma, delta = 200, 20, 1.3, 1e-5
    data = TensorDataset(torch.randn(n, 5), torch.randint(0, 2, (n,)).float())
    model = torch.nn.Linear(5, 1)
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = engine.make_private(module=model, optimizer=opt,
                                             data_loader=DataLoader(data, batch_size=batch),
                                             noise_multiplier=sigma, max_grad_norm=1.0)
    for _ in range(3 * 2):  # three runs of two epochs
        for x, y in loader:
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
            opt.step()
    ours = epsilon([plan(n, batch, 2, sigma)] * 3, delta)
    assert ours == pytest.approx(engine.get_epsilon(delta), rel=1e-9)
    assert 0 < ours < 10


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    one = epsilon([DPSpend(1.0, 0.1, 100)], 1e-5)
    assert epsilon([DPSpend(1.0, 0.1, 100)] * 2, 1e-5) > one
    assert epsilon([DPSpend(2.0, 0.1, 100)], 1e-5) < one
    assert epsilon([], 1e-5) == 0.0
    # the PRV accountant is tighter than RDP's conversion, never looser by more than rounding
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [(1.0, 0.1, 100)]
    assert prv.get_epsilon(1e-5) <= one * 1.01
    with pytest.raises(ConfigError, match="delta"):
        epsilon([DPSpend(1.0, 0.1, 1)], 1.5)


def test_dp_params_must_come_together() -> None:
    with pytest.raises(ConfigError, match="dp-noise-multiplier > 0 and dp-max-grad-norm > 0"):
        TrainConfig(dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="nan"):
        TrainConfig(dp_noise_multiplier=math.nan, dp_max_grad_norm=1.0)
    assert TrainConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0).dp
    assert not TrainConfig().dp


@pytest.mark.parametrize("stage", [1, 2])
def test_per_sample_gradients_equal_the_batched_gradient_of_per_case_losses(stage: int) -> None:
    """Per-case passes (what DP-SGD clips) against one batched forward with per-case losses
    summed: equal only because no layer mixes cases (GroupNorm, per-sample expert capacity)."""
    torch.manual_seed(0)
    # attention dropout off: it draws per forward, so batched and per-case passes would differ
    model = build_model(tiny_config(balance_coef=0.0, z_coef=0.0, dropout=0.0), seed=0)
    model.train()
    model.set_router_noise_scale(0.0)
    cases = toy_cases(6, seed=3)
    b = collate(cases, model.schema, TINY_INPUTS.ct_shape, TINY_INPUTS.path_size)
    cfg = TrainConfig(augment=False)
    w = {m: 1.0 for m in model.cfg.modalities}
    params = [p for p in model.parameters() if p.requires_grad]
    grads = per_sample_grads(params, len(b),
                             lambda i: _loss(model, b.select(torch.tensor([i])), stage, w, cfg)[0])
    out = model(b, fuse=stage == 2)
    present = b.present()
    total = torch.zeros(())
    for j, m in enumerate(MODALITIES):
        if m in model.cfg.modalities:
            bce = F.binary_cross_entropy_with_logits(out.aux_logits[m], b.label, reduction="none")
            total = total + (bce * present[:, j]).sum() * (cfg.aux_weight if stage == 2 else 1.0)
    if stage == 2:
        total = total + F.binary_cross_entropy_with_logits(out.logit, b.label, reduction="sum")
    ref = torch.autograd.grad(total, params, allow_unused=True)
    for p, g, r in zip(params, grads, ref, strict=True):
        assert g.shape == (len(b), *p.shape)
        want = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g.sum(0), want, rtol=1e-3, atol=1e-4)


def test_dp_step_clips_each_case_and_adds_noise_of_the_stated_scale() -> None:
    p = torch.nn.Parameter(torch.zeros(20000))
    gen = torch.Generator().manual_seed(1)
    big = torch.full((4, 20000), 1.0)  # each case's gradient has norm sqrt(20000) ~ 141
    step = DPStep(torch.optim.SGD([p], lr=1.0), 0.0, 2.0, 8, gen)
    step.step([big])
    # no noise: the mean over the expected batch of 4 gradients clipped to norm 2
    assert float(p.detach().norm()) == pytest.approx(4 * 2.0 / 8, rel=1e-4)
    q = torch.nn.Parameter(torch.zeros(20000))
    noisy = DPStep(torch.optim.SGD([q], lr=1.0), 1.5, 2.0, 8, gen)
    noisy.step([torch.zeros(0, 20000)])  # an empty Poisson batch still steps with noise
    assert float(q.detach().std()) == pytest.approx(1.5 * 2.0 / 8, rel=0.03)
    assert abs(float(q.detach().mean())) < 0.01


def test_dp_training_reports_its_spend_and_is_not_seeded_by_the_coordinator() -> None:
    cases = toy_cases(40, seed=1)
    cfg = TrainConfig(epochs=2, stage1_epochs=1, batch_size=8, seed=0, augment=False,
                      dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    states, results = [], []
    for _ in range(2):
        model = build_model(tiny_config(), seed=0)
        results.append(train_local(model, cases, cfg))
        states.append(model.state_dict())
    res = results[0]
    assert res.dp == DPSpend(1.0, 8 / 40, 2 * 5) and res.steps == 10
    # equal loss weights under DP (loss-ratio weights would be a release of the losses)
    assert all(h[f"weight_{m}"] == 1.0 for h in res.history for m in tiny_config().modalities)
    # same round seed, different noise and batches: the noise is not derivable from the seed
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_dp_refuses_batch_norm_in_the_pathology_encoder() -> None:
    model = build_model(tiny_config(path_norm="batch"), seed=0)
    cfg = TrainConfig(epochs=1, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="path_norm 'group'"):
        train_local(model, toy_cases(4, seed=1), cfg)


def test_a_dp_stage_one_round_leaves_the_fusion_untouched() -> None:
    """Stage 1 trains encoders and their heads only; the DP noise must not random-walk the
    fusion blocks, experts and fused head that no stage-1 loss reaches."""
    model = build_model(tiny_config(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=8, augment=False, dp_noise_multiplier=1.0,
                      dp_max_grad_norm=1.0)
    train_local(model, toy_cases(24, seed=1), cfg, stage=1)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"encoders", "aux_heads", "missing", "type_emb"}
    assert "encoders" in changed and "aux_heads" in changed

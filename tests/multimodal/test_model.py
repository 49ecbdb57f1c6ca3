from __future__ import annotations

import pytest
import torch

from multimodal.config import ModelConfig
from multimodal.data import collate
from multimodal.model import build_model
from tests.multimodal.conftest import TINY_INPUTS, tiny_config, toy_cases
from vocab.ehr_schema import CHEST_V1
from vocab.errors import ConfigError
from vocab.modalities import combo_name, modality_combinations


def _full_batch(n: int = 4, seed: int = 0):
    cases = toy_cases(n, seed, p_missing=0.0)
    return collate(cases, CHEST_V1, TINY_INPUTS.ct_shape, TINY_INPUTS.path_size)


@pytest.mark.parametrize("combo", modality_combinations(), ids=combo_name)
def test_every_combination_answers(combo: tuple[str, ...]) -> None:
    model = build_model(tiny_config(), seed=0).eval()
    b = _full_batch().only(set(combo))
    out = model(b)
    assert out.logit.shape == (4,)
    assert torch.isfinite(out.logit).all()
    assert set(out.aux_logits) == {"ct", "path", "ehr"}
    assert all(a.shape == (4,) and torch.isfinite(a).all() for a in out.aux_logits.values())


@pytest.mark.parametrize("fusion,mods,readout", [
    ("late", ("ct", "path", "ehr"), "modality"), ("moe", ("ct",), "modality"),
    ("moe", ("ehr",), "mean"), ("late", ("path",), "modality"), ("moe", ("ct", "ehr"), "mean")])
def test_baseline_variants_answer(fusion: str, mods: tuple[str, ...], readout: str) -> None:
    model = build_model(tiny_config(fusion=fusion, modalities=mods, head_readout=readout),
                        seed=0).eval()
    out = model(_full_batch())
    assert out.logit.shape == (4,) and torch.isfinite(out.logit).all()
    assert set(out.aux_logits) == set(mods)
    if fusion == "moe":  # fusion token + (mean, max) per modality, or + the mean of all tokens;
        # + (mean, max) of each modality's encoder tokens (head_skip, the default)
        n_read = 2 * len(mods) if readout == "modality" else 1
        assert model.head.in_features == (1 + n_read + 2 * len(mods)) * model.cfg.d_model


def test_head_skip_reads_the_encoder_tokens() -> None:
    """With every head weight zeroed except the skip slice, the logit equals the head applied by
    hand to the normalised (mean, max) of each modality's encoder tokens."""
    from multimodal.model import pool_tokens

    model = build_model(tiny_config(), seed=0).eval()
    b = _full_batch()
    b.path_present[1] = False  # a missing modality reads its learned missing tokens
    d, m = model.cfg.d_model, len(model.cfg.modalities)
    n_skip = 2 * m * d
    with torch.no_grad():
        model.head.weight[:, :-n_skip] = 0
        seen: dict[str, torch.Tensor] = {}
        hooks = [model.encoders[k].register_forward_hook(
            lambda _m, _i, o, k=k: seen.__setitem__(k, o)) for k in model.cfg.modalities]
        got = model(b).logit
        for h in hooks:
            h.remove()
        present = {"ct": b.ct_present, "path": b.path_present, "ehr": b.ehr_present}
        feats = []
        for k in model.cfg.modalities:
            tok = model.missing[k].unsqueeze(0).expand(len(b), -1, -1).clone()
            tok[present[k]] = seen[k]  # encoders run on present rows only
            feats.append(pool_tokens(tok + model.type_emb[k]))
        ref = model.head(torch.cat([torch.zeros(len(b), model.head.in_features - n_skip),
                                    model.skip_norm(torch.cat(feats, -1))], -1)).squeeze(-1)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("readout", ["modality", "mean"])
def test_every_parameter_gets_a_gradient(readout: str) -> None:
    # the CT conv path half open: at the default gate 0 only the gate itself gets its gradient
    # (test_ct_conv_path_starts_closed_and_can_open)
    model = build_model(tiny_config(head_readout=readout, ct_deep_gate_init=0.5),
                        seed=0).train()
    b = _full_batch(6)
    # rows 0-2 have all three modalities; rows 3-5 each lack one (missing tokens are used), and
    # some EHR fields are missing (per-field missing embedding is used)
    b.ct_present[3], b.path_present[4], b.ehr_present[5] = False, False, False
    b.ehr_observed[0, :3] = False
    out = model(b)
    loss = out.logit.sum() + sum(a.sum() for a in out.aux_logits.values()) + out.moe_loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    # routed experts only get gradient when they receive tokens; with 6x29 tokens x 2 blocks,
    # top-2 of 8, an expert without tokens is possible but rare -- check it is really unused
    counts = model.expert_counts()
    dead = {f"blocks.{i}.moe.experts.{e}." for i in range(counts.shape[0])
            for e in range(counts.shape[1]) if counts[i, e] == 0}
    no_grad = [n for n in no_grad if not any(n.startswith(d) for d in dead)]
    assert no_grad == []


def test_categorical_ehr_schema_gets_gradients() -> None:
    model = build_model(tiny_config(inputs=TINY_INPUTS.__class__(
        ct_shape=(16, 32, 32), path_size=32, ehr_schema="uci-heart"), modalities=("ehr",)))
    x = torch.zeros(3, 10)
    x[:, 2] = torch.tensor([-1.5, 0.5, 1.5])  # cp codes 1, 3, 4 after (v - 2.5) / 1
    obs = torch.ones(3, 10, dtype=torch.bool)
    enc = model.ehr_encoder
    tok = enc(x, obs)
    assert tok.shape == (3, 10, 32)
    (tok[:, 2] * torch.randn(3, 32)).sum().backward()  # (a plain sum is 0 after LayerNorm)
    rows = enc.cat_emb.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist()
    assert rows == [0, 2, 3]  # cp levels (1, 2, 3, 4): codes 1, 3, 4 used


def test_garbage_in_missing_slot_does_not_change_output() -> None:
    model = build_model(tiny_config(), seed=0).eval()
    b = _full_batch(4)
    b.ct_present[1] = False
    b.path_present[2] = False
    b.ehr_present[3] = False
    ref = model(b)
    g = b.select(torch.arange(4))
    g.ct[1] = torch.randn_like(g.ct[1]) * 1e3
    g.path[2] = float("nan")
    g.ehr[3] = 1e6
    g.ehr_observed[3] = ~g.ehr_observed[3]
    out = model(g)
    torch.testing.assert_close(out.logit, ref.logit, rtol=0, atol=0)
    # ... also in training mode (no batch statistics leak); same seed for router noise
    model.train()
    torch.manual_seed(1)
    a = model(b).logit
    torch.manual_seed(1)
    c = model(g).logit
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_missing_tokens_are_learned_not_zero() -> None:
    model = build_model(tiny_config(), seed=0)
    assert all(p.abs().sum() > 0 for p in model.missing.values())


def test_eval_mode_is_noise_free_and_repeatable() -> None:
    model = build_model(tiny_config(router_noise_std=5.0), seed=0)
    b = _full_batch(4)
    model.eval()
    a, c = model(b).logit, model(b).logit
    assert torch.equal(a, c)
    model.train()  # training mode with noise differs between calls
    model.set_router_noise_scale(1.0)
    d, e = model(b).logit, model(b).logit
    assert not torch.equal(d, e)


def test_expert_counts_sum_to_tokens_times_top_k() -> None:
    cfg = tiny_config()
    model = build_model(cfg, seed=0).eval()
    b = _full_batch(5)
    model.reset_expert_counts()
    model(b)
    model(b)
    n_tokens = 1 + 8 + 4 + len(CHEST_V1.fields)  # fusion + CT 2x2x2 + path 2x2 + EHR fields
    counts = model.expert_counts()
    assert counts.shape == (cfg.n_blocks, cfg.n_experts)
    assert torch.all(counts.sum(1) == 2 * 5 * n_tokens * cfg.top_k)
    by_group = model.expert_counts(by_group=True)
    assert torch.equal(by_group.sum(1), counts)
    model.reset_expert_counts()
    assert model.expert_counts().sum() == 0


def test_feature_layers_for_gradcam() -> None:
    model = build_model(tiny_config(), seed=0).eval()
    seen = {}
    for name, enc in (("ct", model.ct_encoder), ("path", model.path_encoder)):
        enc.feature_layer.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o))
    model(_full_batch(2))
    assert seen["ct"].dim() == 5 and seen["path"].dim() == 4


def test_unknown_backbone_and_keys_raise() -> None:
    with pytest.raises(ConfigError, match="no_such_net"):
        build_model(tiny_config(path_backbone="no_such_net"))
    with pytest.raises(ConfigError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 32})
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="'sum'"):
        tiny_config(head_readout="sum")
    with pytest.raises(ConfigError, match="expert_capacity_factor.*-1"):
        tiny_config(expert_capacity_factor=-1.0)


def test_ct_conv_path_starts_closed_and_can_open() -> None:
    """Gate 0: CT tokens come from the nodule evidence alone (conv weights don't matter) yet the
    gate gets a gradient; gate 1: the conv path changes the tokens."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, *TINY_INPUTS.ct_shape) * 0.3 - 0.6
    closed = build_model(tiny_config(), seed=0).ct_encoder
    before = closed(x)
    with torch.no_grad():
        for p in closed.stages.parameters():
            p.add_(torch.randn_like(p))
    after = closed(x)
    assert torch.equal(before, after)
    after.pow(2).sum().backward()
    assert closed.deep_gate.grad is not None and closed.deep_gate.grad.abs() > 0
    ev = closed.evidence_proj
    assert ev is not None and ev.weight.grad is not None and ev.weight.grad.abs().sum() > 0
    opened = build_model(tiny_config(ct_deep_gate_init=1.0), seed=0).ct_encoder
    ref = opened(x)
    with torch.no_grad():
        for p in opened.stages.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(ref, opened(x))


def test_ct_without_blob_filter_needs_an_open_conv_path() -> None:
    with pytest.raises(ConfigError, match="ct_deep_gate_init"):
        tiny_config(ct_blob_filter=False)
    cfg = tiny_config(ct_blob_filter=False, ct_deep_gate_init=1.0)
    assert build_model(cfg, seed=0).ct_encoder.evidence_proj is None

from __future__ import annotations

import numpy as np
import torch

from multimodal.config import TrainConfig
from multimodal.data import collate
from multimodal.evaluate import evaluate, fit_model_temperature
from multimodal.losses import LossRatioWeighting, fedprox_term
from multimodal.metrics import auc
from multimodal.model import build_model
from multimodal.train import ehr_field_dropout, modality_dropout, train_local
from tests.multimodal.conftest import TINY_INPUTS, tiny_config, toy_cases
from vocab.ehr_schema import CHEST_V1


def test_short_training_beats_chance_on_held_out(tiny_train: TrainConfig) -> None:
    model = build_model(tiny_config(), seed=0)
    # 16 epochs: with per-patient expert capacity 10 epochs on 96 toy cases gave 0.64-0.76
    res = train_local(model, toy_cases(128, seed=1), tiny_train.replace(epochs=16))
    assert res.n_examples == 128 and res.steps == 16 * 8
    assert [h["stage"] for h in res.history] == [1, 1] + [2] * 14
    assert res.expert_counts is not None and res.expert_counts.sum() > 0
    test = toy_cases(64, seed=2)
    fit_model_temperature(model, toy_cases(32, seed=3))
    report = evaluate(model, {"a": test[:32], "b": test[32:]})
    pooled = report.row("pooled", "available")
    assert pooled is not None and pooled.n == 64
    assert pooled.auc > 0.7, report.to_markdown()  # chance: 0.5
    assert len({r.combo for r in report.rows}) == 8  # available + 7 combinations
    assert "| pooled | ct+path+ehr |" in report.to_markdown()
    assert report.expert_summary["min_share"] > 0
    assert report.expert_summary["max_over_mean"] <= 1.5  # per-patient capacity (moe.py)
    assert '"auc"' in report.to_json()


def test_training_is_deterministic(tiny_train: TrainConfig) -> None:
    cfg = tiny_train.replace(epochs=2, stage1_epochs=1)
    cases = toy_cases(32, seed=1)
    states = []
    for _ in range(2):
        model = build_model(tiny_config(), seed=0)
        train_local(model, cases, cfg)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    model = build_model(tiny_config(), seed=0)
    train_local(model, cases, cfg.replace(seed=1))
    assert any(not torch.equal(states[0][k], v) for k, v in model.state_dict().items())


def test_stage1_trains_encoders_only(tiny_train: TrainConfig) -> None:
    model = build_model(tiny_config(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, toy_cases(16, seed=1), tiny_train.replace(epochs=1), stage=1)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    # fusion parts (blocks, head, fusion token, positions) are untouched in stage 1
    assert {"encoders", "aux_heads"} <= changed <= {"encoders", "aux_heads", "type_emb", "missing"}


def test_modality_dropout_never_drops_everything() -> None:
    b = collate(toy_cases(200, seed=0, p_missing=0.3), CHEST_V1, TINY_INPUTS.ct_shape,
                TINY_INPUTS.path_size)
    gen = torch.Generator().manual_seed(0)
    d = modality_dropout(b, 0.9, ("ct", "path", "ehr"), gen)
    assert d.present().any(1).all()
    assert not (d.present() & ~b.present()).any()  # never invents a modality
    assert d.present().sum() < 0.6 * b.present().sum()


def test_ehr_field_dropout_hides_recorded_fields_only() -> None:
    b = collate(toy_cases(200, seed=0, p_missing=0.3), CHEST_V1, TINY_INPUTS.ct_shape,
                TINY_INPUTS.path_size)
    b.ehr_observed[:5, :2] = False  # some fields were never recorded
    gen = torch.Generator().manual_seed(0)
    d = ehr_field_dropout(b, 0.5, gen)
    assert not (d.ehr_observed & ~b.ehr_observed).any()  # never invents a value
    kept = d.ehr_observed.sum() / b.ehr_observed.sum()
    assert 0.45 < float(kept) < 0.55  # ~half of the recorded fields hidden
    assert torch.equal(d.ehr, b.ehr) and torch.equal(d.ehr_present, b.ehr_present)
    assert ehr_field_dropout(b, 0.0, gen) is b


def test_fedprox_term_and_loss_ratio_weights(tiny_train: TrainConfig) -> None:
    model = build_model(tiny_config(), seed=0)
    g = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert float(fedprox_term(model, g, 0.1).detach()) == 0.0
    res = train_local(model, toy_cases(16, seed=1),
                      tiny_train.replace(epochs=1, fedprox_mu=0.1), global_state=g, stage=2)
    assert res.steps == 1 and float(fedprox_term(model, g, 0.1).detach()) > 0
    w = LossRatioWeighting(("ct", "ehr"))
    assert w.weights() == {"ct": 1.0, "ehr": 1.0}
    w.update({"ct": 0.7, "ehr": 0.7})
    w.update({"ct": 0.6, "ehr": 0.3})  # EHR converged faster -> CT gets more weight
    ws = w.weights()
    assert ws["ct"] > 1.0 > ws["ehr"] and np.isclose(sum(ws.values()), 2.0)


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert np.isclose(auc(y, s), brute)
    assert np.isnan(auc(np.ones(5), np.arange(5.0)))

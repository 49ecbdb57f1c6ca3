"""The known label model: AUC formula, intercepts, prevalence, and the oracle AUC ladder."""

from __future__ import annotations

import numpy as np
import pytest

from synth.config import LabelModel, SynthConfig
from synth.model import auc, draw_site, intercept_for, oracle_scores, rng_for, sigmoid


def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(s, y) == pytest.approx(expected, abs=1e-12)
    assert auc(np.arange(4.0), np.array([0, 0, 1, 1])) == 1.0


@pytest.mark.parametrize("prevalence", [0.1, 0.3, 0.5])
def test_intercept_gives_the_prevalence_in_expectation(prevalence: float) -> None:
    lm = LabelModel()
    b0 = intercept_for(prevalence, lm)
    z = np.random.default_rng(1).standard_normal((400_000, 4))
    mean_p = sigmoid(b0 + z @ np.array([lm.a, lm.b, lm.c, lm.d])).mean()
    assert mean_p == pytest.approx(prevalence, abs=0.004)


def test_each_site_prevalence_within_band_on_a_large_draw() -> None:
    cfg = SynthConfig.default(n_sites=6, seed=3)
    prevalences = [s.prevalence for s in cfg.sites]
    assert min(prevalences) >= 0.10 and max(prevalences) <= 0.50
    assert len(set(prevalences)) == len(prevalences)  # hospitals differ
    for i, site in enumerate(cfg.sites):
        d = draw_site(site, cfg.label_model, rng_for(cfg.seed, i, 0), n=8000)
        assert d.label.mean() == pytest.approx(site.prevalence, abs=0.02), site.site_id


def test_fusion_beats_every_single_modality_oracle() -> None:
    """The design target: each modality alone ~0.70-0.80 AUC, all three ~0.9 at best."""
    cfg = SynthConfig.default(n_sites=1, seed=11)
    site = cfg.sites[0]
    d = draw_site(site, cfg.label_model, rng_for(0, 99), n=60_000)
    bayes = auc(d.logit, d.label)
    ora = {k: auc(v, d.label) for k, v in oracle_scores(d.scores, cfg.label_model).items()}
    singles = [ora["ct"], ora["path"], ora["ehr"]]
    assert all(0.70 <= a <= 0.80 for a in singles), ora
    assert 0.85 <= ora["ct+path+ehr"] <= bayes, (ora, bayes)
    assert ora["ct+path+ehr"] >= max(singles) + 0.07, ora
    for pair in ("ct+path", "ct+ehr", "path+ehr"):
        assert max(singles) < ora[pair] < ora["ct+path+ehr"], ora
    assert 0.88 <= bayes <= 0.95


def test_oracle_weights_are_the_best_linear_score() -> None:
    """Closed-form E[logit | scores] equals the least-squares fit on a large sample."""
    lm = LabelModel()
    z = np.random.default_rng(5).standard_normal((200_000, 4))
    d_scores = lm.w_shared * z[:, [0]] + np.sqrt(1 - lm.w_shared**2) * z[:, 1:]
    logit = z @ np.array([lm.a, lm.b, lm.c, lm.d])
    beta = np.linalg.lstsq(d_scores, logit, rcond=None)[0]
    closed = oracle_scores(np.eye(3), lm)["ct+path+ehr"]  # rows of I -> the weights themselves
    np.testing.assert_allclose(closed, beta, atol=0.02)


def test_same_seed_same_latents_and_different_seed_differs() -> None:
    cfg = SynthConfig.default(n_sites=2, seed=4)
    a = draw_site(cfg.sites[0], cfg.label_model, rng_for(4, 0, 0))
    b = draw_site(cfg.sites[0], cfg.label_model, rng_for(4, 0, 0))
    c = draw_site(cfg.sites[0], cfg.label_model, rng_for(5, 0, 0))
    np.testing.assert_array_equal(a.z, b.z)
    assert not np.allclose(a.z, c.z)

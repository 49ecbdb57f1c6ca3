"""The known generative model: latent factors -> modality scores -> Bayes probability -> label.

Everything here is cheap (no images), so tests can draw thousands of patients to check
prevalence and the oracle AUCs that the rendered modalities are built on.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from synth.config import LabelModel, SiteConfig

LATENTS = ("z_shared", "z_ct", "z_path", "z_ehr")
MODALITY_FACTOR = {"ct": "z_ct", "path": "z_path", "ehr": "z_ehr"}


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """An independent, reproducible stream for (seed, site, case, purpose)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _coef(lm: LabelModel) -> np.ndarray:
    return np.array([lm.a, lm.b, lm.c, lm.d])


def intercept_for(prevalence: float, lm: LabelModel) -> float:
    """b0 with E[sigmoid(b0 + L)] = prevalence, L ~ N(0, a^2+b^2+c^2+d^2) (Gauss-Hermite)."""
    sd = float(np.sqrt((_coef(lm) ** 2).sum()))
    x, w = np.polynomial.hermite_e.hermegauss(80)  # nodes for weight exp(-x^2/2)
    w = w / w.sum()
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection: the mean is monotone in b0
        mid = 0.5 * (lo + hi)
        if float((w * sigmoid(mid + sd * x)).sum()) < prevalence:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Draw:
    """Latents and labels of n patients of one site and one task (arrays of length n)."""

    z: np.ndarray  # (n, 4) z_shared, z_ct, z_path, z_ehr (for fibrosis: v_*, same order)
    scores: np.ndarray  # (n, 3) s_ct, s_path, s_ehr: what each modality renders
    logit: np.ndarray  # (n,)
    bayes_prob: np.ndarray  # (n,)
    label: np.ndarray  # (n,) int 0/1
    b0: float


def modality_scores(z: np.ndarray, lm: LabelModel) -> np.ndarray:
    """(n, 4) latents -> (n, 3) standard-normal scores s_m = w*z_shared + sqrt(1-w^2)*z_m."""
    w = lm.w_shared
    return w * z[:, [0]] + np.sqrt(1.0 - w * w) * z[:, 1:]


def draw_site(
    site: SiteConfig, lm: LabelModel, rng: np.random.Generator, n: int | None = None
) -> Draw:
    """Draw n (default site.n_cases) patients from the label model at this site's prevalence."""
    n = site.n_cases if n is None else n
    return draw_task(rng.standard_normal((n, 4)), site.prevalence, lm, rng)


def draw_task(z: np.ndarray, prevalence: float, lm: LabelModel, rng: np.random.Generator) -> Draw:
    """Labels of one task from given (n, 4) standard-normal latents at a site's prevalence.

    The closed forms of this module (intercept_for, oracle_weights, oracle_scores) hold for any
    task whose latents are independent standard normals, whatever lm's weights.
    """
    b0 = intercept_for(prevalence, lm)
    logit = b0 + z @ _coef(lm)
    p = sigmoid(logit)
    label = (rng.random(len(z)) < p).astype(np.int64)
    return Draw(z, modality_scores(z, lm), logit, p, label, b0)


def fibrosis_latents(z_nodule: np.ndarray, coupling: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) fibrosis latents: own factors from rng, the shared factor coupled to the nodule one:
    v_shared = coupling * z_shared + sqrt(1 - coupling^2) * e (still standard normal, still
    independent of v_ct, v_path, v_ehr, so the closed forms apply)."""
    v = rng.standard_normal(z_nodule.shape)
    v[:, 0] = coupling * z_nodule[:, 0] + np.sqrt(1.0 - coupling * coupling) * v[:, 0]
    return v


def draw_fibrosis(
    nodule: Draw, prevalence: float, lm: LabelModel, coupling: float, rng: np.random.Generator
) -> Draw:
    """The second disease for the same patients as `nodule` (one site), from its own stream."""
    return draw_task(fibrosis_latents(nodule.z, coupling, rng), prevalence, lm, rng)


def oracle_weights(lm: LabelModel, combo: tuple[str, ...]) -> np.ndarray:
    """Weights beta with E[logit | s_combo] = b0 + beta . s_combo (jointly Gaussian, closed form).

    P(label | s_combo) is increasing in that mean, so beta . s is the Bayes-optimal score of a
    model that sees only those modalities: the ceiling any trained model can reach on them.
    """
    idx = [("ct", "path", "ehr").index(m) for m in combo]
    w = lm.w_shared
    wm = np.sqrt(1.0 - w * w)
    own = np.array([lm.b, lm.c, lm.d])[idx]
    cov_ss = np.full((len(idx), len(idx)), w * w) + np.eye(len(idx)) * (1.0 - w * w)
    cov_ls = lm.a * w + own * wm
    return np.linalg.solve(cov_ss, cov_ls)


def oracle_scores(scores: np.ndarray, lm: LabelModel) -> dict[str, np.ndarray]:
    """Bayes-optimal score from each of the 7 modality combinations, keyed like 'ct+path'."""
    names = ("ct", "path", "ehr")
    out: dict[str, np.ndarray] = {}
    for k in range(1, 4):
        for combo in combinations(names, k):
            idx = [names.index(m) for m in combo]
            out["+".join(combo)] = scores[:, idx] @ oracle_weights(lm, combo)
    return out


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given their average rank."""
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label).astype(bool)
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_s = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))

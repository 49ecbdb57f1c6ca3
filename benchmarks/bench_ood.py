"""Out-of-scope checks: how well the learned OOD score separates shifted cases, and what the
checks cost per case.

A synthetic site (seed 0) is the serving hospital: the OOD Gaussian is fitted on its train
split, thresholds on its held-out split (explain.scope.SiteScope). Scored against the held-out
cases: (a) the same held-out cases through another scanner/lab (paired: only the shift differs),
(b) new patients from the same generator (seed 1; a control, AUROC ~0.5 expected) and
(c) those new patients shifted. Two models: the tiny test model untrained and after a short
local training. Cost: median/p95 of SiteScope.check per case, with explain_case as the
baseline in the same run. Runs in ~1-2 min on 2 cores:

    .venv/bin/python benchmarks/bench_ood.py [--cases 90]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.config import ExplainConfig
from explain.explanation import explain_case
from explain.scope import SiteScope
from hospital_node.dataset import load_site
from hospital_node.splits import split_of
from multimodal.data import PreparedCase
from multimodal.metrics import auc
from multimodal.train import TrainConfig, train_local
from synth.config import SynthConfig
from synth.federation import generate
from tests.explain.fixtures import TINY_INPUTS, tiny_model
from tests.explain.test_scope import STRONG, shift_case

SHIFTS: dict[str, dict[str, float]] = {
    "mild (CT x1.25 +80 HU, 50 HU noise; tile noise 0.5)":
        dict(ct_gain=1.25, ct_offset=0.08, ct_noise=0.05, path_noise=0.5),
    "CT noise 300 HU only": dict(ct_noise=0.3),
    "strong (CT x1.5 +200 HU, 300 HU noise; tile noise 1.0)": STRONG,
}


def _auroc(inside: list[float], outside: list[float]) -> float:
    return auc(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=90)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ood-"))
    generate(SynthConfig.default(n_sites=1, seed=0, sizes=(args.cases,)), tmp / "a")
    generate(SynthConfig.default(n_sites=1, seed=1, sizes=(40,)), tmp / "b")
    site = load_site(tmp / "a" / "site_a", TINY_INPUTS, None, use_cache=False).cases
    new = load_site(tmp / "b" / "site_a", TINY_INPUTS, None, use_cache=False).cases
    train = [c for c in site if split_of(c.case_id, 0) == "train"]
    held = [c for c in site if split_of(c.case_id, 0) == "test"]
    trained = tiny_model()
    trained.train()
    train_local(trained, train, TrainConfig(epochs=6, stage1_epochs=2, seed=0))
    trained.eval()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; site {len(train)} train / {len(held)} held-out "
          f"cases, {len(new)} new patients (seed 1)")
    print("| model | comparison | AUROC | share not in scope |")
    print("|---|---|---|---|")
    for name, model in (("untrained tiny", tiny_model()), ("trained tiny", trained)):
        scope = SiteScope.fit(model, site)
        assert scope.ood is not None
        s_held = [scope.ood_score(c) or 0.0 for c in held]

        def row(label: str, cases: list[PreparedCase], model_name: str = name,
                sc: SiteScope = scope, ref: list[float] = s_held) -> None:
            s = [sc.ood_score(c) or 0.0 for c in cases]
            flagged = np.mean([sc.check(c).outcome != "in_scope" for c in cases])
            print(f"| {model_name} | held-out vs {label} | {_auroc(ref, s):.3f} | "
                  f"{100 * flagged:.0f}% |")

        row("new patients, same generator (control)", new)
        for label, kw in SHIFTS.items():
            rng = np.random.default_rng(0)
            row(f"held-out {label}", [shift_case(c, rng, **kw) for c in held])
            rng = np.random.default_rng(1)
            row(f"new patients {label}", [shift_case(c, rng, **kw) for c in new])
        flagged_held = np.mean([scope.check(c).outcome != "in_scope" for c in held])
        print(f"| {name} | held-out itself (p95 threshold: ~5% expected) | - | "
              f"{100 * flagged_held:.0f}% |")

    # cost per case: the checks vs the explanation (baseline) on the same cases
    scope = SiteScope.fit(trained, site)
    cfg = ExplainConfig()
    t_scope, t_explain = [], []
    for c in held:
        t0 = time.perf_counter()
        scope.check(c)
        t_scope.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        explain_case(trained, c, cfg)
        t_explain.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    SiteScope.fit(trained, site)
    t_fit = (time.perf_counter() - t0) * 1e3
    ms, me = np.median(t_scope), np.median(t_explain)
    print(f"\nscope check per case: median {ms:.1f} ms, p95 {np.percentile(t_scope, 95):.1f} ms;"
          f" explain_case median {me:.1f} ms (ratio {ms / me:.2f}); fit at start "
          f"{t_fit:.0f} ms for {len(site)} cases")


if __name__ == "__main__":
    main()

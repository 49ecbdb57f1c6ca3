"""Benchmark of the multimodal MoE model on the synthetic federation (pooled training).

    python benchmarks/bench_model.py [--work /tmp/mm_bench] [--sites 4] [--seed 0] [--md out.md]

Generates the default synthetic federation (synth), loads each site with the hospital node's data
layer, splits cases with hospital_node.splits.split_of, trains the fused MoE model, the three
single-modality models and the dense late-fusion baseline with the same loop and config, and
reports AUC per modality combination, the Bayes-optimal AUC from the generator's truth, expert
load, latency (2 threads, one patient) with FLOPs, and training time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from multimodal.config import ModelConfig, TrainConfig
from multimodal.data import PreparedCase
from multimodal.evaluate import EvalReport, evaluate, fit_model_temperature
from multimodal.metrics import auc
from multimodal.model import FedsightModel, build_model
from multimodal.train import as_batch, train_local


def load_federation(work: Path, n_sites: int, seed: int, cfg: ModelConfig,
                    sizes: tuple[int, ...] | None = None
                    ) -> tuple[dict[str, list[PreparedCase]], Path]:
    from hospital_node.dataset import load_site
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = work / "federation"
    if not fed.is_dir() or not any(fed.glob("*/labels.csv")):
        summary = generate(SynthConfig.default(n_sites, seed, sizes=sizes), fed, workers=1)
        print("generated:", json.dumps({k: summary[k] for k in ("total_cases", "oracle_auc")}))
    sites = {}
    for root in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        loaded = load_site(root, cfg.inputs, work / "cache")
        sites[loaded.site_id] = loaded.cases
    return sites, fed


def bayes_auc(fed: Path, cases: list[PreparedCase]) -> float:
    from synth.truth import load_truth

    truth: dict[str, dict] = {}
    probs, ys = [], []
    for c in cases:
        if c.site_id not in truth:
            truth[c.site_id] = load_truth(fed, c.site_id)
        t = truth[c.site_id].get(c.case_id)
        if t is not None and c.label is not None:
            probs.append(t.bayes_prob)
            ys.append(c.label)
    return auc(np.array(ys), np.array(probs))


def latency(model: FedsightModel, case: PreparedCase, runs: int = 60) -> dict[str, float]:
    """Median/p95 ms of forward and forward+backward for one patient, all modalities."""
    b = as_batch(model, [case])
    model.eval()
    res = {}
    with torch.no_grad():
        for _ in range(10):
            model(b)
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            model(b)
            ts.append(time.perf_counter() - t)
    res["fwd_median_ms"], res["fwd_p95_ms"] = (np.median(ts) * 1e3, np.percentile(ts, 95) * 1e3)
    ct = b.ct.clone().requires_grad_(True)  # what an attribution map costs: grad w.r.t. input
    for _ in range(5):
        model.forward_tensors(ct, b.ct_present, b.path, b.path_present, b.ehr, b.ehr_observed,
                              b.ehr_present).logit.sum().backward()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = model.forward_tensors(ct, b.ct_present, b.path, b.path_present, b.ehr,
                                    b.ehr_observed, b.ehr_present)
        out.logit.sum().backward()
        ts.append(time.perf_counter() - t)
    res["fwdbwd_median_ms"], res["fwdbwd_p95_ms"] = (np.median(ts) * 1e3,
                                                     np.percentile(ts, 95) * 1e3)
    with FlopCounterMode(display=False) as fc:
        model(b)
    res["fwd_gflops"] = fc.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as fc:
        model(b).logit.sum().backward()
    res["fwdbwd_gflops"] = fc.get_total_flops() / 1e9
    # implied floor: the FLOPs at a measured large-matmul throughput of this CPU (2 threads)
    a = torch.randn(1024, 1024)
    for _ in range(3):
        a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    gflops_s = 10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
    res["cpu_matmul_gflops_s"] = gflops_s
    res["fwd_floor_ms"] = res["fwd_gflops"] / gflops_s * 1e3
    res["fwdbwd_floor_ms"] = res["fwdbwd_gflops"] / gflops_s * 1e3
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mm_bench"))
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--sizes", default=None, help="patients per site, e.g. 150,150,150,150 "
                    "(default: synth's default federation, ~250 patients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override TrainConfig.epochs")
    ap.add_argument("--only", default="fused,ct,path,ehr,late,ct-meanhead,path-meanhead,"
                    "ehr-meanhead", help="models to train")
    ap.add_argument("--model-seeds", default="0", help="comma-separated training seeds (model "
                    "init, batches, dropout); the split stays fixed by --seed. Reports mean and "
                    "spread; per-combination tables come from the first seed")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--md", type=Path, default=None, help="also write the results here")
    ap.add_argument("--faithfulness", action="store_true",
                    help="score the CT maps of the first seed's fused and CT-only models on the "
                    "malignant test cases with a known lesion (benchmarks/faithfulness_cases.py)")
    ap.add_argument("--tolerance-mm", type=float, default=15.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hospital_node.splits import split_of

    mcfg = ModelConfig()
    tcfg = TrainConfig(seed=args.seed)
    if args.epochs is not None:
        tcfg = tcfg.replace(epochs=args.epochs)
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    sites, fed = load_federation(args.work, args.sites, args.seed, mcfg, sizes)
    train, val, test = [], [], {}
    for sid, cases in sites.items():
        for c in cases:
            if split_of(c.case_id, args.seed) == "test":
                test.setdefault(sid, []).append(c)
            elif split_of(c.case_id, args.seed + 1, 0.2) == "test":
                val.append(c)  # temperature scaling only
            else:
                train.append(c)
    n_test = sum(len(v) for v in test.values())
    print(f"cases: train {len(train)}, val {len(val)}, test {n_test}; sites {sorted(sites)}")
    all_test = [c for v in test.values() for c in v]
    out: dict[str, object] = {"n_train": len(train), "n_val": len(val), "n_test": n_test,
                              "bayes_auc_test": bayes_auc(fed, all_test),
                              "train_config": tcfg.to_dict()}
    print(f"Bayes-optimal AUC on the test cases: {out['bayes_auc_test']:.3f}")
    variants = {
        "fused": mcfg,
        "ct": mcfg.replace(modalities=("ct",)),
        "path": mcfg.replace(modalities=("path",)),
        "ehr": mcfg.replace(modalities=("ehr",)),
        "late": mcfg.replace(fusion="late"),
        # single-modality baselines with the other head readout too: each baseline is reported
        # with its better readout (conservative for the fused model's claimed gain)
        "ct-meanhead": mcfg.replace(modalities=("ct",), head_readout="mean"),
        "path-meanhead": mcfg.replace(modalities=("path",), head_readout="mean"),
        "ehr-meanhead": mcfg.replace(modalities=("ehr",), head_readout="mean"),
    }
    reports: dict[str, EvalReport] = {}
    models: dict[str, FedsightModel] = {}
    model_seeds = [int(x) for x in args.model_seeds.split(",")]
    per_seed: dict[str, list[dict[str, float]]] = {}
    for ms in model_seeds:
        for name in args.only.split(","):
            model = build_model(variants[name], seed=ms)
            res = train_local(model, train, tcfg.replace(seed=ms))
            fit_model_temperature(model, val)
            rep = evaluate(model, test)
            if ms == model_seeds[0]:
                reports[name], models[name] = rep, model
                out[f"train_minutes_{name}"] = res.seconds / 60
            p = rep.row("pooled", "available")
            combo = name.split("-")[0] if name.split("-")[0] in variants["fused"].modalities \
                else "ct+path+ehr"
            r3 = rep.row("pooled", combo)
            per_seed.setdefault(name, []).append(
                {"seed": ms, "auc_available": p.auc, f"auc_{combo}": r3.auc if r3 else math.nan,
                 "minutes": res.seconds / 60, **rep.expert_summary})
            print(f"[{name} seed {ms}] trained {res.seconds / 60:.2f} min ({res.steps} steps); "
                  f"pooled test AUC {p.auc:.3f}, T={model.temperature:.2f}", flush=True)
    out["per_seed"] = per_seed
    if len(model_seeds) > 1:
        print("\n## Over model seeds", model_seeds, "(pooled test AUC, mean / min / max)\n")
        for name, rows in per_seed.items():
            for key in [k for k in rows[0] if k.startswith("auc_")]:
                v = np.array([r[key] for r in rows])
                print(f"{name:6s} {key:18s} mean {v.mean():.3f}  min {v.min():.3f}  "
                      f"max {v.max():.3f}")
        singles = {n: float(np.mean([r["auc_available"] for r in rows]))
                   for n, rows in per_seed.items() if n not in ("fused", "late")}
        if singles and "fused" in per_seed:
            best = max(singles, key=lambda n: singles[n])
            fused_mean = float(np.mean([r["auc_available"] for r in per_seed["fused"]]))
            print(f"best single-modality model (mean over seeds, either head readout): {best} "
                  f"{singles[best]:.3f}; fused {fused_mean:.3f} "
                  f"({fused_mean - singles[best]:+.3f})")
        if "fused" in per_seed and "late" in per_seed:
            d = [f["auc_available"] - lt["auc_available"]
                 for f, lt in zip(per_seed["fused"], per_seed["late"], strict=True)]
            print(f"fused - late (available), per seed: {[round(x, 3) for x in d]}")
    summary: dict[str, float] = {}
    for name, rep in reports.items():
        combo = name.split("-")[0] if name.split("-")[0] in mcfg.modalities else "ct+path+ehr"
        r = rep.row("pooled", combo)
        summary[f"{name}_auc_{combo}"] = r.auc if r else float("nan")
        r = rep.row("pooled", "available")
        summary[f"{name}_auc_available"] = r.auc if r else float("nan")
    out["summary"] = summary
    if "fused" in reports:
        fused = reports["fused"]
        out["fused_report"] = json.loads(fused.to_json())
        print("\n## Fused MoE model, test split\n")
        print(fused.to_markdown())
        load = fused.expert_load["all"]
        print("\nexpert share per block (x1/16):",
              [[round(s * 16, 2) for s in blk] for blk in load])
    if "late" in reports:
        print("\n## Late fusion baseline, pooled\n")
        print("\n".join(ln for ln in reports["late"].to_markdown().splitlines()
                        if ln.startswith("| pooled") or ln.startswith("| site")))
    print("\nsummary:", json.dumps({k: round(v, 3) for k, v in summary.items()}))
    if not args.skip_latency and "fused" in models:
        case = next(c for c in all_test if len(c.modalities()) == 3)
        lat = latency(models["fused"], case)
        out["latency"] = lat
        print(f"latency (threads={args.threads}):", json.dumps({k: round(v, 2)
                                                                   for k, v in lat.items()}))
    if args.faithfulness:
        from faithfulness_cases import faithfulness_report, lesion_cases

        lcases = lesion_cases(fed, all_test)
        out["faithfulness"] = {}
        for name in [n for n in ("fused", "ct", "ct-meanhead") if n in models]:
            print(f"\n## CT-map faithfulness, {name} model, {len(lcases)} malignant test cases "
                  "with a known lesion", flush=True)
            out["faithfulness"][name] = faithfulness_report(models[name], lcases,
                                                            args.tolerance_mm)
    if args.md:
        args.md.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Federated (per-expert and FedAvg, Flower simulation runtime) vs pooled vs local-only, per
hospital, on (a) the default synthetic federation and (b) UCI heart disease as four EHR-only
hospitals (FLamby Fed-Heart-Disease preprocessing). Also bytes per hospital per round and wall
time per round (from the model store's metadata).

    python benchmarks/bench_federated.py --out bench-out [--rounds 5] [--only synthetic|heart]
        [--seeds 0,1,2]

With several seeds (synthetic only) each seed is its own generated federation, split and training
seed; the targets are then checked per hospital on the mean over seeds (a 31-44-case test split
moves AUC by ~0.07 between draws, far more than the 0.02 margin).

Pooled / local-only baselines train with the same code (multimodal.train.train_local) and the
same epoch budget (rounds x local epochs) on the same fixed train/test split (hospital_node.splits).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEART_FILES = {"cleveland": "processed.cleveland.data", "hungarian": "processed.hungarian.data",
               "switzerland": "processed.switzerland.data", "va": "processed.va.data"}
HEART_COLS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
              "oldpeak", "slope", "ca", "thal", "num"]
FLAMBY = {"pooled_accuracy": 0.776, "fedavg_accuracy": 0.654}


def _missing(cell: str) -> bool:
    """UCI marks a missing value with '?' (cleveland, hungarian) or 'NaN' (switzerland, va)."""
    return cell.strip().lower() in ("?", "nan", "")


def write_heart_sites(src: Path, out: Path) -> dict[str, int]:
    """FLamby preprocessing: drop slope/ca/thal, then rows with a missing value; label num > 0."""
    keep = HEART_COLS[:10]
    sizes = {}
    for centre, name in HEART_FILES.items():
        rows = [r for r in csv.reader((src / name).read_text().splitlines()) if r]
        site = out / centre
        site.mkdir(parents=True, exist_ok=True)
        kept = [r for r in rows if not any(_missing(r[i]) for i in (*range(10), 13))]
        with (site / "ehr.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", *keep])
            for i, r in enumerate(kept):
                w.writerow([f"{centre}-{i:04d}", *[r[j] for j in range(10)]])
        with (site / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "label"])
            for i, r in enumerate(kept):
                w.writerow([f"{centre}-{i:04d}", int(float(r[13]) > 0)])
        (site / "site.json").write_text(json.dumps({"site_id": centre,
                                                    "ehr_schema": "uci-heart"}))
        sizes[centre] = len(kept)
    return sizes


def site_split(fed: Path, model_cfg: Any, seed: int) -> dict[str, Any]:
    from hospital_node.task import NodeSettings, site_data

    out = {}
    for site in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        node = NodeSettings(site, cache_dir=fed.parent / "cache" / site.name)
        out[site.name] = site_data(node, model_cfg.inputs, seed)
    return out


def fit_and_score(model_cfg: Any, train_cases: list, tests: dict[str, list], epochs: int,
                  stage1: int, seed: int) -> dict[str, dict[str, float]]:
    import torch

    from multimodal.config import TrainConfig
    from multimodal.evaluate import predict_logits
    from multimodal.metrics import auc, threshold_metrics
    from multimodal.model import build_model
    from multimodal.train import train_local

    model = build_model(model_cfg, seed=seed)
    train_local(model, train_cases, TrainConfig(epochs=epochs, stage1_epochs=stage1, seed=seed))
    scores = {}
    for name, cases in tests.items():
        if not cases:
            continue
        logits, labels = predict_logits(model, cases)
        p, y = torch.sigmoid(logits).numpy(), labels.numpy()
        scores[name] = {"auc": auc(y, p), "accuracy": threshold_metrics(y, p)["accuracy"],
                        "n": len(cases)}
    return scores


def stats(values: list[float]) -> dict[str, float]:
    """median / p95 / n of a list of timings (nearest-rank p95)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"median": statistics.median(v), "p95": v[min(len(v) - 1, math.ceil(0.95 * len(v)) - 1)],
            "n": len(v)}


def federated(fed: Path, work: Path, model_json: str, rounds: int, epochs: int,
              aggregation: str, seed: int, runtime: str = "simulation") -> dict[str, Any]:
    import time

    from coordinator.store import ModelStore
    from ops.cluster import local_deployment, simulate
    from ops.flwr_cli import submit_run, wait_run

    tag = f"{runtime}-{aggregation}"
    store = work / f"store-{tag}"
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))
    cfg = {"num-rounds": rounds, "local-epochs": epochs, "aggregation": aggregation,
           "store-dir": str(store), "model-json": model_json, "seed": seed, "min-hospitals": 2,
           "run-name": f"bench-{tag}"}
    t0 = time.monotonic()
    if runtime == "simulation":
        cfg.update({"federation-dir": str(fed), "cache-dir": str(fed.parent / "cache")})
        status = simulate(work / f"coord-{tag}", cfg, len(sites), cpus_per_node=1).status
    else:  # one SuperLink + one SuperNode process per hospital on 127.0.0.1
        with local_deployment(work / f"coord-{tag}", sites, fed.parent / "cache") as (home, _):
            t_up = time.monotonic() - t0
            status = wait_run(home, submit_run(REPO, home, cfg), timeout=6 * 3600)
    seconds = time.monotonic() - t0
    versions = ModelStore(store).list_versions()
    if status != "finished:completed" or not versions:
        return {"status": status, "seconds": seconds}
    last = versions[-1].meta
    per_round_bytes = {h: {"down": [v.meta["bytes"][h]["down"] for v in versions
                                    if h in v.meta["bytes"]],
                           "up": [v.meta["bytes"][h]["up"] for v in versions
                                  if h in v.meta["bytes"]]} for h in last["bytes"]}
    out = {"status": status, "seconds": seconds, "runtime": runtime,
           "per_hospital": last["metrics"]["hospitals"], "pooled": last["metrics"]["pooled"],
           "round_seconds": [v.meta["round_seconds"] for v in versions],
           "round_seconds_stats": stats([v.meta["round_seconds"] for v in versions]),
           "bytes_per_round": {h: {k: statistics.median(x) for k, x in b.items() if x}
                               for h, b in per_round_bytes.items()},
           "model_bytes": last["model_bytes"]}
    if runtime == "deployment":
        out["startup_seconds"] = t_up
    return out


def benchmark(fed: Path, work: Path, model_json: str, rounds: int, epochs: int, seed: int,
              runtimes: tuple[str, ...] = ("simulation",)) -> dict[str, Any]:
    from multimodal.config import ModelConfig

    model_cfg = ModelConfig.from_dict(json.loads(model_json))
    splits = site_split(fed, model_cfg, seed)
    tests = {s: d.test for s, d in splits.items()}
    budget = rounds * epochs
    result: dict[str, Any] = {"sizes": {s: {"train": len(d.train), "test": len(d.test)}
                                        for s, d in splits.items()}}
    result["pooled"] = fit_and_score(model_cfg, [c for d in splits.values() for c in d.train],
                                     tests, budget, epochs, seed)
    result["local"] = {s: fit_and_score(model_cfg, d.train, {s: d.test}, budget, epochs,
                                        seed).get(s, {}) for s, d in splits.items()}
    for agg in ("per-expert", "examples"):
        result[f"federated-{agg}"] = federated(fed, work, model_json, rounds, epochs, agg, seed)
    if "deployment" in runtimes:
        result["deployment-per-expert"] = federated(fed, work, model_json, rounds, epochs,
                                                    "per-expert", seed, runtime="deployment")
    return result


def timing_lines(res: dict[str, Any]) -> str:
    lines = []
    for key in ("federated-per-expert", "federated-examples", "deployment-per-expert"):
        r = res.get(key)
        if not r or "round_seconds_stats" not in r:
            if r:
                lines.append(f"{key}: {r.get('status')}")
            continue
        st = r["round_seconds_stats"]
        down = [b.get("down", 0) for b in r["bytes_per_round"].values()]
        up = [b.get("up", 0) for b in r["bytes_per_round"].values()]
        lines.append(
            f"{key}: wall per round median {st['median']:.1f} s, p95 {st['p95']:.1f} s "
            f"({st['n']} rounds; first round includes worker start-up); bytes per hospital per "
            f"round down {statistics.median(down) / 1e6:.2f} MB, up "
            f"{statistics.median(up) / 1e6:.2f} MB (model {r['model_bytes'] / 1e6:.2f} MB); "
            f"whole run {r['seconds']:.0f} s")
    return "\n".join(lines)


def target_lines(res: dict[str, Any], metric: str = "auc") -> str:
    """Issue 4 targets, per hospital: federated >= pooled - 0.02 and >= local-only + 0.03."""
    lines = []
    fed = res["federated-per-expert"].get("per_hospital", {})
    for s in sorted(res["sizes"]):
        f = (fed.get(s) or {}).get(metric)
        p = res["pooled"].get(s, {}).get(metric)
        loc = res["local"].get(s, {}).get(metric)
        if any(v is None or not math.isfinite(v) for v in (f, p, loc)):
            lines.append(f"{s}: n/a (federated {f}, pooled {p}, local {loc})")
            continue
        lines.append(f"{s}: federated {f:.3f} vs pooled {p:.3f} (target >= {p - 0.02:.3f}: "
                     f"{_verdict(f - (p - 0.02))}); vs local {loc:.3f} (target >= "
                     f"{loc + 0.03:.3f}: {_verdict(f - (loc + 0.03))})")
    return "\n".join(lines)


ARMS = ("pooled", "local", "federated-per-expert", "federated-examples")


def arm_scores(res: dict[str, Any], metric: str = "auc") -> dict[str, dict[str, float]]:
    """arm -> hospital -> metric, from one benchmark() result (NaN where undefined)."""
    def get(arm: str, s: str) -> float:
        if arm == "pooled":
            v = res["pooled"].get(s, {}).get(metric)
        elif arm == "local":
            v = res["local"].get(s, {}).get(metric)
        else:
            v = res.get(arm, {}).get("per_hospital", {}).get(s, {}).get(metric)
        return float(v) if v is not None else math.nan
    return {arm: {s: get(arm, s) for s in sorted(res["sizes"])} for arm in ARMS}


def seed_summary(results: dict[int, dict[str, Any]], metric: str = "auc") -> dict[str, Any]:
    """Mean / min / max over seeds per arm and hospital, and the issue-4 targets on the means."""
    per = {seed: arm_scores(r, metric) for seed, r in results.items()}
    sites = sorted({s for p in per.values() for s in p["pooled"]})
    out: dict[str, Any] = {"seeds": sorted(results), "arms": {}, "targets": {}}
    for arm in ARMS:
        out["arms"][arm] = {}
        for s in sites:
            v = [p[arm][s] for p in per.values() if math.isfinite(p[arm].get(s, math.nan))]
            out["arms"][arm][s] = ({"mean": statistics.fmean(v), "min": min(v), "max": max(v),
                                    "n": len(v)} if v else {"n": 0})
    for s in sites:
        f, p, loc = (out["arms"][a][s].get("mean") for a in
                     ("federated-per-expert", "pooled", "local"))
        if None in (f, p, loc):
            continue
        out["targets"][s] = {"federated": f, "pooled": p, "local": loc,
                             "vs_pooled": f - (p - 0.02), "vs_local": f - (loc + 0.03)}
    return out


def _verdict(margin: float) -> str:
    return "met" if margin >= 0 else f"missed by {-margin:.3f}"


def seed_summary_lines(summ: dict[str, Any]) -> str:
    arms = summ["arms"]
    sites = sorted(arms["pooled"])
    lines = [f"Mean [min, max] over seeds {summ['seeds']}:",
             f"| hospital | {' | '.join(ARMS)} |", "|---" * (len(ARMS) + 1) + "|"]
    for s in sites:
        cells = []
        for a in ARMS:
            c = arms[a][s]
            cells.append(f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]" if c["n"]
                         else "n/a")
        lines.append(f"| {s} | {' | '.join(cells)} |")
    for s, t in summ["targets"].items():
        lines.append(f"{s}: federated {t['federated']:.3f} vs pooled {t['pooled']:.3f} "
                     f"({_verdict(t['vs_pooled'])}); vs local {t['local']:.3f} "
                     f"({_verdict(t['vs_local'])})")
    return "\n".join(lines)


def table(res: dict[str, Any], metric: str) -> str:
    sites = sorted(res["sizes"])
    cols = ["pooled", "local", "federated-per-expert", "federated-examples"]
    lines = [f"| hospital | n train/test | {' | '.join(cols)} |",
             "|---" * (len(cols) + 2) + "|"]
    for s in sites:
        vals = [res["pooled"].get(s, {}).get(metric), res["local"].get(s, {}).get(metric),
                res["federated-per-expert"].get("per_hospital", {}).get(s, {}).get(metric),
                res["federated-examples"].get("per_hospital", {}).get(s, {}).get(metric)]
        cells = ["n/a" if v is None or (isinstance(v, float) and not math.isfinite(v))
                 else f"{v:.3f}" for v in vals]
        n = res["sizes"][s]
        lines.append(f"| {s} | {n['train']}/{n['test']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> int:
    from vocab.offline import enforce_offline

    enforce_offline()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="synthetic: comma-separated seeds, each its own generated federation, "
                    "split and training seed; targets checked on the per-hospital mean")
    ap.add_argument("--only", choices=["synthetic", "heart"], default=None)
    ap.add_argument("--heart-dir", type=Path, default=REPO.parent / "shared/data/heart-disease")
    ap.add_argument("--sizes", default=None,
                    help="synthetic patients per site, e.g. 150,150,150,150 (default: synth's "
                    "default federation; its 15-22-case test splits make per-hospital AUC noisy)")
    ap.add_argument("--deployment", action="store_true",
                    help="also run per-expert on the deployment runtime (synthetic only)")
    args = ap.parse_args()
    out = args.out.resolve()
    report: dict[str, Any] = {}
    if args.only in (None, "heart"):
        fed = out / "heart" / "federation"
        report["heart_sizes"] = write_heart_sites(args.heart_dir, fed)
        model_json = json.dumps({"modalities": ["ehr"], "inputs": {"ehr_schema": "uci-heart"}})
        report["heart"] = benchmark(fed, out / "heart", model_json, args.rounds, args.epochs,
                                    args.seed)
        report["heart"]["flamby"] = FLAMBY
        print("UCI heart disease (4 EHR-only hospitals), accuracy (FLamby: pooled 0.776, "
              "FedAvg 0.654):\n" + table(report["heart"], "accuracy") + "\nAUC:\n" +
              table(report["heart"], "auc") + "\n" + timing_lines(report["heart"]), flush=True)
    if args.only in (None, "synthetic"):
        from synth.config import SynthConfig
        from synth.federation import generate

        sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
        runtimes = ("simulation", "deployment") if args.deployment else ("simulation",)
        by_seed: dict[int, dict[str, Any]] = {}
        for seed in seeds:
            # the single-seed layout (out/synthetic) stays as before; extra seeds get their own
            work = out / ("synthetic" if len(seeds) == 1 else f"synthetic-seed{seed}")
            fed = work / "federation"
            if not (fed / "federation.json").exists():
                generate(SynthConfig.default(n_sites=4, seed=seed, sizes=sizes), fed)
            by_seed[seed] = benchmark(fed, work, "{}", args.rounds, args.epochs, seed, runtimes)
            print(f"Synthetic federation (seed {seed}), AUC:\n" + table(by_seed[seed], "auc") +
                  "\n" + target_lines(by_seed[seed]) + "\n" + timing_lines(by_seed[seed]),
                  flush=True)
        report["synthetic"] = by_seed[seeds[0]] if len(seeds) == 1 else by_seed
        if len(seeds) > 1:
            report["synthetic_over_seeds"] = seed_summary(by_seed)
            print(seed_summary_lines(report["synthetic_over_seeds"]), flush=True)
    (out / "bench_federated.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out / 'bench_federated.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Federated (per-expert and FedAvg, Flower simulation runtime) vs pooled vs local-only, per
hospital, on (a) the default synthetic federation and (b) UCI heart disease as four EHR-only
hospitals (FLamby Fed-Heart-Disease preprocessing). Also bytes per hospital per round and wall
time per round (from the model store's metadata).

    python benchmarks/bench_federated.py --out bench-out [--rounds 5] [--only synthetic|heart]

Pooled / local-only baselines train with the same code (multimodal.train.train_local) and the
same epoch budget (rounds x local epochs) on the same fixed train/test split (hospital_node.splits).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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


def write_heart_sites(src: Path, out: Path) -> dict[str, int]:
    """FLamby preprocessing: drop slope/ca/thal, then rows with a missing value; label num > 0."""
    keep = HEART_COLS[:10]
    sizes = {}
    for centre, name in HEART_FILES.items():
        rows = [r for r in csv.reader((src / name).read_text().splitlines()) if r]
        site = out / centre
        site.mkdir(parents=True, exist_ok=True)
        kept = [r for r in rows if all(r[i].strip() != "?" for i in range(10)) and r[13] != "?"]
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


def federated(fed: Path, work: Path, model_json: str, rounds: int, epochs: int,
              aggregation: str, seed: int) -> dict[str, Any]:
    from coordinator.launch import simulate
    from coordinator.store import ModelStore

    store = work / f"store-{aggregation}"
    cfg = {"num-rounds": rounds, "local-epochs": epochs, "aggregation": aggregation,
           "federation-dir": str(fed), "cache-dir": str(fed.parent / "cache"),
           "store-dir": str(store), "model-json": model_json, "seed": seed, "min-hospitals": 2,
           "run-name": f"bench-{aggregation}"}
    n_sites = len([p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")])
    res = simulate(work / f"coord-{aggregation}", cfg, n_sites, cpus_per_node=1.0)
    versions = ModelStore(store).list_versions()
    if res.status != "finished:completed" or not versions:
        return {"status": res.status}
    last = versions[-1].meta
    return {"status": res.status, "seconds": res.seconds,
            "per_hospital": last["metrics"]["hospitals"], "pooled": last["metrics"]["pooled"],
            "round_seconds": [v.meta["round_seconds"] for v in versions],
            "bytes_per_round": last["bytes"], "model_bytes": last["model_bytes"]}


def benchmark(fed: Path, work: Path, model_json: str, rounds: int, epochs: int, seed: int
              ) -> dict[str, Any]:
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
    return result


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
    ap.add_argument("--only", choices=["synthetic", "heart"], default=None)
    ap.add_argument("--heart-dir", type=Path, default=REPO.parent / "shared/data/heart-disease")
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
        print("UCI heart disease (4 EHR-only hospitals), accuracy:\n" +
              table(report["heart"], "accuracy") + "\nAUC:\n" + table(report["heart"], "auc"))
    if args.only in (None, "synthetic"):
        from synth.config import SynthConfig
        from synth.federation import generate

        fed = out / "synthetic" / "federation"
        if not (fed / "federation.json").exists():
            generate(SynthConfig.default(n_sites=4, seed=args.seed), fed)
        report["synthetic"] = benchmark(fed, out / "synthetic", "{}", args.rounds, args.epochs,
                                        args.seed)
        print("Synthetic default federation, AUC:\n" + table(report["synthetic"], "auc"))
    (out / "bench_federated.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out / 'bench_federated.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

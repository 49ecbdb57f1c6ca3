"""Federated temperature scaling on synthetic federations (the demo's and seeds nobody tuned on).

    python benchmarks/bench_calibration.py --out .fedsight/bench-cal --seeds 0,21 --rounds 6

Per seed: a federation of --sites x --patients hospitals (generator seed), --rounds federated
rounds on Flower's simulation runtime (as `fedsight demo`), then for the last version (the one
the demo promotes): T, each hospital's ECE before (T = 1) and after (cross-fitted), pooled; and
a central check computed here from the stored model on every held-out case (ECE at T = 1 and at
the stored T, 10 equal-width bins of the probability of malignancy; in-sample for T).
Results: <out>/bench_calibration.json and a markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vocab.offline import enforce_offline

enforce_offline()


def central_ece(version_path: Path, fed: Path, cache: Path, seed: int) -> dict[str, float]:
    import numpy as np
    import torch

    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.calibration import N_BINS, ece_of_bins
    from multimodal.checkpoint import load_checkpoint
    from multimodal.evaluate import predict_logits

    model = load_checkpoint(version_path / "model.pt").eval()
    xs, ys, sites = [], [], []
    for site in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        cases = load_site(site, model.cfg.inputs, cache / site.name).cases
        test = [c for c in cases if split_of(c.case_id, seed) == "test"]
        x, y = predict_logits(model, test)
        xs.append(x)
        ys.append(y)
        sites.append(site.name)
    per_site_p = [torch.sigmoid(x.double() / model.temperature).numpy() for x in xs]
    x, y = torch.cat(xs).double(), torch.cat(ys).double().numpy()

    def ece(p: np.ndarray, labels: np.ndarray) -> float:
        b = np.minimum((p * N_BINS).astype(int), N_BINS - 1)
        return ece_of_bins(np.stack([np.bincount(b, minlength=N_BINS),
                                     np.bincount(b, weights=p, minlength=N_BINS),
                                     np.bincount(b, weights=labels, minlength=N_BINS)], axis=1))

    out = {name: ece(torch.sigmoid(x / t).numpy(), y)
           for name, t in (("central_ece_t1", 1.0), ("central_ece_t", model.temperature))}
    # The ECE a perfectly calibrated model would show on as many cases: labels drawn from
    # its own probabilities (mean over 500 draws). Below it, ECE differences are noise.
    rng = np.random.default_rng(0)

    def floor(p: np.ndarray) -> float:
        return float(np.mean([ece(p, (rng.random(len(p)) < p).astype(float))
                              for _ in range(500)]))

    out["ece_floor"] = floor(torch.sigmoid(x / model.temperature).numpy())
    out["site_floor"] = {s: floor(p) for s, p in zip(sites, per_site_p, strict=True)}
    return out


def one_seed(out: Path, seed: int, sites: int, patients: int, rounds: int) -> dict[str, Any]:
    from coordinator.store import ModelStore
    from ops.cluster import simulate
    from synth.config import SynthConfig
    from synth.federation import generate

    root = out / f"seed{seed}"
    fed = root / "federation"
    if not (fed / "federation.json").exists():
        generate(SynthConfig.default(n_sites=sites, seed=seed, sizes=(patients,) * sites), fed)
    store_dir = (root / "store").resolve()
    if not ModelStore(store_dir).list_versions():
        res = simulate(root / "coordinator", {
            "num-rounds": rounds, "federation-dir": str(fed.resolve()),
            "cache-dir": str((root / "cache").resolve()), "store-dir": str(store_dir),
            "run-name": f"cal{seed}"}, num_nodes=sites, cpus_per_node=1)
        print(f"seed {seed}: run {res.status} in {res.seconds:.0f} s", flush=True)
    last = ModelStore(store_dir).list_versions()[-1]
    cal = last.meta.get("calibration") or {}
    row = {"seed": seed, "version": last.id, "round": last.meta.get("round"),
           "auc": (last.meta["metrics"].get("pooled") or {}).get("auc"), "calibration": cal}
    row.update(central_ece(last.path, fed, root / "cache", 0))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| generator seed | hospital | held-out n | ECE before (T = 1) | ECE after "
             "(cross-fitted) | ECE of a calibrated model by chance (simulated) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cal = r["calibration"]
        if not cal:
            lines.append(f"| {r['seed']} | (no fit) | | | |")
            continue
        floors = {**r["site_floor"], "**pooled**": r["ece_floor"]}
        for h, e in [*sorted(cal["hospitals"].items()), ("**pooled**", cal["pooled"])]:
            lines.append(f"| {r['seed']} (T = {cal['temperature']:.2f}, AUC {r['auc']:.3f}) | "
                         f"{h} | {int(e['n'])} | {e['ece_before']:.3f} | {e['ece_after']:.3f} "
                         f"| {floors.get(h, float('nan')):.3f} |")
        lines.append(f"| {r['seed']} | central check (in-sample T) | {int(cal['n'])} | "
                     f"{r['central_ece_t1']:.3f} | {r['central_ece_t']:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".fedsight/bench-cal"))
    ap.add_argument("--seeds", default="0,21")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--patients", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [one_seed(args.out, int(s), args.sites, args.patients, args.rounds)
            for s in args.seeds.split(",")]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (args.out / "bench_calibration.json").write_text(json.dumps(
        {"machine": machine, "rows": rows}, indent=2))
    print(f"machine: {machine}")
    print(markdown(rows))


if __name__ == "__main__":
    main()

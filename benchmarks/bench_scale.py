"""Scale benchmark (issue 12): 10, 30 and 100 virtual hospitals on Flower's simulation runtime
(Ray backend, `ops.cluster.simulate`), and the two transport levers against the fp32 update.

    .venv/bin/python benchmarks/bench_scale.py --out DIR [--hospitals 10,30,100]
        [--fraction 0.2] [--rounds 3] [--levers-at 10] [--lever-rounds 4] [--seed 21]

Each federation: N synthetic hospitals of 20-60 patients (sizes drawn with the seed; site
profiles of the generator - scanner, noise, stain, prevalence, missing modalities - cycle as in
`synth.config`), the default model. Each round samples `fraction` of the hospitals for training
and the same fraction for evaluation (Flower's FedAvg sampling). Per round, from the store:
wall time, bytes down/up per sampled hospital; per run: pooled held-out AUC of the evaluated
hospitals after the last round, and the peak resident memory (VmHWM, sampled from /proc every
0.2 s) of the coordinator's simulation process and of the largest process that ran hospitals
(a Ray worker runs many hospitals one after another). The levers (vocab.transport: float16
transport, sparse experts, both) are compared with the fp32 run at `--levers-at` hospitals with
every hospital training and evaluated every round (fraction 1: no sampling noise between arms;
local training is seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakMemory:
    """Peak VmHWM (kB) of processes whose command line matches, sampled from /proc."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peaks = every, {"coordinator": 0, "hospital": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kind(cmdline: str) -> str | None:
        if "ray::" in cmdline or "default_worker.py" in cmdline:
            return "hospital"
        if "flwr-simulation" in cmdline or "flower-simulation" in cmdline:
            return "coordinator"
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    kind = self._kind(cmd)
                    if kind is None:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[kind] = max(self.peaks[kind], int(line.split()[1]))
                except (OSError, ValueError):
                    continue
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def federation(out: Path, n: int, seed: int) -> Path:
    import numpy as np

    from synth.config import SynthConfig
    from synth.federation import generate

    fed = out / f"federation-{n}"
    if not (fed / "federation.json").exists():
        sizes = tuple(int(x) for x in np.random.default_rng(seed + n).integers(20, 61, n))
        generate(SynthConfig.default(n_sites=n, seed=seed, sizes=sizes), fed)
    return fed


def one_run(fed: Path, work: Path, name: str, n: int, fraction: float, rounds: int,
            seed: int, transport: str, sparse: bool) -> dict[str, Any]:
    from coordinator.store import ModelStore
    from ops.cluster import simulate

    store = work / f"store-{name}"
    cfg = {"num-rounds": rounds, "local-epochs": 1, "seed": seed, "store-dir": str(store),
           "run-name": name, "min-hospitals": 2, "fraction-train": fraction,
           "fraction-evaluate": fraction, "federation-dir": str(fed),
           "cache-dir": str(fed.parent / f"cache-{n}"), "transport": transport,
           "sparse-experts": sparse}
    t0 = time.monotonic()
    with PeakMemory() as mem:
        status = simulate(work / f"coord-{name}", cfg, n, cpus_per_node=1,
                          timeout=4 * 3600).status
    seconds = time.monotonic() - t0
    versions = ModelStore(store).list_versions()
    if status != "finished:completed" or not versions:
        return {"arm": name, "status": status, "seconds": seconds}
    rounds_s = [v.meta["round_seconds"] for v in versions]
    down = [b["down"] for v in versions for b in v.meta["bytes"].values() if b["up"] > 0]
    up = [b["up"] for v in versions for b in v.meta["bytes"].values() if b["up"] > 0]
    sampled = [sum(1 for b in v.meta["bytes"].values() if b["up"] > 0) for v in versions]
    last = versions[-1].meta
    return {"arm": name, "status": status, "hospitals": n, "seconds": seconds,
            "sampled_per_round": statistics.median(sampled),
            "round_seconds": rounds_s, "round_seconds_median": statistics.median(rounds_s),
            "round_seconds_p95": sorted(rounds_s)[max(0, round(0.95 * len(rounds_s)) - 1)],
            "bytes_down_median": statistics.median(down), "bytes_up_median": statistics.median(up),
            "auc": (last["metrics"].get("pooled") or {}).get("auc"),
            "evaluated": len(last["metrics"].get("hospitals") or {}),
            "peak_coordinator_mb": mem.peaks["coordinator"] / 1024,
            "peak_hospital_process_mb": mem.peaks["hospital"] / 1024}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| arm | hospitals | trained per round | round s median / p95 | s per trained "
           "hospital | MB down / up per trained hospital per round | pooled AUC (hospitals "
           "evaluated) | peak MB coordinator / hospital process |", "|---|---|---|---|---|---|---|"
           "---|"]
    for r in rows:
        if r.get("status") != "finished:completed":
            out.append(f"| {r['arm']} | failed: {r.get('status')} |  |  |  |  |  |  |")
            continue
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}"
        out.append(
            f"| {r['arm']} | {r['hospitals']} | {r['sampled_per_round']:g} | "
            f"{r['round_seconds_median']:.1f} / {r['round_seconds_p95']:.1f} | "
            f"{r['round_seconds_median'] / max(r['sampled_per_round'], 1):.2f} | "
            f"{r['bytes_down_median'] / 1e6:.2f} / {r['bytes_up_median'] / 1e6:.2f} | "
            f"{auc} ({r['evaluated']}) | {r['peak_coordinator_mb']:.0f} / "
            f"{r['peak_hospital_process_mb']:.0f} |")
    return "\n".join(out)


def main() -> int:
    from vocab.offline import enforce_offline

    enforce_offline()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    ap.add_argument("--hospitals", default="10,30,100")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levers-at", type=int, default=10)
    ap.add_argument("--lever-rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=21)
    args = ap.parse_args()
    out = args.out.resolve()
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.hospitals.split(",")):
        t0 = time.monotonic()
        fed = federation(out, n, args.seed)
        print(f"federation of {n}: {time.monotonic() - t0:.0f} s to generate", flush=True)
        arms = [(f"{n}-fp32", args.fraction, args.rounds, "fp32", False)]
        if n == args.levers_at:
            arms += [(f"{n}-all-{label}", 1.0, args.lever_rounds, transport, sparse)
                     for label, transport, sparse in (
                         ("fp32", "fp32", False), ("fp16", "fp16", False),
                         ("sparse-experts", "fp32", True), ("fp16+sparse", "fp16", True))]
        for name, fraction, rounds, transport, sparse in arms:
            r = one_run(fed, out, name, n, fraction, rounds, args.seed, transport, sparse)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n" + table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

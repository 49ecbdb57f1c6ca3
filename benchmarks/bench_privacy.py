"""Privacy-utility benchmark (issue 12): pooled and per-hospital AUC with DP-SGD at every
hospital at epsilon about 1, 3 and 8 (delta 1e-5) against no DP, and the wall-time overhead.

    .venv/bin/python benchmarks/bench_privacy.py --out DIR [--data synthetic,heart]
        [--seed 13] [--sizes 100,100,100,100] [--rounds 4] [--epochs 2] [--targets 1,3,8]

The run is the real coordinator (coordinator.runner.run_federated: Flower's Strategy.start, our
hooks, screening, aggregation, the model store) and the real ClientApp functions (DP-SGD,
ledger) joined in-process by bench_poisoning's Grid (no attack). For each target epsilon the
noise multiplier is the one Opacus's `get_noise_multiplier` gives for the *median* hospital's
training set over the whole run (every round, stage 1 included); each hospital's actual epsilon
(its ledger's, smaller hospitals spend more) is read from the stored version. Ledgers are fresh
per arm (a new cache folder). The synthetic federation's seed was not used for any choice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DELTA = 1e-5
HEART_MODEL = json.dumps({"modalities": ["ehr"], "inputs": {"ehr_schema": "uci-heart"}})


def train_sizes(fed: Path, model_json: str, seed: int) -> dict[str, int]:
    from bench_federated import site_split

    from multimodal.config import ModelConfig

    split = site_split(fed, ModelConfig.from_dict(json.loads(model_json)), seed)
    return {s: len(d.train) for s, d in split.items()}


def noise_for(target: float, n: int, batch: int, rounds: int, epochs: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    from multimodal.dp import plan

    p = plan(n, batch, rounds * epochs, 1.0)
    return float(get_noise_multiplier(target_epsilon=target, target_delta=DELTA,
                                      sample_rate=p.sample_rate, steps=p.steps,
                                      accountant="rdp"))


def secure_grid(sites: list[Path], cache: Path, seed: int) -> Any:
    """bench_poisoning's in-process Grid, but every message goes through the whole ClientApp
    (its mods: Flower's secaggplus_mod for the SecAgg+ stages), as a SuperNode would."""
    from bench_poisoning import InProcessGrid
    from flwr.app import Error, Message

    class SecureInProcessGrid(InProcessGrid):
        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list:
            import uuid

            from flwr.common.serde import message_from_proto, message_to_proto

            from hospital_node.client_app import app

            replies = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                wire = message_from_proto(message_to_proto(msg))  # each node its own copy
                try:
                    replies.append(app(wire, self.contexts[msg.metadata.dst_node_id]))
                except Exception as e:  # noqa: BLE001 - what a SuperNode reports
                    replies.append(Message(error=Error(code=0, reason=repr(e)), reply_to=wire))
            return replies

    return SecureInProcessGrid(sites, cache, "clean", None, seed)


def one_arm(fed: Path, work: Path, name: str, model_json: str, noise: float, clip: float,
            rounds: int, epochs: int, seed: int, secure: bool = False) -> dict[str, Any]:
    from bench_poisoning import InProcessGrid
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.runner import run_federated
    from coordinator.settings import RunSettings
    from coordinator.store import ModelStore

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    store_dir, cache = work / f"store-{name}", work / f"cache-{name}"
    for d in (store_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    cfg = {"num-rounds": rounds, "local-epochs": epochs, "seed": seed,
           "store-dir": str(store_dir), "run-name": name, "min-hospitals": 2,
           "model-json": model_json, "dp-noise-multiplier": noise,
           "dp-max-grad-norm": clip if noise > 0 else 0.0, "secure-aggregation": secure}
    grid = secure_grid(sites, cache, seed) if secure else \
        InProcessGrid(sites, cache, "clean", None, seed)
    t0 = time.monotonic()
    run_federated(grid, RunSettings.from_run_config(cfg))  # type: ignore[arg-type]
    seconds = time.monotonic() - t0
    store = ModelStore(store_dir)
    versions = store.list_versions()
    last = versions[-1].meta if versions else {}
    metrics = last.get("metrics", {})
    eps = {h: v.get("epsilon") for h, v in
           ((last.get("privacy") or {}).get("hospitals") or {}).items()}
    (run,) = store.list_runs()
    rejected = sum(o["outcome"] != "accepted" for r in run["rounds"]
                   for o in r["hospitals"].values())
    train_s = sum(float(t.get("train-seconds", 0.0)) for v in versions
                  for t in ((v.meta.get("metrics") or {}).get("train") or {}).values())
    return {"arm": name, "noise_multiplier": noise, "seconds": seconds, "train_seconds": train_s,
            "auc": (metrics.get("pooled") or {}).get("auc"),
            "per_hospital": {h: m.get("auc") for h, m in (metrics.get("hospitals") or {}).items()},
            "epsilon": eps, "rounds_stored": len(versions), "rejected_hospital_rounds": rejected}


def table(rows: list[dict[str, Any]]) -> str:
    hospitals = sorted({h for r in rows for h in r["per_hospital"]})
    head = ("| arm | noise multiplier | epsilon per hospital (delta 1e-5) | pooled AUC | "
            + " | ".join(hospitals) + " | rejected | run seconds (x no-dp) | local training "
            "seconds, all hospitals (x no-dp) |")
    out = [head, "|" + "---|" * (8 + len(hospitals) - 1)]
    base = next((r for r in rows if r["arm"] == "no-dp"), None)

    def f(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    for r in rows:
        eps = ", ".join(f"{v:.2f}" if v is not None else "none" for _, v in
                        sorted(r["epsilon"].items())) or "-"
        run_x = f" (x{r['seconds'] / base['seconds']:.1f})" if base else ""
        train = "n/a (not reported under SecAgg+)" if not r["train_seconds"] else \
            f"{r['train_seconds']:.0f}" + (f" (x{r['train_seconds'] / base['train_seconds']:.1f})"
                                            if base and base["train_seconds"] else "")
        out.append(f"| {r['arm']} | {r['noise_multiplier']:.3f} | {eps} | {f(r['auc'])} | "
                   + " | ".join(f(r["per_hospital"].get(h)) for h in hospitals)
                   + f" | {r['rejected_hospital_rounds']} | {r['seconds']:.0f}{run_x} | {train} |")
    return "\n".join(out)


def main() -> int:
    from vocab.offline import enforce_offline

    enforce_offline()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/privacy"))
    ap.add_argument("--data", default="synthetic,heart")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--sizes", default="100,100,100,100")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--targets", default="1,3,8")
    ap.add_argument("--secure-target", type=float, default=3.0,
                    help="also run no DP and this target epsilon with SecAgg+ (0: skip)")
    ap.add_argument("--heart-dir", type=Path, default=REPO.parent / "shared/data/heart-disease")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    for data in args.data.split(","):
        work = args.out.resolve() / data
        fed = work / "federation"
        if data == "heart":
            from bench_federated import write_heart_sites

            if not args.heart_dir.is_dir():
                print(f"skip heart: {args.heart_dir} not found", flush=True)
                continue
            write_heart_sites(args.heart_dir, fed)
            model_json = HEART_MODEL
        else:
            from synth.config import SynthConfig
            from synth.federation import generate

            if not (fed / "federation.json").exists():
                sizes = tuple(int(x) for x in args.sizes.split(","))
                generate(SynthConfig.default(n_sites=4, seed=args.seed, sizes=sizes), fed)
            model_json = "{}"
        sizes = train_sizes(fed, model_json, args.seed)
        median_n = int(statistics.median(sizes.values()))
        one_arm(fed, work, "warm-up", model_json, 0.0, args.clip, 1, 1, args.seed)  # imports,
        # first-use costs: not part of any arm's time
        rows = [one_arm(fed, work, "no-dp", model_json, 0.0, args.clip, args.rounds,
                        args.epochs, args.seed)]
        print(json.dumps(rows[-1]), flush=True)
        for target in (float(t) for t in args.targets.split(",")):
            noise = noise_for(target, median_n, args.batch, args.rounds, args.epochs)
            rows.append(one_arm(fed, work, f"eps~{target:g}", model_json, noise, args.clip,
                                args.rounds, args.epochs, args.seed))
            print(json.dumps(rows[-1]), flush=True)
        if args.secure_target > 0:
            noise = noise_for(args.secure_target, median_n, args.batch, args.rounds, args.epochs)
            for name, sigma in (("no-dp+secagg", 0.0),
                                (f"eps~{args.secure_target:g}+secagg", noise)):
                rows.append(one_arm(fed, work, name, model_json, sigma, args.clip, args.rounds,
                                    args.epochs, args.seed, secure=True))
                print(json.dumps(rows[-1]), flush=True)
        report[data] = {"train_sizes": sizes, "rows": rows}
        print(f"\n{data} (train sizes {sizes}):\n{table(rows)}\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Poisoning benchmark (issue 11): one of four synthetic hospitals is malicious; does screening
(coordinator.screening) keep the final pooled AUC within 0.02 of the clean run, and is every
attacking round flagged in the store with its reason?

    .venv/bin/python benchmarks/bench_poisoning.py --out DIR [--seeds 11,12] [--rounds 4]
        [--attacks clean,sign-flip-x1,...] [--robust none,median] [--min-cosine 0.0]

The run is the real coordinator (coordinator.runner.run_federated: Flower's Strategy.start, our
hooks, screening, per-expert aggregation, the model store) and the real ClientApp functions
(hospital_node.client_app train/evaluate/query) joined by an in-process Grid instead of a
SuperLink, so that the attacker's reply can be rewritten between the two. Attacks (hospital 0):

- sign-flip-x1 / sign-flip-x10: sends global - k x (its honest update);
- noise: Gaussian noise with 3 x the norm of its honest update, in place of the update;
- nan: its honest update with NaN in one array;
- label-flip: trains honestly on its data with every label flipped (it evaluates on the true
  labels, so the pooled AUC still scores its patients);
- free-rider: sends the global model back unchanged with its honest metrics;
- absent (a reference, not an attack): hospital 0 never sends an update (its training replies
  fail) but is still evaluated. No defence that leaves the attacker out can beat this arm: in
  this non-IID federation its data is worth several AUC points to the others.

Targets (issue 11): |pooled AUC(attack) - pooled AUC(clean)| <= 0.02 and the attacker rejected
in every round of every attack; the clean run reports how often honest hospitals were rejected.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTACKS = ("clean", "absent", "sign-flip-x1", "sign-flip-x10", "noise", "nan", "label-flip",
           "free-rider")
ATTACKER = 0  # index of the malicious hospital (sorted site folders)


def _update(arrays: dict[str, np.ndarray], glob: dict[str, np.ndarray],
            fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """fn(local, global) on floating arrays; integer buffers as sent."""
    return {k: fn(v, glob[k]).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in arrays.items()}


def poison(attack: str, local: dict[str, np.ndarray], glob: dict[str, np.ndarray],
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    if attack.startswith("sign-flip-x"):
        k = float(attack.removeprefix("sign-flip-x"))
        return _update(local, glob, lambda lo, g: g - k * (lo - g))
    if attack == "noise":
        sq = sum(float(np.sum((local[k].astype(np.float64) - g) ** 2))
                 for k, g in glob.items() if np.issubdtype(g.dtype, np.floating))
        d = sum(g.size for g in glob.values() if np.issubdtype(g.dtype, np.floating))
        sigma = 3.0 * np.sqrt(sq / max(d, 1))
        return _update(local, glob, lambda lo, g: g + rng.normal(0.0, sigma, g.shape))
    if attack == "nan":
        out = dict(local)
        key = next(k for k, v in out.items() if np.issubdtype(v.dtype, np.floating))
        out[key] = np.full_like(out[key], np.nan)
        return out
    if attack == "free-rider":
        return {k: g.copy() for k, g in glob.items()}
    return local  # clean, label-flip (its poison is in the data)


def flipped_copy(site: Path, out: Path) -> Path:
    """The site with every label flipped (0 <-> 1); the original is not touched."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(site, out)
    rows = list(csv.reader((site / "labels.csv").read_text().splitlines()))
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        for r in rows[1:]:
            w.writerow([r[0], str(1 - int(r[1])), *r[2:]])
    return out


class InProcessGrid:
    """A Flower Grid whose nodes are the ClientApp's functions in this process (the hooks only
    use get_node_ids and send_and_receive; ids are set as every Flower grid sets them)."""

    def __init__(self, sites: list[Path], cache: Path, attack: str, flipped: Path | None,
                 seed: int) -> None:
        from flwr.app import Context, RecordDict

        self.sites, self.attack, self.flipped = sites, attack, flipped
        self.dump: Path | None = None
        self.rng = np.random.default_rng(seed)
        self.contexts = {i + 10: Context(1, i + 10, {"data-dir": str(s),
                                                     "cache-dir": str(cache / s.name)},
                                         RecordDict(), {}) for i, s in enumerate(sites)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        from flwr.app import Error, Message

        from hospital_node import client_app

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            attacker = node == ATTACKER + 10 and self.attack != "clean"
            kind = msg.metadata.message_type
            if attacker and kind == "train" and self.flipped is not None:
                ctx.node_config["data-dir"] = str(self.flipped)  # trains on flipped labels
            try:
                if attacker and kind == "train" and self.attack == "absent":
                    raise client_app.NodeTaskError("fedsight-node: train failed (Absent)")
                handler = {"train": client_app.train, "evaluate": client_app.evaluate,
                           "query": client_app.query}[kind]
                reply = handler(msg, ctx)
            except client_app.NodeTaskError as e:
                reply = Message(error=Error(code=0, reason=str(e)), reply_to=msg)
            finally:
                ctx.node_config["data-dir"] = str(self.sites[node - 10])
            if kind == "train" and not reply.has_error():
                from coordinator.strategy import from_numpy, to_numpy

                glob = to_numpy(msg.content["arrays"])
                local = to_numpy(reply.content["arrays"])
                if attacker:
                    local = poison(self.attack, local, glob, self.rng)
                    reply.content["arrays"] = from_numpy(local)
                if self.dump is not None:  # updates for offline analysis of screening rules
                    rnd = int(msg.content["config"]["server-round"])
                    np.savez(self.dump / f"r{rnd}-{self.sites[node - 10].name}.npz",
                             **{k: (v.astype(np.float32) - glob[k].astype(np.float32))
                                for k, v in local.items()
                                if np.issubdtype(v.dtype, np.floating)})
            replies.append(reply)
        return replies


def one_run(fed: Path, work: Path, attack: str, robust: str, rounds: int, epochs: int,
            seed: int, min_cosine: float | None, dump: bool = False) -> dict[str, Any]:
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.runner import run_federated
    from coordinator.settings import RunSettings
    from coordinator.store import ModelStore

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    flipped = flipped_copy(sites[ATTACKER], work / "flipped" / sites[ATTACKER].name) \
        if attack == "label-flip" else None
    store_dir = work / f"store-{attack}-{robust}"
    shutil.rmtree(store_dir, ignore_errors=True)
    cfg: dict[str, Any] = {"num-rounds": rounds, "local-epochs": epochs, "seed": seed,
                           "store-dir": str(store_dir), "run-name": attack,
                           "robust-aggregation": robust, "min-hospitals": 2}
    if min_cosine is not None:
        cfg["screen-min-cosine"] = min_cosine
    grid = InProcessGrid(sites, work / "cache", attack, flipped, seed)
    if dump:
        grid.dump = work / f"updates-{attack}-{robust}"
        grid.dump.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run_federated(grid, RunSettings.from_run_config(cfg))  # type: ignore[arg-type]
    seconds = time.monotonic() - t0
    store = ModelStore(store_dir)
    (run,) = store.list_runs()
    attacker = sites[ATTACKER].name
    versions = store.list_versions()
    last = versions[-1].meta if versions else {}
    metas = {v.id: v.meta for v in versions}
    per_round = [{h: (o["outcome"], round(float(
        ((metas.get(r["version"] or "") or {}).get("screening", {}).get(h) or {}).get("cosine")
        or float("nan")), 3)) for h, o in r["hospitals"].items()}
        | {"_reason": r["hospitals"].get(attacker, {}).get("reason", "")}
        for r in run["rounds"]]
    flagged = [r["hospitals"].get(attacker, {}).get("outcome") in ("rejected", "dropped")
               for r in run["rounds"]]
    honest_rejected = sum(o["outcome"] != "accepted" for r in run["rounds"]
                          for h, o in r["hospitals"].items() if h != attacker)
    return {"attack": attack, "robust": robust, "seconds": seconds,
            "auc": (last.get("metrics", {}).get("pooled") or {}).get("auc"),
            "rounds_flagged": sum(flagged), "rounds": len(flagged),
            "honest_rejections": honest_rejected, "per_round": per_round}


def main() -> int:
    from vocab.offline import enforce_offline

    enforce_offline()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/poisoning"))
    ap.add_argument("--seeds", default="11")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sizes", default=None, help="patients per site, e.g. 80,80,80,80")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--robust", default="none")
    ap.add_argument("--min-cosine", type=float, default=None)
    ap.add_argument("--dump-updates", action="store_true",
                    help="save every round's updates (local - global) as .npz under --out")
    args = ap.parse_args()
    from synth.config import SynthConfig
    from synth.federation import generate

    results: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        work = args.out.resolve() / f"seed{seed}"
        fed = work / "federation"
        if not (fed / "federation.json").exists():
            sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
            generate(SynthConfig.default(n_sites=4, seed=seed, sizes=sizes), fed)
        for robust in args.robust.split(","):
            ref: dict[str, float | None] = {}
            for attack in args.attacks.split(","):
                r = one_run(fed, work, attack, robust, args.rounds, args.epochs, seed,
                            args.min_cosine, args.dump_updates)
                r["seed"] = seed
                if attack in ("clean", "absent"):
                    ref[attack] = r["auc"]
                for base in ("clean", "absent"):
                    have = ref.get(base)
                    r[f"vs_{base}"] = None if have is None or r["auc"] is None \
                        else r["auc"] - have
                results.append(r)
                print(json.dumps(r), flush=True)
    print("\n| seed | robust | attack | pooled AUC | vs clean | vs absent | attacker flagged | "
          "honest rejections | seconds |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = ["" if r[k] is None else f"{r[k]:+.3f}" for k in ("vs_clean", "vs_absent")]
        flag = "-" if r["attack"] in ("clean", "absent") else \
            f"{r['rounds_flagged']}/{r['rounds']}"
        print(f"| {r['seed']} | {r['robust']} | {r['attack']} | {r['auc']:.3f} | {vs[0]} | "
              f"{vs[1]} | {flag} | {r['honest_rejections']} | {r['seconds']:.0f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

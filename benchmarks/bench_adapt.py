"""Learning curves for adapting a federated model to a new task (multimodal.adapt).

    python benchmarks/bench_adapt.py [--work /tmp/bench_adapt] [--seed 11]
        [--sizes 320,90,90,90] [--base federated|pooled] [--rounds 6] [--local-epochs 2]
        [--ns 10,25,50,100,200] [--draws 5] [--methods scratch,full,head,lora]
        [--out /tmp/bench_adapt.json] [--plot docs/img/adapt_learning_curves.png]

Generates a synthetic federation with a second disease (synth, tasks nodule + fibrosis), trains
the base on the FIRST task (nodule) over all sites - a real Flower simulation via
bench_federated.federated, or with --base pooled one train_local on the pooled nodule training
cases - then, for each n and draw, adapts the base to fibrosis from n fibrosis-labelled cases of
site_a's training split (stratified, nested over n within a draw) by every method, and scores
fibrosis AUC on a fixed test set: site_a's held-out split plus every case of the other sites.
"auc_unseen" also scores only the held-out split of every site, i.e. cases the base never trained
on. Reports mean / std / min / max over draws, the Bayes-optimal AUC (generator truth) as the
ceiling, and the sample-efficiency ratio: the n scratch needs to reach LoRA's mean AUC at n=50,
over 50 (linear interpolation in log n). Quick smoke run:
    python benchmarks/bench_adapt.py --work /tmp/ba-smoke --sizes 60,20,20,20 --rounds 2 \
        --local-epochs 1 --ns 10,25 --draws 1 --methods head,lora --epochs 4 --plot ''
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

NEW_TASK = "fibrosis"
ANCHOR_N = 50  # the ratio's reference point: LoRA's mean AUC at 50 labelled cases


def make_federation(work: Path, seed: int, sizes: tuple[int, ...]) -> tuple[Path, dict[str, Any]]:
    """The federation under work/federation (reused when complete), and its generator summary."""
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = work / "federation"
    summary_path = work / "generator_summary.json"
    if not (fed / "federation.json").exists() or not summary_path.exists():
        t0 = time.perf_counter()
        summary = generate(SynthConfig.default(len(sizes), seed, sizes=sizes,
                                               tasks=("nodule", NEW_TASK)), fed, workers=1)
        summary["generate_seconds"] = time.perf_counter() - t0
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return fed, json.loads(summary_path.read_text())


def site_roots(fed: Path) -> list[Path]:
    return sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))


def load_task_cases(fed: Path, task: str, inputs: Any) -> dict[str, list[Any]]:
    """site -> labelled cases of `task`, sorted by case id (the order draws index into)."""
    from hospital_node.dataset import load_site

    out = {}
    for root in site_roots(fed):
        loaded = load_site(root, inputs, fed.parent / "cache" / root.name, task=task)
        out[loaded.site_id] = sorted((c for c in loaded.cases if c.label is not None),
                                     key=lambda c: c.case_id)
    return out


def federated_base(fed: Path, work: Path, rounds: int, epochs: int, seed: int
                   ) -> tuple[Any, dict[str, Any]]:
    """The last version of a real Flower simulation (per-expert aggregation) on the first task."""
    from bench_federated import federated

    from coordinator.store import ModelStore
    from multimodal.checkpoint import load_checkpoint

    res = federated(fed, work, "{}", rounds, epochs, "per-expert", seed)
    if res.get("status") != "finished:completed":
        raise RuntimeError(f"federated base run ended {res.get('status')!r} after "
                           f"{res.get('seconds', 0):.0f} s; try --base pooled")
    last = ModelStore(work / "store-simulation-per-expert").list_versions()[-1]
    info = {"kind": "federated", "aggregation": "per-expert", "rounds": rounds,
            "local_epochs": epochs, "seconds": res["seconds"], "version": last.id,
            "nodule_auc_pooled_heldout": (res.get("pooled") or {}).get("auc"),
            "round_seconds": res.get("round_seconds")}
    return load_checkpoint(last.model_path), info


def pooled_base(cases: dict[str, list[Any]], rounds: int, epochs: int, seed: int
                ) -> tuple[Any, dict[str, Any]]:
    """Fallback: one model on the pooled nodule training split, the same epoch budget."""
    from hospital_node.splits import split_of
    from multimodal.config import ModelConfig, TrainConfig
    from multimodal.model import build_model
    from multimodal.train import train_local

    train = [c for v in cases.values() for c in v if split_of(c.case_id, seed) == "train"]
    model = build_model(ModelConfig(), seed=seed)
    res = train_local(model, train, TrainConfig(epochs=rounds * epochs, stage1_epochs=epochs,
                                                seed=seed))
    return model.eval(), {"kind": "pooled", "epochs": rounds * epochs, "stage1_epochs": epochs,
                          "seconds": res.seconds, "n_train": len(train)}


def nested_draw(pool: list[Any], ns: list[int], draw: int, seed: int) -> dict[int, list[Any]]:
    """n -> n cases of the pool, stratified (the pool's prevalence, >= 2 of each class) and
    nested (a draw's smaller sets are prefixes of its larger ones, per class)."""
    rng = np.random.default_rng([seed, draw])
    pos = [c for c in pool if c.label == 1]
    neg = [c for c in pool if c.label == 0]
    pos = [pos[i] for i in rng.permutation(len(pos))]
    neg = [neg[i] for i in rng.permutation(len(neg))]
    prev = len(pos) / len(pool)
    out = {}
    for n in ns:
        k = min(len(pos), max(2, round(n * prev)))
        if n - k > len(neg) or n - k < 2:
            raise ValueError(f"n={n}: pool of {len(pool)} ({len(pos)} positive) too small")
        out[n] = pos[:k] + neg[:n - k]
    return out


def test_auc(model: Any, cases: list[Any]) -> np.ndarray:
    import torch

    from multimodal.evaluate import predict_logits

    with torch.no_grad():
        logits, _ = predict_logits(model, cases)
    return torch.sigmoid(logits).numpy()


def bayes_probs(fed: Path, cases: list[Any], task: str) -> np.ndarray:
    from synth.truth import load_truth

    truth: dict[str, Any] = {}
    out = []
    for c in cases:
        if c.site_id not in truth:
            truth[c.site_id] = load_truth(fed, c.site_id)
        out.append(truth[c.site_id][c.case_id].tasks[task]["bayes_prob"])
    return np.array(out)


def summarise(runs: list[dict[str, Any]], key: str = "auc") -> dict[str, dict[int, dict]]:
    """method -> n -> mean/std/min/max/draws of `key` over draws."""
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        out.setdefault(r["method"], {}).setdefault(r["n"], {"v": []})["v"].append(r[key])
    for per_n in out.values():
        for n, d in per_n.items():
            v = np.array(d.pop("v"))
            per_n[n] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1
                        else 0.0, "min": float(v.min()), "max": float(v.max()), "draws": len(v)}
    return out


def n_to_reach(curve: dict[int, dict], target: float) -> tuple[float | None, str]:
    """The first n where the mean curve reaches target, linear in log n between grid points.
    (None, why) if it is reached below the grid or never within it."""
    ns = sorted(curve)
    m = [curve[n]["mean"] for n in ns]
    if m[0] >= target:
        return None, f"<= {ns[0]}"
    for i in range(1, len(ns)):
        if m[i] >= target:
            f = (target - m[i - 1]) / (m[i] - m[i - 1])
            return math.exp(math.log(ns[i - 1]) + f * (math.log(ns[i]) - math.log(ns[i - 1]))), ""
    return None, f"> {ns[-1]}"


def ratio_report(summ: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Issue targets: scratch needs >= 3x LoRA's labels (at LoRA's n=50 AUC); LoRA@50 >= full@50."""
    out: dict[str, Any] = {}
    lora, scratch, full = summ.get("lora", {}), summ.get("scratch", {}), summ.get("full", {})
    if ANCHOR_N in lora and scratch:
        target = lora[ANCHOR_N]["mean"]
        n_star, why = n_to_reach(scratch, target)
        out["lora_at_50"] = target
        out["scratch_n_to_reach"] = n_star if n_star is not None else why
        if n_star is not None:
            out["ratio"] = n_star / ANCHOR_N
            out["ratio_text"] = f"{n_star / ANCHOR_N:.2f}"
            out["ratio_target_met"] = n_star / ANCHOR_N >= 3
        else:
            bound = float(why.split()[1]) / ANCHOR_N
            out["ratio_text"] = f"{why.split()[0]} {bound:g}"
            out["ratio_target_met"] = why.startswith(">") and bound >= 3
    if ANCHOR_N in lora and ANCHOR_N in full:
        out["full_at_50"] = full[ANCHOR_N]["mean"]
        out["lora_minus_full_at_50"] = lora[ANCHOR_N]["mean"] - full[ANCHOR_N]["mean"]
        out["lora_vs_full_target_met"] = out["lora_minus_full_at_50"] >= 0
    return out


def table(summ: dict[str, dict[int, dict]], methods: list[str], ns: list[int],
          bayes: float, where: str = "the test set") -> str:
    lines = ["| n | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in ns:
        cells = []
        for m in methods:
            c = summ.get(m, {}).get(n)
            cells.append(f"{c['mean']:.3f} ± {c['std']:.3f} [{c['min']:.3f}, {c['max']:.3f}]"
                         if c else "n/a")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(f"\nBayes-optimal fibrosis AUC on {where} (ceiling): {bayes:.3f}")
    return "\n".join(lines)


def plot(summ: dict[str, dict[int, dict]], methods: list[str], bayes: float, zero_shot: float,
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        ns = sorted(summ.get(m, {}))
        if not ns:
            continue
        mean = np.array([summ[m][n]["mean"] for n in ns])
        lo = mean - np.array([summ[m][n]["min"] for n in ns])
        hi = np.array([summ[m][n]["max"] for n in ns]) - mean
        x = np.array(ns) * (1 + 0.03 * (i - (len(methods) - 1) / 2))  # dodge the bars
        ax.errorbar(x, mean, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.axhline(bayes, ls="--", color="k", lw=1, label=f"Bayes-optimal ({bayes:.3f})")
    ax.axhline(zero_shot, ls=":", color="grey", lw=1,
               label=f"base nodule score, 0 labels ({zero_shot:.3f})")
    ax.set_xscale("log")
    all_ns = sorted({n for m in summ.values() for n in m})
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.set_xlabel("labelled fibrosis cases (site_a)")
    ax.set_ylabel("test AUC (fibrosis)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_adapt"),
                    help="federation, caches and model store (reused when present)")
    ap.add_argument("--seed", type=int, default=11, help="generator, split and base seed")
    ap.add_argument("--sizes", default="320,90,90,90", help="patients per site, site_a first")
    ap.add_argument("--base", choices=["federated", "pooled"], default="federated")
    ap.add_argument("--rounds", type=int, default=6, help="base: federated rounds")
    ap.add_argument("--local-epochs", type=int, default=2, help="base: local epochs per round "
                    "(pooled base: rounds x local epochs)")
    ap.add_argument("--ns", default="10,25,50,100,200", help="labelled cases per adaptation")
    ap.add_argument("--draws", type=int, default=5, help="draws of the labelled cases per n "
                    "(draw d also seeds the adaptation)")
    ap.add_argument("--methods", default="scratch,full,head,lora")
    ap.add_argument("--epochs", type=int, default=None, help="override AdaptConfig.epochs "
                    "(head/lora)")
    ap.add_argument("--full-epochs", type=int, default=None, help="override "
                    "AdaptConfig.full_epochs (full/scratch)")
    ap.add_argument("--budget-min", type=float, default=0.0, help="stop starting new draws "
                    "once another would end past this many minutes of grid time (0: no limit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_adapt.json"),
                    help="raw results (JSON), rewritten after every run; a run already in it "
                    "(same settings) is not repeated")
    ap.add_argument("--plot", default=str(REPO / "docs/img/adapt_learning_curves.png"),
                    help="learning-curve PNG ('' for none)")
    args = ap.parse_args(argv)

    import torch

    from hospital_node.splits import split_of
    from multimodal.adapt import AdaptConfig, adapt
    from multimodal.config import ModelConfig
    from multimodal.metrics import auc
    from vocab.offline import enforce_offline

    enforce_offline()
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    sizes = tuple(int(x) for x in args.sizes.split(","))
    ns = [int(x) for x in args.ns.split(",")]
    methods = args.methods.split(",")
    acfg_over: dict[str, Any] = {}
    if args.epochs is not None:
        acfg_over["epochs"] = args.epochs
    if args.full_epochs is not None:
        acfg_over["full_epochs"] = args.full_epochs
    settings = AdaptConfig(**acfg_over).to_dict()
    settings.pop("method")
    settings.pop("seed")

    fed, gen = make_federation(work, args.seed, sizes)
    inputs = ModelConfig().inputs
    new_cases = load_task_cases(fed, NEW_TASK, inputs)
    first = sorted(new_cases)[0]
    pool = [c for c in new_cases[first] if split_of(c.case_id, args.seed) == "train"]
    test = [c for c in new_cases[first] if split_of(c.case_id, args.seed) == "test"]
    test += [c for s in sorted(new_cases) if s != first for c in new_cases[s]]
    unseen = np.array([split_of(c.case_id, args.seed) == "test" for c in test])
    y = np.array([c.label for c in test])
    bayes_p = bayes_probs(fed, test, NEW_TASK)
    bayes = auc(y, bayes_p)
    print(f"federation seed {args.seed}, sizes {sizes}: generated in "
          f"{gen.get('generate_seconds', float('nan')):.0f} s; {first} training pool "
          f"{len(pool)} ({sum(c.label for c in pool)} positive); test {len(test)} "
          f"({int(y.sum())} positive, {int(unseen.sum())} held out at every site); Bayes AUC "
          f"{bayes:.3f} (held out only {auc(y[unseen], bayes_p[unseen]):.3f})", flush=True)

    base_path = work / f"base-{args.base}.pt"
    if base_path.exists():
        from multimodal.checkpoint import load_checkpoint

        base = load_checkpoint(base_path)
        base_info = json.loads(base_path.with_suffix(".json").read_text())
    else:
        from multimodal.checkpoint import save_checkpoint

        if args.base == "federated":
            base, base_info = federated_base(fed, work, args.rounds, args.local_epochs,
                                             args.seed)
        else:
            base, base_info = pooled_base(load_task_cases(fed, "nodule", inputs), args.rounds,
                                          args.local_epochs, args.seed)
        save_checkpoint(base, base_path)
        base_path.with_suffix(".json").write_text(json.dumps(base_info, indent=2, default=str))
    base.eval()
    print("base:", json.dumps(base_info, default=str), flush=True)
    # zero labels: the base's own nodule probability read as a fibrosis score (the diseases share
    # a latent factor in the generator), the floor an adapted model should clear
    zero_shot = auc(y, test_auc(base, test))
    print(f"base nodule score as the fibrosis score (zero labels): test AUC {zero_shot:.3f}")

    header = {"generator_seed": args.seed, "sizes": sizes, "base": base_info,
              "adapt_settings": settings, "threads": args.threads, "ns": ns,
              "methods": methods, "pool": len(pool), "pool_pos": sum(c.label for c in pool),
              "test": len(test), "test_pos": int(y.sum()), "test_unseen": int(unseen.sum()),
              "bayes_auc_test": bayes, "bayes_auc_unseen": auc(y[unseen], bayes_p[unseen]),
              "oracle_auc_tasks": gen.get("oracle_auc_tasks"),
              "generate_seconds": gen.get("generate_seconds")}
    runs: list[dict[str, Any]] = []
    if args.out.exists():
        old = json.loads(args.out.read_text())
        same = all(old.get(k) == json.loads(json.dumps(v, default=str))
                   for k, v in header.items() if k not in ("methods", "ns", "threads"))
        if same:  # only this invocation's grid is kept (and summarised)
            runs = [r for r in old.get("runs", []) if r["method"] in methods and r["n"] in ns
                    and r["draw"] < args.draws]
            print(f"resuming: {len(runs)} run(s) from {args.out}")
    done = {(r["method"], r["n"], r["draw"]) for r in runs}

    def save() -> dict[str, Any]:
        summ = summarise(runs)
        doc = {**header, "zero_shot_nodule_score_auc": zero_shot,
               "draws_done": sorted({r["draw"] for r in runs}), "runs": runs,
               "summary": summ, "summary_unseen": summarise(runs, "auc_unseen"),
               "ratio": ratio_report(summ)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, default=str))
        return doc

    t_grid = time.perf_counter()
    draw_seconds: list[float] = []
    for d in range(args.draws):
        if args.budget_min and draw_seconds:
            elapsed = time.perf_counter() - t_grid
            if elapsed + max(draw_seconds) > args.budget_min * 60:
                print(f"budget: stopping after {d} draw(s) ({elapsed / 60:.1f} min)", flush=True)
                break
        t_draw = time.perf_counter()
        sets = nested_draw(pool, ns, d, args.seed)
        for n in ns:
            for m in methods:
                if (m, n, d) in done:
                    continue
                res = adapt(base, sets[n], NEW_TASK, AdaptConfig(method=m, seed=d, **acfg_over))
                p = test_auc(res.model, test)
                runs.append({"method": m, "n": n, "draw": d, "n_pos": sum(c.label
                                                                         for c in sets[n]),
                             "auc": auc(y, p), "auc_unseen": auc(y[unseen], p[unseen]),
                             "seconds": res.seconds, "threads": args.threads})
                print(f"draw {d} n {n:3d} {m:7s} AUC {runs[-1]['auc']:.3f} (held out only "
                      f"{runs[-1]['auc_unseen']:.3f}) {res.seconds:6.1f} s", flush=True)
                save()
        draw_seconds.append(time.perf_counter() - t_draw)
    doc = save()
    summ = doc["summary"]
    print(f"\n## Fibrosis test AUC, mean ± std [min, max] over draws {doc['draws_done']}\n")
    print(table(summ, methods, ns, bayes))
    print("\nheld out at every site only (cases the base never trained on):")
    print(table(doc["summary_unseen"], methods, ns, header["bayes_auc_unseen"],
                "these cases"))
    r = doc["ratio"]
    if "ratio_text" in r:
        print(f"\nsample-efficiency ratio (n scratch needs for LoRA@{ANCHOR_N} = "
              f"{r['lora_at_50']:.3f}, / {ANCHOR_N}): {r['ratio_text']} -> target >= 3 "
              f"{'met' if r['ratio_target_met'] else 'missed'}")
    if "full_at_50" in r:
        print(f"LoRA@{ANCHOR_N} {r['lora_at_50']:.3f} vs full@{ANCHOR_N} {r['full_at_50']:.3f} "
              f"({r['lora_minus_full_at_50']:+.3f}) -> target LoRA >= full "
              f"{'met' if r['lora_vs_full_target_met'] else 'missed'}")
    secs = {m: [x["seconds"] for x in runs if x["method"] == m and x["n"] == max(ns)]
            for m in methods}
    print(f"seconds per run at n={max(ns)}:",
          {m: round(float(np.median(v)), 1) for m, v in secs.items() if v})
    if args.plot:
        plot(summ, methods, bayes, zero_shot, Path(args.plot),
             f"fibrosis from a {base_info['kind']} nodule base; synth seed {args.seed},\n"
             f"sizes {','.join(map(str, sizes))}; mean and min-max over {len(doc['draws_done'])} "
             f"draw(s)")
        print("plot:", args.plot)
    print("raw results:", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does federated self-supervised pretraining of the image encoders help the task? Three
synthetic federations on generator seeds not tuned on, most patients unlabelled.

    python benchmarks/bench_pretrain.py [--work /tmp/bench_pretrain] [--gen-seeds 31,32,33]

Per generator seed: 4 hospitals (--sizes), --labelled-fraction of patients with labels. The
test split (hospital_node.splits, seed 0) holds labelled cases only; the task models train on
the labelled cases of the train split, pretraining uses every train-split case with an image.

Pretraining is federated averaging across the four hospitals, run in this process with the same
pieces the Flower run uses (multimodal.pretrain.pretrain_local at each hospital; the arrays
averaged weighted by cases, as the strategy does for non-expert arrays; the Flower transport
itself is covered by tests/integration/test_federated_pretrain.py). Its held-out objective is
printed per round.

Task models, each trained the same way with and without the pretrained encoders: CT only,
pathology only, fused MoE, dense late fusion, and the fused model with progressive modality
alignment off (stage1_epochs 0) and with dynamic loss weighting off (equal). Reported: pooled test
AUC against the generator's oracle for the same modalities on the same test cases, fused against
the best single modality and late fusion, and the CT encoder's learned-path gate.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal.config import ModelConfig, TrainConfig
from multimodal.data import PreparedCase
from multimodal.evaluate import evaluate
from multimodal.model import FedsightModel, build_model
from multimodal.pretrain import (
    PretrainConfig,
    SSLHeads,
    encoder_keys,
    load_pretrained_encoders,
    objective,
    pretrain_local,
)
from multimodal.train import train_local

VARIANTS = ("ct", "path", "ehr", "fused", "late", "fused-noalign", "fused-equal", "ct-open",
            "fused-open")
OPEN_GATE = 1.0  # "-open": the learned CT conv path starts with its gate open (default shut, 0)


def variant_config(name: str, base: ModelConfig) -> ModelConfig:
    if name.endswith("-open"):
        return variant_config(name.removesuffix("-open"), base).replace(
            ct_deep_gate_init=OPEN_GATE)
    if name in ("ct", "path", "ehr"):
        return base.replace(modalities=(name,))
    if name == "late":
        return base.replace(fusion="late")
    return base


def variant_train(name: str, base: TrainConfig) -> TrainConfig:
    if name == "fused-noalign":
        return base.replace(stage1_epochs=0)
    if name == "fused-equal":
        return base.replace(loss_weighting="equal")
    return base


def federation(work: Path, seed: int, sizes: tuple[int, ...], labelled: float,
               cfg: ModelConfig) -> tuple[dict[str, list[PreparedCase]], Path]:
    from hospital_node.dataset import load_site
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = work / f"seed{seed}" / "federation"
    if not (fed / "federation.json").is_file():
        generate(SynthConfig.default(len(sizes), seed, sizes=sizes, labelled_fraction=labelled),
                 fed)
    sites = {}
    for root in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        loaded = load_site(root, cfg.inputs, work / "cache")
        sites[loaded.site_id] = loaded.cases
    return sites, fed


def with_truth_labels(fed: Path, cases: list[PreparedCase]) -> list[PreparedCase]:
    """Test cases whose labels the federation did not write get the generator's (evaluation
    only: a bigger test set; pretraining and training never see test-split cases)."""
    from synth.truth import load_truth

    truth = {s: load_truth(fed, s) for s in {c.site_id for c in cases}}
    return [c if c.label is not None else
            dataclasses.replace(c, label=truth[c.site_id][c.case_id].label) for c in cases]


def oracle_on(fed: Path, cases: list[PreparedCase]) -> dict[str, float]:
    """The generator's Bayes and per-modality oracle AUCs on exactly these test cases."""
    from synth.config import SynthConfig
    from synth.federation import oracle_aucs
    from synth.truth import load_truth

    truth = {s: load_truth(fed, s) for s in {c.site_id for c in cases}}
    rows = [(t.logit, t.latents, t.scores, t.label)
            for t in (truth[c.site_id][c.case_id] for c in cases)]
    return oracle_aucs(SynthConfig().label_model, rows)


def federated_pretrain(sites: dict[str, list[PreparedCase]], test: list[PreparedCase],
                       cfg: ModelConfig, pcfg: PretrainConfig, rounds: int, epochs: int
                       ) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """FedAvg of pretrain_local over the hospitals; (encoder state, held-out objective before
    and after each round, seconds)."""
    t0 = time.perf_counter()
    model = build_model(cfg, seed=0)
    torch.manual_seed(0)
    heads = SSLHeads(model, pcfg)
    mods = tuple(heads.proj)
    keys = encoder_keys(model, mods)
    parts = objective(model, heads, test, pcfg, seed=99)
    curve = [sum(parts.values())]
    print(f"  pretrain round 0: held-out objective {curve[0]:.3f} {_rounded(parts)}", flush=True)
    for r in range(1, rounds + 1):
        sums: dict[str, torch.Tensor] = {}
        total = 0
        for i, cases in enumerate(sites.values()):
            m, h = copy.deepcopy(model), copy.deepcopy(heads)
            run = PretrainConfig.from_dict({**pcfg.to_dict(), "epochs": epochs,
                                            "seed": 1000 * r + i})
            pretrain_local(m, h, cases, run)
            own = {k: v for k, v in m.state_dict().items() if k in keys}
            own |= {"ssl." + k: v for k, v in h.state_dict().items()}
            for k, v in own.items():
                sums[k] = sums.get(k, 0) + v.double() * len(cases)
            total += len(cases)
        avg = {k: (v / total) for k, v in sums.items()}
        sd = model.state_dict()
        for k in keys:
            sd[k].copy_(avg[k].to(sd[k].dtype))
        heads.load_state_dict({k[4:]: v.float() for k, v in avg.items() if k.startswith("ssl.")})
        parts = objective(model, heads, test, pcfg, seed=99)
        curve.append(sum(parts.values()))
        print(f"  pretrain round {r}: held-out objective {curve[-1]:.3f} {_rounded(parts)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {k: model.state_dict()[k].clone() for k in keys}, curve, time.perf_counter() - t0


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def train_variant(name: str, mcfg: ModelConfig, tcfg: TrainConfig, train: list[PreparedCase],
                  test: list[PreparedCase], pre: dict[str, torch.Tensor] | None
                  ) -> dict[str, float]:
    cfg = variant_config(name, mcfg)
    model: FedsightModel = build_model(cfg, seed=0)
    if pre is not None:
        mods = tuple(m for m in ("ct", "path") if m in cfg.modalities)
        load_pretrained_encoders(model, pre, mods)
    res = train_local(model, train, variant_train(name, tcfg))
    rep = evaluate(model, {"all": test})
    single = name.removesuffix("-open")
    combo = single if single in ("ct", "path", "ehr") else "ct+path+ehr"
    out = {"auc": rep.row("pooled", "available").auc, "minutes": res.seconds / 60}
    r3 = rep.row("pooled", combo)
    out["auc_" + combo] = r3.auc if r3 else float("nan")
    if "ct" in cfg.modalities:
        out["ct_gate"] = float(model.encoders["ct"].deep_gate.detach().abs().item())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_pretrain"))
    ap.add_argument("--gen-seeds", default="31,32,33")
    ap.add_argument("--sizes", default="120,120,120,120")
    ap.add_argument("--labelled-fraction", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="task training epochs override")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hospital_node.splits import split_of

    mcfg = ModelConfig()
    tcfg = TrainConfig(seed=0)
    if args.epochs is not None:
        tcfg = tcfg.replace(epochs=args.epochs)
    pcfg = PretrainConfig()
    sizes = tuple(int(x) for x in args.sizes.split(","))
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()},
                                  "pretrain_config": pcfg.to_dict(), "seeds": {}}
    for gs in [int(x) for x in args.gen_seeds.split(",")]:
        t0 = time.perf_counter()
        sites, fed = federation(args.work, gs, sizes, args.labelled_fraction, mcfg)
        test = with_truth_labels(fed, [c for cs in sites.values() for c in cs
                                       if split_of(c.case_id, 0) == "test"])
        train_lab = [c for cs in sites.values() for c in cs
                     if c.label is not None and split_of(c.case_id, 0) == "train"]
        images = {s: [c for c in cs if split_of(c.case_id, 0) == "train"
                      and (c.ct is not None or c.path is not None)] for s, cs in sites.items()}
        test_img = [c for cs in sites.values() for c in cs if split_of(c.case_id, 0) == "test"
                    and (c.ct is not None or c.path is not None)]
        oracle = oracle_on(fed, test)
        for m, has in (("ct", lambda c: c.ct is not None), ("path", lambda c: c.path is not None)):
            # a single-modality model is judged on the cases that have its modality
            oracle[m + "_on_own_cases"] = oracle_on(fed, [c for c in test if has(c)])[m]
        print(f"\n# generator seed {gs}: {len(train_lab)} labelled train cases, "
              f"{sum(map(len, images.values()))} train cases with an image, {len(test)} test; "
              f"oracle {json.dumps(oracle)} (loaded in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        pre, curve, secs = federated_pretrain(images, test_img, mcfg, pcfg, args.rounds,
                                              args.local_epochs)
        row: dict[str, object] = {"oracle": oracle, "objective": curve, "pretrain_s": secs,
                                  "n_train_labelled": len(train_lab), "n_test": len(test),
                                  "n_train_images": sum(map(len, images.values())),
                                  "models": {}}
        for name in args.only.split(","):
            for tag, state in (("scratch", None), ("pretrained", pre)):
                if name == "ehr" and tag == "pretrained":  # no image encoder: the same model
                    row["models"][f"{name}/{tag}"] = row["models"][f"{name}/scratch"]
                    continue
                r = train_variant(name, mcfg, tcfg, train_lab, test, state)
                row["models"][f"{name}/{tag}"] = r  # type: ignore[index]
                print(f"  {name:14s} {tag:10s} AUC {r['auc']:.3f} "
                      + (f"gate {r['ct_gate']:.3f} " if "ct_gate" in r else "")
                      + f"({r['minutes']:.1f} min)", flush=True)
        results["seeds"][str(gs)] = row  # type: ignore[index]
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    return 0


def table(results: dict) -> str:
    """The docs/benchmarks.md tables: per seed and model, scratch vs pretrained (pooled test
    AUC on cases as available, and a single-modality model on the cases with its modality
    against the generator's oracle for that modality on the same cases), then fused against
    the best single-modality model and late fusion."""
    lines = ["| seed | model | AUC scratch | AUC pretrained | gain | own-modality cases: "
             "oracle / scratch / pretrained |", "|---|---|---|---|---|---|"]
    for gs, row in results["seeds"].items():
        oracle = row["oracle"]
        for key in sorted({k.split("/")[0] for k in row["models"]},
                          key=lambda n: VARIANTS.index(n)):
            s, p = row["models"][f"{key}/scratch"], row["models"][f"{key}/pretrained"]
            own = ""
            mod = key.removesuffix("-open")
            if mod in ("ct", "path"):
                a = "auc_" + mod
                own = f"{oracle[mod + '_on_own_cases']:.3f} / {s[a]:.3f} / {p[a]:.3f}"
            if "ct_gate" in s:
                own += f" (CT gate {s['ct_gate']:.2f} / {p['ct_gate']:.2f})"
            lines.append(f"| {gs} | {key} | {s['auc']:.3f} | {p['auc']:.3f} | "
                         f"{p['auc'] - s['auc']:+.3f} | {own} |")
    lines += ["", "| seed | encoders | fused | best single | fused - best single | "
              "fused - late | noalign - fused | equal-weighting - fused |",
              "|---|---|---|---|---|---|---|---|"]
    for gs, row in results["seeds"].items():
        for tag in ("scratch", "pretrained"):
            m = {k.split("/")[0]: v["auc"] for k, v in row["models"].items()
                 if k.endswith("/" + tag)}
            singles = {k: m[k] for k in ("ct", "path", "ehr") if k in m}
            if "fused" not in m or not singles:
                continue
            best = max(singles, key=lambda k: singles[k])
            d = {k: (f"{m[k] - m['fused']:+.3f}" if k in m else "")
                 for k in ("fused-noalign", "fused-equal")}
            late = f"{m['fused'] - m['late']:+.3f}" if "late" in m else ""
            lines.append(f"| {gs} | {tag} | {m['fused']:.3f} | {best} {singles[best]:.3f} | "
                         f"{m['fused'] - singles[best]:+.3f} | {late} | {d['fused-noalign']} | "
                         f"{d['fused-equal']} |")
    return "\n".join(lines) + "\n\nheld-out objective by pretraining round: " + json.dumps(
        {gs: [round(x, 2) for x in row["objective"]] for gs, row in results["seeds"].items()})


if __name__ == "__main__":
    raise SystemExit(main())

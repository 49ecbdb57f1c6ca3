"""INT8 study: does a dynamically quantized copy of the served model pay (size, AUC, latency)?

    python benchmarks/bench_int8.py --out .fedsight/bench-int8        (~3 min on 2 cores)

1. A 2-site synthetic federation is written and the default model trained briefly on site_a's
   train split (as benchmarks/bench_ui.py does), temperature fitted on site_a's test split.
2. multimodal.quantize.quantize_int8 makes the INT8 copy (nn.Linear -> dynamic int8).
3. Measured in this one run: serialized state_dict bytes; pooled AUC (site_a test + all of
   site_b, the held-out cases) of fp32 and int8 and the per-case probability differences;
   forward latency (model.predict_proba under no_grad) at batch 1 and 8, fp32 and int8 timed
   alternately so machine load hits both alike; and, to judge static conv quantization, the fp32
   time of each encoder alone and the parameter share of each layer type.
Results: <out>/bench_int8.json and a markdown section printed (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vocab.offline import enforce_offline

enforce_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def held_out_and_model(out: Path, sizes: tuple[int, int], epochs: int) -> tuple[Any, list[Any]]:
    from bench_ui import make_federation, train_model

    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.checkpoint import load_checkpoint

    fed = make_federation(out, sizes)
    t0 = time.perf_counter()
    ckpt = train_model(fed, out, epochs)
    print(f"[int8] model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    model = load_checkpoint(ckpt)
    model.eval()
    cases = []
    for sid in ("site_a", "site_b"):
        site = load_site(fed / sid, model.cfg.inputs, out / "cache" / sid)
        cases += [c for c in site.cases if sid == "site_b" or split_of(c.case_id, 0) == "test"]
    return model, cases


@torch.no_grad()
def probs(model: Any, batch: Any, bs: int = 16) -> np.ndarray:
    idx = torch.arange(len(batch)).split(bs)
    return torch.cat([model.predict_proba(batch.select(i)) for i in idx]).numpy()


@torch.no_grad()
def latency(models: dict[str, Any], batch: Any, bs: int, reps: int, warmup: int
            ) -> dict[str, dict[str, float]]:
    """Median/p95 ms per forward of each model on the same `bs` cases, timed alternately."""
    sub = batch.select(torch.arange(bs) % len(batch))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + reps):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.predict_proba(sub)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[name].append(dt)
    return {k: {"median_ms": round(pctl(v, 50), 2), "p95_ms": round(pctl(v, 95), 2)}
            for k, v in times.items()}


@torch.no_grad()
def encoder_times(model: Any, batch: Any, reps: int) -> dict[str, float]:
    """fp32 median ms of each encoder alone at batch 1 (where the time goes)."""
    sub = batch.select(torch.arange(1))
    parts = {"ct": (model.ct_encoder, lambda: (sub.ct,)),
             "path": (model.path_encoder, lambda: (sub.path,)),
             "ehr": (model.ehr_encoder, lambda: (sub.ehr, sub.ehr_observed))}
    out = {}
    for name, (enc, args) in parts.items():
        if enc is None:
            continue
        ts = []
        for _ in range(reps + 5):
            t0 = time.perf_counter()
            enc(*args())
            ts.append((time.perf_counter() - t0) * 1e3)
        out[name] = round(pctl(ts[5:], 50), 2)
    return out


def param_share(model: Any) -> dict[str, float]:
    c: collections.Counter[str] = collections.Counter()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            c[type(mod).__name__] += p.numel()
    total = sum(c.values())
    return {k: round(v / total, 3) for k, v in c.most_common()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".fedsight/bench-int8"))
    ap.add_argument("--sizes", type=int, nargs=2, default=(100, 60))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    from multimodal.metrics import auc
    from multimodal.quantize import quantize_int8, quantized_share, serialized_bytes
    from multimodal.train import as_batch

    model, cases = held_out_and_model(args.out, tuple(args.sizes), args.epochs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    q = quantize_int8(model)
    quant_s = time.perf_counter() - t0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    batch = as_batch(model, cases)
    y = batch.label.numpy()
    p32, p8 = probs(model, batch), probs(q, batch)
    diff = np.abs(p32 - p8)
    size32, size8 = serialized_bytes(model), serialized_bytes(q)
    # timed on cases with all three modalities: a missing one skips its encoder
    full = batch.select(batch.present().all(1).nonzero().squeeze(1))
    lat = {f"batch{bs}": latency({"fp32": model, "int8": q}, full, bs, args.reps, args.warmup)
           for bs in (1, 8)}
    res: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{args.threads} threads, engine {torch.backends.quantized.engine}, "
                   f"load avg {os.getloadavg()[0]:.1f}",
        "held_out_cases": len(y), "positives": int(y.sum()), "timed_cases": len(full),
        "bytes": {"fp32": size32, "int8": size8, "change": round(size8 / size32 - 1, 3)},
        "quantized_param_share": round(quantized_share(model), 3),
        "param_share_by_layer": param_share(model),
        "auc": {"fp32": round(auc(y, p32), 4), "int8": round(auc(y, p8), 4),
                "change": round(auc(y, p8) - auc(y, p32), 4)},
        "prob_abs_diff": {"median": float(np.median(diff)), "max": float(diff.max())},
        "decision_flips_at_0.5": int(((p32 >= 0.5) != (p8 >= 0.5)).sum()),
        "quantize_s": round(quant_s, 2),
        "latency": lat,
        "fp32_encoder_ms_batch1": encoder_times(model, full, args.reps // 2),
    }
    (args.out / "bench_int8.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"\n| | fp32 | int8 | change |\n|---|---|---|---|\n"
          f"| serialized bytes | {size32:,} | {size8:,} | {res['bytes']['change']:+.1%} |\n"
          f"| pooled AUC ({len(y)} held-out) | {res['auc']['fp32']:.4f} | "
          f"{res['auc']['int8']:.4f} | {res['auc']['change']:+.4f} |")
    for bs in (1, 8):
        a, b = lat[f"batch{bs}"]["fp32"], lat[f"batch{bs}"]["int8"]
        print(f"| batch {bs} median / p95 ms | {a['median_ms']} / {a['p95_ms']} | "
              f"{b['median_ms']} / {b['p95_ms']} | x{b['median_ms'] / a['median_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark (not a test): one patient, all three modalities, default model, torch threads = 2.

    .venv/bin/python benchmarks/bench_latency.py [--runs 40]

Prints forward and forward+backward (what a GradCAM map costs) median / p95 in ms, and checks
the separable local mean of the CT blob channel against the direct k^3 average pool (baseline).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.data import PreparedCase, collate
from multimodal.encoders import _local_mean
from multimodal.model import build_model
from vocab.ehr_schema import CHEST_V1


def _time(f, runs: int) -> tuple[float, float]:
    for _ in range(5):
        f()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ts)), float(np.percentile(ts, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 1, 32, 64, 64)
    direct = lambda: F.avg_pool3d(x, 9, stride=1, padding=4, count_include_pad=False)  # noqa: E731
    diff = float((direct() - _local_mean(x, 9)).abs().max())
    print(f"blob context mean 9^3: direct {_time(direct, args.runs)} ms, separable "
          f"{_time(lambda: _local_mean(x, 9), args.runs)} ms (median, p95); max diff {diff:.1e}")
    model = build_model(seed=0).eval()
    rng = np.random.default_rng(0)
    case = PreparedCase("bench", ct=rng.standard_normal((32, 64, 64), dtype=np.float32),
                        path=rng.standard_normal((3, 128, 128), dtype=np.float32),
                        ehr=np.array([60, 1, 20, 0, 4, 26, 130, 1.0], dtype=np.float32))
    batch = collate([case], CHEST_V1, (32, 64, 64), 128)
    with torch.no_grad():
        print("forward ms (median, p95):", _time(lambda: model(batch), args.runs))

    def fwd_bwd() -> None:
        model.zero_grad()
        model(batch).logit.sum().backward()

    print("forward+backward ms (median, p95):", _time(fwd_bwd, args.runs))


if __name__ == "__main__":
    main()

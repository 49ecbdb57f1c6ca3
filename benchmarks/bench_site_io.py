"""Benchmark (not a test): read + preprocess a synthetic site cold (empty cache) and warm.

    python benchmarks/bench_site_io.py [--cases 24] [--repeats 5] [--threads 1]

Prints cases/s (median over repeats), the p95 load time, and the machine (CPU model, cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []  # Linux only
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from hospital_node.dataset import load_site
    from multimodal.grid import InputConfig
    from synth.config import SynthConfig
    from synth.federation import generate

    work = Path(tempfile.mkdtemp(prefix="fedsight-bench-"))
    try:
        cfg = SynthConfig.default(1, seed=args.seed, sizes=(args.cases,))
        generate(cfg, work / "fed")
        root = work / "fed" / cfg.sites[0].site_id
        inputs = InputConfig()
        load_site(root, inputs, use_cache=False)  # warm imports / page cache once
        cold, warm = [], []
        for r in range(args.repeats):
            cache = work / f"cache{r}"
            t0 = time.perf_counter()
            site = load_site(root, inputs, cache)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = load_site(root, inputs, cache)
            warm.append(time.perf_counter() - t0)
            if again.cache_misses:
                raise RuntimeError(f"warm load missed the cache {again.cache_misses} times")
        n = len(site.report.cases)
        n_ct = sum("ct" in c.modalities for c in site.report.cases)
        print(f"machine: {_cpu_model()}, {os.cpu_count()} logical cores, torch threads "
              f"{args.threads}, python {platform.python_version()}")
        print(f"site: {n} cases ({n_ct} with CT, {cfg.ct_matrix}x{cfg.ct_matrix} px, "
              f"slice {cfg.sites[0].slice_thickness_mm} mm), grid {inputs.ct_shape}, "
              f"{args.repeats} repeats")
        for name, times in (("cold (empty cache)", cold), ("warm (cached)", warm)):
            rates = [n / t for t in times]
            print(f"{name:<19} cases/s median {statistics.median(rates):7.1f}  "
                  f"p95 load time {_p95(times) * 1000:7.1f} ms  "
                  f"(median {statistics.median(times) * 1000:.1f} ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

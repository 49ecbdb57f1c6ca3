"""Server-side cost of the native CT view (ui.ct_view) against the old 64 x 64 grid render.

Series: the real GE head CT (../shared/data/ct-head-ge: 512 x 512, 28 files -> 37 uniform
slices, tilted) when present, and a synthetic 128 x 128 chest series (synth generator). The
attribution map is a smooth random field on the model grid (the view's cost does not depend on
its values). Measured, per series, in one run:

  old        render.ct_slice_overlay on the model grid (what ct_slice did before), every slice
  cold step  CtViews.render stepping through every native slice once (map resampled per slice)
  warm step  the same slices again (resampled map cached)
  window     one slice, cycling the three presets and a custom window
  png        PIL PNG encode of one frame (what Gradio adds after our handler returns, zlib
             level 6), and at zlib level 1 (what a pre-encoded frame would cost)
  open       read_native: the series read again from its files (once per opened diagnosis)

`python benchmarks/bench_ct_view.py [--repeats 5]`; prints JSON with median/p95 (ms) and the
ratios to `old`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from hospital_node.preprocess import ct_to_grid
from hospital_node.series_choice import SeriesRule
from multimodal.grid import InputConfig
from ui import render
from ui.ct_view import WINDOW_PRESETS, CtViewConfig, CtViews, read_native

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": round(float(np.median(a)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2), "n": len(ms)}


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def bench_series(folder: Path, root: Path, repeats: int) -> dict:
    cfg = CtViewConfig()
    inputs = InputConfig()
    opens, vol, series = [], None, None
    for _ in range(3):
        t0 = time.perf_counter()
        series, vol = read_native(folder, root, SeriesRule(), cfg)
        opens.append((time.perf_counter() - t0) * 1e3)
    assert vol is not None and series is not None, series.problems if series else folder
    grid, gaff = ct_to_grid(series, inputs)
    rng = np.random.default_rng(0)
    gmap = gaussian_filter(rng.normal(size=grid.shape), 2.0).astype(np.float32)

    old = [timed(render.ct_slice_overlay, grid, gmap, k)
           for _ in range(repeats) for k in range(grid.shape[0])]
    cold, warm, window = [], [], []
    lung = WINDOW_PRESETS["lung"]
    for r in range(repeats):
        views = CtViews(cfg)  # a fresh open diagnosis: nothing cached
        views.open(f"h{r}", grid, gaff, gmap, None, native=vol)
        cold += [timed(views.render, f"h{r}", k, *lung) for k in range(vol.n_slices)]
        warm += [timed(views.render, f"h{r}", k, *lung) for k in range(vol.n_slices)]
        k = vol.n_slices // 2
        for wl in [*WINDOW_PRESETS.values(), (80.0, 40.0)] * 3:
            window.append(timed(views.render, f"h{r}", k, *wl))
    frame = views.render(f"h{repeats - 1}", vol.n_slices // 2, *lung).image
    small = render.ct_slice_overlay(grid, gmap, grid.shape[0] // 2)
    png = [timed(lambda im: Image.fromarray(im).save(io.BytesIO(), format="PNG"), frame)
           for _ in range(20)]
    png_old = [timed(lambda im: Image.fromarray(im).save(io.BytesIO(), format="PNG"), small)
               for _ in range(20)]
    png_fast = [timed(lambda im: Image.fromarray(im).save(io.BytesIO(), format="PNG",
                                                          compress_level=1), frame)
                for _ in range(20)]
    out = {"native_shape": list(vol.hu.shape), "inplane_factor": vol.inplane_factor,
           "native_mib": round(vol.nbytes / 2 ** 20, 1), "old": stats(old),
           "cold_step": stats(cold), "warm_step": stats(warm), "window": stats(window),
           "png_native": stats(png), "png_native_level1": stats(png_fast),
           "png_old": stats(png_old), "open": stats(opens)}
    base = out["old"]["median_ms"]
    for key in ("cold_step", "warm_step", "window"):
        out[key]["ratio_median_to_old"] = round(out[key]["median_ms"] / base, 1)
    return out


def synthetic_series(tmp: Path) -> tuple[Path, Path]:
    from synth.config import SynthConfig
    from synth.federation import generate

    generate(SynthConfig.default(n_sites=1, seed=0, sizes=(2,)), tmp)
    site = tmp / "site_a"
    case = sorted(p for p in (site / "ct").iterdir() if p.is_dir())[0]
    return case, site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one request's work on one core, as under load on 2 cores
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} cores, torch threads 1",
                    "load_avg_1min_before": round(os.getloadavg()[0], 2)}
    head = DATA / "ct-head-ge"
    if head.is_dir():
        result["ct-head-ge (512x512, tilted)"] = bench_series(head, DATA, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        case, site = synthetic_series(Path(tmp))
        result["synthetic chest (128x128)"] = bench_series(case, site, args.repeats)
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

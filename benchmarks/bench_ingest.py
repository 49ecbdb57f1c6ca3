"""Cold read rate of a CT series through the node's read path (docs/benchmarks.md).

Writes one axial series (default 300 slices of 512x512 int16, explicit VR little endian, as a
scanner exports it) and times, in the same run:
  baseline   pydicom alone: dcmread every file, stack pixel_array (the floor of any reader)
  read       hospital_node: walk + bounded headers + checks + series choice + geometry + HU
  read+grid  the above plus resampling onto the model grid (what a cache miss costs)
"Cold" means no fedsight cache; the OS page cache is dropped before each repeat when this runs
as root and /proc/sys/vm/drop_caches is writable, and the output says whether it was.

    python benchmarks/bench_ingest.py [--slices 300] [--size 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "hospital_node"))

import monai.transforms  # noqa: F401  (imported once here, not inside the first timing)
from dicom_writer import write_series

from hospital_node.dicom_series import read_ct_series
from hospital_node.preprocess import ct_to_grid
from multimodal.grid import InputConfig


def _drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _baseline(folder: Path) -> np.ndarray:
    import pydicom

    slices = [pydicom.dcmread(p).pixel_array for p in sorted(folder.iterdir())]
    return np.stack(slices)


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return statistics.median(xs), p95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (args.slices, args.size, args.size)).astype(np.float32)
    inputs = InputConfig()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "case"
        write_series(folder, hu, (1.0, 0.7, 0.7))
        del hu
        mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        times: dict[str, list[float]] = {"baseline": [], "read": [], "read+grid": []}
        dropped = []
        for _ in range(args.repeats):
            for name in times:
                dropped.append(_drop_caches())
                t = time.perf_counter()
                if name == "baseline":
                    _baseline(folder)
                else:
                    s = read_ct_series(folder)
                    assert s.usable, s.problems
                    if name == "read+grid":
                        ct_to_grid(s, inputs)
                times[name].append(time.perf_counter() - t)
    print(f"series: {args.slices} slices x {args.size}x{args.size} int16, {mb:.0f} MB on disk; "
          f"page cache dropped: {all(dropped)}; repeats {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()} "
          f"{platform.release()}, Python {platform.python_version()}")
    base_med, _ = _stats(times["baseline"])
    for name, xs in times.items():
        med, p95 = _stats(xs)
        print(f"{name:10s} median {med:6.2f} s  p95 {p95:6.2f} s  "
              f"{args.slices / med:6.0f} slices/s  {mb / med:6.0f} MB/s  "
              f"x{med / base_med:4.2f} of baseline")


if __name__ == "__main__":
    main()

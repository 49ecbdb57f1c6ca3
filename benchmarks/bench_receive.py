"""Benchmark (not a test): push the real GE head series N times (a different PatientID and
StudyInstanceUID each time) with dcmtk's storescu into a running `fedsight node receive`.

    python benchmarks/bench_receive.py [--studies 4] [--repeats 5] [--quiet 1.0]

Each repeat starts a fresh receiver (new data root and staging, not timed), pushes all N
studies in one storescu association and times it: storescu returns when every C-STORE is
acknowledged, and an acknowledgement means de-identified and fsync'd in staging. Prints
instances/s (median and p95 over repeats: p95 = the slowest 5%), the time until every study
was published (including the quiet period) and the machine (CPU model, cores, load).
Needs ../shared/data/ct-head-ge and storescu (apt-get install dcmtk).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD = REPO.parent / "shared" / "data" / "ct-head-ge"
sys.path.insert(0, str(REPO / "tests" / "integration"))


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _studies(out: Path, n: int) -> list[Path]:
    """n modified copies of the GE series: new patient, study, series and instance UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    files = []
    for k in range(n):
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for src in sorted(HEAD.glob("*.dcm")):
            ds = pydicom.dcmread(src)
            ds.PatientID, ds.StudyInstanceUID = f"BENCH-{k:04d}", study
            ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = out / f"{k:04d}-{src.name}"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4, help="studies pushed per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quiet", type=float, default=1.0, help="receiver --quiet-seconds")
    args = ap.parse_args()
    if not HEAD.is_dir() or shutil.which("storescu") is None:
        sys.exit(f"needs {HEAD} and storescu on PATH")
    from dicom_peers import Receiver, storescu, wait_for_cases

    work = Path(tempfile.mkdtemp(prefix="fedsight-bench-receive-"))
    try:
        (work / "in").mkdir()
        files = _studies(work / "in", args.studies)
        rates, publish = [], []
        for rep in range(args.repeats):
            tmp = work / f"rep{rep}"
            tmp.mkdir()
            r = Receiver(tmp, quiet_s=args.quiet).start()
            try:
                t0 = time.perf_counter()
                run = storescu(r.port, files)
                pushed = time.perf_counter() - t0
                if run.returncode != 0:
                    sys.exit(f"storescu failed:\n{run.stdout}{run.stderr}")
                wait_for_cases(r.root, args.studies, timeout=120)
                publish.append(time.perf_counter() - t0)
            finally:
                r.stop()
            rates.append(len(files) / pushed)
            print(f"repeat {rep + 1}: {len(files)} instances in {pushed:.2f} s "
                  f"= {rates[-1]:.1f} instances/s; all {args.studies} cases published after "
                  f"{publish[-1]:.2f} s", flush=True)
            shutil.rmtree(tmp)
        print(f"\ninstances/s over {args.repeats} repeats of {len(files)} instances "
              f"({args.studies} studies x 28, 512x512 int16, explicit VR LE): "
              f"median {statistics.median(rates):.1f}, p95 (slowest 5%) {_pct(rates, 0.05):.1f}")
        print(f"push + publish (quiet {args.quiet:g} s): median "
              f"{statistics.median(publish):.2f} s, p95 {_pct(publish, 0.95):.2f} s")
        print(f"machine: {_cpu_model()}, {os.cpu_count()} cores, load average at end "
              f"{os.getloadavg()[0]:.2f}, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

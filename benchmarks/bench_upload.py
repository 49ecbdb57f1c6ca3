"""A 300-slice CT upload and a worklist click in a real browser, through the running app.

    python benchmarks/bench_upload.py --model VERSION_DIR_OR_STORE --site SITE_DIR \
        [--slices 300] [--reps 5] [--clicks 15]

1. A 512 x 512 x --slices chest phantom (body, two lungs, a nodule; 0.7 mm pixels, 1 mm
   slices, int16) is written as real DICOM (tests/hospital_node/dicom_writer.py) and zipped.
2. The app is served on 127.0.0.1 (login, triage cache warmed first); `diagnose_upload` is
   called through gradio_client with the zip (--reps times; each upload a distinct file, as
   clinicians' are): wall time from the call to the answer, upload transfer included.
3. In headless Chromium: click-to-rendered of worklist diagnoses (served from the triage
   cache), --clicks times after one warm-up click: from the Diagnose click until the CT image
   of the new diagnosis has loaded.
Prints median / p95 and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hospital_node"))

from vocab.offline import enforce_offline

enforce_offline()

import numpy as np  # noqa: E402

USER, PASSWORD = "bench", "bench-pass"


def phantom(slices: int, size: int = 512) -> np.ndarray:
    """(Z, Y, X) HU: air, an elliptic body (40 HU), two lungs (-850 HU), a 12 mm nodule."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    body = ((x - c) / (0.42 * size)) ** 2 + ((y - c) / (0.30 * size)) ** 2 <= 1
    lungs = [((x - c + s * 0.17 * size) / (0.12 * size)) ** 2 + ((y - c) / (0.2 * size)) ** 2
             <= 1 for s in (1, -1)]
    sl = np.where(body, 40.0, -1000.0)
    for lung in lungs:
        sl = np.where(lung, -850.0, sl)
    vol = np.repeat(sl[None], slices, axis=0)
    zc, yc, xc = slices // 2, int(c), int(c - 0.17 * size)
    zz, yy, xx = np.ogrid[:slices, :size, :size]
    nodule = ((zz - zc) * 1.0) ** 2 + ((yy - yc) * 0.7) ** 2 + ((xx - xc) * 0.7) ** 2 <= 36
    vol[nodule] = 30.0
    return vol.astype(np.float32)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=15)
    args = ap.parse_args()
    from bench_ui import free_port, in_browser
    from dicom_writer import write_series
    from gradio_client import Client, handle_file

    from explain.config import ExplainConfig
    from ui.app import build_app, serve
    from ui.config import TriageConfig, UiConfig, hash_password
    from ui.service import DiagnosisService

    work = Path(tempfile.mkdtemp(prefix="fedsight-upload-"))
    t0 = time.perf_counter()
    files = write_series(work / "series", phantom(args.slices), spacing=(1.0, 0.7, 0.7),
                         origin=(-179.0, -179.0, -150.0))
    zips = []
    for r in range(args.reps + 1):  # one warm-up
        z = work / f"series-{r}.zip"
        with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
            for f in files:
                zf.write(f, f.name)
            zf.writestr("rep.txt", str(r))  # distinct bytes per upload
        zips.append(z)
    mb = zips[0].stat().st_size / 2**20
    print(f"series: {args.slices} slices 512x512 int16, zip {mb:.0f} MB, written in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    service = DiagnosisService.from_paths(
        args.site, args.model, work / "cache", ExplainConfig(),
        triage=TriageConfig(cache_dir=work / "triage", rescan_s=3600))
    if service.worker is not None:
        service.worker.idle.wait(1800)
    cfg = UiConfig(port=free_port(), users=((USER, hash_password(PASSWORD, 1000)),))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    base = f"http://127.0.0.1:{cfg.port}/"
    try:
        client = Client(base, auth=(USER, PASSWORD), verbose=False)
        n_ehr = len(service.served.model.schema.fields)
        times = []
        for r, z in enumerate(zips):
            t = time.perf_counter()
            out = client.predict([handle_file(str(z))], None, *([""] * n_ehr),
                                 api_name="/diagnose_upload")
            dt = time.perf_counter() - t
            assert "Probability of malignancy" in out[1] or "Not diagnosed" in out[1], out[1]
            if r:
                times.append(dt)
            print(f"upload {r}: {dt:.2f} s ({out[1].splitlines()[0]})", flush=True)
            if r == 0:
                print("  " + " ".join(out[1].splitlines()[1:4])[:400], flush=True)
        labels = [lab for lab, _ in service.worklist()[:8]]
        browser = in_browser(base, labels, args.clicks, work / "browser.png")
    finally:
        app.close()
        service.close()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"upload {args.slices} slices ({mb:.0f} MB zip): median {statistics.median(times):.2f} s"
          f", p95 {pct(times, 95):.2f} s (n={len(times)})")
    print(f"browser click-to-rendered (cached diagnoses): {browser}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Clinician app benchmark: latency through the real server, and CT-map faithfulness.

    python benchmarks/bench_ui.py --out .fedsight/bench-ui      (trains a model if none given)
    python benchmarks/bench_ui.py --model STORE_OR_CHECKPOINT --site DIR ...

1. A synthetic federation (2 sites) is written; a model is trained on site_a's train split
   (or --model is served), its temperature fitted on site_a's test split.
2. Faithfulness of the CT maps on malignant cases with an index lesion (site_a test + site_b):
   pointing game (map maximum inside the lesion, exact and grown by --tolerance-mm) and the share
   of positive attribution inside the lesion, for several encoder layers; Adebayo weight
   randomisation (rank correlation of maps, model vs re-initialised copy).
3. The app is served on 127.0.0.1 with login; `diagnose` is called through Gradio's HTTP API the
   way the browser does (POST /gradio_api/call/diagnose, read the event stream) --calls times
   after warm-up; then through gradio_client; then click-to-rendered in headless Chromium.
Results: <out>/bench_ui.json and a markdown section printed (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import statistics
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

USER, PASSWORD = "bench", "bench-pass"


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median_ms": round(pctl(xs, 50), 1), "p95_ms": round(pctl(xs, 95), 1),
            "max_ms": round(max(xs), 1) if xs else float("nan")}


def make_federation(out: Path, sizes: tuple[int, int]) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = out / "federation"
    if not (fed / "federation.json").exists():
        generate(SynthConfig.default(n_sites=2, seed=0, sizes=sizes), fed)
    return fed


def train_model(fed: Path, out: Path, epochs: int) -> Path:
    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.checkpoint import save_checkpoint
    from multimodal.config import ModelConfig, TrainConfig
    from multimodal.evaluate import fit_model_temperature
    from multimodal.model import build_model
    from multimodal.train import train_local

    ckpt = out / "model.pt"
    if ckpt.exists():
        return ckpt
    cfg = ModelConfig()
    site = load_site(fed / "site_a", cfg.inputs, out / "cache" / "site_a")
    train = [c for c in site.cases if split_of(c.case_id, 0) == "train"]
    test = [c for c in site.cases if split_of(c.case_id, 0) == "test"]
    model = build_model(cfg, seed=0)
    t0 = time.perf_counter()
    train_local(model, train, TrainConfig(epochs=epochs, stage1_epochs=max(1, epochs // 4)))
    print(f"[bench] trained on {len(train)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    fit_model_temperature(model, test)
    return save_checkpoint(model, ckpt)


def faithfulness(model: Any, fed: Path, out: Path, tolerance_mm: float) -> dict[str, Any]:
    """CT maps scored on site_a's test split and all of site_b (the model trained on site_a's
    train split)."""
    from faithfulness_cases import faithfulness_report, lesion_cases

    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of

    cases = []
    for sid in ("site_a", "site_b"):
        site = load_site(fed / sid, model.cfg.inputs, out / "cache" / sid)
        cases += [c for c in site.cases if sid == "site_b" or split_of(c.case_id, 0) == "test"]
    return faithfulness_report(model, lesion_cases(fed, cases), tolerance_mm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_api(base: str, case_ids: list[str], calls: int, warmup: int, service: Any
             ) -> dict[str, Any]:
    import httpx

    client = httpx.Client(base_url=base, timeout=60)
    r = client.post("/login", data={"username": USER, "password": PASSWORD})
    r.raise_for_status()
    totals, totals_img, server, cpu = [], [], [], []
    load_before = os.getloadavg()[0]
    for i in range(warmup + calls):
        cid = case_ids[i % len(case_ids)]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        ev = client.post("/gradio_api/call/diagnose", json={"data": [cid]}).json()["event_id"]
        data = None
        with client.stream("GET", f"/gradio_api/call/diagnose/{ev}") as resp:
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    break
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if event != "complete" or data is None:
            raise RuntimeError(f"diagnose call failed: {event} {data}")
        # what the browser does next: fetch the images (CT, pathology, EHR, modality charts)
        for item in data:
            if isinstance(item, dict) and item.get("url"):
                client.get(item["url"]).raise_for_status()
        t2 = time.perf_counter()
        if i >= warmup:
            totals.append((t1 - t0) * 1e3)
            totals_img.append((t2 - t0) * 1e3)
            server.append(dict(service.timing_log[-1]))
            cpu.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3)
    keys = sorted({k for s in server for k in s})
    breakdown = {k: round(statistics.median([s.get(k, 0.0) for s in server]), 2) for k in keys}
    handler = [sum(s.values()) for s in server]
    transport = [t - h for t, h in zip(totals, handler, strict=True)]
    return {"result": summary(totals), "result_plus_images": summary(totals_img),
            "server_median_ms": breakdown, "server_total": summary(handler),
            "transport_and_gradio": summary(transport),
            # CPU time this process (server + client) spent per call, all threads: what a call
            # costs independent of other load on the machine.
            "process_cpu_per_call": summary(cpu),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def png_encode_cost(service: Any, case_id: str) -> float:
    from PIL import Image

    d = service.diagnose_case(case_id)
    imgs = [x for x in (d.ct_image, d.path_image) if x is not None]
    t0 = time.perf_counter()
    for _ in range(20):
        for im in imgs:
            Image.fromarray(im).save(io.BytesIO(), format="PNG")
    return (time.perf_counter() - t0) / 20 * 1e3


def via_gradio_client(base: str, case_ids: list[str], calls: int) -> dict[str, float]:
    from gradio_client import Client

    c = Client(base, auth=(USER, PASSWORD), verbose=False)
    c.predict(case_ids[0], api_name="/diagnose")
    ts = []
    for i in range(calls):
        t0 = time.perf_counter()
        c.predict(case_ids[i % len(case_ids)], api_name="/diagnose")
        ts.append((time.perf_counter() - t0) * 1e3)
    return summary(ts)


def in_browser(base: str, labels: list[str], clicks: int, shot: Path) -> dict[str, float] | str:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        return "skipped: /usr/bin/chromium absent"
    from playwright.sync_api import sync_playwright

    ts = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(base, timeout=60_000)
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        for i in range(clicks + 1):
            page.locator("#worklist input").click(timeout=60_000)
            page.get_by_role("option", name=labels[i % len(labels)]).first.click()
            old = page.locator("#ct-image img").get_attribute("src") if i else None
            t0 = time.perf_counter()
            page.locator("#diagnose-btn").click()
            page.wait_for_function(
                """old => { const im = document.querySelector('#ct-image img');
                            return im && im.src && im.src !== old && im.complete
                                   && im.naturalWidth > 0; }""", arg=old, timeout=60_000)
            if i:
                ts.append((time.perf_counter() - t0) * 1e3)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return summary(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".fedsight/bench-ui"))
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--sizes", type=int, nargs=2, default=(120, 70))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--client-calls", type=int, default=30)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance-mm", type=float, default=15.0)
    ap.add_argument("--skip-faithfulness", action="store_true")
    ap.add_argument("--faithfulness-model", type=Path, default=None,
                    help="checkpoint whose CT maps are scored (default: the served model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    from explain.config import ExplainConfig
    from ui.app import build_app, serve
    from ui.config import UiConfig, hash_password
    from ui.service import DiagnosisService

    fed = make_federation(args.out, tuple(args.sizes))
    model_path = args.model or train_model(fed, args.out, args.epochs)
    t0 = time.perf_counter()
    service = DiagnosisService.from_paths(fed / "site_a", model_path, args.out / "cache" /
                                          "site_a", ExplainConfig())
    load_s = time.perf_counter() - t0
    res: dict[str, Any] = {"load_avg_start": os.getloadavg(), "threads": args.threads,
                           "model": service.served.version, "startup_load_s": round(load_s, 2),
                           "worklist_cases": len(service.worklist())}
    if not args.skip_faithfulness:
        fm = service.served.model
        if args.faithfulness_model is not None:
            from multimodal.checkpoint import load_checkpoint

            fm = load_checkpoint(args.faithfulness_model).eval()
        res["faithfulness"] = faithfulness(fm, fed, args.out, args.tolerance_mm)
    work = service.worklist()
    ids = [cid for _, cid in work]
    labels = [lab for lab, cid in work if service._cases[cid].ct is not None][:4]
    res["png_encode_ms"] = round(png_encode_cost(service, ids[0]), 2)

    cfg = UiConfig(port=free_port(), users=((USER, hash_password(PASSWORD, 1000)),))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    base = f"http://127.0.0.1:{cfg.port}"
    try:
        res["http_api"] = http_api(base, ids, args.calls, args.warmup, service)
        print(f"[bench] http api: {res['http_api']}", flush=True)
        res["gradio_client"] = via_gradio_client(base + "/", ids, args.client_calls)
        print(f"[bench] gradio_client: {res['gradio_client']}", flush=True)
        res["browser_click_to_rendered"] = in_browser(base + "/", labels, args.clicks,
                                                      args.out / "bench_ui_browser.png")
        print(f"[bench] browser: {res['browser_click_to_rendered']}", flush=True)
    finally:
        app.close()
    res["load_avg_end"] = os.getloadavg()
    (args.out / "bench_ui.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

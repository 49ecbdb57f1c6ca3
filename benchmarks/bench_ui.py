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
4. With --clients 1,4,10: simulated clinicians in a separate process (one thread and one logged-in
   HTTP session each) click worklist cases, step CT slices, ask questions, send feedback and
   upload a DICOM zip now and then, for --duration seconds per level, after the background
   triage has precomputed the worklist. Per action: throughput and p50/p95/p99; diagnoses/s;
   the triage cache hit rate; the server's peak RSS; the micro-batch sizes. --skip-single runs
   only this part (no faithfulness, single-client, gradio_client or browser runs).
Results: <out>/bench_ui.json and a markdown section printed (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vocab.offline import enforce_offline

enforce_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402

USER, PASSWORD = "bench", "bench-pass"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _call(client: Any, api: str, data: list[Any], session: str = "") -> list[Any]:
    """One Gradio HTTP API call as the browser makes it (POST, then read the event stream);
    `session`: a session hash, so that component updates (the slider's range) carry over."""
    body: dict[str, Any] = {"data": data}
    if session:
        body["session_hash"] = session
    ev = client.post(f"/gradio_api/call/{api}", json=body)
    ev.raise_for_status()
    event, out = "", None
    with client.stream("GET", f"/gradio_api/call/{api}/{ev.json()['event_id']}") as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                out = json.loads(line[5:])
                break
    if event != "complete" or out is None:
        raise RuntimeError(f"{api} failed: {event} {str(out)[:200]}")
    return out


def clinician(base: str, k: int, ids: list[str], upload: tuple[str, str, list[Any]],
              duration_s: float, upload_every: int, clicks_only: bool = False
              ) -> dict[str, list[float]]:
    """One simulated clinician: sessions of (worklist click, 2 slice steps, a question,
    feedback on every third), an upload (a worklist case's CT zip, pathology tile and EHR
    values) instead of the click every `upload_every` sessions. `clicks_only`: worklist clicks
    back to back (the load of the single-action baseline)."""
    import httpx
    from PIL import Image, PngImagePlugin

    zip_path, tile_path, ehr = upload
    tile = Image.open(tile_path)
    tile.load()

    rng = np.random.default_rng(k)
    c = httpx.Client(base_url=base, timeout=120)
    c.post("/login", data={"username": USER, "password": PASSWORD}).raise_for_status()
    t: dict[str, list[float]] = {a: [] for a in ("click", "upload", "slice", "ask", "feedback")}
    errors: list[str] = []
    session = f"bench{k}x{os.getpid()}"
    end = time.perf_counter() + duration_s
    n = 0
    while time.perf_counter() < end:
        n += 1
        try:
            t0 = time.perf_counter()
            if clicks_only:
                _call(c, "diagnose", [ids[int(rng.integers(len(ids)))]], session)
                t["click"].append((time.perf_counter() - t0) * 1e3)
                continue
            if upload_every and n % upload_every == 0:
                # unique bytes per upload (a zip comment): Gradio stores uploads by content
                # hash, and the app deletes an upload after use
                buf = io.BytesIO(Path(zip_path).read_bytes())
                with zipfile.ZipFile(buf, "a") as zf:
                    zf.comment = f"bench {k} {n} {time.time_ns()}".encode()
                png = io.BytesIO()
                info = PngImagePlugin.PngInfo()
                info.add_text("bench", f"{k} {n} {time.time_ns()}")
                tile.save(png, format="PNG", pnginfo=info)
                up = c.post("/gradio_api/upload", files=[
                    ("files", ("series.zip", buf.getvalue(), "application/zip")),
                    ("files", ("tile.png", png.getvalue(), "image/png"))])
                up.raise_for_status()
                zp, pp = ({"path": x, "meta": {"_type": "gradio.FileData"}} for x in up.json())
                out = _call(c, "diagnose_upload", [[zp], pp, *ehr], session)
                t["upload"].append((time.perf_counter() - t0) * 1e3)
            else:
                out = _call(c, "diagnose", [ids[int(rng.integers(len(ids)))]], session)
                t["click"].append((time.perf_counter() - t0) * 1e3)
            handle = out[0]
            if not handle:  # not diagnosed (out of scope): next case
                continue
            top = out[3].get("maximum", 2) if isinstance(out[3], dict) else 2
            for _ in range(2 if out[2] else 0):  # slice steps where there is a CT
                t0 = time.perf_counter()
                _call(c, "ct_slice", [handle, int(rng.integers(1, int(top) + 1)), 1500, -600],
                      session)
                t["slice"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            _call(c, "ask", [handle, "How sure is it?"], session)
            t["ask"].append((time.perf_counter() - t0) * 1e3)
            if n % 3 == 1:
                t0 = time.perf_counter()
                _call(c, "feedback", [handle, "agree", None, f"bench {k}-{n}"], session)
                t["feedback"].append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")
    t["errors"] = errors  # type: ignore[assignment]
    return t


def _client_process(base: str, n: int, ids: list[str], upload: tuple[str, str, list[Any]],
                    duration_s: float, upload_every: int, clicks_only: bool, q: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        res = list(ex.map(lambda k: clinician(base, k, ids, upload, duration_s, upload_every,
                                              clicks_only), range(n)))
    q.put((res, time.perf_counter() - t0))


def concurrency(base: str, service: Any, levels: list[int], duration_s: float, ids: list[str],
                upload: tuple[str, str, list[Any]], upload_every: int,
                clicks_only: bool = False) -> dict[str, Any]:
    """Each level's clients run in a separate process (their HTTP and JSON work does not share
    the server's GIL); the server's RSS is sampled every 100 ms."""
    import multiprocessing as mp
    import threading

    from vocab.feedback_store import FeedbackStore

    out: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    store = FeedbackStore(service.feedback_store.path)
    for n in levels:
        cache = service.triage_cache
        h0, m0 = (cache.hits, cache.misses) if cache is not None else (0, 0)
        b0 = len(service._batcher.batch_sizes)
        fb0 = len(store.all())
        service.timing_log.clear()
        peak = [rss_mb()]
        stop = threading.Event()

        def sample(stop: threading.Event = stop, peak: list[float] = peak) -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        q = ctx.Queue()
        proc = ctx.Process(target=_client_process, args=(base, n, ids, upload, duration_s,
                                                         upload_every, clicks_only, q))
        load0 = os.getloadavg()[0]
        cpu0 = os.times()
        proc.start()
        res, wall = q.get(timeout=duration_s + 600)
        cpu1 = os.times()
        server_cpu_s = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        proc.join(60)
        stop.set()
        sampler.join()
        merged: dict[str, list[float]] = {}
        errors = [e for r in res for e in r.pop("errors")]
        for r in res:
            for a, xs in r.items():
                merged.setdefault(a, []).extend(xs)
        hits, misses = ((cache.hits - h0, cache.misses - m0) if cache is not None else (0, 0))
        sizes = service._batcher.batch_sizes[b0:]
        steps = list(service.timing_log)
        keys = sorted({k for st in steps for k in st})
        diagnoses = len(merged["click"]) + len(merged["upload"])
        out[str(n)] = {
            "wall_s": round(wall, 1), "load_avg_1min": [round(load0, 2),
                                                        round(os.getloadavg()[0], 2)],
            "actions_per_s": round(sum(len(v) for v in merged.values()) / wall, 1),
            "diagnoses_per_s": round(diagnoses / wall, 1),
            "per_action": {a: {"n": len(xs), "per_s": round(len(xs) / wall, 2),
                               "p50_ms": round(pctl(xs, 50), 1),
                               "p95_ms": round(pctl(xs, 95), 1),
                               "p99_ms": round(pctl(xs, 99), 1)} for a, xs in merged.items()},
            # CPU seconds the server process used (all threads; the clients run elsewhere),
            # per second of wall time and per action: cost independent of the machine's load
            "server_cpu_cores": round(server_cpu_s / wall, 2),
            "server_cpu_ms_per_action": round(server_cpu_s * 1e3 / max(1, sum(
                len(v) for v in merged.values())), 1),
            "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
            "micro_batches": {"n": len(sizes), "mean_size": round(float(np.mean(sizes)), 2)
                              if sizes else None, "max_size": max(sizes) if sizes else None},
            # server-side steps of the diagnoses (clicks and uploads), medians / p95
            "server_steps_ms": {k: [round(pctl([st[k] for st in steps if k in st], 50), 1),
                                    round(pctl([st[k] for st in steps if k in st], 95), 1)]
                                for k in keys},
            "feedback_rows_written": len(store.all()) - fb0,
            "feedback_sent": len(merged["feedback"]),
            "server_peak_rss_mb": round(peak[0], 1),
            "errors": len(errors), "error_examples": sorted(set(errors))[:3],
        }
        print(f"[bench] {n} clients: {json.dumps(out[str(n)])}", flush=True)
    return out


def zip_series(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"series/{f.name}")
    return dest


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
    ap.add_argument("--clients", default="", help="concurrency levels, e.g. 1,4,10")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    ap.add_argument("--upload-every", type=int, default=10,
                    help="a clinician's every n-th session is an upload (0: none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--clicks-only", action="store_true",
                    help="concurrency clients only click worklist cases (no slices, questions, "
                         "feedback, uploads)")
    ap.add_argument("--cold", action="store_true",
                    help="no triage cache: every diagnosis is computed (micro-batched)")
    ap.add_argument("--skip-single", action="store_true",
                    help="only the concurrency levels (no faithfulness, single client, browser)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    from explain.config import ExplainConfig
    from ui.app import build_app, serve
    from ui.config import TriageConfig, UiConfig, hash_password
    from ui.service import DiagnosisService

    fed = make_federation(args.out, tuple(args.sizes))
    model_path = args.model or train_model(fed, args.out, args.epochs)
    t0 = time.perf_counter()
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    triage = TriageConfig(cache_dir=args.out / f"triage-{time.time_ns()}", rescan_s=3600,
                          max_batch=args.batch_size, max_wait_ms=args.batch_wait_ms) \
        if levels and not args.cold else None  # a fresh cache: the warm-up below is measured
    if args.cold and levels:
        # no cache, no background work; interactive calls still go through the micro-batcher
        triage = TriageConfig(cache=False, background=False, max_batch=args.batch_size,
                              max_wait_ms=args.batch_wait_ms)
    service = DiagnosisService.from_paths(fed / "site_a", model_path, args.out / "cache" /
                                          "site_a", ExplainConfig(), triage=triage)
    load_s = time.perf_counter() - t0
    res: dict[str, Any] = {"load_avg_start": os.getloadavg(), "threads": args.threads,
                           "model": service.served.version, "startup_load_s": round(load_s, 2),
                           "worklist_cases": len(service.worklist())}
    if service.worker is not None:
        # the background worker fills the triage cache (one torch thread, nice 19)
        service.worker.idle.wait(1800)
        res["triage_warm_s"] = round(time.perf_counter() - t0 - load_s, 1)
        res["rss_after_warm_mb"] = round(rss_mb(), 1)
    if not args.skip_faithfulness and not args.skip_single:
        fm = service.served.model
        if args.faithfulness_model is not None:
            from multimodal.checkpoint import load_checkpoint

            fm = load_checkpoint(args.faithfulness_model).eval()
        res["faithfulness"] = faithfulness(fm, fed, args.out, args.tolerance_mm)
    work = service.worklist()
    ids = [cid for _, cid in work]
    labels = [lab for lab, cid in work if service._cases[cid].ct is not None][:4]
    if not args.skip_single:
        res["png_encode_ms"] = round(png_encode_cost(service, ids[0]), 2)

    cfg = UiConfig(port=free_port(), users=((USER, hash_password(PASSWORD, 1000)),))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    base = f"http://127.0.0.1:{cfg.port}"
    try:
        if levels:
            full = [cid for cid in ids if len(service._cases[cid].modalities()) == 3]
            zp = zip_series(fed / "site_a" / "ct" / full[0], args.out / "upload.zip")
            tile = next((fed / "site_a" / "pathology").glob(f"{full[0]}.*"))
            ehr = [None if math.isnan(float(v)) else float(v)
                   for v in service._cases[full[0]].ehr]
            res["concurrency"] = concurrency(base, service, levels, args.duration, ids,
                                             (str(zp), str(tile), ehr), args.upload_every,
                                             args.clicks_only)
            res["batch"] = {"max_batch": args.batch_size, "max_wait_ms": args.batch_wait_ms}
        if not args.skip_single:
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

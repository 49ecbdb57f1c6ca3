"""Screenshots of the running clinician app in headless Chromium, for docs/ui.md.

    python benchmarks/ui_screenshots.py --model VERSION_DIR_OR_STORE --site SITE_DIR \
        [--out docs/img] [--head-ct ../shared/data/ct-head-ge]

Serves the app on 127.0.0.1 (login, triage cache in a temporary folder), logs in, and writes:
ui_worklist_diagnosis.png (triage worklist + a diagnosis, CT in the lung window),
ui_ct_mediastinum.png (the same slice in the mediastinal window), ui_model_card.png (the
calibration panel with its reliability diagram) and, given --head-ct, ui_out_of_scope.png (a real
head CT uploaded and refused). Needs Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vocab.offline import enforce_offline

enforce_offline()

USER, PASSWORD = "screenshots", "screenshots-pass"
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--head-ct", type=Path, default=None)
    args = ap.parse_args()
    if not CHROMIUM.exists():
        print("needs Debian chromium at /usr/bin/chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import expect, sync_playwright

    from explain.config import ExplainConfig
    from ui.app import build_app, serve
    from ui.config import TriageConfig, UiConfig, hash_password
    from ui.service import DiagnosisService

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedsight-shots-"))
    service = DiagnosisService.from_paths(
        args.site, args.model, work / "cache", ExplainConfig(),
        triage=TriageConfig(cache_dir=work / "triage", rescan_s=3600))
    if service.worker is not None:
        service.worker.idle.wait(900)  # the worklist shows the precomputed triage
    cfg = UiConfig(port=free_port(), users=((USER, hash_password(PASSWORD, 1000)),))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(f"http://127.0.0.1:{cfg.port}/", timeout=60_000)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            table = page.locator("#worklist-table")
            expect(table).to_be_visible(timeout=60_000)
            # the first row of the triage order: the most suspicious / uncertain case
            label = service.worklist()[0][0]
            page.locator("#worklist input").click(timeout=60_000)
            page.get_by_role("option", name=label).first.click()
            page.locator("#diagnose-btn").click()
            expect(page.locator("#card")).to_contain_text("Probability of malignancy",
                                                          timeout=60_000)
            expect(page.locator("#ct-caption")).to_contain_text("W 1500", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "ui_worklist_diagnosis.png"), full_page=True)
            page.locator("#ct-window").get_by_text("mediastinum", exact=False).first.click()
            expect(page.locator("#ct-caption")).to_contain_text("W 350", timeout=60_000)
            page.wait_for_timeout(1000)
            page.locator("#ct-image").screenshot(path=str(args.out / "ui_ct_mediastinum.png"))
            page.get_by_text("Model card: calibration").click()
            page.wait_for_timeout(1500)
            page.locator("#calibration").scroll_into_view_if_needed()
            page.screenshot(path=str(args.out / "ui_model_card.png"), full_page=True)
            if args.head_ct is not None and args.head_ct.is_dir():
                page.get_by_role("tab", name="Upload").click()
                files = sorted(str(p) for p in args.head_ct.glob("*.dcm") if p.is_file())
                # copies: uploads are deleted after use, the shared data is read-only
                page.locator("input[type=file][multiple]").first.set_input_files(files)
                page.wait_for_timeout(10_000)  # the 28 files reach the server
                page.get_by_role("button", name="Diagnose upload").click()
                expect(page.locator("#card")).to_contain_text("Not diagnosed", timeout=120_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(args.out / "ui_out_of_scope.png"), full_page=True)
            browser.close()
    finally:
        app.close()
        service.close()
    for p in sorted(args.out.glob("ui_*.png")):
        print(f"wrote {p} ({p.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

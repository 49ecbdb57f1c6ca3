"""The real app on 127.0.0.1: driven by gradio_client, and by a real headless Chromium."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui.conftest import ct_case_with_ct, zip_series
from ui.service import DiagnosisService
from vocab.feedback_store import FeedbackStore

pytestmark = pytest.mark.integration
USER, PASSWORD = "dr_a", "s3cret-pass"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(service: DiagnosisService) -> Iterator[str]:
    from ui.app import build_app, serve
    from ui.config import UiConfig, hash_password

    cfg = UiConfig(port=_free_port(), users=((USER, hash_password(PASSWORD, 1000)),))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    try:
        yield f"http://127.0.0.1:{cfg.port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(server: str):
    from gradio_client import Client

    return Client(server, auth=(USER, PASSWORD), verbose=False)


def test_diagnose_worklist_case_and_send_feedback(client, site_root: Path):
    cid = ct_case_with_ct(site_root)
    out = client.predict(cid, api_name="/diagnose")
    handle, card, ct_img = out[0], out[1], out[2]
    assert handle and "Probability of malignancy" in card
    assert Path(ct_img).is_file() and Path(ct_img).stat().st_size > 500
    answer = client.predict(handle, "What if we had no pathology?", api_name="/ask")
    assert "%" in answer
    msg = client.predict(handle, "disagree", "malignant (1)", "please review",
                         api_name="/feedback")
    assert "Feedback saved" in msg
    rows = [f for f in FeedbackStore.at_site(site_root).all() if f.comment == "please review"]
    assert rows and rows[-1].case_id == cid and rows[-1].corrected_label == 1
    assert rows[-1].user == USER


def test_upload_dicom_zip(client, site_root: Path, tmp_path: Path):
    from gradio_client import handle_file

    z = zip_series(site_root / "ct" / ct_case_with_ct(site_root), tmp_path / "series.zip")
    out = client.predict([handle_file(str(z))], None, "70", "1", "40", "1", "8.0", "", "", "",
                         api_name="/diagnose_upload")
    assert "Probability of malignancy" in out[1] and out[2] is not None
    # the form left empty (as the browser sends it): a CT-only diagnosis, no EHR refusal
    z2 = zip_series(site_root / "ct" / ct_case_with_ct(site_root), tmp_path / "series2.zip")
    out = client.predict([handle_file(str(z2))], None, *([""] * 8),
                         api_name="/diagnose_upload")
    assert "Probability of malignancy" in out[1]
    assert "EHR" in out[1].split("**missing:**")[1].splitlines()[0]


def test_broken_upload_gives_the_error_and_server_keeps_serving(client, site_root: Path,
                                                                tmp_path: Path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "slice.dcm"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(AppError, match="Upload refused: .*not a DICOM"):
        client.predict([handle_file(str(bad))], None, *([None] * 8),
                       api_name="/diagnose_upload")
    out = client.predict(ct_case_with_ct(site_root), api_name="/diagnose")
    assert "Probability of malignancy" in out[1]


def test_login_is_required(server: str):
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "gradio_api/info", timeout=10)
    assert err.value.code in (401, 403)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at "
                    "/usr/bin/chromium (apt-get install chromium)")
def test_browser_login_open_case_see_diagnosis(server: str, site_root: Path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    cid = ct_case_with_ct(site_root)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server, timeout=60_000)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            page.locator("#worklist input").click(timeout=60_000)
            page.get_by_role("option", name=cid).first.click()
            t0 = time.perf_counter()
            page.locator("#diagnose-btn").click()
            expect(page.locator("#card")).to_contain_text("Probability of malignancy",
                                                          timeout=60_000)
            img = page.locator("#ct-image img")
            expect(img).to_be_visible(timeout=30_000)
            page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                                   arg=img.element_handle(), timeout=30_000)
            click_to_rendered = time.perf_counter() - t0
            page.screenshot(path=str(ARTIFACTS / "ui_diagnosis.png"), full_page=True)
            assert click_to_rendered < 30
        finally:
            browser.close()

"""One app serves every task of a two-task version, one tab each (the task selector): the real
Gradio server driven by gradio_client (each task's API) and by a real headless Chromium
(switching tabs and diagnosing in the second task's words)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from multimodal.adapt import AdaptConfig, build_adapted
from multimodal.checkpoint import save_checkpoint
from tests.explain.fixtures import tiny_model
from tests.ui.conftest import ct_case_with_ct
from vocab.feedback_store import FeedbackStore
from vocab.site_layout import FEEDBACK_DB

pytestmark = pytest.mark.integration
USER, PASSWORD = "dr_t", "two-task-pass"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(site_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tasks-site") / "site"  # its own feedback store
    shutil.copytree(site_root, dest, ignore=shutil.ignore_patterns(Path(FEEDBACK_DB).name + "*"))
    return dest


@pytest.fixture(scope="module")
def server(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from cli.ui_cmd import launch_app
    from ui.config import hash_password

    model = build_adapted(tiny_model(), "fibrosis", AdaptConfig(method="lora"))
    with torch.no_grad():  # the two heads answer differently
        for p in model.task_heads["fibrosis"].parameters():
            p.add_(torch.randn_like(p))
    tmp = tmp_path_factory.mktemp("tasks-app")
    ckpt = save_checkpoint(model, tmp / "model.pt")
    users = tmp / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, 1000)}\n")
    port = _free_port()
    # the CLI's own entry: no --task = every task of the version
    app = launch_app(site, ckpt, port=port, users_file=users, cache_dir=tmp / "cache",
                     block=False, audit_log=tmp / "audit.jsonl", threads=1)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()  # type: ignore[attr-defined]


def test_each_task_has_its_api_and_answers_in_its_words(server: str, site: Path) -> None:
    from gradio_client import Client

    client = Client(server, auth=(USER, PASSWORD), verbose=False)
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/diagnose", "/diagnose_fibrosis", "/feedback", "/feedback_fibrosis",
            "/ask_fibrosis"} <= names
    assert not any(n.endswith("_sepsis") for n in names)
    cid = ct_case_with_ct(site)
    a = client.predict(cid, api_name="/diagnose")
    b = client.predict(cid, api_name="/diagnose_fibrosis")
    assert "Probability of malignancy" in a[1] and "fixed by the task (nodule)" in a[1]
    assert "Probability of fibrotic interstitial lung disease" in b[1]
    assert "not the task's policy" in b[1]
    pa = float(a[1].split("Probability of malignancy ")[1].split("%")[0])
    pb = float(b[1].split("interstitial lung disease ")[1].split("%")[0])
    assert pa != pb  # two heads, not one answer shown twice
    # feedback through the second task's endpoint is that task's label
    msg = client.predict(b[0], "disagree", "fibrotic ILD (1)", "", api_name="/feedback_fibrosis")
    assert "Feedback saved" in msg
    rows = FeedbackStore.at_site(site).all()
    assert [(r.task, r.case_id, r.corrected_label) for r in rows] == [("fibrosis", cid, 1)]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at "
                    "/usr/bin/chromium (apt-get install chromium)")
def test_browser_switches_task_and_diagnoses_there(server: str, site: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    cid = ct_case_with_ct(site)
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
            expect(page.locator("#app-header")).to_contain_text("fibrosis", timeout=60_000)
            page.get_by_role("tab", name="fibrosis: fibrotic interstitial lung disease").click()
            page.locator("#worklist-fibrosis input").click(timeout=60_000)
            page.get_by_role("option", name=cid).first.click()
            page.locator("#diagnose-btn-fibrosis").click()
            card = page.locator("#card-fibrosis")
            expect(card).to_contain_text("Probability of fibrotic interstitial lung disease",
                                         timeout=60_000)
            expect(card).to_contain_text("not the task's policy")
            # the first task's panel is hidden, untouched
            expect(page.locator("#card")).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "ui_two_tasks.png"), full_page=True)
        finally:
            browser.close()

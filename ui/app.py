"""The clinician app: `build_app(service, cfg)` builds the Gradio Blocks (no model at import);
`serve(app, cfg)` launches it with login, upload limits and no outbound calls.

Handlers are thin: they call the DiagnosisService and turn its DataError into a gr.Error the
clinician reads; the app keeps serving. API names (for the HTTP API and gradio_client):
diagnose, diagnose_upload, ct_slice, ask, feedback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vocab.offline import enforce_offline

enforce_offline()  # before gradio is imported: it reads the analytics settings at import

import gradio as gr  # noqa: E402

from explain.answers import QUESTIONS  # noqa: E402
from ui.config import UiConfig  # noqa: E402
from ui.service import Diagnosis, DiagnosisService  # noqa: E402
from vocab import audit as A  # noqa: E402
from vocab.audit import AuditLog  # noqa: E402
from vocab.errors import DataError  # noqa: E402

CORRECTED = {"benign (0)": 0, "malignant (1)": 1}
# Overlays arrive at model resolution; the browser enlarges them without smoothing.
CSS = "#ct-image img, #path-image img { image-rendering: pixelated; width: 100%; height: 100%;" \
      " object-fit: contain; }"


def _outputs(d: Diagnosis) -> tuple[Any, ...]:
    n = max(d.n_slices, 2)  # a slider needs max > min; hidden anyway when there is no CT
    slider = gr.Slider(minimum=1, maximum=n, step=1, value=d.ct_slice + 1,
                       visible=d.ct_image is not None, label=f"CT slice (of {n})")
    return (d.handle, d.card_md, d.ct_image, slider, d.path_image, d.ehr_chart,
            d.modality_chart, d.modality_md, "")


def _paths(files: Any) -> list[Path]:
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    return [Path(f if isinstance(f, str) else f.name) for f in items]


def _user(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def login_check(cfg: UiConfig, audit: AuditLog | None) -> Callable[[str, str], bool]:
    """Gradio's auth callable: cfg.authenticate, with every attempt in the audit log (the user
    name only; an attempt that cannot be audited is refused)."""

    def check(name: str, password: str) -> bool:
        ok = cfg.authenticate(name, password)
        if audit is not None:
            audit.append(A.UI_LOGIN if ok else A.UI_LOGIN_FAILED, name[:128])
        return ok

    return check


def build_app(service: DiagnosisService, cfg: UiConfig) -> gr.Blocks:
    schema = service.served.model.schema

    def diagnose(case_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        if not case_id:
            raise gr.Error("Choose a case from the worklist first.")
        try:
            return _outputs(service.diagnose_case(case_id, _user(request)))
        except DataError as e:
            raise gr.Error(str(e)) from None

    def diagnose_upload(dicom: Any, pathology: Any, *ehr: float | None) -> tuple[Any, ...]:
        values = dict(zip(schema.names, ehr, strict=True))
        path_file = _paths(pathology)
        try:
            d = service.diagnose_upload(_paths(dicom), path_file[0] if path_file else None,
                                        values)
        except DataError as e:
            raise gr.Error(f"Upload refused: {e}") from None
        return _outputs(d)

    def ct_slice(handle: str, index: float) -> Any:
        if not handle:
            return None
        try:
            return service.ct_slice(handle, int(index) - 1)
        except DataError as e:
            raise gr.Error(str(e)) from None

    def ask(handle: str, question: str) -> str:
        if not handle:
            raise gr.Error("Diagnose a case first.")
        try:
            return service.ask(handle, question or "")
        except DataError as e:
            raise gr.Error(str(e)) from None

    def feedback(handle: str, verdict: str, corrected: str | None, comment: str,
                 request: gr.Request) -> str:
        if not handle:
            raise gr.Error("Diagnose a case first.")
        if verdict not in ("agree", "disagree"):
            raise gr.Error("Choose agree or disagree.")
        try:
            row = service.send_feedback(handle, verdict, CORRECTED.get(corrected or ""),
                                        comment or "", _user(request))
        except DataError as e:
            raise gr.Error(str(e)) from None
        return f"Feedback saved (#{row}). It becomes a training label in the next round."

    with gr.Blocks(title=cfg.title, delete_cache=(600, 900), analytics_enabled=False) as app:
        handle = gr.Textbox(visible=False, label="diagnosis handle")
        gr.Markdown(f"## {cfg.title}\nSite `{service.site_id}` · model `{service.served.version}`")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Tab("Worklist"):
                    case = gr.Dropdown(choices=service.worklist(), label="Case",
                                       elem_id="worklist")
                    go = gr.Button("Diagnose", variant="primary", elem_id="diagnose-btn")
                with gr.Tab("Upload"):
                    dicom = gr.File(label="CT: DICOM files or one .zip", file_count="multiple")
                    path_up = gr.File(label="Pathology image (PNG/TIFF)", file_count="single")
                    ehr_inputs = [gr.Number(label=f"{f.name} ({f.unit})", value=None)
                                  for f in schema.fields]
                    go_up = gr.Button("Diagnose upload", variant="primary")
            with gr.Column(scale=2):
                card = gr.Markdown("Choose a case and press Diagnose.", elem_id="card")
                with gr.Row():
                    with gr.Column():
                        ct_img = gr.Image(label="CT with attribution", type="numpy",
                                          format="png", interactive=False, elem_id="ct-image",
                                          height=300)
                        slider = gr.Slider(1, 2, step=1, value=1, label="CT slice",
                                           visible=False)
                    path_img = gr.Image(label="Pathology with attribution", type="numpy",
                                        format="png", interactive=False, elem_id="path-image",
                                        height=300)
                with gr.Row():
                    ehr_img = gr.HTML(elem_id="ehr-bars")
                    with gr.Column():
                        mod_img = gr.HTML(elem_id="modality-bars")
                        mod_md = gr.Markdown()
                with gr.Row():
                    question = gr.Dropdown(choices=list(QUESTIONS), value=QUESTIONS[0],
                                           allow_custom_value=True, label="Ask")
                    ask_btn = gr.Button("Ask")
                answer_md = gr.Markdown(elem_id="answer")
                with gr.Accordion("Feedback", open=False):
                    verdict = gr.Radio(["agree", "disagree"], label="Your judgement")
                    corrected = gr.Radio(list(CORRECTED), label="Correct diagnosis (if you "
                                         "disagree)")
                    comment = gr.Textbox(label="Comment", lines=2)
                    fb_btn = gr.Button("Send feedback")
                    fb_status = gr.Markdown()

        outs = [handle, card, ct_img, slider, path_img, ehr_img, mod_img, mod_md, answer_md]
        go.click(diagnose, [case], outs, api_name="diagnose")
        go_up.click(diagnose_upload, [dicom, path_up, *ehr_inputs], outs,
                    api_name="diagnose_upload")
        slider.release(ct_slice, [handle, slider], [ct_img], api_name="ct_slice")
        ask_btn.click(ask, [handle, question], [answer_md], api_name="ask")
        fb_btn.click(feedback, [handle, verdict, corrected, comment], [fb_status],
                     api_name="feedback")
    return app


def serve(app: gr.Blocks, cfg: UiConfig, block: bool = True) -> None:
    """Launch on cfg.host:cfg.port; `block=False` returns once serving (tests)."""
    app.queue(default_concurrency_limit=4).launch(
        server_name=cfg.host,
        server_port=cfg.port,
        auth=login_check(cfg, cfg.open_audit()) if cfg.users else None,
        auth_message="fedsight: sign in with your hospital account",
        max_file_size=cfg.max_file_size,
        allowed_paths=[],  # serve nothing from disk beyond Gradio's own cache
        share=False,
        quiet=True,
        show_error=False,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        prevent_thread_lock=not block,
        css=CSS,
    )

"""The clinician app: `build_app(service, cfg)` builds the Gradio Blocks (no model at import);
`serve(app, cfg)` launches it with login, upload limits and no outbound calls.

Handlers are thin: they call the DiagnosisService and turn its DataError into a gr.Error the
clinician reads; the app keeps serving. API names (for the HTTP API and gradio_client):
diagnose, diagnose_upload, ct_slice, ask, feedback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vocab.offline import enforce_offline

enforce_offline()  # before gradio is imported: it reads the analytics settings at import

import gradio as gr  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from explain.answers import QUESTIONS  # noqa: E402
from explain.config import ExplainConfig  # noqa: E402
from ui.config import UiConfig  # noqa: E402
from ui.ct_view import DEFAULT_PRESET, WINDOW_PRESETS, FrameFiles  # noqa: E402
from ui.login_limit import ClientAddressMiddleware, LoginLimiter, client_address  # noqa: E402
from ui.reliability import reliability_png  # noqa: E402
from ui.service import Diagnosis, DiagnosisService  # noqa: E402
from vocab import audit as A  # noqa: E402
from vocab.audit import AuditLog  # noqa: E402
from vocab.errors import DataError  # noqa: E402

WORKLIST_ORDERS = {"triage": "malignant or near the threshold first",
                   "suspicion": "highest probability first",
                   "uncertainty": "closest to the threshold first"}
WORKLIST_COLUMNS = ("case", "data", "P %", "decision", "margin (pp)", "feedback")
SHORT = {"ct": "CT", "path": "Path", "ehr": "EHR"}


def corrected_choices(cfg: ExplainConfig) -> dict[str, int]:
    """The feedback form's diagnoses in the served task's words."""
    return {f"{cfg.negative} (0)": 0, f"{cfg.positive} (1)": 1}
NO_DIAGNOSIS = ("No diagnosis is open: diagnose a case first (a case refused as out of scope "
                "has no diagnosis to ask about or give feedback on).")
# The pathology overlay arrives at model resolution; the browser enlarges it without smoothing.
# The CT comes at its own resolution (up to 512 px) and is scaled smoothly, as viewers do (a
# nearest-neighbour downscale would drop pixels); the 128 px pathology tile stays crisp.
CSS = "[id^=ct-image] img, [id^=path-image] img { width: 100%; height: 100%; " \
      "object-fit: contain; } [id^=path-image] img { image-rendering: pixelated; }"


def _outputs(d: Diagnosis) -> tuple[Any, ...]:
    n = max(d.n_slices, 2)  # a slider needs max > min; hidden anyway when there is no CT
    grid = "as acquired" if d.ct_native else "model grid"
    slider = gr.Slider(minimum=1, maximum=n, step=1, value=d.ct_slice + 1,
                       visible=d.ct_image is not None, label=f"CT slice ({grid}, of {n})")
    return (d.handle, d.card_md, d.ct_image, slider, d.path_image, d.ehr_chart,
            d.modality_chart, d.modality_md, "")


def _paths(files: Any) -> list[Path]:
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    return [Path(f if isinstance(f, str) else f.name) for f in items]


def _user(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def login_check(cfg: UiConfig, audit: AuditLog | None, limiter: LoginLimiter | None = None
                ) -> Callable[[str, str], bool]:
    """Gradio's auth callable: cfg.authenticate, with every attempt in the audit log (the user
    name only; an attempt that cannot be audited is refused). With a limiter, attempts over its
    back-off are refused unchecked with HTTP 429 + Retry-After (the first refusal of each
    back-off is audited; the rest would let a guesser flood the log)."""

    def check(name: str, password: str) -> bool:
        if limiter is None:
            ok = cfg.authenticate(name, password)
        else:
            att = limiter.attempt(name, client_address(),
                                  lambda: cfg.authenticate(name, password))
            if not att.allowed:
                wait = max(1, math.ceil(att.retry_after_s))
                if audit is not None and att.first_refusal:
                    audit.append(A.UI_LOGIN_THROTTLED, name[:128],
                                 {"scope": att.scope, "retry_after_s": wait})
                raise HTTPException(status_code=429, headers={"Retry-After": str(wait)},
                                    detail=f"Too many failed sign-ins; try again in {wait} s.")
            ok = att.ok
        if audit is not None:
            audit.append(A.UI_LOGIN if ok else A.UI_LOGIN_FAILED, name[:128])
        return ok

    return check


def model_card_image(service: DiagnosisService) -> Any:
    """The served version's reliability diagram as a PIL image (None without a fit)."""
    import io

    from PIL import Image

    png = reliability_png(service.served.calibration_meta, service.served.version)
    return Image.open(io.BytesIO(png)) if png is not None else None


def build_app(services: DiagnosisService | Sequence[DiagnosisService], cfg: UiConfig
              ) -> gr.Blocks:
    """One app for one site: a service per task of the served version (ui.service). With more
    than one, a tab per task (the task selector); the first task keeps the plain API names and
    element ids, every other task's get `_<task>` / `-<task>` appended."""
    services = [services] if isinstance(services, DiagnosisService) else list(services)
    if not services:
        raise ValueError("build_app needs at least one DiagnosisService")
    first = services[0]
    tasks = ", ".join(f"**{s.served.task}** (probability of {s.cfg.condition})" for s in services)
    with gr.Blocks(title=cfg.title, delete_cache=(600, 900), analytics_enabled=False) as app:
        gr.Markdown(f"## {cfg.title}\nSite `{first.site_id}` · model "
                    f"`{first.served.version}` · task{'s' if len(services) > 1 else ''} {tasks}",
                    elem_id="app-header")
        if len(services) == 1:
            _task_panel(app, first, "")
        else:
            with gr.Tabs(elem_id="task-tabs"):
                for i, s in enumerate(services):
                    with gr.Tab(f"{s.served.task}: {s.cfg.condition}", id=s.served.task,
                                elem_id=f"task-tab-{s.served.task}"):
                        _task_panel(app, s, "" if i == 0 else s.served.task)
    return app


def _task_panel(app: gr.Blocks, service: DiagnosisService, suffix: str) -> None:
    """The worklist, upload, diagnosis, CT view, "why?" and feedback of one task, wired to
    `service`; inside `app`'s Blocks context. suffix: "" or the task id (API names, elem ids)."""
    schema = service.served.model.schema
    corrected_of = corrected_choices(service.cfg)

    def api(name: str) -> str:
        return f"{name}_{suffix}" if suffix else name

    def eid(name: str) -> str:
        return f"{name}-{suffix}" if suffix else name

    def diagnose(case_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        if not case_id:
            raise gr.Error("Choose a case from the worklist first.")
        try:
            return _outputs(service.diagnose_case(case_id, _user(request)))
        except DataError as e:
            raise gr.Error(str(e)) from None

    def worklist_table(order: str, unreviewed: bool) -> tuple[Any, Any]:
        """The triage table (computed cases sorted by `order`, then pending ones) and the
        dropdown's choices in the same order."""
        table, choices = _worklist(order, unreviewed)
        return table, gr.Dropdown(choices=choices)

    def _worklist(order: str, unreviewed: bool) -> tuple[list[list[Any]], list[Any]]:
        try:
            rows = service.worklist_rows(order or "triage", bool(unreviewed))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        pending = "computing" if service.worker is not None else "not precomputed"
        table = [[r["case_id"], "+".join(SHORT.get(m, m) for m in r["modalities"]),
                  None if r["probability"] is None else round(100 * r["probability"], 1),
                  (r["decision"] or pending) + (" (uncertain)" if r["near_threshold"]
                                                else ""),
                  None if r["margin"] is None else round(100 * r["margin"], 1),
                  "yes" if r["feedback"] else ""] for r in rows]
        labels = dict((cid, lab) for lab, cid in service.worklist())
        choices = [(labels.get(r["case_id"], r["case_id"]), r["case_id"]) for r in rows]
        return (table or [[""] * len(WORKLIST_COLUMNS)]), choices

    def pick_row(table: Any, evt: gr.SelectData) -> str:
        row = evt.row_value if evt.row_value else None
        if row is None:
            row = list(table.iloc[evt.index[0]]) if hasattr(table, "iloc") else table[evt.index[0]]
        return str(row[0])

    def diagnose_upload(dicom: Any, pathology: Any, *ehr: str | float | None
                        ) -> tuple[Any, ...]:
        values = dict(zip(schema.names, ehr, strict=True))
        path_file = _paths(pathology)
        try:
            d = service.diagnose_upload(_paths(dicom), path_file[0] if path_file else None,
                                        values)
        except DataError as e:
            raise gr.Error(f"Upload refused: {e}") from None
        return _outputs(d)

    frames = FrameFiles()  # slice images as fast-encoded PNG files (ui.ct_view.FrameFiles)

    def ct_slice(handle: str, index: float, width: float | None = None,
                 level: float | None = None) -> tuple[Any, str]:
        """Slice `index` (1-based) in window width/level HU (None: lung) -> (image, caption)."""
        if not handle:
            return None, ""
        try:
            f = service.ct_frame(handle, int(index) - 1, width, level)
        except DataError as e:
            raise gr.Error(str(e)) from None
        return frames.write(f.image), f.label

    def ct_open(handle: str, width: float | None, level: float | None) -> tuple[Any, str, Any]:
        """A new diagnosis: its peak slice in the clinician's window, natively once read."""
        if not handle:
            return None, "", gr.Slider()
        try:
            f = service.ct_frame(handle, None, width, level)
        except DataError:
            return gr.Image(), "", gr.Slider()  # no CT (or closed): leave the view as it is
        grid = "as acquired" if f.native else "model grid"
        return frames.write(f.image), f.label, gr.Slider(minimum=1, maximum=max(f.n_slices, 2),
                                           value=f.index + 1,
                                           label=f"CT slice ({grid}, of {f.n_slices})")

    def window_preset(name: str) -> tuple[Any, Any]:
        w, lev = WINDOW_PRESETS.get(name, (None, None))
        return (gr.Number(value=w), gr.Number(value=lev)) if w is not None else (
            gr.Number(), gr.Number())

    def ask(handle: str, question: str) -> str:
        if not handle:
            raise gr.Error(NO_DIAGNOSIS)
        try:
            return service.ask(handle, question or "")
        except DataError as e:
            raise gr.Error(str(e)) from None

    def feedback(handle: str, verdict: str, corrected: str | None, comment: str,
                 request: gr.Request) -> str:
        if not handle:
            raise gr.Error(NO_DIAGNOSIS)
        if verdict not in ("agree", "disagree"):
            raise gr.Error("Choose agree or disagree.")
        try:
            row = service.send_feedback(handle, verdict, corrected_of.get(corrected or ""),
                                        comment or "", _user(request))
        except DataError as e:
            raise gr.Error(str(e)) from None
        return f"Feedback saved (#{row}). It becomes a training label in the next round."

    handle = gr.Textbox(visible=False, label="diagnosis handle")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            with gr.Tab("Worklist"):
                # Precomputed in the background (ui.triage): a row click is a cache read.
                with gr.Row():
                    order = gr.Radio(list(WORKLIST_ORDERS), value="triage", label="Sort",
                                     elem_id=eid("worklist-order"))
                    unreviewed = gr.Checkbox(label="No feedback yet",
                                             elem_id=eid("worklist-unreviewed"))
                table = gr.Dataframe(_worklist("triage", False)[0],
                                     headers=list(WORKLIST_COLUMNS), interactive=False,
                                     elem_id=eid("worklist-table"), max_height=360)
                refresh = gr.Button("Refresh worklist", size="sm")
                case = gr.Dropdown(choices=service.worklist(), label="Case",
                                   elem_id=eid("worklist"))
                go = gr.Button("Diagnose", variant="primary", elem_id=eid("diagnose-btn"))
            with gr.Tab("Upload"):
                dicom = gr.File(label="CT: DICOM files or one .zip", file_count="multiple")
                path_up = gr.File(label="Pathology image (PNG/TIFF)", file_count="single")
                # Text, not gr.Number: the browser sends an untouched number box as 0,
                # which is a value (age 0 was refused; cea 0 would be believed). Empty =
                # not recorded; parse_ehr_form names a field that is not a number.
                ehr_inputs = [gr.Textbox(label=f"{f.name} ({f.unit})", value="",
                                         placeholder="not recorded", max_lines=1)
                              for f in schema.fields]
                go_up = gr.Button("Diagnose upload", variant="primary")
        with gr.Column(scale=2):
            card = gr.Markdown("Choose a case and press Diagnose.", elem_id=eid("card"))
            with gr.Row():
                with gr.Column():
                    ct_img = gr.Image(label="CT with attribution", type="numpy",
                                      format="png", interactive=False,
                                      elem_id=eid("ct-image"),
                                      height=480)
                    slider = gr.Slider(1, 2, step=1, value=1, label="CT slice",
                                       visible=False)
                    ct_caption = gr.Markdown(elem_id=eid("ct-caption"))
                    slice_no = gr.Number(visible=False, precision=0, label="CT slice (API)")
                    with gr.Row():
                        preset = gr.Radio([*WINDOW_PRESETS, "custom"], value=DEFAULT_PRESET,
                                          label="Window", elem_id=eid("ct-window"))
                        win_w = gr.Number(WINDOW_PRESETS[DEFAULT_PRESET][0], minimum=1,
                                          maximum=8000, label="W (HU)", min_width=80)
                        win_l = gr.Number(WINDOW_PRESETS[DEFAULT_PRESET][1], minimum=-2000,
                                          maximum=4000, label="L (HU)", min_width=80)
                path_img = gr.Image(label="Pathology with attribution", type="numpy",
                                    format="png", interactive=False,
                                    elem_id=eid("path-image"),
                                    height=300)
            with gr.Row():
                ehr_img = gr.HTML(elem_id=eid("ehr-bars"))
                with gr.Column():
                    mod_img = gr.HTML(elem_id=eid("modality-bars"))
                    mod_md = gr.Markdown()
            with gr.Row():
                question = gr.Dropdown(choices=list(QUESTIONS), value=QUESTIONS[0],
                                       allow_custom_value=True, label="Ask")
                ask_btn = gr.Button("Ask")
            answer_md = gr.Markdown(elem_id=eid("answer"))
            with gr.Accordion("Feedback", open=False):
                verdict = gr.Radio(["agree", "disagree"], label="Your judgement")
                corrected = gr.Radio(list(corrected_of), label="Correct diagnosis (if you "
                                     "disagree)")
                comment = gr.Textbox(label="Comment", lines=2)
                fb_btn = gr.Button("Send feedback")
                fb_status = gr.Markdown()
            with gr.Accordion("Model card: calibration", open=False):
                gr.Markdown(service.served.calibration, elem_id=eid("calibration"))
                diagram = model_card_image(service)
                if diagram is not None:
                    gr.Image(diagram, type="pil", format="png", interactive=False,
                             label="Reliability diagram (held-out cases, all hospitals)",
                             elem_id=eid("reliability"), height=360)

    outs = [handle, card, ct_img, slider, path_img, ehr_img, mod_img, mod_md, answer_md]
    go.click(diagnose, [case], outs, api_name=api("diagnose"))
    wl_in, wl_out = [order, unreviewed], [table, case]
    refresh.click(worklist_table, wl_in, wl_out, api_name=api("worklist"))
    order.change(worklist_table, wl_in, wl_out, api_visibility="private")
    unreviewed.change(worklist_table, wl_in, wl_out, api_visibility="private")
    app.load(worklist_table, wl_in, wl_out, api_visibility="private")
    table.select(pick_row, [table], [case], api_visibility="private").then(
        diagnose, [case], outs, api_visibility="private")
    go_up.click(diagnose_upload, [dicom, path_up, *ehr_inputs], outs,
                api_name=api("diagnose_upload"))
    # The window only re-renders the slice: the explanation is not recomputed.
    view_in, view_out = [handle, slider, win_w, win_l], [ct_img, ct_caption]
    slider.release(ct_slice, view_in, view_out, api_name=api("ct_slider"),
                   api_visibility="private")
    # The API endpoint takes the slice as an unbounded number: the slider's range in an
    # API session stays the one diagnose returned (the model grid while the native series
    # is still being read), which would refuse native slice numbers beyond it.
    slice_no.change(ct_slice, [handle, slice_no, win_w, win_l], view_out,
                    api_name=api("ct_slice"))
    preset.input(window_preset, [preset], [win_w, win_l], api_visibility="private").then(
        ct_slice, view_in, view_out, api_name=api("ct_window_preset"), api_visibility="private")
    for box in (win_w, win_l):
        box.submit(ct_slice, view_in, view_out, api_name=api(f"ct_window_{box.label[0]}"),
                   api_visibility="private")
        box.submit(lambda: "custom", None, [preset], api_visibility="private")
    # A new diagnosis: caption and the clinician's current window (the service renders lung).
    handle.change(ct_open, [handle, win_w, win_l], [*view_out, slider],
                  api_visibility="private")
    ask_btn.click(ask, [handle, question], [answer_md], api_name=api("ask"))
    fb_btn.click(feedback, [handle, verdict, corrected, comment], [fb_status],
                 api_name=api("feedback"))


def serve(app: gr.Blocks, cfg: UiConfig, block: bool = True) -> None:
    """Launch on cfg.host:cfg.port; `block=False` returns once serving (tests)."""
    limiter = LoginLimiter(cfg.login_limits)
    app.queue(default_concurrency_limit=cfg.concurrency).launch(
        server_name=cfg.host,
        server_port=cfg.port,
        auth=login_check(cfg, cfg.open_audit(), limiter) if cfg.users else None,
        # Gradio calls auth with (name, password) only: this hands it the client address
        app_kwargs={"middleware": [Middleware(ClientAddressMiddleware)]},
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

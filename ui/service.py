"""The diagnosis service behind the app (no Gradio): a site's worklist, uploads, explanations,
rendered views, follow-up answers and feedback. The app's handlers are thin calls into it.

Model calls are serialised by a lock (one model, explanations swap encoders temporarily); the
worklist is preprocessed once at start (the node's cache makes restarts cheap); recent
explanations are kept by an opaque handle for the slice viewer, questions and feedback.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from explain.answers import answer, pct
from explain.config import ExplainConfig
from explain.explanation import Explanation, explain_case
from hospital_node.dataset import load_site
from multimodal.data import PreparedCase
from ui import render
from ui.model_source import ServedModel, load_served_model
from ui.uploads import UploadError, case_from_upload
from vocab import audit as A
from vocab.audit import AuditLog
from vocab.errors import DataError
from vocab.feedback_store import Feedback, FeedbackStore
from vocab.modalities import MODALITY_LABELS

log = logging.getLogger(__name__)  # never logs case ids or values: handles and timings only
RECENT = 64


@dataclass
class Diagnosis:
    """What one diagnose call returns to the app (images as (H, W, 3) uint8)."""

    handle: str
    explanation: Explanation
    card_md: str
    ct_image: np.ndarray | None
    ct_slice: int  # 0-based slice shown
    n_slices: int
    path_image: np.ndarray | None
    ehr_chart: str  # HTML bars ("" without EHR)
    modality_chart: str  # HTML bars
    modality_md: str
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Entry:
    case: PreparedCase
    explanation: Explanation


class DiagnosisService:
    def __init__(self, served: ServedModel, cases: Sequence[PreparedCase], site_id: str,
                 feedback: FeedbackStore, cfg: ExplainConfig, audit: AuditLog | None = None
                 ) -> None:
        self.served, self.site_id, self.feedback_store, self.cfg = served, site_id, feedback, cfg
        # Hospital-local: it may name case ids, never other patient values.
        self.audit = audit
        self._cases = {c.case_id: c for c in cases}
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, _Entry] = OrderedDict()
        # Per-call step timings (ms) of recent diagnoses, for benchmarks and monitoring.
        self.timing_log: deque[dict[str, float]] = deque(maxlen=1000)

    @classmethod
    def from_paths(cls, site_root: Path, model_path: Path, cache_dir: Path | None,
                   cfg: ExplainConfig, audit: AuditLog | None = None) -> DiagnosisService:
        """Load the model and preprocess the site's worklist (hospital files are only read)."""
        from hospital_node.dataset import read_site_config

        site_id = read_site_config(Path(site_root)).site_id
        served = load_served_model(model_path, site_id)
        site = load_site(Path(site_root), served.model.cfg.inputs, cache_dir)
        log.info("worklist: %d usable cases; model %s", len(site.cases), served.version)
        return cls(served, site.cases, site.site_id, FeedbackStore.at_site(site_root), cfg,
                   audit)

    # ---- worklist / uploads ----
    def worklist(self) -> list[tuple[str, str]]:
        """(label, case_id) per usable case, sorted by case id."""
        out = []
        for cid in sorted(self._cases):
            mods = "+".join(MODALITY_LABELS[m] for m in self._cases[cid].modalities())
            out.append((f"{cid} ({mods})", cid))
        return out

    def diagnose_case(self, case_id: str, user: str = "") -> Diagnosis:
        try:
            case = self._cases[case_id]
        except KeyError:
            raise DataError("that case is not on this site's worklist") from None
        return self._diagnose(case, user)

    def diagnose_upload(self, dicom_files: Sequence[Path], pathology: Path | None,
                        ehr_values: Mapping[str, float | int | str | None]) -> Diagnosis:
        t0 = time.perf_counter()
        model = self.served.model
        case = case_from_upload(f"upload-{uuid.uuid4().hex[:8]}", dicom_files, pathology,
                                ehr_values, model.cfg.inputs, model.schema)
        d = self._diagnose(case)
        d.timings_ms["load"] = (time.perf_counter() - t0) * 1e3 - sum(d.timings_ms.values())
        return d

    # ---- diagnosis ----
    def _diagnose(self, case: PreparedCase, user: str = "") -> Diagnosis:
        with self._lock:
            e = explain_case(self.served.model, case, self.cfg, self.served.version)
        if self.audit is not None:  # before it is shown: an unaudited diagnosis is not served
            self.audit.append(A.UI_DIAGNOSIS, user, {
                "case_id": case.case_id, "model_version": e.model_version,
                "probability": float(e.probability)})
        t0 = time.perf_counter()
        handle = uuid.uuid4().hex
        self._recent[handle] = _Entry(case, e)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        d = self._render(handle, case, e)
        d.timings_ms.update(e.timings_ms)
        d.timings_ms["render"] = (time.perf_counter() - t0) * 1e3
        self.timing_log.append(dict(d.timings_ms))
        log.info("diagnosis %s: %s", handle[:8],
                 " ".join(f"{k}={v:.1f}ms" for k, v in d.timings_ms.items()))
        return d

    def _entry(self, handle: str) -> _Entry:
        try:
            return self._recent[handle]
        except KeyError:
            raise DataError("that diagnosis is no longer open; diagnose the case again") from None

    def _render(self, handle: str, case: PreparedCase, e: Explanation) -> Diagnosis:
        ct_img, top, n = None, 0, 0
        if case.ct is not None:
            n = case.ct.shape[0]
            top = e.ct_top_slice if e.ct_top_slice is not None else n // 2
            ct_img = render.ct_slice_overlay(case.ct, e.ct_map, top)
        path_img = render.path_overlay(case.path, e.path_map) if case.path is not None else None
        ehr_chart = ""
        if e.ehr:
            rows = sorted(e.ehr, key=lambda f: -abs(f.contribution))
            labels = [f"{f.name} = {'missing' if f.value is None else f'{f.value:g}'}"
                      for f in rows]
            ehr_chart = render.bar_html(labels, [f.contribution for f in rows],
                                        "EHR fields: value known vs. missing (logit)")
        mods = sorted(e.modality_contrib.items(), key=lambda kv: -abs(kv[1]))
        mod_chart = render.bar_html([MODALITY_LABELS[m] for m, _ in mods],
                                    [v for _, v in mods], "Modalities: Shapley value (logit)")
        return Diagnosis(handle, e, self.card_markdown(e), ct_img, top, n, path_img, ehr_chart,
                         mod_chart, self.modality_markdown(e))

    # ---- interactions on an open diagnosis ----
    def ct_slice(self, handle: str, index: int) -> np.ndarray:
        entry = self._entry(handle)
        if entry.case.ct is None:
            raise DataError("this case has no CT")
        n = entry.case.ct.shape[0]
        return render.ct_slice_overlay(entry.case.ct, entry.explanation.ct_map,
                                       int(min(max(index, 0), n - 1)))

    def ask(self, handle: str, question: str) -> str:
        return answer(self._entry(handle).explanation, question)

    def send_feedback(self, handle: str, verdict: str, corrected_label: int | None,
                      comment: str, user: str) -> int:
        entry = self._entry(handle)
        e = entry.explanation
        fb = Feedback(entry.case.case_id, e.model_version, e.probability,
                      int(e.decision == "malignant"), verdict,  # type: ignore[arg-type]
                      corrected_label, comment.strip()[:2000], user)
        row = self.feedback_store.add(fb)
        log.info("feedback stored (row %d, %s)", row, verdict)
        if self.audit is not None:  # the row, not its content: labels and comments stay there
            self.audit.append(A.UI_FEEDBACK, user, {
                "case_id": fb.case_id, "model_version": fb.model_version,
                "verdict": fb.verdict, "feedback_row": row})
        return row

    # ---- text ----
    def card_markdown(self, e: Explanation) -> str:
        s = self.served
        lines = [
            f"### {e.decision.upper()} — {pct(e.probability)}",
            f"Calibrated probability of malignancy {pct(e.probability)}; decision threshold "
            f"{pct(e.threshold)}.",
            "",
            f"**Uncertainty:** {_uncertainty(e)}",
            "",
            f"**Data used:** {', '.join(MODALITY_LABELS[m] for m in e.present) or 'none'}"
            + (f" · **missing:** {', '.join(MODALITY_LABELS[m] for m in e.missing)}"
               if e.missing else ""),
            "",
            f"**Model:** version `{s.version}`" + (f", round {s.round}" if s.round is not None
                                                   else ""),
        ]
        if s.site_metrics:
            parts = [f"{k} {v:.3f}" if abs(v) < 10 else f"{k} {v:g}"
                     for k, v in sorted(s.site_metrics.items())]
            lines.append(f"Validation at this hospital: {', '.join(parts)}")
        else:
            lines.append("Validation at this hospital: no metrics stored for this version.")
        lines.append(s.privacy)
        return "\n".join(lines)

    @staticmethod
    def modality_markdown(e: Explanation) -> str:
        base = e.baseline
        lines = ["| modality | contribution (logit) |", "|---|---|"]
        for m, v in sorted(e.modality_contrib.items(), key=lambda kv: -abs(kv[1])):
            lines.append(f"| {MODALITY_LABELS[m]} | {v:+.2f} |")
        lines.append("")
        lines.append(f"Prior with no data: {pct(base.probability)} → with "
                     f"{', '.join(MODALITY_LABELS[m] for m in e.present)}: {pct(e.probability)}.")
        fusion = [x for x in e.experts if x.fusion]
        if fusion:
            by_block: dict[int, list[int]] = {}
            for x in fusion:
                by_block.setdefault(x.block, []).append(x.expert)
            lines.append("Experts the diagnosis token used: " + "; ".join(
                f"block {b + 1}: {', '.join(f'#{i}' for i in sorted(v))}"
                for b, v in sorted(by_block.items())))
        return "\n".join(lines)


def _uncertainty(e: Explanation) -> str:
    margin = abs(e.probability - e.threshold)
    if e.near_threshold:
        text = (f"low confidence: {pct(margin)} from the threshold (within "
                f"{pct(e.uncertain_band)}).")
    else:
        text = f"{pct(margin)} from the threshold."
    if e.missing:
        text += f" Decided without {', '.join(MODALITY_LABELS[m] for m in e.missing)}."
    return text


__all__ = ["DiagnosisService", "Diagnosis", "UploadError"]

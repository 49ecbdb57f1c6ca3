"""The diagnosis service behind the app (no Gradio): a site's worklist, uploads, explanations,
rendered views, follow-up answers and feedback. The app's handlers are thin calls into it.

Model calls are serialised by ui.batching.ModelLock (one model, explanations swap encoders
temporarily; interactive calls before the background worker); uncached diagnoses are
micro-batched (ui.batching.MicroBatcher -> explain_cases); with a TriageConfig the worklist is
precomputed into the triage cache (ui.triage) and a click reads it. The worklist is preprocessed
at start (the node's cache makes restarts cheap) and rescanned by the worker; recent
explanations are kept by an opaque handle for the slice viewer, questions and feedback.
"""

from __future__ import annotations

import dataclasses
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
from explain.explanation import Explanation, explain_cases
from explain.scope import ScopeConfig, ScopeVerdict, SiteScope, card_lines, refusal_markdown
from hospital_node.dataset import load_site
from multimodal.data import PreparedCase
from ui import render
from ui import triage as T
from ui.batching import MicroBatcher, ModelLock
from ui.config import TriageConfig, triage_cache_path
from ui.ct_view import DEFAULT_PRESET, WINDOW_PRESETS, CtFrame, CtViews, site_case_reader
from ui.model_source import ServedModel, load_served_model
from ui.operating_point import OperatingPoint, choose_operating_point
from ui.uploads import UploadError, case_from_upload
from vocab import audit as A
from vocab.audit import AuditLog
from vocab.errors import DataError
from vocab.feedback_store import Feedback, FeedbackStore
from vocab.modalities import MODALITY_LABELS
from vocab.tasks import get_task

log = logging.getLogger(__name__)  # never logs case ids or values: handles and timings only
RECENT = 64


@dataclass
class Diagnosis:
    """What one diagnose call returns to the app (images as (H, W, 3) uint8)."""

    handle: str
    explanation: Explanation | None  # None: refused as out of scope (see `scope`)
    card_md: str
    ct_image: np.ndarray | None
    ct_slice: int  # 0-based slice shown
    n_slices: int
    path_image: np.ndarray | None
    ehr_chart: str  # HTML bars ("" without EHR)
    modality_chart: str  # HTML bars
    modality_md: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    scope: ScopeVerdict | None = None
    ct_label: str = ""  # the shown slice: DICOM instance, table mm, window (ui.ct_view)
    ct_native: bool = False  # True: the series' own slices; False: the model grid


@dataclass
class _Entry:
    case: PreparedCase
    explanation: Explanation


class DiagnosisService:
    def __init__(self, served: ServedModel, cases: Sequence[PreparedCase], site_id: str,
                 feedback: FeedbackStore, cfg: ExplainConfig, audit: AuditLog | None = None,
                 scope_cfg: ScopeConfig | None = None, *, site_root: Path | None = None,
                 preprocess_cache: Path | None = None, triage: TriageConfig | None = None
                 ) -> None:
        self.served, self.site_id, self.feedback_store, self.cfg = served, site_id, feedback, cfg
        if served.operating_point is None or served.operating_point.threshold != cfg.threshold:
            served.operating_point = OperatingPoint(  # built by hand (tests, benchmarks)
                cfg.threshold, "config", f"{pct(cfg.threshold)}, set in the app's configuration.")
        # Hospital-local: it may name case ids, never other patient values.
        self.audit = audit
        self._cases = {c.case_id: c for c in cases}
        self._recent: OrderedDict[str, _Entry] = OrderedDict()
        # Native CT of open diagnoses, memory-bounded; worklist series re-read from the site.
        self.ct_views = CtViews(case_reader=site_case_reader(site_root) if site_root else None)
        # Per-call step timings (ms) of recent diagnoses, for benchmarks and monitoring.
        self.timing_log: deque[dict[str, float]] = deque(maxlen=1000)
        # Out-of-scope checks, fitted on this site's own cases (one batched forward).
        self.scope = SiteScope.fit(served.model, cases, scope_cfg or ScopeConfig())
        for note in self.scope.notes:
            log.info("scope: %s", note)
        self._init_triage(site_root, preprocess_cache, triage)

    @classmethod
    def from_paths(cls, site_root: Path, model_path: Path, cache_dir: Path | None,
                   cfg: ExplainConfig, audit: AuditLog | None = None,
                   scope_cfg: ScopeConfig | None = None, triage: TriageConfig | None = None,
                   task: str | None = None, threshold: float | None = None,
                   split_seed: int = 0) -> DiagnosisService:
        """Load the model and preprocess the site's worklist (hospital files are only read).
        `triage`: precompute the worklist into its cache (None: no cache and no background
        work; interactive calls are micro-batched either way). `threshold`: the operator's
        (None: the task's policy, ui.operating_point, on the held-out cases of the nodes'
        split with `split_seed`; cfg.threshold is replaced either way)."""
        from hospital_node.dataset import read_site_config

        site_id = read_site_config(Path(site_root)).site_id
        served = load_served_model(model_path, site_id, task)
        words = get_task(served.task)  # the decision, card and answers in the task's words
        # the cases carry the served task's labels: they fit its threshold policy
        site = load_site(Path(site_root), served.model.cfg.inputs, cache_dir, task=served.task)
        served.operating_point = choose_operating_point(words, served.model, site.cases,
                                                        split_seed, threshold)
        cfg = dataclasses.replace(cfg, positive=words.positive, negative=words.negative,
                                  condition=words.condition,
                                  threshold=served.operating_point.threshold)
        log.info("worklist: %d usable cases; model %s; threshold %.3f (%s)", len(site.cases),
                 served.version, cfg.threshold, served.operating_point.source)
        return cls(served, site.cases, site.site_id, FeedbackStore.at_site(site_root), cfg,
                   audit, scope_cfg, site_root=Path(site_root), preprocess_cache=cache_dir,
                   triage=triage)

    # ---- worklist / uploads ----
    def worklist(self) -> list[tuple[str, str]]:
        """(label, case_id) per usable case: computed ones in triage order (ui.triage.sort_rows)
        with their probability, then the pending ones by case id."""
        out = []
        for r in self.worklist_rows():
            mods = "+".join(MODALITY_LABELS[m] for m in r["modalities"])
            p = "" if r["probability"] is None else f", {pct(r['probability'])}"
            out.append((f"{r['case_id']} ({mods}{p})", r["case_id"]))
        return out

    def worklist_rows(self, order: str = "triage", without_feedback: bool = False
                      ) -> list[dict]:
        """One dict per usable case (case_id, modalities, probability, decision, margin,
        near_threshold, feedback; None where not computed yet): computed rows sorted by `order`
        (ui.triage.sort_rows), then the pending ones by id. `without_feedback`: only cases no
        clinician has given feedback on (any model version)."""
        with self._state:
            cases = dict(self._cases)
            rows = {cid: r for cid, r in self._rows.items() if cid in cases}
        reviewed = {f.case_id for f in self.feedback_store.all()}
        out = [{"case_id": r.case_id, "modalities": r.modalities,
                "probability": None if r.decision == T.OUT_OF_SCOPE else r.probability,
                "decision": r.decision,
                "margin": None if r.decision == T.OUT_OF_SCOPE else r.margin,
                "near_threshold": r.near_threshold, "feedback": r.case_id in reviewed}
               for r in T.sort_rows(rows.values(), order)]
        for cid in sorted(set(cases) - set(rows)):
            out.append({"case_id": cid, "modalities": cases[cid].modalities(),
                        "probability": None, "decision": None, "margin": None,
                        "near_threshold": None, "feedback": cid in reviewed})
        return [r for r in out if not (without_feedback and r["feedback"])]

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
        cid = f"upload-{uuid.uuid4().hex[:8]}"
        case = case_from_upload(cid, dicom_files, pathology, ehr_values, model.cfg.inputs,
                                model.schema, read_ct=self.ct_views.upload_reader(cid))
        d = self._diagnose(case)
        d.timings_ms["load"] = (time.perf_counter() - t0) * 1e3 - sum(d.timings_ms.values())
        return d

    # ---- diagnosis ----
    def _diagnose(self, case: PreparedCase, user: str = "") -> Diagnosis:
        t_scope = time.perf_counter()
        keys = self._keys_of(case)
        verdict = self._scope_memo.get(keys) if keys else None
        if verdict is None:
            with self.model_lock.interactive():
                verdict = self.scope.check(case)
            if keys:
                self._remember_scope(keys, verdict)
        scope_ms = (time.perf_counter() - t_scope) * 1e3
        if keys and verdict.refused:
            self._on_triaged(case.case_id, *keys, None)
        e = None if verdict.refused else self._explain(case, keys)
        if e is None:
            return self._not_diagnosed(case, verdict, user, scope_ms)
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
        d.card_md, d.scope = _with_scope_lines(d.card_md, verdict), verdict
        d.timings_ms.update(e.timings_ms)
        d.timings_ms["scope"] = scope_ms
        d.timings_ms["render"] = (time.perf_counter() - t0) * 1e3
        self.timing_log.append(dict(d.timings_ms))
        log.info("diagnosis %s: %s", handle[:8],
                 " ".join(f"{k}={v:.1f}ms" for k, v in d.timings_ms.items()))
        return d

    # ---- triage cache, micro-batches, background worker (ui.triage, ui.batching) ----
    def _init_triage(self, site_root: Path | None, preprocess_cache: Path | None,
                     tc: TriageConfig | None) -> None:
        cfg = tc or TriageConfig(background=False)
        self.triage_cfg = cfg
        self.model_lock = ModelLock()
        self._batcher: MicroBatcher[tuple[PreparedCase, ServedModel], Explanation] = \
            MicroBatcher(self._explain_batch, self.model_lock, cfg.max_batch, cfg.max_wait_ms,
                         name="diagnose-batcher")
        self._state = threading.Lock()  # _cases, _content, _rows, the model key
        self._site_root, self._preprocess_cache = site_root, preprocess_cache
        self._content: dict[str, str] = {}  # case id -> content key (ui.triage)
        self._rows: dict[str, T.Row] = {}  # case id -> summary for the current model+content
        self._scope_memo: OrderedDict[tuple[str, str], ScopeVerdict] = OrderedDict()
        self._key_for: tuple[int, str] = (0, "")
        self.triage_cache: T.TriageCache | None = None
        self.worker: T.TriageWorker | None = None
        if tc is None or site_root is None or not cfg.cache:
            return
        self._content = T.site_content_hashes(site_root, self._cases,
                                              self.served.model.cfg.inputs, preprocess_cache)
        folder = cfg.cache_dir or triage_cache_path(site_root)
        self.triage_cache = T.TriageCache(folder, cfg.memory_entries)
        if cfg.background:
            self.worker = T.TriageWorker(self._snapshot, self._rescan, self.triage_cache,
                                         self.model_lock, self.cfg, cfg.rescan_s,
                                         self._on_triaged, also=self.scope.check).start()

    def refresh(self) -> None:
        """Rescan the site now (new cases, changed files) and wake the worker."""
        self._rescan()
        if self.worker is not None:
            self.worker.idle.clear()
            self.worker.wake.set()

    def close(self) -> None:
        """Stop the background worker (the app keeps serving from what is cached)."""
        if self.worker is not None:
            self.worker.stop()

    def _model_key(self) -> str:
        served = self.served
        with self._state:
            if self._key_for[0] != id(served):
                self._key_for = (id(served), T.model_key(served.model, served.version, self.cfg))
            return self._key_for[1]

    def _snapshot(self) -> tuple:
        served, mk = self.served, self._model_key()
        with self._state:
            return served.model, served.version, mk, dict(self._cases), dict(self._content)

    def _rescan(self) -> None:
        """Reload the site (new cases, changed files; the node's cache makes it cheap)."""
        if self._site_root is None:
            return
        inputs = self.served.model.cfg.inputs
        site = load_site(self._site_root, inputs, self._preprocess_cache)
        cases = {c.case_id: c for c in site.cases}
        before = T.site_content_hashes(self._site_root, cases, inputs, self._preprocess_cache)
        # hashed again after: a file that changed meanwhile is cached from the next rescan
        after = T.site_content_hashes(self._site_root, cases, inputs, self._preprocess_cache)
        stable = {cid: k for cid, k in after.items() if before.get(cid) == k}
        with self._state:
            changed = stable != self._content or cases.keys() != self._cases.keys()
            # a row of changed content is dropped (listed as computing until recomputed)
            self._rows = {cid: r for cid, r in self._rows.items()
                          if cid in stable and stable[cid] == self._content.get(cid)}
            # a case without a stable key stays on the worklist, served uncached meanwhile
            self._cases, self._content = cases, stable
        if changed:
            log.info("worklist rescan: %d usable cases", len(stable))

    def _on_triaged(self, case_id: str, mk: str, ck: str, e: Explanation | None,
                    scope: ScopeVerdict | None = None) -> None:
        if scope is not None:
            self._remember_scope((mk, ck), scope)
        with self._state:
            case = self._cases.get(case_id)
            if case is not None and self._content.get(case_id) == ck and self._key_for[1] == mk:
                self._rows[case_id] = T.row_of(case_id, e, case.modalities())

    def _remember_scope(self, keys: tuple[str, str], verdict: ScopeVerdict) -> None:
        with self._state:
            self._scope_memo[keys] = verdict
            while len(self._scope_memo) > 4096:
                self._scope_memo.popitem(last=False)

    def _keys_of(self, case: PreparedCase) -> tuple[str, str] | None:
        """(model key, content key) of a worklist case as loaded; None for uploads."""
        if self.triage_cache is None:
            return None
        with self._state:
            ck = self._content.get(case.case_id) if self._cases.get(case.case_id) is case \
                else None
        return (self._model_key(), ck) if ck else None

    def _explain(self, case: PreparedCase, keys: tuple[str, str] | None) -> Explanation:
        """From the triage cache when there, else through the micro-batcher (then cached)."""
        if keys is not None and self.triage_cache is not None:
            t0 = time.perf_counter()
            hit = self.triage_cache.get(*keys)
            if hit is not None:
                # this call computed nothing: the steps cost 0 ms, the read is timed
                return dataclasses.replace(hit, timings_ms={
                    "collate": 0.0, "gradcam_ct_path": 0.0, "forward_shapley_ehr": 0.0,
                    "cache_read": (time.perf_counter() - t0) * 1e3})
        served = self.served
        e = self._batcher.submit((case, served))
        if keys is not None and self.triage_cache is not None and served is self.served:
            self.triage_cache.put(*keys, e)
            self._on_triaged(case.case_id, *keys, e)
        return e

    def _explain_batch(self, items: list[tuple[PreparedCase, ServedModel]]
                       ) -> list[Explanation]:
        """One micro-batch (under the model lock): explain_cases per served model."""
        out: list[Explanation | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (_c, s) in enumerate(items):
            groups.setdefault(id(s), []).append(i)
        for idx in groups.values():
            served = items[idx[0]][1]
            res = explain_cases(served.model, [items[i][0] for i in idx], self.cfg,
                                served.version)
            for i, e in zip(idx, res, strict=True):
                out[i] = e
        return out  # type: ignore[return-value]

    def _not_diagnosed(self, case: PreparedCase, verdict: ScopeVerdict, user: str,
                       scope_ms: float) -> Diagnosis:
        """Out of scope: no probability, no overlays; the audit log records the refusal."""
        if self.audit is not None:  # check names only: measured values stay out of the log
            self.audit.append(A.UI_NOT_DIAGNOSED, user, {
                "case_id": case.case_id, "model_version": self.served.version,
                "checks": list(verdict.failed_checks)})
        log.info("not diagnosed (out of scope: %s)", ",".join(verdict.failed_checks))
        return Diagnosis(handle="", explanation=None, card_md=refusal_markdown(verdict),
                         ct_image=None, ct_slice=0, n_slices=0, path_image=None, ehr_chart="",
                         modality_chart="", modality_md="", timings_ms={"scope": scope_ms},
                         scope=verdict)

    def _entry(self, handle: str) -> _Entry:
        try:
            return self._recent[handle]
        except KeyError:
            raise DataError("that diagnosis is no longer open; diagnose the case again") from None

    def _render(self, handle: str, case: PreparedCase, e: Explanation) -> Diagnosis:
        ct_img, top, n, ct_label, native = None, 0, 0, "", False
        if case.ct is not None:
            self.ct_views.open_case(handle, case, e, case.case_id in self._cases, RECENT)
            grid_top = e.ct_top_slice if e.ct_top_slice is not None else case.ct.shape[0] // 2
            # No wait: a worklist series is read on the first slice request (the app makes
            # one for every new diagnosis), not here (CtViewConfig.lazy).
            f = self.ct_views.render(handle, self.ct_views.top_index(handle, grid_top, False),
                                     *WINDOW_PRESETS[DEFAULT_PRESET], wait=False)
            ct_img, top, n, ct_label, native = f.image, f.index, f.n_slices, f.label, f.native
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
                         mod_chart, self.modality_markdown(e), ct_label=ct_label,
                         ct_native=native)

    # ---- interactions on an open diagnosis ----
    def ct_slice(self, handle: str, index: int, width: float | None = None,
                 level: float | None = None) -> np.ndarray:
        """The image of slice `index` (0-based) in window width/level (HU; default lung)."""
        return self.ct_frame(handle, index, width, level).image

    def ct_frame(self, handle: str, index: int | None, width: float | None = None,
                 level: float | None = None) -> CtFrame:
        """Slice `index` (None: the slice through the map's peak) with its caption; cheap: the
        explanation is not recomputed and the resampled map is cached per slice (ui.ct_view).
        The first request on a just-opened worklist diagnosis reads its native series."""
        entry = self._entry(handle)
        if entry.case.ct is None:
            raise DataError("this case has no CT")
        dw, dl = WINDOW_PRESETS[DEFAULT_PRESET]
        try:
            if index is None:
                top = entry.explanation.ct_top_slice
                index = self.ct_views.top_index(handle, top if top is not None else 0)
            return self.ct_views.render(handle, int(index), dw if width is None else width,
                                        dl if level is None else level)
        except ValueError as e:  # a window outside the allowed range: say which value
            raise DataError(str(e)) from None
        except KeyError:
            raise DataError("that diagnosis is no longer open; diagnose the case again") from None

    def ask(self, handle: str, question: str) -> str:
        return answer(self._entry(handle).explanation, question, self.ct_views.place(handle))

    def send_feedback(self, handle: str, verdict: str, corrected_label: int | None,
                      comment: str, user: str) -> int:
        entry = self._entry(handle)
        e = entry.explanation
        fb = Feedback(entry.case.case_id, e.model_version, e.probability,
                      int(e.is_positive), verdict,  # type: ignore[arg-type]
                      corrected_label, comment.strip()[:2000], user, task=self.served.task)
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
            f"Probability of {e.condition} {pct(e.probability)}; decision threshold "
            f"{pct(e.threshold)}.",
            "",
            f"**Threshold:** {s.operating_point.summary if s.operating_point else ''}",
            "",
            f"**Calibration:** {s.calibration}",
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
            lines += ["", f"Validation at this hospital: {', '.join(parts)}"]
        else:
            lines += ["", "Validation at this hospital: no metrics stored for this version."]
        lines += ["", s.privacy]  # paragraphs: Markdown would run adjacent lines together
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


def _with_scope_lines(card_md: str, verdict: ScopeVerdict) -> str:
    """The card with the scope warning lines (borderline cases) under its heading."""
    extra = card_lines(verdict)
    if not extra:
        return card_md
    head, _, rest = card_md.partition("\n")
    return "\n".join([head, "", *extra, "", rest]) if rest else "\n".join([head, "", *extra])


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

"""Out-of-scope cases through the diagnosis service: refused with a reason, no probability, an
audit entry of their own; in-scope and borderline cases are diagnosed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from explain.scope import Finding, ScopeConfig, ScopeVerdict
from tests.ui.conftest import ct_case_with_ct, zip_series
from ui.service import DiagnosisService, _with_scope_lines
from vocab import audit
from vocab.audit import AuditLog, read_events
from vocab.ehr_schema import CHEST_V1

HEAD_CT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ct-head-ge"


def _head_files(dest: Path, strip_headers: bool = False) -> list[Path]:
    if not HEAD_CT.is_dir():
        pytest.skip("shared real data (../shared/data/ct-head-ge) is not present")
    files = []
    for f in sorted(HEAD_CT.glob("*.dcm")):
        out = Path(shutil.copy(f, dest))
        if strip_headers:  # the anatomy check must refuse without any header help
            ds = pydicom.dcmread(out)
            for k in ("BodyPartExamined", "StudyDescription", "ProtocolName",
                      "SeriesDescription"):
                if k in ds:
                    delattr(ds, k)
            ds.save_as(out)
        files.append(out)
    return files


def test_real_head_ct_upload_is_refused_and_audited(service: DiagnosisService, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    log = AuditLog(tmp_path / "audit.jsonl")
    monkeypatch.setattr(service, "audit", log)
    d = service.diagnose_upload(_head_files(tmp_path), None, {})
    assert d.explanation is None and d.scope is not None and d.scope.refused
    assert d.card_md.count("Not diagnosed:") == 1 and "head examination" in d.card_md
    assert "almost no air-filled lung" in d.card_md  # the anatomy check agrees with the header
    assert "MALIGNANT" not in d.card_md and "BENIGN" not in d.card_md
    assert "probability of malignancy" not in d.card_md.lower()
    assert d.ct_image is None and d.path_image is None and d.ehr_chart == ""
    (ev,) = read_events(log.path)
    assert ev.kind == audit.UI_NOT_DIAGNOSED
    assert ev.data["checks"] == ["ct_anatomy", "ct_header"]
    assert "HEAD" not in log.path.read_text()  # no header text in the log


def test_head_ct_without_headers_is_refused_by_anatomy(service: DiagnosisService,
                                                       tmp_path: Path):
    d = service.diagnose_upload(_head_files(tmp_path, strip_headers=True), None, {})
    assert d.scope is not None and d.scope.failed_checks == ("ct_anatomy",)
    assert "Not diagnosed:" in d.card_md and "lung" in d.card_md


def test_synthetic_chest_ct_upload_is_in_scope(service: DiagnosisService, site_root: Path,
                                               tmp_path: Path):
    cid = ct_case_with_ct(site_root)
    d = service.diagnose_upload([zip_series(site_root / "ct" / cid, tmp_path / "s.zip")], None,
                                {})
    assert d.explanation is not None and d.scope is not None
    assert d.scope.outcome == "in_scope", d.scope.findings
    assert f"{100 * d.explanation.probability:.1f}%" in d.card_md
    assert "scope" in d.timings_ms


def test_blank_pathology_upload_is_refused(service: DiagnosisService, tmp_path: Path):
    tile = tmp_path / "white.png"
    Image.fromarray(np.full((256, 256, 3), 248, np.uint8)).save(tile)
    d = service.diagnose_upload([], tile, {})
    assert d.scope is not None and d.scope.failed_checks == ("pathology",)
    assert "Not diagnosed:" in d.card_md and "almost no tissue" in d.card_md


def test_ehr_outside_the_sites_range_is_refused(service: DiagnosisService):
    # The test site has 6 cases: allow site ranges from 3 values so that they apply.
    cases = list(service._cases.values())
    strict = DiagnosisService(service.served, cases, service.site_id, service.feedback_store,
                              service.cfg, scope_cfg=ScopeConfig(min_site_values=3))
    ages = [float(c.ehr[0]) for c in cases if c.ehr is not None and np.isfinite(c.ehr[0])]
    assert CHEST_V1.fields[0].name == "age" and len(ages) >= 3
    spec = CHEST_V1.fields[0]
    lo = strict.scope.ehr_ranges.lo[0]  # type: ignore[union-attr]
    assert lo == pytest.approx(max(spec.lo, min(ages) - 0.25 * (max(ages) - min(ages))))
    young = lo - 5
    assert young >= spec.lo  # inside the schema's possible range: only the site range refuses
    d = strict.diagnose_upload([], None, {"age": young})
    assert d.explanation is None and "EHR age" in d.card_md and "this hospital's cases" in \
        d.card_md


def test_borderline_card_lines():
    v = ScopeVerdict((Finding("ood", "borderline", "the case is unusual for this hospital.",
                              4.2, 3.1),), 4.2, 3.1, 5.0)
    card = _with_scope_lines("### BENIGN — 12.0%\nCalibrated probability ...", v)
    lines = card.splitlines()
    assert lines[0] == "### BENIGN — 12.0%" and lines[-1] == "Calibrated probability ..."
    assert "**Warning:** the case is unusual for this hospital." in lines
    assert "Out-of-distribution score: 4.20 (this hospital's p95 3.10)" in lines
    ok = ScopeVerdict((Finding("ood", "ok", "typical", 1.0, 3.1),), 1.0, 3.1, 5.0)
    assert _with_scope_lines("### X\nY", ok) == "### X\nY"

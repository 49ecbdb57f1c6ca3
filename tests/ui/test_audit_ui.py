"""The clinician app's hospital-local audit log: logins, diagnoses and feedback land in it with
case ids but no other patient value; it is never placed inside the site data root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ui.conftest import ct_case_with_ct
from ui.config import UiConfig, audit_log_path, hash_password
from ui.service import DiagnosisService
from vocab import audit
from vocab.audit import AuditLog, read_events, verify
from vocab.errors import ConfigError
from vocab.feedback_store import FeedbackStore


def test_diagnosis_and_feedback_are_audited(service: DiagnosisService, site_root: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    monkeypatch.setattr(service, "audit", log)
    monkeypatch.setattr(service, "feedback_store", FeedbackStore(tmp_path / "feedback.db"))
    cid = ct_case_with_ct(site_root)
    d = service.diagnose_case(cid, "dr_a")
    row = service.send_feedback(d.handle, "disagree", 1 - int(d.explanation.decision ==
                                                              "malignant"), "see 2nd CT", "dr_a")
    assert verify(log.path).ok
    diag, fb = read_events(log.path)
    assert (diag.kind, diag.actor) == (audit.UI_DIAGNOSIS, "dr_a")
    assert diag.data == {"case_id": cid, "model_version": d.explanation.model_version,
                         "probability": d.explanation.probability}
    assert (fb.kind, fb.actor) == (audit.UI_FEEDBACK, "dr_a")
    assert fb.data == {"case_id": cid, "model_version": d.explanation.model_version,
                       "verdict": "disagree", "feedback_row": row}
    assert "see 2nd CT" not in log.path.read_text()  # free text and labels stay in the store


def test_logins_are_audited_by_user_name_only(tmp_path: Path) -> None:
    from ui.app import login_check

    cfg = UiConfig(users=(("dr_a", hash_password("right", 1000)),),
                   audit_log=tmp_path / "audit.jsonl")
    check = login_check(cfg, cfg.open_audit())
    assert check("dr_a", "right") and not check("dr_a", "wrong")
    events = list(read_events(tmp_path / "audit.jsonl"))
    assert [(e.kind, e.actor, dict(e.data)) for e in events] == [
        (audit.UI_LOGIN, "dr_a", {}), (audit.UI_LOGIN_FAILED, "dr_a", {})]
    assert "wrong" not in (tmp_path / "audit.jsonl").read_text()


def test_audit_log_is_never_inside_the_site_root(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    default = audit_log_path(root)
    assert default.is_relative_to(tmp_path / "state" / "fedsight") and default.name == \
        "audit.jsonl"
    assert audit_log_path(root, tmp_path / "x.jsonl") == (tmp_path / "x.jsonl").resolve()
    with pytest.raises(ConfigError, match="inside the site data root"):
        audit_log_path(root, root / "audit.jsonl")

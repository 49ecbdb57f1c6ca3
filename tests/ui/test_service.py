"""The diagnosis service and the app's handlers, called directly (no server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.ui.conftest import ct_case_with_ct, zip_series
from ui.service import DiagnosisService
from ui.uploads import UploadError
from vocab.feedback_store import FeedbackStore


def test_worklist_and_diagnosis(service: DiagnosisService, site_root: Path):
    cid = ct_case_with_ct(site_root)
    assert cid in [c for _, c in service.worklist()]
    d = service.diagnose_case(cid)
    e = d.explanation
    assert d.ct_image is not None and d.ct_image.dtype == np.uint8 and d.ct_image.shape[2] == 3
    # the native view (read on this first slice request) opens on the slice through the peak
    f = service.ct_frame(d.handle, None)
    assert f.native and f.index == service.ct_views.place(d.handle).slice_index
    assert f"{100 * e.probability:.1f}%" in d.card_md
    assert e.model_version in d.card_md
    assert {"forward_shapley_ehr", "gradcam_ct_path", "render"} <= set(d.timings_ms)
    assert "EHR fields" in d.ehr_chart and "CT" in d.modality_chart
    other = service.ct_slice(d.handle, 0)
    assert other.shape == f.image.shape
    assert "slice" in service.ask(d.handle, "Where in the CT?")


def test_feedback_lands_in_the_site_store(service: DiagnosisService, site_root: Path):
    cid = ct_case_with_ct(site_root)
    d = service.diagnose_case(cid)
    row = service.send_feedback(d.handle, "disagree", 1 - int(d.explanation.decision ==
                                                              "malignant"), "recheck", "dr_a")
    store = FeedbackStore.at_site(site_root)
    fb = [f for f in store.all() if f.id == row][0]
    assert fb.case_id == cid and fb.verdict == "disagree" and fb.user == "dr_a"
    assert store.labels()[cid] == fb.corrected_label


def test_upload_zip_and_files_are_deleted(service: DiagnosisService, site_root: Path,
                                          tmp_path: Path):
    cid = ct_case_with_ct(site_root)
    z = zip_series(site_root / "ct" / cid, tmp_path / "series.zip")
    tile = tmp_path / "tile.png"
    shutil.copyfile(next((site_root / "pathology").iterdir()), tile)
    d = service.diagnose_upload([z], tile, {"age": 70, "cea": 9.5})
    assert set(d.explanation.present) == {"ct", "path", "ehr"}
    assert not z.exists() and not tile.exists()  # uploads deleted after use


def test_the_same_upload_twice_at_once_refuses_the_second_clearly(
        service: DiagnosisService, site_root: Path, tmp_path: Path):
    """Gradio keeps identical bytes uploaded together as one file; the first request deletes
    it after use. The second gets a readable refusal, not a FileNotFoundError."""
    import threading

    cid = ct_case_with_ct(site_root)
    z = zip_series(site_root / "ct" / cid, tmp_path / "series.zip")
    results: list[object] = []

    def upload() -> None:
        try:
            results.append(service.diagnose_upload([z], None, {}))
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            results.append(e)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 2 and all(isinstance(e, UploadError) for e in errors), errors
    # whichever way the race went, a refusal says what happened (a zip read while it is being
    # deleted can also look truncated)
    assert all("no longer on the server" in str(e) or "zip" in str(e) for e in errors), errors
    assert not z.exists()


@pytest.mark.parametrize("kind", ["not_dicom", "missing_slices", "not_ct_zip", "tiny_image",
                                  "ehr_range", "broken_zip"])
def test_bad_uploads_are_refused_with_a_reason(service: DiagnosisService, site_root: Path,
                                               tmp_path: Path, kind: str):
    import pydicom

    cid = ct_case_with_ct(site_root)
    series = sorted((site_root / "ct" / cid).iterdir())
    files: list[Path] = []
    path, ehr = None, {}
    if kind == "not_dicom":
        f = tmp_path / "scan.dcm"
        f.write_text("hello")
        files = [f]
        expect = "not a DICOM"
    elif kind == "missing_slices":
        for s in series[:5] + series[7:]:
            shutil.copyfile(s, tmp_path / s.name)
            files.append(tmp_path / s.name)
        expect = "twice the regular step"
    elif kind == "not_ct_zip":
        for s in series:
            ds = pydicom.dcmread(s)
            ds.Modality = "MR"
            ds.save_as(tmp_path / s.name)
            files.append(tmp_path / s.name)
        expect = "expected 'CT'"
    elif kind == "tiny_image":
        from PIL import Image

        path = tmp_path / "small.png"
        Image.new("RGB", (20, 20), "pink").save(path)
        expect = "need at least"
    elif kind == "ehr_range":
        ehr = {"age": 300}
        expect = "outside"
    else:
        f = tmp_path / "broken.zip"
        f.write_bytes(zip_series(site_root / "ct" / cid, tmp_path / "ok.zip").read_bytes()[:500])
        files = [f]
        expect = "zip"
    with pytest.raises(UploadError, match=expect):
        service.diagnose_upload(files, path, ehr)
    assert all(not f.exists() for f in files)


def test_handlers_directly(service: DiagnosisService, site_root: Path):
    import gradio as gr

    from ui.app import build_app
    from ui.config import UiConfig

    app = build_app(service, UiConfig())
    fns = {d.api_name: d.fn for d in app.fns.values() if d.api_name}
    out = fns["diagnose"](ct_case_with_ct(site_root))
    handle, card = out[0], out[1]
    assert handle and "Probability of malignancy" in card
    assert isinstance(out[2], np.ndarray)
    assert "probability" in fns["ask"](handle, "How sure is it?")
    with pytest.raises(gr.Error):
        fns["diagnose"]("no-such-case")
    with pytest.raises(gr.Error, match="Upload refused"):
        fns["diagnose_upload"](None, None, *([None] * 8))
    ehr_only = fns["diagnose_upload"](None, None, 70, 1, 40, None, 9.0, None, None, None)
    assert ehr_only[2] is None and "missing:** CT, pathology" in ehr_only[1]

"""`fedsight node receive` for real: a subprocess Storage SCP on a free loopback port, fed by
dcmtk's storescu with the real GE head series (../shared/data/ct-head-ge)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from dicom_peers import (
    HEAD,
    Receiver,
    assert_case_equals_originals,
    head_files,
    storescu,
    wait_for_cases,
)
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})"),
    pytest.mark.skipif(shutil.which("storescu") is None,
                       reason="dcmtk's storescu not on PATH (apt-get install dcmtk)"),
]


@pytest.fixture
def receiver(tmp_path: Path):
    made: list[Receiver] = []

    def make(*extra: str) -> Receiver:
        r = Receiver(tmp_path / f"r{len(made)}", *extra)
        r.tmp.mkdir()
        made.append(r)
        return r.start()

    try:
        yield make
    finally:
        for r in made:
            r.stop()


def test_push_ge_series_files_one_deidentified_case(receiver, tmp_path: Path) -> None:
    from hospital_node.check import check_site

    r = receiver()
    t0 = time.monotonic()
    sent = storescu(r.port, head_files())
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (case,) = wait_for_cases(r.root)
    print(f"28 instances sent in {time.monotonic() - t0:.1f} s (incl. 1 s quiet period)")
    assert case.name.startswith("r-") and len(case.name) == 18
    assert_case_equals_originals(case, head_files())
    orig = pydicom.dcmread(head_files()[0])
    with sqlite3.connect(r.lookup) as db:
        row = db.execute("SELECT patient_id, study_uid FROM cases WHERE case_id = ?",
                         (case.name,)).fetchone()
    assert row == (orig.PatientID, orig.StudyInstanceUID)
    code, text = check_site(r.root, as_json=True, cache_dir=tmp_path / "cache")
    import json

    report = json.loads(text)
    (rep,) = report["cases"]
    assert rep["case_id"] == case.name and "ct" in rep["modalities"], rep
    assert code == 1  # usable CT but no labels.csv: nothing trainable, as expected
    r.stop()
    log = r.text()
    assert "published: 28 new instance(s)" in log
    for value in (orig.PatientID, orig.StudyInstanceUID, orig.SeriesInstanceUID,
                  orig.SOPInstanceUID, str(orig.PatientName)):
        assert value not in log


def test_duplicate_resend_is_stored_once(receiver) -> None:
    r = receiver()
    assert storescu(r.port, head_files()[:10]).returncode == 0
    assert storescu(r.port, head_files()[:10]).returncode == 0  # before publication
    (case,) = wait_for_cases(r.root)
    assert storescu(r.port, head_files()).returncode == 0      # after: 10 dupes, 18 new
    deadline = time.monotonic() + 30
    while len(list(case.iterdir())) < 28 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.cases() == [case]
    assert_case_equals_originals(case, head_files())
    r.stop()
    assert "'duplicate': 20" in r.text() and "'stored': 28" in r.text()


def test_unknown_calling_ae_refused(receiver) -> None:
    r = receiver("--allow", "GOODAE@127.0.0.1")
    bad = storescu(r.port, head_files()[:3], aet="BADAE")
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout + bad.stderr
    assert "calling AE 'BADAE' from 127.0.0.1 is not allowed" in r.log.read_text()
    assert r.staged() == 0 and r.cases() == []
    good = storescu(r.port, head_files()[:3], aet="GOODAE")
    assert good.returncode == 0, good.stdout + good.stderr
    (case,) = wait_for_cases(r.root)
    assert len(list(case.iterdir())) == 3


def test_non_ct_sop_class_rejected_at_negotiation(receiver) -> None:
    r = receiver()
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", r.port, ae_title="FEDSIGHT")
    try:
        assert assoc.is_established
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        rejected = {c.abstract_syntax for c in assoc.rejected_contexts}
        assert accepted == {CTImageStorage} and rejected == {MRImageStorage}
        mr = pydicom.dcmread(head_files()[0])
        mr.SOPClassUID = MRImageStorage
        with pytest.raises(ValueError):  # no accepted context: pynetdicom refuses to send
            assoc.send_c_store(mr)
        ct_as_mr = pydicom.dcmread(head_files()[0])
        ct_as_mr.Modality = "MR"
        assert assoc.send_c_store(ct_as_mr).Status == 0xA900  # data set does not match
    finally:
        assoc.release()


def _copies(tmp: Path, n: int) -> list[Path]:
    """n copies of the GE series as one study (new SOP Instance UIDs): a longer transfer."""
    out = tmp / "copies"
    out.mkdir()
    files = []
    for k in range(n):
        for src in head_files():
            ds = pydicom.dcmread(src)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = out / f"{k:02d}-{src.name}"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def test_kill9_mid_transfer_then_full_resend(receiver, tmp_path: Path) -> None:
    files = _copies(tmp_path, 6)
    r = receiver()
    push = storescu(r.port, files, wait=False)
    try:
        while r.staged() < 20:
            assert push.poll() is None, "transfer ended before the kill point"
            assert r.cases() == [], "a partially received study is visible"
            time.sleep(0.01)
        r.kill9()
        push.wait(60)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    staged = r.staged()
    assert 20 <= staged < len(files)
    assert r.cases() == []
    r.start()  # same data root, staging, secret and lookup
    assert "1 held" in r.log.read_text()
    assert r.cases() == []
    push = storescu(r.port, files, wait=False)
    seen: set[int] = set()
    try:
        while push.poll() is None:
            for case in r.cases():
                seen.add(len(list(case.iterdir())))
            time.sleep(0.01)
    finally:
        if push.poll() is None:
            push.kill()
        push.wait()
    assert push.returncode == 0
    (case,) = wait_for_cases(r.root)
    seen.add(len(list(case.iterdir())))
    assert seen == {len(files)}, f"case seen with {sorted(seen)} instances"
    names = sorted(p.name for p in case.iterdir())
    uids = {pydicom.dcmread(case / n, stop_before_pixels=True).SOPInstanceUID for n in names}
    assert len(names) == len(uids) == len(files)
    assert r.staged() == 0
    r.stop()
    assert f"'duplicate': {staged}" in r.log.read_text()

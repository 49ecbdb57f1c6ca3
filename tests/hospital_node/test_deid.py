"""De-identification, pseudonyms, admission and the staging store of the DICOM network entry
(hospital_node.dicom_net), on datasets written with pydicom and on the real GE series."""

from __future__ import annotations

import logging
import os
import re
import stat
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_writer import sphere_volume, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, MRImageStorage, generate_uid
from pynetdicom.dsutils import encode

from hospital_node.dicom_net import admit
from hospital_node.dicom_net.config import IntakeConfig
from hospital_node.dicom_net.deid import BASIC_PROFILE, X, deidentify
from hospital_node.dicom_net.intake import Intake
from hospital_node.dicom_net.pseudonym import Pseudonyms, load_or_create_secret
from hospital_node.dicom_net.store import StudyStore
from vocab.errors import ConfigError

HEAD = Path(__file__).parents[2].parent / "shared" / "data" / "ct-head-ge"
SECRET = b"k" * 32
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
            "Rows", "Columns", "RescaleSlope", "RescaleIntercept")
PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-77", "PatientBirthDate": "19500101",
       "PatientAddress": "1 Main St", "AccessionNumber": "ACC123", "InstitutionName": "St Elsew",
       "ReferringPhysicianName": "House^Greg", "OperatorsName": "Op^One", "StudyID": "S42",
       "StudyDescription": "chest for Jane Doe", "ImageComments": "call 555-0100",
       "OtherPatientIDs": "ALT-9", "StationName": "CT01", "DeviceSerialNumber": "SN999"}


def _identifying_series(folder: Path) -> list[Path]:
    hu = sphere_volume((4, 16, 16), (2.5, 1.0, 1.0), (2, 8, 8), 3.0)
    paths = write_series(folder, hu, (2.5, 1.0, 1.0))
    for p in paths:
        ds = pydicom.dcmread(p)
        for kw, value in PHI.items():
            setattr(ds, kw, value)
        ds.StudyDate, ds.SeriesDate, ds.StudyTime = "20200115", "20200115", "101500"
        ds.AcquisitionDateTime = "20200115101600.5"
        ds.FrameOfReferenceUID = "1.2.3.4.5"
        ds.add_new(0x00091010, "LO", "private secret")  # private creator block content
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.99"
        ref.PerformingPhysicianName = "Nested^Name"
        ds.ReferencedImageSequence = Sequence([ref])
        ds.save_as(p, enforce_file_format=True)
    return paths


def _all_values(ds: Dataset) -> list[str]:
    out = []
    for elem in ds.iterall():
        if elem.VR != "SQ" and elem.tag != 0x7FE00010:
            out.append(str(elem.value))
    return out


def test_identifying_tags_gone_and_profile_applied(tmp_path: Path) -> None:
    pseudo = Pseudonyms(SECRET)
    for path in _identifying_series(tmp_path / "s"):
        ds = pydicom.dcmread(path)
        deidentify(ds, pseudo, "MRN-77")
        text = " ".join(_all_values(ds))
        for kw, value in PHI.items():
            assert value not in text, kw
            action = BASIC_PROFILE[kw]
            assert (kw not in ds) if action == X else (ds[kw].value in ("", None)), kw
        assert "Nested^Name" not in text and "1.2.3.99" not in text
        assert not [e for e in ds.iterall() if e.tag.is_private], "private tags kept"
        assert ds.PatientIdentityRemoved == "YES"
        codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
        assert "113100" in codes
        assert ds.SOPClassUID == CTImageStorage
        assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
        assert ds.StudyTime == "101500"  # whole-day shift keeps clock times


def test_dates_shift_by_one_offset_per_patient(tmp_path: Path) -> None:
    pseudo = Pseudonyms(SECRET)
    ds = pydicom.dcmread(_identifying_series(tmp_path / "s")[0])
    deidentify(ds, pseudo, "MRN-77")
    shifted = date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:]))
    days = (shifted - date(2020, 1, 15)).days
    assert days == pseudo.day_shift("MRN-77") and -4015 <= days <= -365
    assert ds.AcquisitionDateTime == ds.StudyDate + "101600.5"
    assert ds.PatientBirthDate == ""  # Z in the Basic profile, not shifted
    assert Pseudonyms(SECRET).day_shift("MRN-77") == days != pseudo.day_shift("MRN-78")


def test_uids_remapped_consistently_across_a_series(tmp_path: Path) -> None:
    pseudo = Pseudonyms(SECRET)
    originals, outs = [], []
    for p in _identifying_series(tmp_path / "s"):
        ds = pydicom.dcmread(p)
        originals.append(pydicom.dcmread(p))
        deidentify(ds, pseudo, "MRN-77")
        outs.append(ds)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({o[kw].value for o in outs}) == 1, kw
        assert outs[0][kw].value == pseudo.uid(originals[0][kw].value), kw
    assert len({o.SOPInstanceUID for o in outs}) == len(outs)
    assert not {str(o.SOPInstanceUID) for o in originals} & {str(o.SOPInstanceUID) for o in outs}
    for o in outs:
        assert re.fullmatch(r"2\.25\.[1-9]\d*", o.SOPInstanceUID) and len(o.SOPInstanceUID) <= 64
        assert o.ReferencedImageSequence[0].ReferencedSOPInstanceUID == pseudo.uid("1.2.3.99")


@pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})")
def test_real_series_pixels_and_geometry_unchanged() -> None:
    pseudo = Pseudonyms(SECRET)
    for path in sorted(HEAD.glob("*.dcm"))[:6]:
        orig = pydicom.dcmread(path)
        ds = pydicom.dcmread(path)
        deidentify(ds, pseudo, str(orig.PatientID))
        assert ds.PixelData == orig.PixelData
        for kw in GEOMETRY:
            assert ds[kw].value == orig[kw].value, kw
        assert ds.PatientName == "" and ds.PatientID == ""
        assert not [e for e in ds.iterall() if e.tag.is_private]
        assert str(orig.StudyInstanceUID) not in " ".join(_all_values(ds))


def test_enhanced_ct_functional_groups_keep_geometry() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-77"
    frames = []
    for k in range(3):
        f = Dataset()
        pos, content = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        content.FrameAcquisitionDateTime = "20200115101600"
        content.DimensionIndexValues = [k + 1]
        f.PlanePositionSequence, f.FrameContentSequence = Sequence([pos]), Sequence([content])
        frames.append(f)
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 2.5
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    deidentify(ds, Pseudonyms(SECRET), "MRN-77")
    per = ds.PerFrameFunctionalGroupsSequence
    assert [f.PlanePositionSequence[0].ImagePositionPatient[2] for f in per] == [0.0, 2.5, 5.0]
    assert [f.FrameContentSequence[0].DimensionIndexValues for f in per] == [1, 2, 3]
    assert per[0].FrameContentSequence[0].FrameAcquisitionDateTime != "20200115101600"
    sh = ds.SharedFunctionalGroupsSequence[0]
    assert list(sh.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert list(sh.PixelMeasuresSequence[0].PixelSpacing) == [0.7, 0.7]


def test_pseudonyms_stable_keyed_and_readable() -> None:
    a, b = Pseudonyms(SECRET), Pseudonyms(b"other-secret-0123456789abcdef")
    cid = a.case_id("MRN-77", "1.2.3")
    assert re.fullmatch(r"r-[0-9a-f]{16}", cid)
    assert cid == Pseudonyms(SECRET).case_id("MRN-77", "1.2.3")
    assert cid != a.case_id("MRN-77", "1.2.4") != b.case_id("MRN-77", "1.2.3")
    assert a.case_id("ab", "c") != a.case_id("a", "bc")
    assert a.uid("1.2.3") == Pseudonyms(SECRET).uid("1.2.3") != b.uid("1.2.3")


def test_secret_created_0600_and_loose_mode_refused(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "secret"
    key = load_or_create_secret(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == key
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_secret(path)


def test_secret_lookup_and_staging_inside_the_data_root_refused(tmp_path: Path) -> None:
    root = tmp_path / "site"
    with pytest.raises(ConfigError, match="--secret-file"):
        IntakeConfig.build(root, secret_file=root / "secret", lookup=tmp_path / "l.db")
    with pytest.raises(ConfigError, match="--lookup"):
        IntakeConfig.build(root, secret_file=tmp_path / "s", lookup=root / "sub" / "l.db")
    with pytest.raises(ConfigError, match="--staging"):
        IntakeConfig.build(root, secret_file=tmp_path / "s", lookup=tmp_path / "l.db",
                           staging=root / "ct" / ".incoming")
    cfg = IntakeConfig.build(root, secret_file=tmp_path / "s", lookup=tmp_path / "l.db")
    assert not cfg.staging.is_relative_to(root)


def test_pixel_budget_checked_from_the_header() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality, ds.StudyInstanceUID = CTImageStorage, "CT", "1.2.3"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames, ds.BitsAllocated = 1000, 16
    ds.PixelData = b"\0\0"  # never looked at: the header alone decides
    assert admit.check(ds, CTImageStorage, 1 << 30) is admit.TOO_LARGE
    ds.Rows = ds.Columns = 1
    ds.NumberOfFrames = 1
    assert admit.check(ds, CTImageStorage, 1 << 30) is None
    assert admit.check(ds, MRImageStorage, 1 << 30) is admit.NOT_CT
    ds.SOPClassUID = MRImageStorage
    assert admit.check(ds, MRImageStorage, 1 << 30) is admit.SOP_CLASS_NOT_SUPPORTED
    import zlib

    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = bomb.compress(b"\0" * (50 << 20)) + bomb.flush()
    assert admit.inflate_bounded(data, 1 << 20) is None
    assert admit.inflate_bounded(data, 60 << 20) is not None


def _intake(tmp_path: Path, quiet: float = 0.0) -> Intake:
    return Intake(IntakeConfig.build(tmp_path / "site", secret_file=tmp_path / "secret",
                                     lookup=tmp_path / "lookup.db", quiet_s=quiet))


def test_intake_files_once_and_logs_no_patient_values(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    intake = _intake(tmp_path)
    paths = _identifying_series(tmp_path / "in")
    for _ in range(2):
        for p in paths:
            ds = pydicom.dcmread(p)
            st = intake.receive(encode(ds, False, True), ds.file_meta.TransferSyntaxUID,
                                CTImageStorage, 1)
            assert st.value == 0
    mr = pydicom.dcmread(paths[0])
    mr.SOPClassUID = MRImageStorage
    assert intake.receive(encode(mr, False, True), mr.file_meta.TransferSyntaxUID,
                          MRImageStorage, 1) is admit.SOP_CLASS_NOT_SUPPORTED
    assert intake.counts == {"stored": 4, "duplicate": 4, "refused.sop_class": 1}
    assert intake.store.due() == []  # association still open
    intake.store.end(1, released=True)
    cases = intake.store.publish_due()
    assert len(cases) == 1 and len(list((tmp_path / "site" / "ct" / cases[0]).iterdir())) == 4
    orig = pydicom.dcmread(paths[0])
    assert intake.lookup.get(cases[0])[:2] == ("MRN-77", orig.StudyInstanceUID)
    logged = caplog.text
    for value in (*PHI.values(), str(orig.StudyInstanceUID), str(orig.SOPInstanceUID)):
        assert value not in logged
    intake.close()


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_store_completion_rule_abort_hold_and_recovery(tmp_path: Path) -> None:
    root, staging, clock = tmp_path / "site", tmp_path / "stage", _Clock()
    store = StudyStore(root, staging, quiet_s=5.0, clock=clock)
    assert store.put("r-a", "1.dcm", b"one", assoc=1)
    assert not store.put("r-a", "1.dcm", b"one", assoc=1)  # duplicate: stored once
    clock.t += 1
    store.end(1, released=True)
    clock.t += 3.9
    assert store.due() == [] and not (root / "ct" / "r-a").exists()  # quiet period running
    clock.t += 0.1
    assert store.publish_due() == ["r-a"]
    assert (root / "ct" / "r-a" / "1.dcm").read_bytes() == b"one"
    # A sender that aborts mid-study: held, invisible, until a later full re-send releases.
    store.begin(2)
    assert store.put("r-b", "1.dcm", b"x", assoc=2)
    store.end(2, released=False)
    clock.t += 60
    assert store.publish_due() == [] and store.held() == ["r-b"]
    # Receiver killed: a fresh store over the same staging finds r-b interrupted (held).
    clock.t += 1
    store = StudyStore(root, staging, quiet_s=5.0, clock=clock)
    assert store.held() == ["r-b"] and not (root / "ct" / "r-b").exists()
    clock.t += 1
    store.begin(3)
    assert not store.put("r-b", "1.dcm", b"x", assoc=3)
    assert store.put("r-b", "2.dcm", b"y", assoc=3)
    store.end(3, released=True)
    clock.t += 5
    assert store.publish_due() == ["r-b"]
    assert sorted(p.name for p in (root / "ct" / "r-b").iterdir()) == ["1.dcm", "2.dcm"]
    # A later instance of a published study is merged in (the case swapped atomically).
    store.begin(4)
    assert store.put("r-b", "3.dcm", b"z", assoc=4)
    assert not store.put("r-b", "1.dcm", b"x", assoc=4)
    store.end(4, released=True)
    clock.t += 5
    assert store.publish_due() == ["r-b"]
    assert sorted(p.name for p in (root / "ct" / "r-b").iterdir()) == ["1.dcm", "2.dcm", "3.dcm"]
    assert not any((staging / "studies").iterdir()) and not any((staging / "merge").iterdir())
    assert os.listdir(staging / "tmp") == []


def test_released_study_survives_a_restart(tmp_path: Path) -> None:
    root, staging, clock = tmp_path / "site", tmp_path / "stage", _Clock()
    store = StudyStore(root, staging, quiet_s=5.0, clock=clock)
    store.put("r-c", "1.dcm", b"1", assoc=1)
    store.end(1, released=True)
    store = StudyStore(root, staging, quiet_s=5.0, clock=clock)  # killed during quiet period
    assert store.held() == []
    clock.t += 5
    assert store.publish_due() == ["r-c"]


def test_pixel_data_written_unchanged_by_intake(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    paths = _identifying_series(tmp_path / "in")
    for p in paths:
        ds = pydicom.dcmread(p)
        intake.receive(encode(ds, True, True), "1.2.840.10008.1.2", CTImageStorage, 7)
    intake.store.end(7, released=True)
    (case,) = intake.store.publish_due()
    got = {tuple(d.ImagePositionPatient): d for d in
           (pydicom.dcmread(f) for f in (tmp_path / "site" / "ct" / case).iterdir())}
    for p in paths:
        orig = pydicom.dcmread(p)
        out = got[tuple(orig.ImagePositionPatient)]
        assert out.PixelData == orig.PixelData
        np.testing.assert_array_equal(out.pixel_array, orig.pixel_array)
        assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    intake.close()

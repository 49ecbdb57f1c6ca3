"""CT ingestion as hospitals deliver it: PACS export trees (DICOMDIR, nested folders, no
extensions, vendor files, several series), Enhanced CT, hostile header values, links and special
files. Each refusal has its code and names the file/field; the rest of the site goes on."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CT_SHAPE, CT_SPACING, SMALL, write_good_case
from dicom_writer import snapshot, sphere_volume, write_enhanced, write_series, write_tile
from pydicom.fileset import FileSet
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from hospital_node import dicom_header
from hospital_node.dataset import load_site
from hospital_node.dicom_series import read_ct_series
from hospital_node.series_choice import SeriesRule

DATA = Path(__file__).parents[2].parent / "shared" / "data"
HEAD = DATA / "ct-head-ge"
needs_head = pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})")


def _vol() -> np.ndarray:
    return sphere_volume(CT_SHAPE, CT_SPACING, (6, 20, 20), 5.0)


def codes(obj) -> set[str]:
    return {p.code for p in obj.problems}


def _pacs_export(dest: Path) -> list[str]:
    """A DICOMDIR file-set (PTxxx/STxxx/SExxx/IMxxx, no extensions) written by pydicom's
    FileSet from the real GE series plus a localizer, a thick reconstruction and a secondary
    capture of the same study; returns the GE SOP Instance UIDs."""
    fs = FileSet()

    def read(p: Path) -> pydicom.Dataset:
        # The public series is de-identified down to empty dates, which a DICOMDIR's STUDY
        # record needs (PS3.3 F.5): fill them in the in-memory copy only.
        ds = pydicom.dcmread(p)
        for kw, v in (("StudyDate", "20000101"), ("StudyTime", "000000"), ("StudyID", "1"),
                      ("PatientID", "anon"), ("PatientName", "anon")):
            if not str(ds.get(kw, "") or ""):
                setattr(ds, kw, v)
        return ds

    head = [read(p) for p in sorted(HEAD.glob("*.dcm"))]
    study = head[0].StudyInstanceUID
    for ds in head:
        fs.add(ds)
    scout = read(sorted(HEAD.glob("*.dcm"))[0])
    scout.SeriesInstanceUID, scout.SOPInstanceUID = generate_uid(), generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.ImageType, scout.SeriesNumber = ["ORIGINAL", "PRIMARY", "LOCALIZER"], 1
    fs.add(scout)
    thick_uid = generate_uid()
    for ds in [read(p) for p in sorted(HEAD.glob("*.dcm"))][::4]:
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = thick_uid, generate_uid(), 5
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        fs.add(ds)
    sc = read(sorted(HEAD.glob("*.dcm"))[5])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.SeriesInstanceUID, sc.SOPInstanceUID, sc.SeriesNumber = generate_uid(), generate_uid(), 99
    sc.file_meta.MediaStorageSOPInstanceUID = sc.SOPInstanceUID
    sc.StudyInstanceUID = study
    fs.add(sc)
    fs.write(dest)
    # Another study's single slice from pydicom's own test files, dropped in by a PACS that
    # exports by date: a CT series of one slice, which the rule must skip, not stack.
    from pydicom.data import get_testdata_file

    (dest / "EXTRA").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), dest / "EXTRA" / "IM0")
    # Vendor clutter as exports carry it: a viewer's index and a readme, not DICOM.
    (dest / "VIEWER").mkdir()
    (dest / "VIEWER" / "INDEX").write_bytes(b"\x00\x01vendor-index" * 40)
    (dest / "README").write_text("Exported by PACS\n")
    return [str(ds.SOPInstanceUID) for ds in head]


@needs_head
def test_pacs_export_tree_gives_one_case_with_the_chosen_series_named(tmp_path: Path,
                                                                      cache_dir: Path) -> None:
    root = tmp_path / "site"
    _pacs_export(root / "ct" / "case1")
    files = [p for p in (root / "ct" / "case1").rglob("*") if p.is_file()]
    assert any(p.name == "DICOMDIR" for p in files)
    assert all(p.suffix == "" for p in files if p.parent.name != "EXTRA")  # no .dcm, as exports
    before = snapshot(root)
    site = load_site(root, SMALL, cache_dir)
    rep = site.report.case("case1")
    assert rep.modalities == ["ct"], rep.problems
    chosen = next(p for p in rep.problems if p.code == "ct.series_chosen")
    assert not chosen.fatal
    # The GE axial series (series 2, 28 slices) was used; each other series has its reason.
    assert "used series 2" in chosen.message and "28 slices" in chosen.message
    assert "series 1" in chosen.message and "localizer" in chosen.message
    assert "series 5" in chosen.message and "ranked lower (7 slices" in chosen.message
    assert "series 99" in chosen.message and "dicom.secondary_capture" in chosen.message
    assert "EXTRA: 1 slice(s), fewer than 3" in chosen.message
    not_dicom = next(p for p in rep.problems if p.code == "dicom.not_dicom")
    assert not not_dicom.fatal and "README" in not_dicom.message
    assert snapshot(root) == before  # nothing written into the site root


@needs_head
def test_pacs_export_same_volume_as_the_flat_folder(tmp_path: Path) -> None:
    _pacs_export(tmp_path / "tree")
    a = read_ct_series(tmp_path / "tree", tmp_path)
    b = read_ct_series(HEAD, DATA)
    assert a.usable and b.usable
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.affine, b.affine)


def test_rule_is_configurable_thinnest_or_original_only(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    # 12 slices at 2.5 mm (ORIGINAL, no ImageType written) and 20 slices at 1.25 mm covering
    # less: most_slices and thinnest agree on the second; a derived one with more slices is
    # ranked after both unless nothing else qualifies.
    write_series(folder / "a", _vol(), CT_SPACING)
    write_series(folder / "b", sphere_volume((20, 40, 40), (1.25, 1.5, 1.5), (10, 20, 20), 5),
                 (1.25, 1.5, 1.5))
    thick = read_ct_series(folder, tmp_path, SeriesRule(prefer="thinnest"))
    assert thick.usable and thick.spacing[0] == pytest.approx(1.25)
    most = read_ct_series(folder, tmp_path, SeriesRule(prefer="most_slices"))
    assert most.hu.shape[0] == 20
    strict = read_ct_series(folder, tmp_path, SeriesRule(require_original=True))
    assert not strict.usable and "ct.no_usable_series" in codes(strict)
    assert "not ORIGINAL/PRIMARY" in next(p.message for p in strict.problems
                                          if p.code == "ct.no_usable_series")


def test_enhanced_ct_reads_into_the_same_volume_as_classic(tmp_path: Path) -> None:
    hu = _vol()
    hu[:, 0, 0] = np.arange(CT_SHAPE[0]) * 10.0 - 500
    write_series(tmp_path / "classic", hu, CT_SPACING, origin=(-30, -30, 100))
    write_enhanced(tmp_path / "enh" / "IM0001", hu, CT_SPACING, origin=(-30, -30, 100))
    a = read_ct_series(tmp_path / "classic", tmp_path)
    b = read_ct_series(tmp_path / "enh", tmp_path)
    assert a.usable and b.usable, b.problems
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.spacing == b.spacing


def test_enhanced_ct_from_pydicom_data(tmp_path: Path) -> None:
    data_store = pytest.importorskip("data_store", reason="pydicom-data not installed")
    src = Path(data_store.__file__).parent / "data" / "eCT_Supplemental.dcm"
    shutil.copy(src, (tmp_path / "e").mkdir() or tmp_path / "e" / "IM1")
    s = read_ct_series(tmp_path / "e", tmp_path, SeriesRule(min_slices=2))
    assert s.usable, s.problems
    assert s.hu.shape == (2, 512, 512)
    assert s.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    ref = pydicom.dcmread(src)
    # Row direction -x, column direction +y: the slice normal is -z, so sorted along the
    # normal the frame at z=-149 comes first.
    expect = ref.pixel_array[::-1].astype(np.float32) - 1024.0
    np.testing.assert_array_equal(s.hu, expect)
    np.testing.assert_allclose(s.affine[:3, 2], [-0.388672, 0, 0], atol=1e-6)
    np.testing.assert_allclose(s.affine[:3, 3], [99.5, -301.5, -149.0])
    np.testing.assert_allclose(s.affine[:3, 0], [0, 0, -10.0], atol=1e-6)
    assert "ct.derived_series" in codes(s)  # a perfusion map: DERIVED, said so


def _set_raw(path: Path, keyword: str, value: object, vr: str | None = None) -> None:
    from pydicom import config

    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds = pydicom.dcmread(path)
        if vr is not None:
            # The bytes exactly as a broken scanner writes them (pydicom would refuse to
            # convert some, e.g. DS 'abc', so they go in raw).
            from pydicom.datadict import tag_for_keyword
            from pydicom.dataelem import RawDataElement

            text = "\\".join(value) if isinstance(value, list) else str(value)
            raw = text.encode() + (b" " if len(text) % 2 else b"")
            tag = pydicom.tag.Tag(tag_for_keyword(keyword))
            ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        else:
            setattr(ds, keyword, value)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old


@pytest.mark.parametrize("keyword,value,code", [
    ("RescaleSlope", "NaN", "dicom.bad_value"),
    ("RescaleSlope", "0", "dicom.bad_value"),
    ("RescaleSlope", "abc", "dicom.bad_value"),
    ("RescaleIntercept", "inf", "dicom.bad_value"),
    ("PixelSpacing", ["1e-30", "1e-30"], "dicom.bad_value"),
    ("PixelSpacing", ["1e30", "1e30"], "dicom.bad_value"),
    ("PixelSpacing", ["0.7"], "dicom.bad_value"),
    ("ImagePositionPatient", ["0", "0", "nan"], "dicom.bad_value"),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"], "ct.bad_orientation"),
    ("ImageOrientationPatient", ["2", "0", "0", "0", "1", "0"], "ct.bad_orientation"),
    ("Rows", 1, "dicom.bad_value"),
    ("Columns", 65535, "dicom.bad_value"),
    ("BitsAllocated", 12, "dicom.bad_value"),
])
def test_hostile_header_value_excludes_the_series_naming_the_field(
        tmp_path: Path, keyword: str, value: object, code: str) -> None:
    paths = write_series(tmp_path / "s", _vol(), CT_SPACING)
    vr = {"RescaleSlope": "DS", "RescaleIntercept": "DS", "PixelSpacing": "DS",
          "ImagePositionPatient": "DS", "ImageOrientationPatient": "DS"}.get(keyword)
    _set_raw(paths[4], keyword, value, vr)
    s = read_ct_series(tmp_path / "s", tmp_path)
    assert not s.usable
    prob = next(p for p in s.problems if p.code == code)
    assert prob.fatal and prob.field == keyword and prob.file == "s/005.dcm"


def test_decoded_size_checked_before_decoding(tmp_path: Path, monkeypatch) -> None:
    from hospital_node import dicom_series

    write_series(tmp_path / "s", _vol(), CT_SPACING)
    monkeypatch.setattr(dicom_series, "MAX_CASE_DECODED_BYTES", 12 * 40 * 40 * 2 - 1)
    s = read_ct_series(tmp_path / "s", tmp_path)
    assert not s.usable and "ct.too_large" in codes(s)


def test_deflate_bomb_is_refused_before_inflating(tmp_path: Path, monkeypatch) -> None:
    paths = write_series(tmp_path / "s", _vol(), CT_SPACING)
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new("ImageComments", "LT", "A" * 3_000_000)  # compresses ~1000:1
    pydicom.dcmwrite(paths[0], ds, enforce_file_format=True)
    assert paths[0].stat().st_size < 100_000
    monkeypatch.setattr(dicom_header, "MAX_INFLATE_BYTES", 1_000_000)
    s = read_ct_series(tmp_path / "s", tmp_path)
    prob = next(p for p in s.problems if p.code == "dicom.too_large")
    assert "001.dcm" in prob.file and "inflates" in prob.message
    assert zlib  # the inflation is capped by zlib's max_length, never a full decompress


def test_links_out_of_the_root_and_special_files_are_refused(tmp_path: Path,
                                                             cache_dir: Path) -> None:
    root = tmp_path / "site"
    for cid in ("good", "linked", "slice_link", "fifo"):
        write_good_case(root, cid)
    outside = tmp_path / "elsewhere"
    write_series(outside / "ct", _vol(), CT_SPACING)
    write_tile(outside / "tile.png")
    shutil.rmtree(root / "ct" / "linked")
    os.symlink(outside / "ct", root / "ct" / "linked")  # a case folder leading out
    first = sorted((root / "ct" / "slice_link").iterdir())[0]
    first.unlink()
    os.symlink(sorted((outside / "ct").iterdir())[0], first)  # one slice leading out
    (root / "pathology" / "fifo.png").unlink()
    os.mkfifo(root / "pathology" / "fifo.png")  # reading it would block forever
    (root / "pathology" / "linked.png").unlink()
    os.symlink(outside / "tile.png", root / "pathology" / "linked.png")
    site = load_site(root, SMALL, cache_dir)
    rep = site.report
    assert rep.case("good").modalities == ["ct", "path"]
    assert "ct.outside_root" in rep.codes("linked") and "ct" not in rep.case("linked").modalities
    assert "path.outside_root" in rep.codes("linked")
    assert "ct.outside_root" in rep.codes("slice_link")
    assert "path.not_regular" in rep.codes("fifo") and rep.case("fifo").modalities == ["ct"]
    assert "FIFO" in next(p.message for p in rep.case("fifo").problems
                          if p.code == "path.not_regular")


def test_non_utf8_case_name_is_refused_and_the_report_prints(tmp_path: Path,
                                                             cache_dir: Path) -> None:
    import json

    root = tmp_path / "site"
    write_good_case(root, "c1")
    bad = os.fsdecode(b"case\xff\xfe")
    write_good_case(root, bad)
    site = load_site(root, SMALL, cache_dir)
    assert [c.case_id for c in site.report.cases] == ["c1"]
    assert "site.bad_case_name" in site.report.codes()
    json.dumps(site.report.to_json()).encode("utf-8")
    site.report.render_table().encode("utf-8")


def test_png_bomb_not_decoded(tmp_path: Path) -> None:
    from PIL import Image

    from hospital_node.pathology import read_tile

    Image.new("1", (7000, 7000)).save(tmp_path / "big.png")  # a few KB, 49 Mpx
    assert (tmp_path / "big.png").stat().st_size < 200_000
    t = read_tile(tmp_path / "big.png", "big.png")
    assert not t.usable and t.problems[0].code == "path.too_large"
    assert "pixel limit" in t.problems[0].message


def test_site_json_sets_the_series_rule_and_bad_rules_are_reported(tmp_path: Path,
                                                                   cache_dir: Path) -> None:
    import json

    root = tmp_path / "site"
    folder = root / "ct" / "c1"
    write_series(folder / "a", _vol(), CT_SPACING)
    write_series(folder / "b", sphere_volume((20, 40, 40), (1.25, 1.5, 1.5), (10, 20, 20), 5),
                 (1.25, 1.5, 1.5))
    (root / "site.json").write_text(json.dumps({"ct_series": {"require_original": True}}))
    site = load_site(root, SMALL, cache_dir)
    assert "ct.no_usable_series" in site.report.codes("c1")  # neither says ORIGINAL/PRIMARY
    (root / "site.json").write_text(json.dumps({"ct_series": {"prefer": "newest"}}))
    site = load_site(root, SMALL, cache_dir)
    bad = next(p for p in site.report.problems if p.field == "ct_series")
    assert bad.code == "site.bad_config" and "newest" in bad.message
    assert site.report.case("c1").modalities == ["ct"]  # default rule used instead


def test_site_root_reached_through_a_link_loads_like_the_real_one(tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    real = tmp_path / "mnt" / "export"
    write_good_case(real, "c1")
    os.symlink(real, tmp_path / "data")  # hospitals mount exports and link them
    site = load_site(tmp_path / "data", SMALL, cache_dir)
    assert site.report.case("c1").modalities == ["ct", "path"]
    again = load_site(tmp_path / "data", SMALL, cache_dir)
    assert again.cache_hits == 2 and again.cache_misses == 0


def test_refused_folders_do_not_share_a_cache_entry(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "site"
    (root / "ct" / "empty").mkdir(parents=True)
    os.symlink(tmp_path, root / "ct" / "out")  # no readable file either
    for _ in range(2):  # second pass: from the cache
        rep = load_site(root, SMALL, cache_dir).report
        assert "ct.outside_root" in rep.codes("out") and "ct.outside_root" not in rep.codes("empty")
        assert "ct.empty" in rep.codes("empty")
        assert all("ct/out" not in p.message for p in rep.case("empty").problems)

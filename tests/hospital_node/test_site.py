"""A whole site with a broken-input corpus: each problem has its code, the rest still loads,
no file is modified; check_site exit codes; the public summary carries counts only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CT_SHAPE, CT_SPACING, EHR_HEADER, SMALL, ehr_row, write_good_case
from dicom_writer import snapshot, sphere_volume, write_csv, write_series, write_tile

from hospital_node.check import check_site
from hospital_node.dataset import load_site


@pytest.fixture
def broken_site(good_site: Path) -> Path:
    root = good_site
    vol = sphere_volume(CT_SHAPE, CT_SPACING, (6, 20, 20), 5.0)
    paths = write_series(root / "ct" / "trunc", vol, CT_SPACING)
    paths[4].write_bytes(paths[4].read_bytes()[:700])
    write_series(root / "ct" / "notdcm", vol, CT_SPACING)
    (root / "ct" / "notdcm" / "zz.dcm").write_text("this is a report, not an image")
    write_series(root / "ct" / "mr", vol, CT_SPACING, modality="MR")
    offs = [k * 2.5 for k in range(CT_SHAPE[0])]
    write_series(root / "ct" / "holes", vol, CT_SPACING, offsets=offs[:6] + [o + 5 for o in
                                                                          offs[6:]])
    write_series(root / "ct" / "ident", vol, CT_SPACING, identifying=True)
    write_tile(root / "pathology" / "tiny.png", size=32)
    write_tile(root / "pathology" / "gray.png", mode="L")
    write_tile(root / "pathology" / "c1.tif")  # c1 already has c1.png
    ids = ["trunc", "notdcm", "mr", "holes", "ident", "tiny", "gray"]
    rows = [ehr_row(c) for c in ("c1", "c2", "c3", *ids)]
    rows[1] = ehr_row("c2", "abc")
    rows[2] = ehr_row("c3", 250)
    rows.append(ehr_row("c3", 40))  # duplicate, different
    write_csv(root / "ehr.csv", EHR_HEADER, rows)
    write_csv(root / "labels.csv", ["case_id", "label"],
              [[c, 1] for c in ("c1", "c2", "c3", *ids)] + [["onlylabel", 0]])
    return root


def test_each_problem_has_its_code_and_the_rest_loads(broken_site: Path, cache_dir: Path
                                                      ) -> None:
    before = snapshot(broken_site)
    site = load_site(broken_site, SMALL, cache_dir)
    rep = site.report
    expect = {"trunc": "dicom.unreadable", "notdcm": "dicom.not_dicom", "mr": "dicom.not_ct",
              "holes": "ct.missing_slices", "ident": "dicom.identifying_tags",
              "tiny": "path.too_small", "gray": "path.not_rgb", "c1": "case.duplicate",
              "c2": "ehr.not_a_number", "c3": "ehr.duplicate_case", "onlylabel": "case.no_data"}
    for cid, code in expect.items():
        assert code in rep.codes(cid), (cid, rep.case(cid).problems)
    # Bad modality excluded, the case keeps its others; the good data is all there.
    assert rep.case("mr").excluded == ["ct"] and rep.case("mr").modalities == ["ehr"]
    assert rep.case("c1").modalities == ["ct", "ehr"]
    assert rep.case("c3").modalities == ["ct", "path"]
    assert rep.case("ident").modalities == ["ct", "ehr"]
    assert not rep.case("onlylabel").usable
    loaded = {c.case_id: c for c in site.cases}
    assert set(loaded) == {c.case_id for c in rep.cases if c.usable}
    assert loaded["c2"].ct.shape == SMALL.ct_shape and loaded["c2"].path.shape == (3, 32, 32)
    assert np.isnan(loaded["c2"].ehr[0]) and loaded["c2"].ehr[1] == 1
    assert snapshot(broken_site) == before  # nothing written or touched in the data root


def test_public_summary_has_counts_only(broken_site: Path, cache_dir: Path) -> None:
    rep = load_site(broken_site, SMALL, cache_dir).report
    text = json.dumps(rep.public_summary())
    for c in rep.cases:
        assert f'"{c.case_id}"' not in text
    assert ".dcm" not in text and ".png" not in text
    assert rep.public_summary()["problems"]["dicom.not_ct"] == 1


def test_check_site_exit_codes_and_outputs(broken_site: Path, tmp_path: Path,
                                           cache_dir: Path) -> None:
    code, text = check_site(broken_site, cache_dir=cache_dir)
    assert code == 0 and "dicom.not_ct" in text and "ct/mr/" in text and "EXCLUDED" in text
    code, text = check_site(broken_site, as_json=True, cache_dir=cache_dir)
    data = json.loads(text)
    assert code == 0 and data["n_trainable"] >= 3
    assert check_site(tmp_path / "nowhere", cache_dir=cache_dir)[0] == 2
    empty = tmp_path / "empty_site"
    write_good_case(empty, "x")  # images but no labels: nothing trainable
    assert check_site(empty, cache_dir=cache_dir)[0] == 1


def test_site_json_and_schema_mismatch(good_site: Path, cache_dir: Path) -> None:
    (good_site / "site.json").write_text('{"site_id": "h-north", "ehr_schema": "uci-heart", '
                                         '"colour": 1}')
    site = load_site(good_site, SMALL, cache_dir)
    assert site.site_id == "h-north"
    assert {"site.bad_config", "site.ehr_schema_mismatch"} <= rep_codes(site)
    assert all(c.ehr is None for c in site.cases) and len(site.cases) == 3


def rep_codes(site) -> set[str]:
    return site.report.codes()


def test_cache_inside_root_refused(good_site: Path) -> None:
    from vocab.errors import ConfigError

    with pytest.raises(ConfigError):
        load_site(good_site, SMALL, good_site / "cache")


def test_read_only_root_loads(good_site: Path, cache_dir: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    shutil.copytree(good_site, ro)
    for p in [ro, *ro.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert len(load_site(ro, SMALL, cache_dir).cases) == 3
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

"""Write a small synthetic federation with synth/ and read it back through the node's reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_writer import snapshot

from hospital_node.dataset import load_site
from hospital_node.dicom_series import read_ct_series
from multimodal.grid import InputConfig
from vocab.ehr_schema import CHEST_V1

federation = pytest.importorskip("synth.federation", reason="synth/ not in the tree yet")
from synth.config import SynthConfig  # noqa: E402
from synth.truth import load_truth  # noqa: E402


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> tuple[Path, SynthConfig]:
    out = tmp_path_factory.mktemp("fed") / "federation"
    cfg = SynthConfig.default(2, seed=3, sizes=(6, 6))
    federation.generate(cfg, out)
    return out, cfg


def test_ct_hu_spacing_orientation(fed) -> None:
    out, cfg = fed
    for site in cfg.sites:
        for folder in sorted((out / site.site_id / "ct").iterdir())[:2]:
            s = read_ct_series(folder)
            assert s.usable and not s.problems, s.problems
            first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            px = float(first.PixelSpacing[0])
            assert s.spacing == pytest.approx((site.slice_thickness_mm, px, px))
            np.testing.assert_allclose(s.affine[:3, :3], np.array(
                [[0, 0, px], [0, px, 0], [site.slice_thickness_mm, 0, 0]]), atol=1e-6)
            assert np.median(s.hu[:, :4, :4]) == pytest.approx(-1000 + site.hu_offset, abs=40)
            lung = np.mean((s.hu > -950) & (s.hu < -750))
            assert lung > 0.05  # lungs present around -850 HU
            assert np.percentile(s.hu, 99.9) > 300  # bone


def test_nodules_where_truth_says_and_ehr_labels_equal(fed, tmp_path: Path) -> None:
    out, cfg = fed
    n_checked = 0
    for site in cfg.sites:
        root = out / site.site_id
        before = snapshot(root)
        loaded = load_site(root, InputConfig(), tmp_path / "cache")
        assert loaded.site_id == site.site_id
        assert loaded.report.n_trainable == site.n_cases
        truth = load_truth(out, site.site_id)
        for case in loaded.cases:
            t = truth[case.case_id]
            assert case.label == t.label
            assert set(case.modalities()) == set(t.modalities)
            for j, name in enumerate(CHEST_V1.names):
                want = t.ehr.get(name)
                got = float(case.ehr[j])
                assert (math.isnan(got) if want is None else got == pytest.approx(want, rel=1e-5))
            for les in t.lesions:
                if les.kind != "index" or les.radius_mm < 5:
                    continue  # small granulomas are below the grid's resolution
                v = np.linalg.inv(case.ct_affine) @ np.append(les.centre_mm, 1.0)
                d, h, w = np.round(v[:3]).astype(int)
                assert case.ct[d, h, w] > -0.75  # denser than lung (-850 HU -> -0.85)
                far = int(math.ceil((les.radius_mm + 8) / InputConfig().ct_spacing[2]))
                lo = min(case.ct[d, h, max(w - far, 0)], case.ct[d, h, min(w + far, 63)])
                assert case.ct[d, h, w] > lo + 0.1
                n_checked += 1
        assert snapshot(root) == before
    assert n_checked >= 2

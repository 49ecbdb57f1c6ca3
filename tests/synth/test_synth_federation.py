"""Whole-federation behaviour: layout, determinism, truth consistency, refusals, site diversity."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.config import SynthConfig
from synth.ehr import draw_ehr
from synth.federation import generate
from synth.truth import load_truth
from tests.synth.conftest import SMALL
from vocab.ehr_schema import CHEST_V1
from vocab.errors import ConfigError


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path: Path) -> None:
    cfg = SynthConfig.default(n_sites=2, seed=123, sizes=(2, 1))
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b", workers=2)
    ha, hb = hashes(tmp_path / "a"), hashes(tmp_path / "b")
    assert ha == hb
    assert any(k.endswith(".dcm") for k in ha) and any(k.endswith(".png") for k in ha)
    generate(SynthConfig.default(n_sites=2, seed=124, sizes=(2, 1)), tmp_path / "c")
    hc = hashes(tmp_path / "c")
    differing = [k for k in ha if k in hc and ha[k] != hc[k]]
    assert len(differing) > len(ha) // 2


def test_layout_and_manifest(small_fed) -> None:
    out, summary = small_fed
    manifest = json.loads((out / "federation.json").read_text())
    assert [s["site_id"] for s in manifest["sites"]] == [s.site_id for s in SMALL.sites]
    assert manifest["seed"] == SMALL.seed and manifest["generator"] == "fedsight.synth"
    for site in SMALL.sites:
        root = out / site.site_id
        assert json.loads((root / "site.json").read_text()) == {
            "site_id": site.site_id,
            "ehr_schema": "chest-v1",
        }
        assert not (root / "_truth").exists() and not list(root.rglob("truth*"))
        ehr = read_csv(root / "ehr.csv")
        labels = read_csv(root / "labels.csv")
        assert list(ehr[0]) == ["case_id", *CHEST_V1.names]
        assert [r["case_id"] for r in ehr] == [r["case_id"] for r in labels]
        assert len(labels) == site.n_cases
        letter = site.site_id.removeprefix("site_")
        assert labels[0]["case_id"] == f"{letter}-c0001"
    assert summary["total_cases"] == sum(s.n_cases for s in SMALL.sites)
    assert (out / "_truth" / "site_a" / "truth.json").is_file()


def test_labels_and_modalities_match_truth(small_fed) -> None:
    out, summary = small_fed
    for site in SMALL.sites:
        truth = load_truth(out, site.site_id)
        root = out / site.site_id
        for row in read_csv(root / "labels.csv"):
            t = truth[row["case_id"]]
            assert int(row["label"]) == t.label
            assert 0.0 < t.bayes_prob < 1.0
            assert t.bayes_prob == pytest.approx(1 / (1 + np.exp(-t.logit)), abs=1e-5)
            assert set(t.latents) == {"z_shared", "z_ct", "z_path", "z_ehr"}
            assert ((root / "ct" / t.case_id).is_dir()) == ("ct" in t.modalities)
            assert ((root / "pathology" / f"{t.case_id}.png").is_file()) == ("path" in t.modalities)
            assert (t.atypia_bbox is not None) == ("path" in t.modalities)
            assert "ehr" in t.modalities
    by_site = {s["site_id"]: s for s in summary["sites"]}
    assert by_site["site_c"]["n_path"] == 0  # the hospital without pathology
    assert not (out / "site_c" / "pathology").exists()
    assert by_site["site_a"]["n_path"] > 0


def test_ehr_values_equal_truth_and_lie_in_schema_ranges(small_fed) -> None:
    out, _ = small_fed
    for site in SMALL.sites:
        truth = load_truth(out, site.site_id)
        for row in read_csv(out / site.site_id / "ehr.csv"):
            t = truth[row["case_id"]]
            assert any(row[f] != "" for f in CHEST_V1.names)
            for f in CHEST_V1.fields:
                cell, want = row[f.name], t.ehr[f.name]
                if want is None:
                    assert cell == ""
                    continue
                assert float(cell) == pytest.approx(want, abs=1e-9)
                assert f.lo <= float(cell) <= f.hi
                if f.levels:
                    assert int(cell) in f.levels


def test_ehr_informative_fields_follow_the_score_and_others_do_not() -> None:
    site = SynthConfig.default(n_sites=1).sites[0]
    rng = np.random.default_rng(0)
    s = rng.standard_normal(3000)
    rows = [draw_ehr(site, float(v), rng) for v in s]

    def corr(name: str) -> float:
        pairs = [(v, r[name]) for v, r in zip(s, rows, strict=True) if r[name] is not None]
        a, b = np.array(pairs).T
        return float(np.corrcoef(a, b)[0, 1])

    for name in ("age", "pack_years", "family_history", "cea"):
        assert corr(name) > 0.15, name
    for name in ("sex", "bmi", "systolic_bp", "creatinine"):
        assert abs(corr(name)) < 0.06, name
    missing = np.mean([v is None for r in rows for v in r.values()])
    assert missing == pytest.approx(site.ehr_cell_missing_rate, abs=0.01)


def test_sites_differ_like_hospitals() -> None:
    sites = SynthConfig.default(n_sites=4).sites
    assert sum(s.n_cases for s in sites) == 250
    assert len({s.n_cases for s in sites}) == 4
    assert len({s.slice_thickness_mm for s in sites}) >= 3
    assert len({s.noise_sigma_hu for s in sites}) == 4
    assert len({s.stain_shift for s in sites}) == 4
    assert sum(s.path_missing_rate == 1.0 for s in sites) == 1
    assert any(s.ct_missing_rate > 0 for s in sites)


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not synthetic")
    with pytest.raises(ConfigError, match="refusing to write"):
        generate(SynthConfig.default(n_sites=1, sizes=(1,)), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "not synthetic"


def test_replaces_a_previous_synth_output_but_not_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    generate(SynthConfig.default(n_sites=2, sizes=(2, 1)), out)
    generate(SynthConfig.default(n_sites=1, sizes=(1,)), out)  # fewer sites: old ones go
    assert sorted(p.name for p in out.iterdir()) == ["_truth", "federation.json", "site_a"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write"):
        generate(SynthConfig.default(n_sites=1, sizes=(1,)), out)
    assert (out / "site_a" / "labels.csv").exists()


def test_pathology_png_is_rgb_256_with_he_colours(small_fed) -> None:
    out, _ = small_fed
    pngs = sorted((out / "site_a" / "pathology").glob("*.png"))
    assert pngs
    for p in pngs:
        img = Image.open(p)
        assert img.mode == "RGB" and img.size == (256, 256)
        a = np.asarray(img).reshape(-1, 3).astype(float)
        r, g, b = a.mean(0)
        assert g < r - 30 and g < b - 30  # pink/purple: green absorbed by both stains
        dark = a[a.sum(1) < np.percentile(a.sum(1), 5)]  # nuclei
        assert dark[:, 2].mean() > dark[:, 0].mean()  # haematoxylin is blue-purple
        light = a[a.sum(1) > np.percentile(a.sum(1), 50)]  # stroma
        assert light[:, 0].mean() > light[:, 1].mean() + 40  # eosin is pink


def test_a_federation_of_a_hundred_hospitals_has_unique_ids_and_keeps_the_first_26() -> None:
    from synth.config import MAX_SITES

    ids = [s.site_id for s in SynthConfig.default(n_sites=100).sites]
    assert len(set(ids)) == 100
    assert ids[:26] == [s.site_id for s in SynthConfig.default(n_sites=26).sites]
    assert ids[0] == "site_a" and ids[25] == "site_z" and ids[26] == "site_026"
    with pytest.raises(ConfigError, match=f"n_sites must be 1..{MAX_SITES}, got 1000"):
        SynthConfig.default(n_sites=1000)

"""The precomputed triage worklist: background computation into a cache keyed by (model,
case content), served on a worklist click, never served for another content or model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from explain.config import ExplainConfig
from explain.explanation import Explanation, explain_case
from hospital_node.dataset import load_site
from multimodal.checkpoint import save_checkpoint
from tests.explain.fixtures import make_case, tiny_model
from tests.ui.conftest import ct_case_with_ct
from ui import triage as T
from ui.config import TriageConfig, triage_cache_path
from ui.service import DiagnosisService
from vocab.errors import ConfigError

WAIT_S = 120


def _same(a: Explanation, b: Explanation) -> None:
    assert a.probability == pytest.approx(b.probability, abs=1e-6)
    assert a.present == b.present and a.model_version == b.model_version
    for x, y in ((a.ct_map, b.ct_map), (a.path_map, b.path_map)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-5 * max(1e-6, float(np.abs(y).max())))
    assert [f.contribution for f in a.ehr] == pytest.approx([f.contribution for f in b.ehr],
                                                            abs=1e-5)
    assert a.modality_contrib == pytest.approx(b.modality_contrib, abs=1e-5)


@pytest.fixture()
def site_copy(site_root: Path, tmp_path: Path) -> Path:
    """Hospital files are read-only: tests that change a file change a copy."""
    dst = tmp_path / "site"
    shutil.copytree(site_root, dst, ignore=shutil.ignore_patterns("feedback.db"))
    return dst


def _service(root: Path, model: Path, tmp: Path, **kw) -> DiagnosisService:
    tc = TriageConfig(cache_dir=tmp / "triage", rescan_s=3600, **kw)
    s = DiagnosisService.from_paths(root, model, tmp / "prep", ExplainConfig(), triage=tc)
    assert s.worker is None or s.worker.idle.wait(WAIT_S), "background worker did not finish"
    return s


def test_explanation_round_trips_through_npz_without_pickle(tmp_path: Path):
    model = tiny_model()
    for combo in [("ct", "path", "ehr"), ("ehr",), ("path",)]:
        e = explain_case(model, make_case(combo, seed=3), ExplainConfig(), "v7")
        cache = T.TriageCache(tmp_path / "c")
        cache.put("m", combo[0], e)
        fresh = T.TriageCache(tmp_path / "c")  # nothing in memory: read from disk
        back = fresh.get("m", combo[0])
        assert back is not None
        assert back.ehr == e.ehr and back.subsets == e.subsets and back.experts == e.experts
        assert back.ct_location == e.ct_location and back.ct_top_slice == e.ct_top_slice
        assert back.present == e.present and back.missing == e.missing
        assert (back.probability, back.logit, back.threshold) == (e.probability, e.logit,
                                                                   e.threshold)
        _same(back, e)
        with np.load(next((tmp_path / "c").glob("*.npz")), allow_pickle=False) as z:
            assert "_meta" in z.files  # JSON + arrays: loadable without pickle


def test_foreign_or_corrupt_entry_is_never_served(tmp_path: Path):
    model = tiny_model()
    e = explain_case(model, make_case(("ehr",)), ExplainConfig(), "v1")
    cache = T.TriageCache(tmp_path / "c")
    cache.put("model-a", "content-a", e)
    # an entry stored under another name (renamed, or a hash collision) carries its own keys
    src = cache.dir / f"{T.entry_name('model-a', 'content-a')}.npz"
    shutil.copy(src, cache.dir / f"{T.entry_name('model-b', 'content-a')}.npz")
    fresh = T.TriageCache(tmp_path / "c")
    assert fresh.get("model-b", "content-a") is None
    assert fresh.get("model-a", "content-b") is None
    (cache.dir / f"{T.entry_name('model-a', 'content-a')}.npz").write_bytes(b"not a zip")
    assert T.TriageCache(tmp_path / "c").get("model-a", "content-a") is None


def test_worklist_is_precomputed_sorted_and_clicks_are_cache_reads(
        site_copy: Path, checkpoint: Path, tmp_path: Path):
    s = _service(site_copy, checkpoint, tmp_path)
    try:
        rows = s.worklist_rows()
        assert rows and all(r["probability"] is not None or r["decision"] == T.OUT_OF_SCOPE
                            for r in rows)
        diag = [r for r in rows if r["decision"] != T.OUT_OF_SCOPE]
        first = [r["decision"] == "malignant" or r["near_threshold"] for r in diag]
        assert first == sorted(first, reverse=True)  # suspicious / uncertain ones first
        by_p = [r["probability"] for r in s.worklist_rows("suspicion")
                if r["probability"] is not None]
        assert by_p == sorted(by_p, reverse=True)
        margins = [r["margin"] for r in s.worklist_rows("uncertainty") if r["margin"] is not None]
        assert margins == sorted(margins)
        with pytest.raises(ValueError, match="order"):
            s.worklist_rows("alphabetical")
        cid = diag[0]["case_id"]
        hits = s.triage_cache.hits
        d = s.diagnose_case(cid)
        assert s.triage_cache.hits == hits + 1 and "cache_read" in d.timings_ms
        _same(d.explanation, explain_case(s.served.model, s._cases[cid], s.cfg,
                                          s.served.version))
        assert d.explanation.probability == pytest.approx(diag[0]["probability"])
        # the feedback filter
        s.send_feedback(d.handle, "agree", None, "", "dr_a")
        assert cid not in [r["case_id"] for r in s.worklist_rows(without_feedback=True)]
        assert cid in [r["case_id"] for r in s.worklist_rows()]
    finally:
        s.close()


def test_changed_dicom_byte_invalidates_only_that_case(site_copy: Path, checkpoint: Path,
                                                       tmp_path: Path):
    s = _service(site_copy, checkpoint, tmp_path)
    try:
        cid = ct_case_with_ct(site_copy)
        old_keys = dict(s._content)
        old = s.diagnose_case(cid).explanation
        # one byte of one slice's pixel data (the file's last byte) changes
        slices = sorted((site_copy / "ct" / cid).iterdir())
        f = slices[len(slices) // 2]
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x5A
        f.write_bytes(bytes(data))
        s.refresh()
        assert s.worker.idle.wait(WAIT_S)
        changed = {c for c in old_keys if s._content.get(c) != old_keys[c]}
        assert changed == {cid}
        misses_before = s.triage_cache.misses
        # the service's entry is the one computed for the new bytes, never the old one
        reloaded = {c.case_id: c for c in load_site(site_copy, s.served.model.cfg.inputs,
                                                    tmp_path / "prep2").cases}
        fresh = explain_case(s.served.model, reloaded[cid], s.cfg, s.served.version)
        got = s.diagnose_case(cid).explanation
        _same(got, fresh)
        assert s.triage_cache.misses == misses_before  # the worker had computed it already
        np.testing.assert_array_equal(s._cases[cid].ct, reloaded[cid].ct)  # the new pixels
        assert old.model_version == got.model_version
        assert s.triage_cache.get(*(s._model_key(), old_keys[cid])) is not None  # still on disk
    finally:
        s.close()


def test_another_model_version_never_gets_the_first_ones_entries(
        site_copy: Path, checkpoint: Path, tmp_path: Path):
    a = _service(site_copy, checkpoint, tmp_path)
    a.close()
    other = save_checkpoint(tiny_model(seed=5), tmp_path / "m2" / "model.pt")
    b = DiagnosisService.from_paths(site_copy, other, tmp_path / "prep", ExplainConfig(),
                                    triage=TriageConfig(cache_dir=tmp_path / "triage",
                                                        background=False))
    try:
        assert b._model_key() != a._model_key()
        cid = ct_case_with_ct(site_copy)
        misses = b.triage_cache.misses
        got = b.diagnose_case(cid).explanation
        assert b.triage_cache.misses == misses + 1  # a's entry for the same content not served
        _same(got, explain_case(b.served.model, b._cases[cid], b.cfg, b.served.version))
        assert abs(got.probability - a.diagnose_case(cid).explanation.probability) > 1e-6
    finally:
        b.close()


def test_triage_cache_is_never_inside_the_site_root(site_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    default = triage_cache_path(site_root)
    assert default.is_relative_to(tmp_path / "state") and default.name == "triage"
    with pytest.raises(ConfigError, match="inside the site data root"):
        triage_cache_path(site_root, site_root / "triage")


@pytest.mark.parametrize("kw, field", [({"max_batch": 0}, "max_batch"),
                                       ({"max_wait_ms": -1.0}, "max_wait_ms"),
                                       ({"rescan_s": 0.0}, "rescan_s")])
def test_triage_config_names_the_bad_field(kw: dict, field: str):
    with pytest.raises(ConfigError, match=field):
        TriageConfig(**kw)


def test_app_worklist_table_and_row_click(site_copy: Path, checkpoint: Path, tmp_path: Path):
    from ui.app import WORKLIST_COLUMNS, build_app
    from ui.config import UiConfig

    s = _service(site_copy, checkpoint, tmp_path)
    try:
        app = build_app(s, UiConfig())
        fns = {d.api_name: d.fn for d in app.fns.values() if d.api_name}
        table, dropdown = fns["worklist"]("suspicion", False)
        assert all(len(r) == len(WORKLIST_COLUMNS) for r in table)
        probs = [r[2] for r in table if r[2] is not None]
        assert probs == sorted(probs, reverse=True) and probs
        assert [c for _, c in dropdown.choices] == [r[0] for r in table]
        out = fns["diagnose"](table[0][0])
        assert f"{probs[0]:.1f}%" in out[1]  # the card agrees with the table
        s.send_feedback(out[0], "agree", None, "", "dr_a")
        unreviewed, _ = fns["worklist"]("triage", True)
        assert table[0][0] not in [r[0] for r in unreviewed]
    finally:
        s.close()


def test_a_new_case_is_triaged_after_a_rescan(site_copy: Path, checkpoint: Path,
                                              tmp_path: Path):
    s = _service(site_copy, checkpoint, tmp_path)
    try:
        before = {r["case_id"] for r in s.worklist_rows()}
        src = site_copy / "ct" / ct_case_with_ct(site_copy)
        shutil.copytree(src, site_copy / "ct" / "zz-new-case")
        s.refresh()
        assert s.worker.idle.wait(WAIT_S)
        rows = {r["case_id"]: r for r in s.worklist_rows()}
        assert set(rows) - before == {"zz-new-case"}
        new = rows["zz-new-case"]
        assert new["decision"] is not None  # computed (or refused by the scope check)
        if new["decision"] != T.OUT_OF_SCOPE:
            e = s.diagnose_case("zz-new-case").explanation
            assert e.probability == pytest.approx(new["probability"])
    finally:
        s.close()

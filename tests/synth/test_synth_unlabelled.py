"""SynthConfig.labelled_fraction: some patients appear in no labels file but keep every image
and EHR row, byte for byte what a fully labelled federation of the same seed writes; the truth
names them; the default manifest does not mention the knob."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from synth.config import SynthConfig
from synth.federation import MANIFEST, generate
from synth.truth import truth_path
from vocab.errors import ConfigError
from vocab.tasks import labels_file

BOTH = ("nodule", "fibrosis")


def _ids(path: Path) -> set[str]:
    with path.open() as f:
        return {row["case_id"] for row in csv.DictReader(f)}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_unlabelled_cases_keep_their_data_and_only_lose_their_labels(tmp_path: Path) -> None:
    full = SynthConfig.default(2, seed=8, sizes=(30, 24), tasks=BOTH)
    part = SynthConfig.default(2, seed=8, sizes=(30, 24), tasks=BOTH, labelled_fraction=0.3)
    a, b = generate(full, tmp_path / "full"), generate(part, tmp_path / "part")
    fa, fb = _files(tmp_path / "full"), _files(tmp_path / "part")
    label_files = {f for f in fa if f.endswith(".csv") and "/labels" in f}
    differ = {f for f in fa if fa[f] != fb.get(f)}
    # only the labels files, the truth (names the unlabelled) and the manifest differ
    assert differ <= label_files | {MANIFEST} | {f for f in fa if f.startswith("_truth/")}
    assert set(fa) == set(fb)
    total_unlabelled = 0
    for site in full.sites:
        root = tmp_path / "part" / site.site_id
        truth = json.loads(truth_path(tmp_path / "part", site.site_id).read_text())
        unlabelled = set(truth["unlabelled"])
        every = _ids(tmp_path / "full" / site.site_id / "labels.csv")
        assert len(every) == site.n_cases
        for task in BOTH:
            assert _ids(root / labels_file(task)) == every - unlabelled, (site.site_id, task)
        # each unlabelled case still has its EHR row (and its images: files are identical)
        assert unlabelled <= _ids(root / "ehr.csv")
        assert {c["case_id"] for c in truth["cases"]} == every  # truth keeps every patient
        total_unlabelled += len(unlabelled)
    summary_unlabelled = sum(s["n_unlabelled"] for s in b["sites"])
    assert summary_unlabelled == total_unlabelled
    # 54 patients, 70 % expected unlabelled: far from none and far from all
    assert 25 <= total_unlabelled <= 50, total_unlabelled
    assert "n_unlabelled" not in json.dumps(a)
    assert "labelled_fraction" not in (tmp_path / "full" / MANIFEST).read_text()
    assert json.loads((tmp_path / "part" / MANIFEST).read_text())["config"][
        "labelled_fraction"] == 0.3


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_labelled_fraction_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="labelled_fraction must be in"):
        SynthConfig.default(1, sizes=(4,), labelled_fraction=bad)

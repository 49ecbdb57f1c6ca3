"""`fedsight evaluate` end to end: real synthetic sites on disk, a saved checkpoint, the report."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from hospital_node.dataset import load_site
from multimodal.checkpoint import save_checkpoint
from multimodal.config import ModelConfig
from multimodal.grid import InputConfig
from multimodal.model import build_model
from synth.config import SynthConfig
from synth.federation import generate
from vocab.modalities import combo_name, modality_combinations

INPUTS = InputConfig(ct_shape=(16, 32, 32), ct_spacing=(16.0, 10.0, 10.0), path_size=32)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by brute force over every positive/negative pair (ties 1/2): a second reference."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(2, seed=5, sizes=(10, 10)), out)
    return out


def test_evaluate_writes_per_site_and_combo_metrics(fed: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    cfg = ModelConfig(inputs=INPUTS, d_model=32, n_heads=2, n_blocks=1, ct_channels=(8, 16),
                      n_experts=4, top_k=2, expert_hidden=16, ehr_hidden=16)
    model = build_model(cfg, seed=0)
    ckpt = save_checkpoint(model, tmp_path / "model.pt")
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", str(ckpt), "--split", "all", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    for s in sites:
        argv += ["--site", str(s)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert "pooled" in capsys.readouterr().out

    rows = {(r["site"], r["combo"]): r for r in report["rows"]}
    all_cases, site_ids = [], []
    for s in sites:
        loaded = load_site(s, INPUTS, tmp_path / "cache")
        labelled = [c for c in loaded.cases if c.label is not None]
        site_ids.append(loaded.site_id)
        all_cases += labelled
        assert rows[(loaded.site_id, "available")]["n"] == len(labelled)
    # every one of the 7 modality combinations is answered for the pooled federation
    for combo in modality_combinations():
        assert ("pooled", combo_name(combo)) in rows
    # pooled AUC equals a brute-force AUC of the same model's probabilities
    model.eval()
    with torch.no_grad():
        from multimodal.evaluate import predict_logits

        logits, labels = predict_logits(model, all_cases)
    ref = _pairwise_auc(labels.numpy().astype(int), logits.numpy())
    assert rows[("pooled", "available")]["auc"] == pytest.approx(ref, abs=1e-9)


def test_evaluate_rejects_site_without_labelled_cases(fed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelConfig(inputs=INPUTS, d_model=32, n_heads=2, n_blocks=1, ct_channels=(8, 16),
                      n_experts=4, top_k=2, expert_hidden=16, ehr_hidden=16)
    ckpt = save_checkpoint(build_model(cfg, seed=0), tmp_path / "model.pt")
    empty = tmp_path / "empty_site"
    (empty / "ct").mkdir(parents=True)
    rc = main(["evaluate", "--model", str(ckpt), "--site", str(empty),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    assert "no labelled cases" in capsys.readouterr().err

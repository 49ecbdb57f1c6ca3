from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multimodal.checkpoint import load_checkpoint, load_into, save_checkpoint
from multimodal.data import collate
from multimodal.model import build_model
from tests.multimodal.conftest import TINY_INPUTS, tiny_config, toy_cases
from vocab.ehr_schema import CHEST_V1
from vocab.errors import CheckpointError


def test_round_trip(tmp_path: Path) -> None:
    model = build_model(tiny_config(), seed=0).eval()
    model.temperature = 1.7
    b = collate(toy_cases(3, 0), CHEST_V1, TINY_INPUTS.ct_shape, TINY_INPUTS.path_size)
    ref = model(b).logit
    p = save_checkpoint(model, tmp_path / "m.pt", meta={"round": 3})
    loaded = load_checkpoint(p, expected=tiny_config())
    assert loaded.temperature == 1.7
    assert torch.equal(loaded(b).logit, ref)
    other = build_model(tiny_config(), seed=1)
    load_into(other, p)
    assert torch.equal(other(b).logit, ref)


def test_wrong_config_names_differing_keys(tmp_path: Path) -> None:
    p = save_checkpoint(build_model(tiny_config(), seed=0), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"n_experts: 4 != 8.*top_k: 1 != 2") as e:
        load_checkpoint(p, expected=tiny_config(n_experts=4, top_k=1))
    assert "d_model" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"inputs\.path_size"):
        load_into(build_model(tiny_config(inputs=TINY_INPUTS.__class__(
            ct_shape=(16, 32, 32), path_size=64))), p)


def test_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(bad)


def test_run_evaluate_writes_reports(tmp_path: Path) -> None:
    from multimodal.cli_eval import run_evaluate

    p = save_checkpoint(build_model(tiny_config(), seed=0), tmp_path / "m.pt")
    rep = run_evaluate({"s": toy_cases(12, 0)}, p, tmp_path / "out" / "eval.json")
    assert (tmp_path / "out" / "eval.json").read_text().startswith("{")
    assert "| pooled | available |" in (tmp_path / "out" / "eval.md").read_text()
    assert rep.row("s", "available").n == 12

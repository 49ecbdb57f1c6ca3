"""`fedsight adapt` end to end on a synthetic federation with two diseases: a stored base version,
a new version with the task, base and method; the base untouched; refusals before training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.main import main
from coordinator.store import ModelStore, sha256_file
from hospital_node.dataset import load_site
from multimodal.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from multimodal.config import ModelConfig, TrainConfig
from multimodal.grid import InputConfig
from multimodal.model import build_model
from multimodal.train import as_batch, train_local
from synth.config import SynthConfig
from synth.federation import generate

INPUTS = InputConfig(ct_shape=(16, 32, 32), ct_spacing=(16.0, 10.0, 10.0), path_size=32)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("adapt")
    fed = tmp / "federation"
    generate(SynthConfig.default(2, seed=9, sizes=(40, 24), tasks=("nodule", "fibrosis")), fed)
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))
    cfg = ModelConfig(inputs=INPUTS, d_model=32, n_heads=2, n_blocks=1, ct_channels=(8, 16),
                      n_experts=4, top_k=2, expert_hidden=16, ehr_hidden=16)
    base = build_model(cfg, seed=0)
    cases = [c for s in sites for c in load_site(s, INPUTS, tmp / "cache").cases]
    train_local(base, cases, TrainConfig(epochs=2, stage1_epochs=1))
    base.temperature = 1.3
    store = ModelStore(tmp / "store")
    v = store.add_version(lambda p: save_checkpoint(base, p), {"round": 1, "task": "nodule"})
    return {"tmp": tmp, "sites": sites, "base_dir": v.path, "store": tmp / "store",
            "cache": tmp / "cache", "cases": cases}


def test_adapt_cli_writes_a_two_task_version_and_leaves_the_base(world: dict) -> None:
    base_pt = world["base_dir"] / "model.pt"
    digest, mtime = sha256_file(base_pt), os.stat(base_pt).st_mtime_ns
    argv = [sys.executable, "-m", "cli.main", "adapt", "--base", str(world["base_dir"]),
            "--task", "fibrosis", "--site", str(world["sites"][0]), "--site",
            str(world["sites"][1]), "--store", str(world["store"]), "--method", "lora",
            "--epochs", "3", "--cache-dir", str(world["cache"])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["task"] == "fibrosis" and rep["method"] == "lora" and rep["n_train"] >= 10
    assert sha256_file(base_pt) == digest and os.stat(base_pt).st_mtime_ns == mtime
    store = ModelStore(world["store"])
    v = store.get(rep["version"])
    assert v.meta["task"] == "fibrosis" and v.meta["tasks"] == ["nodule", "fibrosis"]
    assert v.meta["base"] == {"version": world["base_dir"].name, "sha256": digest}
    assert v.meta["adapt"]["method"] == "lora" and v.meta["adapt"]["n_cases"] == rep["n_train"]
    assert read_checkpoint(v.model_path)["meta"]["task"] == "fibrosis"
    # the new version answers both tasks; the first exactly as the base did
    base = load_checkpoint(base_pt)
    first = load_checkpoint(v.model_path, task="nodule")
    new = load_checkpoint(v.model_path, task="fibrosis")
    b = as_batch(base, world["cases"][:8])
    with torch.no_grad():
        assert torch.equal(first(b).logit, base(b).logit)
        assert not torch.allclose(new(b).logit, base(b).logit)
    assert first.temperature == 1.3 and new.temperature == 1.0


def test_evaluate_takes_the_task(world: dict, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    v = ModelStore(world["store"]).list_versions()[-1]
    if v.meta.get("task") != "fibrosis":
        pytest.skip("needs the adapted version of the test above")
    rc = main(["evaluate", "--model", str(v.path), "--task", "fibrosis", "--split", "all",
               "--cache-dir", str(world["cache"]), *sum((["--site", str(s)]
                                                        for s in world["sites"]), [])])
    assert rc == 0
    rc = main(["evaluate", "--model", str(world["base_dir"]), "--task", "fibrosis",
               "--site", str(world["sites"][0])])
    assert rc == 2
    assert "no head for task 'fibrosis'" in capsys.readouterr().err


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_refusals_name_the_file_or_version_before_training(
        world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n_before = len(ModelStore(world["store"]).list_versions())
    common = ["--base", str(world["base_dir"]), "--store", str(world["store"]),
              "--cache-dir", str(world["cache"])]
    site = world["sites"][0]
    # a site without labels of the task
    bare = tmp_path / "bare"
    shutil.copytree(site, bare, ignore=shutil.ignore_patterns("labels"))
    err = _refused(["adapt", *common, "--task", "fibrosis", "--site", str(bare)], capsys)
    assert "labels/fibrosis.csv" in err and str(bare) in err
    # an unknown task, and a task file whose EHR schema the base does not read
    err = _refused(["adapt", *common, "--task", "sepsis", "--site", str(site)], capsys)
    assert "unknown task 'sepsis'" in err
    tf = tmp_path / "heart.toml"
    tf.write_text('[task]\nid = "heart"\ndescription = "d"\npositive = "p"\nnegative = "n"\n'
                  'condition = "c"\nehr_schema = "uci-heart"\nmodalities = ["ehr"]\n')
    err = _refused(["adapt", *common, "--task", str(tf), "--site", str(site)], capsys)
    assert "uci-heart" in err and "chest-v1" in err
    # fewer labelled cases than the minimum, more than exist
    err = _refused(["adapt", *common, "--task", "fibrosis", "--site", str(site), "--cases", "5"],
                   capsys)
    assert "5 labelled case(s), at least 10" in err
    err = _refused(["adapt", *common, "--task", "fibrosis", "--site", str(site), "--cases",
                    "999"], capsys)
    assert "--cases 999" in err
    # a base that is not a model
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    err = _refused(["adapt", "--base", str(junk), "--store", str(world["store"]), "--task",
                    "fibrosis", "--site", str(site)], capsys)
    assert str(junk) in err
    # the base already has the task
    v = ModelStore(world["store"]).list_versions()[-1]
    if v.meta.get("task") == "fibrosis":
        err = _refused(["adapt", "--base", str(v.path), "--store", str(world["store"]),
                        "--task", "fibrosis", "--site", str(site)], capsys)
        assert "already has a head for task 'fibrosis'" in err
    assert len(ModelStore(world["store"]).list_versions()) == n_before


def test_labels_of_an_unknown_task_are_reported_not_read(world: dict, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(world["sites"][1], site)
    (site / "labels" / "fibrosys.csv").write_text("case_id,label\n")
    loaded = load_site(site, INPUTS, None, use_cache=False, task="fibrosis")
    msgs = [p.message for p in loaded.report.problems if p.code == "site.unknown_task_labels"]
    assert msgs and "labels/fibrosys.csv" in msgs[0] and "'fibrosys'" in msgs[0]
    assert all(c.label is not None for c in loaded.cases)

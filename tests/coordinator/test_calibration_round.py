"""Federated temperature scaling end to end without a network: the real ClientApp evaluates the
round's model at two synthetic hospitals, the strategy fits T from their sums alone, the round
hook stores T in the version's checkpoint and meta, and the app's card follows what is stored.
The fitted T is checked against a central fit on the same held-out cases (computed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.run_state import RunState
from coordinator.runner import _round_end_hook
from coordinator.settings import RunSettings
from coordinator.store import ModelStore, StoreError
from coordinator.strategy import build_strategy
from multimodal.calibration import T_GRID
from multimodal.model import ModelConfig, build_model
from vocab import records as K

TINY = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_experts": 4, "top_k": 2,
        "expert_hidden": 16, "ct_channels": [8], "ehr_hidden": 8,
        "inputs": {"ct_shape": [8, 16, 16], "ct_spacing": [32.0, 20.0, 20.0], "path_size": 32,
                   "ehr_schema": "chest-v1"}}
NODES = {201: "site_a", 202: "site_b"}
SEED = 0


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=2, seed=11, sizes=(70, 70)), out)
    return out


def overconfident_model() -> torch.nn.Module:
    """A tiny model whose logits are blown up (x6 at the head) so that T must be > 1."""
    model = build_model(ModelConfig.from_dict(TINY), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head"):
                p.mul_(6.0)
    return model


def central_temperature(model: torch.nn.Module, federation: Path, tmp: Path) -> float:
    """Grid T minimising the NLL of all held-out cases pooled in one place (what a central
    fit would do), computed with the node's own loader but not its reply."""
    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.evaluate import predict_logits

    xs, ys = [], []
    for site in ("site_a", "site_b"):
        cases = load_site(federation / site, model.cfg.inputs, tmp / "cache-ref").cases
        test = [c for c in cases if split_of(c.case_id, SEED) == "test"]
        x, y = predict_logits(model, test)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    nll = [float(F.binary_cross_entropy_with_logits(x / t, y, reduction="sum")) for t in T_GRID]
    return T_GRID[int(np.argmin(nll))]


def test_round_fits_t_from_hospital_sums_and_the_version_carries_it(
        federation: Path, tmp_path: Path) -> None:
    from hospital_node.client_app import app
    from ui.model_source import load_served_model

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    model = overconfident_model()
    settings = RunSettings.from_run_config({"min-hospitals": 2,
                                            "store-dir": str(tmp_path / "store")})
    run = RunState("r", {}, 1)
    s = build_strategy(settings, run, identify=lambda grid, ids, taken: {
        i: NODES[i] for i in ids})
    arrays = ArrayRecord(model.state_dict())
    config = ConfigRecord({K.SERVER_ROUND: 1, K.STAGE: 2, K.MODEL_JSON: json.dumps(TINY),
                           K.TRAIN_JSON: "{}", K.SEED: SEED, K.MAX_CASES: 0})
    msgs = list(s.configure_evaluate(1, arrays, config, FakeGrid()))
    replies = []
    for m in msgs:
        site = NODES[m.metadata.dst_node_id]
        ctx = Context(run_id=7, node_id=m.metadata.dst_node_id, state=RecordDict(),
                      run_config={}, node_config={"data-dir": str(federation / site),
                                                  "cache-dir": str(tmp_path / f"c-{site}")})
        replies.append(app(m, ctx))
    s.aggregate_evaluate(1, replies)
    rec = s.journal[1]
    cal = rec.calibration
    assert cal["temperature"] == central_temperature(model, federation, tmp_path)
    assert cal["temperature"] > 1.5  # the blown-up head is overconfident
    assert set(cal["hospitals"]) == {"site_a", "site_b"}
    n_eval = sum(h.eval[K.N_EVAL] for h in rec.hospitals.values())
    assert cal["n"] == n_eval == sum(h["n"] for h in cal["hospitals"].values())
    assert cal["pooled"]["ece_after"] < cal["pooled"]["ece_before"]

    rec.status = "aggregated"  # as after a training phase that merged updates
    store = ModelStore(tmp_path / "store")
    _round_end_hook(store, s, settings, ModelConfig.from_dict(TINY), run)(1, arrays)
    version = store.get(run.last_version)
    assert version.meta["calibration"]["temperature"] == cal["temperature"]
    served = load_served_model(version.path, "site_a")
    assert served.model.temperature == cal["temperature"]
    assert served.calibration.startswith(
        f"Calibrated (federated temperature scaling, T = {cal['temperature']:.2f}); ECE at "
        "this hospital")

    # the promotion gate reads the same record
    bound = cal["pooled"]["ece_after"]
    with pytest.raises(StoreError, match="pooled ECE .* exceeds"):
        store.promote(version.id, max_ece=bound / 2)
    assert store.promote(version.id, max_ece=bound + 1e-9).id == version.id

    # `fedsight models show --plot` draws the diagram from the stored record
    png = tmp_path / "rel.png"
    out = subprocess.run([sys.executable, "-m", "cli.main", "models", "show", "--store",
                          str(tmp_path / "store"), version.id, "--plot", str(png)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_version_without_a_fit_is_called_uncalibrated(tmp_path: Path) -> None:
    from coordinator.runner import write_model
    from ui.model_source import load_served_model

    store = ModelStore(tmp_path / "store")
    cfg = ModelConfig.from_dict(TINY)
    state = build_model(cfg, seed=0).state_dict()
    v = store.add_version(lambda p: write_model(state, cfg, p), {"round": 1,
                                                               "calibration": None})
    served = load_served_model(v.path, "site_a")
    assert served.calibration.startswith("**Uncalibrated** probability")
    with pytest.raises(StoreError, match="no federated calibration"):
        store.promote(v.id, max_ece=0.05)
    # a record that disagrees with the checkpoint's T is not believed
    v2 = store.add_version(lambda p: write_model(state, cfg, p, 1.0),
                           {"round": 2, "calibration": {"temperature": 2.0}})
    assert "does not match its model" in load_served_model(v2.path, "site_a").calibration

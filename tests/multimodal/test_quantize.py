"""The INT8 copy: close probabilities, smaller checkpoint, the float model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from multimodal.config import TrainConfig
from multimodal.metrics import auc
from multimodal.model import build_model
from multimodal.quantize import quantize_int8, quantized_share, serialized_bytes
from multimodal.train import as_batch, train_local
from tests.multimodal.conftest import tiny_config, toy_cases
from vocab.errors import ConfigError

# benchmarks/bench_int8.py measured max |p_int8 - p_fp32| = 0.026 over 78 held-out synthetic
# cases with the default model (docs/benchmarks.md, INT8); twice that is the bound here.
MAX_PROB_DIFF = 0.05


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.set_num_threads(1)
    model = build_model(tiny_config(), seed=0)
    train_local(model, toy_cases(48, seed=0), TrainConfig(
        epochs=6, stage1_epochs=1, batch_size=16, lr=3e-3, seed=0, augment=False))
    return model.eval()


@torch.no_grad()
def _probs(model: nn.Module, batch) -> np.ndarray:  # type: ignore[no-untyped-def]
    return model.predict_proba(batch).numpy()


def test_int8_probabilities_stay_close_to_fp32(trained: nn.Module) -> None:
    q = quantize_int8(trained)
    batch = as_batch(trained, toy_cases(40, seed=1))
    p32, p8 = _probs(trained, batch), _probs(q, batch)
    diff = np.abs(p32 - p8)
    assert diff.max() < MAX_PROB_DIFF
    assert diff.max() > 0  # it really runs int8 (identical floats would mean nothing changed)
    y = batch.label.numpy()
    assert abs(auc(y, p8) - auc(y, p32)) < 0.05
    kinds = {type(m) for m in q.modules()}
    assert nnqd.Linear in kinds and nn.Linear not in kinds


def test_int8_checkpoint_is_smaller_by_the_linear_weights(trained: nn.Module) -> None:
    q = quantize_int8(trained)
    b32, b8 = serialized_bytes(trained), serialized_bytes(q)
    linears = [m for m in trained.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    # each Linear weight goes from 4 bytes to 1; each packed layer pickles a few more records
    # (scale, zero point, dtype: ~740 bytes measured, 1 KiB allowed)
    assert 3 * weights - 1024 * len(linears) <= b32 - b8 <= 3 * weights
    assert b8 > b32 * (1 - 0.75 * quantized_share(trained))  # convs stay float


def test_original_model_is_untouched_and_keeps_its_gradients(trained: nn.Module) -> None:
    trained.train()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    grads_on = [p.requires_grad for p in trained.parameters()]
    q = quantize_int8(trained)
    assert trained.training and not q.training
    after = trained.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in trained.parameters()] == grads_on
    assert all(isinstance(m, nn.Linear) for m in trained.modules() if "Linear" in type(m).__name__)
    # explanations need input gradients through the float model: still there
    trained.eval()
    batch = as_batch(trained, toy_cases(2, seed=3, p_missing=0.0))
    batch.ehr.requires_grad_(True)
    trained(batch).logit.sum().backward()
    assert batch.ehr.grad is not None and batch.ehr.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in q.parameters())


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        quantize_int8(build_model(tiny_config(), seed=0), engine="nope")

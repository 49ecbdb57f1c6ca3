"""Tiny configs and a toy dataset with a learnable signal in every modality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal.config import ModelConfig, TrainConfig
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from vocab.ehr_schema import CHEST_V1

TINY_INPUTS = InputConfig(ct_shape=(16, 32, 32), path_size=32)


def tiny_config(**kw: object) -> ModelConfig:
    base = dict(inputs=TINY_INPUTS, d_model=32, n_heads=2, n_blocks=2, ct_channels=(8, 16),
                n_experts=8, top_k=2, expert_hidden=16, ehr_hidden=16, router_noise_steps=50)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def toy_cases(n: int, seed: int, p_missing: float = 0.2,
              inputs: InputConfig = TINY_INPUTS) -> list[PreparedCase]:
    """Cases whose label shows (noisily) in every modality: a bright CT blob, a striped tile,
    a higher CEA. Each modality is absent with probability p_missing (never all three)."""
    rng = np.random.default_rng(seed)
    d, h, w = inputs.ct_shape
    s = inputs.path_size
    out = []
    for i in range(n):
        y = int(rng.random() < 0.5)
        ct = rng.normal(0, 0.3, (d, h, w)).astype(np.float32)
        ct[d // 4: d // 2, h // 4: h // 2, w // 4: w // 2] += 0.6 * y + rng.normal(0, 0.3)
        path = rng.normal(0, 0.3, (3, s, s)).astype(np.float32)
        path[:, ::4] += 1.0 * y + rng.normal(0, 0.3)  # stripes: a local texture, like nuclei
        ehr = np.array([f.center + rng.normal(0, f.scale) for f in CHEST_V1.fields], np.float32)
        ehr[4] = CHEST_V1.fields[4].center + CHEST_V1.fields[4].scale * (1.2 * y + rng.normal())
        ehr[rng.random(len(ehr)) < 0.1] = np.nan
        keep = rng.random(3) >= p_missing
        if not keep.any():
            keep[rng.integers(3)] = True
        out.append(PreparedCase(
            case_id=f"toy{seed}-{i}", ct=ct if keep[0] else None,
            path=path if keep[1] else None, ehr=ehr if keep[2] else None, label=y, site_id="toy",
        ))
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_train() -> TrainConfig:
    # no flips: the toy CT blob sits at a fixed place
    return TrainConfig(epochs=10, stage1_epochs=2, batch_size=16, lr=3e-3, seed=0, augment=False)

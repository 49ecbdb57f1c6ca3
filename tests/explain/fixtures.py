"""Tiny model + cases shared by the explain and ui tests (seconds per test on 2 cores)."""

from __future__ import annotations

import numpy as np

from multimodal.config import ModelConfig
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from multimodal.model import FedsightModel, build_model
from vocab.ehr_schema import CHEST_V1

TINY_INPUTS = InputConfig(ct_shape=(16, 32, 32), ct_spacing=(16.0, 10.0, 10.0), path_size=64)


def tiny_config(**kw: object) -> ModelConfig:
    # the conv path open (gate 1): the GradCAM-at-a-conv-stage tests need gradient through it
    base = dict(inputs=TINY_INPUTS, d_model=32, n_heads=2, n_blocks=2, ct_channels=(8, 16),
                n_experts=4, top_k=2, expert_hidden=16, ehr_hidden=16, ct_deep_gate_init=1.0)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, temperature: float = 1.3) -> FedsightModel:
    m = build_model(tiny_config(), seed=seed).eval()
    m.temperature = temperature
    return m


def make_case(modalities: tuple[str, ...], seed: int = 0, cid: str = "c1") -> PreparedCase:
    rng = np.random.default_rng(seed)
    d, h, w = TINY_INPUTS.ct_shape
    s = TINY_INPUTS.path_size
    case = PreparedCase(cid)
    if "ct" in modalities:
        case.ct = rng.uniform(-1, 1, (d, h, w)).astype(np.float32)
        aff = np.diag([*TINY_INPUTS.ct_spacing[::-1], 1.0])
        case.ct_affine = aff
    if "path" in modalities:
        case.path = rng.normal(0, 1, (3, s, s)).astype(np.float32)
    if "ehr" in modalities:
        ehr = np.array([f.center + f.scale * rng.normal() for f in CHEST_V1.fields], np.float32)
        ehr[1], ehr[3] = 1.0, 0.0  # binary fields
        ehr[6] = np.nan  # one missing field
        case.ehr = ehr
    return case

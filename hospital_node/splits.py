"""Deterministic train/test assignment of a case, the same on every run and every machine."""

from __future__ import annotations

import hashlib
from typing import Literal


def split_of(case_id: str, seed: int, test_fraction: float = 0.25) -> Literal["train", "test"]:
    """Hash (seed, case_id) to [0, 1); below test_fraction is "test"."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    digest = hashlib.sha256(f"{seed}\x00{case_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def calibration_fold(case_id: str, seed: int) -> int:
    """0 or 1: the fold of a held-out case for cross-fitted temperature scaling
    (multimodal.calibration), independent of split_of (another hash domain)."""
    digest = hashlib.sha256(f"calibration\x00{seed}\x00{case_id}".encode()).digest()
    return digest[0] & 1

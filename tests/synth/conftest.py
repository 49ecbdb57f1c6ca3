"""A small synthetic federation written once per test session (3 sites, the 3rd without
pathology), so the file-level tests share ~15 cases instead of regenerating them."""

from __future__ import annotations

from pathlib import Path

import pytest

from synth.config import SynthConfig
from synth.federation import generate

SMALL = SynthConfig.default(n_sites=3, seed=7, sizes=(6, 5, 4))


@pytest.fixture(scope="session")
def small_fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fed") / "federation"
    return out, generate(SMALL, out)

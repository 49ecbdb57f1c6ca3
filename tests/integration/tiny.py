"""What the integration tests share: a tiny network (seconds per round on two cores) and small
synthetic federations written with the generator that the demo uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Tiny network on the default input grid: the cache that `node start`'s site check fills is the
# one training reads (no second preprocessing pass inside the message processes).
TINY_MODEL: dict[str, Any] = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_experts": 4,
                              "top_k": 2, "expert_hidden": 16, "ct_channels": [8],
                              "ehr_hidden": 8}
# The same on a small input grid, for the simulation runtime (each virtual node preprocesses).
TINY_MODEL_SMALL_GRID: dict[str, Any] = {
    **TINY_MODEL, "inputs": {"ct_shape": [8, 16, 16], "ct_spacing": [32.0, 20.0, 20.0],
                             "path_size": 32, "ehr_schema": "chest-v1"}}


def small_federation(out: Path, n_sites: int, seed: int, cases: int = 6) -> Path:
    """`n_sites` synthetic hospitals of `cases` patients each under out/federation."""
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = out / "federation"
    generate(SynthConfig.default(n_sites=n_sites, seed=seed, sizes=(cases,) * n_sites), fed)
    return fed

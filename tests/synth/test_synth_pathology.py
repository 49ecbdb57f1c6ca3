"""Pathology tiles: atypia follows the score and concentrates in the recorded region."""

from __future__ import annotations

import numpy as np

from synth.config import SynthConfig
from synth.pathology import render_tile

SITE = SynthConfig.default(n_sites=1).sites[0]


def nuclear_fraction(tile: np.ndarray) -> float:
    """Share of haematoxylin-dominated pixels (blue over red, dark)."""
    t = tile.astype(float)
    return float(((t[..., 2] > t[..., 0] + 20) & (t.sum(-1) < 450)).mean())


def test_more_nuclei_with_higher_score() -> None:
    fr = {
        s: np.mean(
            [
                nuclear_fraction(render_tile(SITE, s, 256, np.random.default_rng(k))[0])
                for k in range(4)
            ]
        )
        for s in (-1.5, 0.0, 1.5)
    }
    assert fr[-1.5] < fr[0.0] < fr[1.5]
    assert fr[1.5] > 1.5 * fr[-1.5]


def test_atypia_concentrated_in_region() -> None:
    tile, (x0, y0, x1, y1) = render_tile(SITE, 2.0, 256, np.random.default_rng(3))
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    yy, xx = np.mgrid[:256, :256]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 0.8  # away from the soft edge
    t = tile.astype(float)
    nuc = (t[..., 2] > t[..., 0] + 20) & (t.sum(-1) < 450)
    assert nuc[inside].mean() > 1.3 * nuc[~inside].mean()


def test_sites_stain_differently() -> None:
    sites = SynthConfig.default(n_sites=3).sites
    means = [
        render_tile(s, 0.0, 256, np.random.default_rng(0))[0].reshape(-1, 3).mean(0) for s in sites
    ]
    assert np.abs(means[0] - means[1]).max() > 8
    assert np.abs(means[0] - means[2]).max() > 8

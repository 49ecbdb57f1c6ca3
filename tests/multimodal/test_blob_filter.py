"""The CT encoder's fixed nodule-enhancement channel: responds to a blob in lung, not elsewhere."""

from __future__ import annotations

import torch

from multimodal.encoders import BlobFilter


def _volume(background: float, shape: tuple[int, int, int] = (16, 32, 32)) -> torch.Tensor:
    return torch.full((1, 1, *shape), background)


def test_blob_in_lung_peaks_at_its_centre() -> None:
    x = _volume(-0.85)  # lung, HU / 1000
    x[0, 0, 7:10, 14:17, 20:23] = -0.1  # a 3-voxel solid nodule centred at (8, 15, 21)
    out = BlobFilter()(x)[0, 0]
    peak = torch.nonzero(out == out.max())[0].tolist()
    assert peak == [8, 15, 21]
    assert out.max() > 0.3  # ~ (local mean - context mean) of a 0.75 contrast blob
    assert out[0, 0, 0] == 0  # flat lung far from the blob: no response


def test_same_blob_in_soft_tissue_is_suppressed() -> None:
    lung, tissue = _volume(-0.85), _volume(0.04)
    for x in (lung, tissue):
        x[0, 0, 7:10, 14:17, 20:23] += 0.75
    assert BlobFilter()(tissue).max() < 0.01 * BlobFilter()(lung).max()


def test_small_grids_shrink_the_neighbourhood() -> None:
    x = torch.randn(2, 1, 8, 16, 16)  # smaller than the 9^3 context in depth
    assert BlobFilter()(x).shape == x.shape


def test_faint_nodule_outshines_the_lung_wall() -> None:
    """A faint ground-glass nodule (-0.3, 2 voxels wide) deep in lung must beat a small tissue
    bump on the chest wall (a vessel or rib head at the pleura); with the earlier gate (-0.5,
    sharpness 10) the wall won."""
    x = _volume(-0.85, (16, 40, 40))
    x[..., 30:] = 0.04  # chest wall: soft tissue from column 30 on
    x[0, 0, 7:9, 20:23, 27:30] = 0.04  # a 2x3x3 bump on the wall, into the lung
    x[0, 0, 7:9, 14:16, 10:12] = -0.3  # faint nodule far from the wall
    nodule = (slice(7, 9), slice(14, 16), slice(10, 12))
    new = BlobFilter()(x)[0, 0]
    assert new[nodule].max() == new.max()
    old = BlobFilter(lung_below=-0.5, sharpness=10.0)(x)[0, 0]
    assert old[nodule].max() < old.max()  # the regression this gate fixes

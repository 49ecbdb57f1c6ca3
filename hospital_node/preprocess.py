"""Put a CT series and a pathology tile on the model's input grid (multimodal.grid.InputConfig).

CT: the model grid is axis-aligned in patient LPS space (d -> +z superior, h -> +y posterior,
w -> +x left) at `inputs.ct_spacing`, `inputs.ct_shape` voxels, centred on the centre of the
scanned volume. One MONAI SpatialResample from the series affine (sheared when the gantry was
tilted, any orientation) to that grid places every voxel correctly; that single step also does
the centre crop/pad, with air (-1000 HU) outside the scan. Before it, block averaging by the
integer part of the zoom factor removes aliasing (0.5 mm pixels sampled every 5 mm would
otherwise be noise).

MONAI is imported inside ct_to_grid only: it is needed on a cache miss, and importing it costs
seconds in every fresh node process (Flower starts one per message).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hospital_node.dicom_series import CtSeries
from multimodal.data import HU_CLIP, PATH_MEAN, PATH_STD
from multimodal.grid import InputConfig
from vocab.errors import DataError

# Bump when the output of ct_to_grid/path_to_tensor changes for the same input (cache key).
PREPROCESS_VERSION = "2"  # 2: CT read path for export trees (problems and choice changed)


def grid_affine(centre_mm: np.ndarray, inputs: InputConfig) -> np.ndarray:
    """(4, 4) model-grid index (d, h, w) -> patient mm, axis-aligned, centred on centre_mm."""
    sd, sh, sw = inputs.ct_spacing
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = sd, sh, sw, 1.0
    half = (np.asarray(inputs.ct_shape, float) - 1) / 2
    aff[:3, 3] = centre_mm - aff[:3, :3] @ half
    return aff


def _block_mean(vol: torch.Tensor, affine: np.ndarray, target: tuple[float, float, float]
                ) -> tuple[torch.Tensor, np.ndarray]:
    """Average k-voxel blocks (k = floor(target / source spacing) per axis) and fix the affine."""
    src = np.linalg.norm(affine[:3, :3], axis=0)
    # Target mm along each source axis: the finest model spacing keeps it conservative.
    k = [max(1, int(min(target) // s)) for s in src]
    k = [min(kk, n) for kk, n in zip(k, vol.shape[-3:], strict=True)]
    if k == [1, 1, 1]:
        return vol, affine
    pooled = F.avg_pool3d(vol[None], kernel_size=k, stride=k)[0]
    scale = np.eye(4)
    scale[:3, :3] = np.diag(k)
    scale[:3, 3] = (np.asarray(k, float) - 1) / 2  # new voxel centre in old index units
    return pooled, affine @ scale


def ct_to_grid(series: CtSeries, inputs: InputConfig) -> tuple[np.ndarray, np.ndarray]:
    """HU volume -> ((D, H, W) float32 in [-1, 1] via HU_CLIP, (4, 4) grid affine to mm)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if series.hu is None or series.affine is None:
        raise DataError("ct_to_grid needs a usable CtSeries (hu and affine are None)")
    if not (np.isfinite(series.hu).all() and np.isfinite(series.affine).all()):
        raise DataError("CT volume or affine holds non-finite values; not passed to the model")
    lo, hi = HU_CLIP
    half = (hi - lo) / 2
    # Shift so air is 0: the resampler pads with zeros, which then means air.
    vol = (np.clip(series.hu, lo, hi) - lo) / half  # [0, 2]
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None]  # (1, Z, Y, X)
    t, src_aff = _block_mean(t, series.affine, inputs.ct_spacing)
    centre = series.affine @ np.append((np.asarray(series.hu.shape, float) - 1) / 2, 1.0)
    dst_aff = grid_affine(centre[:3], inputs)
    img = MetaTensor(t, affine=torch.as_tensor(src_aff, dtype=torch.float64))
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        img, dst_affine=torch.as_tensor(dst_aff, dtype=torch.float64),
        spatial_size=inputs.ct_shape,
    )
    grid = np.asarray(out.as_tensor()[0].numpy(), dtype=np.float32) - 1.0  # (D, H, W)
    # The model boundary: nothing non-finite goes in (clip would keep a NaN as NaN).
    if not np.isfinite(grid).all():
        raise DataError("CT grid holds non-finite values after resampling")
    return np.clip(grid, -1.0, 1.0), dst_aff


def path_to_tensor(img: np.ndarray, inputs: InputConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32: centre square crop, antialiased resize, norm."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DataError(f"pathology image must be HxWx3 uint8, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    sq = img[top:top + side, left:left + side]
    t = torch.tensor(sq).permute(2, 0, 1)[None].float() / 255.0
    s = inputs.path_size
    t = F.interpolate(t, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(PATH_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PATH_STD).view(1, 3, 1, 1)
    out = ((t.clamp(0, 1) - mean) / std)[0].numpy().astype(np.float32)
    if not np.isfinite(out).all():  # the model boundary: never a NaN into the encoder
        raise DataError("pathology tensor holds non-finite values")
    return out

"""ct_to_grid / path_to_tensor: a sphere lands where the affine says; HU and pixel scaling."""

from __future__ import annotations

import numpy as np
import pytest

from hospital_node.dicom_series import CtSeries
from hospital_node.preprocess import ct_to_grid, path_to_tensor
from multimodal.data import PATH_MEAN, PATH_STD
from multimodal.grid import InputConfig


def _series(centre_mm, affine, shape=(60, 128, 128), radius=12.0, inside=100.0) -> CtSeries:
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    mm = idx @ affine[:3, :3].T + affine[:3, 3]
    hu = np.where(np.linalg.norm(mm - centre_mm, axis=-1) < radius, inside, -1000.0)
    sp = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return CtSeries(hu.astype(np.float32), affine, sp)


def _centroid(grid: np.ndarray) -> np.ndarray:
    w = np.clip(grid + 1, 0, None)
    w[grid < -0.5] = 0
    return (np.argwhere(w > 0) * w[w > 0][:, None]).sum(0) / w.sum()


@pytest.mark.parametrize("shear", [0.0, 0.3])  # 0.3 ~ a 17 degree gantry tilt
def test_sphere_lands_at_affine_predicted_voxel(shear: float) -> None:
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, 2.5]
    aff[:3, 1] = [0, 1.6 * np.cos(np.arcsin(shear)), -1.6 * shear]
    aff[:3, 2] = [1.6, 0, 0]
    aff[:3, 3] = [-100, -110, -50]
    centre = np.array([20.0, -40.0, 30.0])
    inputs = InputConfig()
    grid, gaff = ct_to_grid(_series(centre, aff), inputs)
    assert grid.shape == inputs.ct_shape
    predicted = (np.linalg.inv(gaff) @ np.append(centre, 1))[:3]
    np.testing.assert_allclose(_centroid(grid), predicted, atol=0.5)  # within half a voxel
    assert np.linalg.norm(gaff[:3, :3], axis=0) == pytest.approx(
        [inputs.ct_spacing[0], inputs.ct_spacing[1], inputs.ct_spacing[2]])


def test_hu_scaling_and_air_padding() -> None:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])[[2, 1, 0, 3]]  # (z,y,x) -> (x,y,z), 2 mm
    hu = np.full((40, 40, 40), 500.0, np.float32)  # 80 mm cube, smaller than the grid
    grid, _ = ct_to_grid(CtSeries(hu, aff, (2.0, 2.0, 2.0)), InputConfig())
    assert grid[16, 32, 32] == pytest.approx(0.5)  # 500 HU / 1000
    assert grid[0, 0, 0] == pytest.approx(-1.0)   # outside the scan: air
    hot = CtSeries(np.full((40, 40, 40), 3000.0, np.float32), aff, (2.0, 2.0, 2.0))
    assert ct_to_grid(hot, InputConfig())[0].max() == pytest.approx(1.0)  # clipped


def test_path_to_tensor_shape_and_normalisation() -> None:
    img = np.zeros((300, 200, 3), np.uint8)
    img[..., 0] = 255
    out = path_to_tensor(img, InputConfig(path_size=64))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 10, 10], [(1 - PATH_MEAN[0]) / PATH_STD[0],
                                                 -PATH_MEAN[1] / PATH_STD[1],
                                                 -PATH_MEAN[2] / PATH_STD[2]], rtol=1e-5)

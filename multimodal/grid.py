"""The model's input grid: what preprocessing must produce. Sized for 2 CPU cores by default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputConfig:
    """Input grid shared by preprocessing (hospital node, UI) and the model.

    ct_shape/ct_spacing: (D, H, W) voxels and their (z, y, x) size in mm; the default covers
    256 x 320 x 320 mm, a whole adult chest, at a resolution where a 10 mm nodule is 2+ voxels.
    path_size: pathology tiles are resized to path_size x path_size RGB.
    """

    ct_shape: tuple[int, int, int] = (32, 64, 64)
    ct_spacing: tuple[float, float, float] = (8.0, 5.0, 5.0)
    path_size: int = 128
    ehr_schema: str = "chest-v1"

    def __post_init__(self) -> None:
        if len(self.ct_shape) != 3 or min(self.ct_shape) < 8:
            raise ValueError(f"ct_shape must be 3 sizes >= 8, got {self.ct_shape!r}")
        if len(self.ct_spacing) != 3 or min(self.ct_spacing) <= 0:
            raise ValueError(f"ct_spacing must be 3 positive mm values, got {self.ct_spacing!r}")
        if self.path_size < 32:
            raise ValueError(f"path_size must be >= 32, got {self.path_size!r}")

"""Explanation settings (frozen; parsed once where they enter, unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vocab.errors import ConfigError


@dataclass(frozen=True)
class ExplainConfig:
    """What to attribute and how.

    ct_layer / path_layer: dotted names (relative to the model) of the feature maps LayerGradCam
    looks at. The CT encoder's last map (`feature_layer`) is only 2x2x2 cells on the default grid,
    too coarse to point at a nodule, so the default is the first residual stage (8x8x8): still
    class-specific (gradients flow through every later layer) but sharp enough to localise.
    threshold: calibrated probability at or above which the decision is "malignant".
    uncertain_band: |p - threshold| below this is stated as "close to the threshold".
    """

    ct_layer: str = "encoders.ct.stages.0"
    path_layer: str = "encoders.path.feature_layer"
    threshold: float = 0.5
    uncertain_band: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if not 0.0 <= self.uncertain_band < 0.5:
            raise ConfigError(f"uncertain_band must be in [0, 0.5), got {self.uncertain_band!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExplainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ExplainConfig key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

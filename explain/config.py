"""Explanation settings (frozen; parsed once where they enter, unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from vocab.errors import ConfigError


@dataclass(frozen=True)
class ExplainConfig:
    """What to attribute and how.

    ct_layer / path_layer: dotted names (relative to the model) of the layers the maps are taken
    at; ct_method: "grad_x_act" (Captum LayerGradientXActivation) or "gradcam" (LayerGradCam).
    The CT default is gradient x activation at the encoder's fixed nodule channel
    (`encoders.ct.blob`, full resolution): it follows both of the CT encoder's paths (nodule
    evidence per cell, and the gated conv path), while GradCAM at a conv stage sees only the
    latter, which the default model keeps nearly closed (docs/benchmarks.md: GradCAM at
    `stages.0` pointed at 0/38 lesions even before the gate). A model built without the blob
    channel needs ct_layer="encoders.ct.stages.0", ct_method="gradcam".
    threshold: calibrated probability at or above which the decision is `positive`.
    uncertain_band: |p - threshold| below this is stated as "close to the threshold".
    """

    ct_layer: str = "encoders.ct.blob"
    ct_method: Literal["grad_x_act", "gradcam"] = "grad_x_act"
    path_layer: str = "encoders.path.feature_layer"
    threshold: float = 0.5
    uncertain_band: float = 0.15
    # What the served task's label 1 / 0 mean (vocab.tasks: Task.positive / Task.negative), as
    # the decision, the card and the answers word it.
    positive: str = "malignant"
    negative: str = "benign"
    condition: str = "malignancy"  # "probability of <condition>"

    def __post_init__(self) -> None:
        if self.ct_method not in ("gradcam", "grad_x_act"):
            raise ConfigError(f"ct_method must be gradcam or grad_x_act, got {self.ct_method!r}")
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

from __future__ import annotations

import numpy as np
import torch

from multimodal.calibration import fit_temperature
from multimodal.metrics import ece, threshold_metrics


def test_temperature_recovers_known_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, generator=g) * 2
    y = (torch.rand(4000, generator=g) < torch.sigmoid(z)).float()
    t = fit_temperature(z * 3.0, y)  # logits 3x overconfident
    assert abs(t - 3.0) < 0.3


def test_ece_and_threshold_metrics() -> None:
    y = np.array([1, 1, 0, 0])
    assert ece(y, np.array([1.0, 1.0, 0.0, 0.0])) == 0.0
    assert np.isclose(ece(y, np.array([0.9, 0.9, 0.1, 0.1])), 0.1)
    m = threshold_metrics(y, np.array([0.9, 0.4, 0.6, 0.1]), 0.5)
    assert m == {"accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5}

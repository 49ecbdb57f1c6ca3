from __future__ import annotations

import numpy as np
import torch

from explain.faithfulness import (
    lesion_mask,
    mass_inside,
    pointing_hit,
    randomisation_check,
    spearman,
)
from tests.explain.fixtures import make_case, tiny_model

torch.set_num_threads(1)


def test_lesion_mask_and_metrics_on_a_known_map():
    aff = np.diag([10.0, 10.0, 10.0, 1.0])  # voxel (d, h, w) -> mm (10d, 10h, 10w)
    mask = lesion_mask(aff, (8, 8, 8), [(30.0, 40.0, 50.0)], [5.0])
    assert mask.sum() == 1 and mask[3, 4, 5]
    grown = lesion_mask(aff, (8, 8, 8), [(30.0, 40.0, 50.0)], [5.0], grow_mm=6.0)
    assert grown.sum() == 7  # the voxel and its 6 face neighbours
    cam = np.zeros((8, 8, 8), np.float32)
    cam[3, 4, 5], cam[0, 0, 0] = 3.0, 1.0
    assert pointing_hit(cam, mask) and mass_inside(cam, mask) == 0.75
    cam[0, 0, 0] = 5.0
    assert not pointing_hit(cam, mask)


def test_spearman():
    a = np.arange(10.0)
    assert spearman(a, a * 2 + 1) == 1.0 and spearman(a, -a) == -1.0


def test_randomised_weights_change_the_maps():
    corr = randomisation_check(tiny_model(), [make_case(("ct", "ehr"), seed=s) for s in (1, 2)],
                               "encoders.ct.stages.0")
    assert all(abs(c) < 0.9 for c in corr), corr

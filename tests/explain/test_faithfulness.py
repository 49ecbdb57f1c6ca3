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


def test_grad_x_activation_map_equals_autograd_reference():
    import pytest

    from explain.attribution import ct_grad_x_activation
    from explain.explanation import case_batch
    from explain.faithfulness import ct_map

    model = tiny_model()
    case = make_case(("ct", "path", "ehr"), seed=3)
    b = case_batch(model, case)
    got = ct_grad_x_activation(model, b, "encoders.ct.blob")
    assert got.shape == case.ct.shape and got.dtype == np.float32
    # reference: d(calibrated logit)/d(blob channel) * blob channel, by plain autograd
    seen = {}
    hook = model.get_submodule("encoders.ct.blob").register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("blob", out))
    try:
        ct = b.ct.clone().requires_grad_(True)  # the fixed blob filter has no parameters
        logit = model.forward_tensors(ct, b.ct_present, b.path, b.path_present, b.ehr,
                                      b.ehr_observed, b.ehr_present).logit / model.temperature
        (grad,) = torch.autograd.grad(logit.sum(), seen["blob"])
    finally:
        hook.remove()
    ref = (grad * seen["blob"]).detach()[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
    assert np.abs(ref).max() > 0
    with pytest.raises(ValueError, match="'saliency'"):
        ct_map(model, case, "encoders.ct.blob", "saliency")

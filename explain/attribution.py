"""Captum attributions for one case: CT and pathology maps (LayerGradientXActivation /
LayerGradCam), EHR fields (FeatureAblation against the missing-field baseline).

Every function takes a one-case `Batch` and returns numbers in calibrated-logit units
(logit / temperature), the scale the displayed probability is computed on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import FeatureAblation, LayerGradCam, LayerGradientXActivation

from explain.tokens import (
    EncoderTokens,
    capture_tokens,
    image_tokens,
    repeat_batch,
    replay_encoders,
)
from multimodal.data import Batch
from multimodal.model import FedsightModel
from vocab.errors import ConfigError


def resolve_layer(model: FedsightModel, name: str) -> torch.nn.Module:
    """The submodule `name` (dotted, relative to the model); ConfigError naming it if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"model has no layer {name!r} to attribute to") from None


def _calibrated_logit(model: FedsightModel, b: Batch, **override: torch.Tensor) -> torch.Tensor:
    args = {"ct": b.ct, "ct_present": b.ct_present, "path": b.path,
            "path_present": b.path_present, "ehr": b.ehr, "ehr_observed": b.ehr_observed,
            "ehr_present": b.ehr_present}
    args.update(override)
    out = model.forward_tensors(**args)
    return out.logit / float(model.temperature)  # (B,)


def ct_gradcam(model: FedsightModel, batch: Batch, layer: str,
               tokens: EncoderTokens | None = None) -> np.ndarray:
    """Signed LayerGradCam of the calibrated logit at `layer`, trilinearly upsampled to the CT
    grid: (D, H, W) float32. Positive = evidence towards malignant. `tokens`: the case's
    encoder outputs so far; pathology is replayed from it when there, and the outputs this
    forward computes are added to it (for later replays)."""
    shape = tuple(batch.ct.shape[2:])
    tokens = {} if tokens is None else tokens
    with replay_encoders(model, tokens, ("path",)), capture_tokens(model, tokens):
        cam = LayerGradCam(lambda ct: _calibrated_logit(model, batch, ct=ct),
                           resolve_layer(model, layer))
        attr = cam.attribute(batch.ct.clone().requires_grad_(True))  # (1, 1, d, h, w)
    up = F.interpolate(attr.detach(), size=shape, mode="trilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)


def ct_grad_x_activation(model: FedsightModel, batch: Batch, layer: str) -> np.ndarray:
    """Captum LayerGradientXActivation of the calibrated logit at `layer`, summed over channels
    and trilinearly resized to the CT grid: (D, H, W) float32. At `encoders.ct.blob` (the fixed
    nodule channel, full resolution) it follows every path the model reads the CT through,
    including the per-cell blob shortcut that bypasses the conv stages GradCAM looks at."""
    shape = tuple(batch.ct.shape[2:])
    gxa = LayerGradientXActivation(lambda ct: _calibrated_logit(model, batch, ct=ct),
                                   resolve_layer(model, layer))
    attr = gxa.attribute(batch.ct.clone().requires_grad_(True)).sum(1, keepdim=True)
    up = F.interpolate(attr.detach(), size=shape, mode="trilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)


def path_gradcam(model: FedsightModel, batch: Batch, layer: str,
                 tokens: EncoderTokens | None = None) -> np.ndarray:
    """Signed LayerGradCam over the pathology tile, bilinearly upsampled: (S, S) float32."""
    size = tuple(batch.path.shape[2:])
    tokens = {} if tokens is None else tokens
    with replay_encoders(model, tokens, ("ct",)), capture_tokens(model, tokens):
        cam = LayerGradCam(lambda p: _calibrated_logit(model, batch, path=p),
                           resolve_layer(model, layer))
        attr = cam.attribute(batch.path.clone().requires_grad_(True))  # (1, 1, h, w)
    up = F.interpolate(attr.detach(), size=size, mode="bilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)


@torch.no_grad()
def ehr_ablation(model: FedsightModel, batch: Batch, tokens: EncoderTokens | None = None
                 ) -> np.ndarray:
    """(F,) per-field contribution: calibrated logit with the field as recorded minus with the
    field marked missing (the model's learned missing-field embedding). 0 for missing fields."""
    n_fields = batch.ehr.shape[1]
    observed = batch.ehr_observed  # (1, F)

    def forward(keep: torch.Tensor) -> torch.Tensor:  # keep: (B, F) 1 = as recorded, 0 = missing
        b = repeat_batch(batch, keep.shape[0])
        obs = b.ehr_observed & (keep > 0.5)
        return _calibrated_logit(model, b, ehr_observed=obs)

    tokens = image_tokens(model, batch) if tokens is None else tokens
    with replay_encoders(model, tokens, ("ct", "path")):
        attr = FeatureAblation(forward).attribute(
            torch.ones(1, n_fields), baselines=0.0, perturbations_per_eval=n_fields
        )  # (1, F)
    return (attr[0] * observed[0]).numpy().astype(np.float32)


def joint_gradcam(model: FedsightModel, batch: Batch, layers: dict[str, str],
                  tokens: EncoderTokens | None = None,
                  methods: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """CT and pathology maps at once: one forward and one backward give the layer gradients of
    both (Captum's LayerGradientXActivation without the multiplication), so the fusion blocks
    run once instead of twice. Per modality, `methods` picks "gradcam" (LayerGradCam, the
    default; equal to `ct_gradcam` / `path_gradcam`) or "grad_x_act" (gradient x activation
    summed over channels; equal to `ct_grad_x_activation`) -- both tested.

    layers: modality ("ct" / "path", present in the case) -> layer name. Returns modality ->
    signed map upsampled to its input ((D, H, W) or (S, S)).
    """
    methods = methods or {}
    bad = {m: v for m, v in methods.items() if v not in ("gradcam", "grad_x_act")}
    if bad:
        raise ConfigError(f"map method must be gradcam or grad_x_act, got {bad}")
    names = [m for m in ("ct", "path") if m in layers]
    if not names:
        return {}
    mods = [resolve_layer(model, layers[m]) for m in names]
    acts: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(
        lambda _m, _i, out, k=k: acts.__setitem__(k, out.detach())) for k, mod in zip(
            names, mods, strict=True)]
    tokens = {} if tokens is None else tokens
    inputs = {"ct": batch.ct, "path": batch.path}

    def forward(*x: torch.Tensor) -> torch.Tensor:
        return _calibrated_logit(model, batch, **dict(zip(names, x, strict=True)))

    try:
        with capture_tokens(model, tokens):
            grads = LayerGradientXActivation(forward, mods, multiply_by_inputs=False).attribute(
                tuple(inputs[m].clone().requires_grad_(True) for m in names))
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, np.ndarray] = {}
    for m, g in zip(names, grads, strict=True):
        a = acts[m]  # (1, C, *spatial)
        if methods.get(m, "gradcam") == "grad_x_act":
            cam = (g * a).sum(1, keepdim=True)  # (1, 1, *spatial)
        else:
            w = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)  # (1, C, 1, ...)
            cam = (w * a).sum(1, keepdim=True)  # (1, 1, *spatial)
        size = tuple(inputs[m].shape[2:])
        mode = "trilinear" if cam.dim() == 5 else "bilinear"
        up = F.interpolate(cam.detach(), size=size, mode=mode, align_corners=False)
        out[m] = up[0, 0].numpy().astype(np.float32)
    return out

"""Is the CT map faithful? Measured against known lesions (synthetic cases) and by the
weight-randomisation sanity check of Adebayo et al. (2018).

- mass inside: share of the positive attribution that falls inside the true lesion(s);
- pointing game: the map's maximum lies inside a lesion grown by `tolerance_mm` (the map is
  computed on a feature grid several voxels coarse, so a hit one feature cell away counts);
- randomisation: re-initialise the model's weights from the top down; a faithful map must change
  (low rank correlation with the original map).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from explain.attribution import ct_grad_x_activation, ct_gradcam
from explain.explanation import case_batch
from multimodal.data import PreparedCase
from multimodal.model import FedsightModel


def lesion_mask(affine: np.ndarray, shape: tuple[int, int, int],
                centres_mm: Sequence[Sequence[float]], radii_mm: Sequence[float],
                grow_mm: float = 0.0) -> np.ndarray:
    """(D, H, W) bool: grid voxels whose centre lies within radius + grow_mm of a lesion centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)  # (D,H,W,3)
    mm = idx.reshape(-1, 3) @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine)[:3, 3]
    mask = np.zeros(len(mm), bool)
    for c, r in zip(centres_mm, radii_mm, strict=True):
        mask |= np.linalg.norm(mm - np.asarray(c, float), axis=1) <= r + grow_mm
    return mask.reshape(shape)


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution mass inside `mask` (0 when the map has none)."""
    pos = np.clip(cam, 0, None)
    total = float(pos.sum())
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    return bool(mask.flat[int(np.argmax(cam))])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (flattened)."""
    ra = np.argsort(np.argsort(a.ravel())).astype(np.float64)
    rb = np.argsort(np.argsort(b.ravel())).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


@dataclass(frozen=True)
class CaseFaithfulness:
    case_id: str
    hit: bool  # map maximum inside a lesion grown by tolerance_mm
    hit_exact: bool  # map maximum inside a lesion
    mass_inside: float
    lesion_fraction: float  # share of the grid the lesion occupies (chance level of mass_inside)


def ct_faithfulness(model: FedsightModel, case: PreparedCase,
                    centres_mm: Sequence[Sequence[float]], radii_mm: Sequence[float],
                    layer: str, tolerance_mm: float,
                    method: str = "gradcam") -> CaseFaithfulness:
    """method: "gradcam" (LayerGradCam) or "grad_x_act" (LayerGradientXActivation, what the
    app shows at `encoders.ct.blob` by default)."""
    if case.ct is None or case.ct_affine is None:
        raise ValueError(f"case {case.case_id!r} has no CT (or no CT affine) to check")
    cam = ct_map(model, case, layer, method)
    exact = lesion_mask(case.ct_affine, cam.shape, centres_mm, radii_mm)
    grown = lesion_mask(case.ct_affine, cam.shape, centres_mm, radii_mm, tolerance_mm)
    return CaseFaithfulness(case.case_id, pointing_hit(cam, grown), pointing_hit(cam, exact),
                            mass_inside(cam, exact), float(exact.mean()))


def ct_map(model: FedsightModel, case: PreparedCase, layer: str, method: str) -> np.ndarray:
    if method == "gradcam":
        return ct_gradcam(model, case_batch(model, case), layer)
    if method == "grad_x_act":
        return ct_grad_x_activation(model, case_batch(model, case), layer)
    raise ValueError(f"CT map method must be gradcam or grad_x_act, got {method!r}")


def randomised_copy(model: FedsightModel, seed: int) -> FedsightModel:
    """A copy of the model (same config and temperature) with every weight re-initialised."""
    rnd = FedsightModel(model.cfg).eval()  # a fresh copy (deepcopy trips on cached graphs)
    rnd.load_state_dict(model.state_dict())
    rnd.temperature = model.temperature
    torch.manual_seed(seed)
    for m in rnd.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():  # bare nn.Parameters (missing tokens, embeddings, router weights)
        for name, p in rnd.named_parameters():
            if _is_bare(rnd, name):
                p.normal_(0, 0.02)
    return rnd


def _is_bare(model: torch.nn.Module, name: str) -> bool:
    """A parameter owned directly by a module without reset_parameters."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return not hasattr(owner, "reset_parameters")


def randomisation_check(model: FedsightModel, cases: Sequence[PreparedCase], layer: str,
                        seed: int = 0, method: str = "gradcam") -> list[float]:
    """Spearman correlation between each case's CT map from `model` and from a fully
    re-initialised copy (near 0 = the map depends on what the model learned)."""
    rnd = randomised_copy(model, seed)
    return [spearman(ct_map(model, c, layer, method), ct_map(rnd, c, layer, method))
            for c in cases]


@dataclass(frozen=True)
class LesionCase:
    """A case with known lesion(s): centres in patient mm (LPS) and radii in mm."""

    case: PreparedCase
    centres_mm: tuple[tuple[float, float, float], ...]
    radii_mm: tuple[float, ...]


def pointing_game(model: FedsightModel, cases: Sequence[LesionCase], layer: str,
                  tolerance_mm: float, method: str = "gradcam") -> dict[str, float]:
    """Mean over cases: pointing-game hit rate (exact and within tolerance_mm), share of
    positive attribution inside the lesion, and that share by chance (the lesion's volume)."""
    res = [ct_faithfulness(model, c.case, c.centres_mm, c.radii_mm, layer, tolerance_mm, method)
           for c in cases]
    if not res:
        return {"n": 0}
    return {"n": len(res), "pointing_exact": float(np.mean([r.hit_exact for r in res])),
            "pointing_tol": float(np.mean([r.hit for r in res])),
            "mass_inside": float(np.mean([r.mass_inside for r in res])),
            "lesion_fraction": float(np.mean([r.lesion_fraction for r in res]))}

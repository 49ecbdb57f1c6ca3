"""Is a case inside what the lung-nodule model was built for? Refuse before diagnosing if not.

A model answers every input with a probability; a head CT or a photograph gets one too. Each
check here measures one thing about the prepared case and compares it with a stated bound:

- CT header: a DICOM header naming a non-chest region (head, abdomen, ...) refuses; an absent or
  uninformative header decides nothing (the words were reduced to a fixed region word at read
  time: hospital_node.dicom_header.body_region, so no header text reaches this module).
- CT anatomy, trusting no header: a chest CT's field of view holds two large air-filled lungs
  inside the body (adult lungs are 4-6 L at inspiration, 30-45 % of a 256 mm thoracic slab); a
  head CT holds only sinus and mastoid air (tens of mL). Lung = voxels of -950..-500 HU (aerated
  parenchyma; partial volume on the coarse model grid keeps it above pure air) inside the body
  outline (tissue > -500 HU, holes filled slice by slice, so air around the patient is not lung).
- Pathology: stained tissue covers the tile, and its colour lies in the haematoxylin-eosin cone
  (Ruifrok-Johnston optical-density vectors, tolerance for lab-to-lab stain variation) with the
  saturation of a dye (a grey scan or blank glass has none).
- EHR: inside the schema's possible ranges and inside what this hospital's own cases cover
  (observed min..max widened by a margin) -- the model has not seen patients outside it.
- Learned OOD score: Mahalanobis distance of the fused features the diagnosis head reads, to a
  Gaussian fitted on this hospital's training-split cases (Ledoit-Wolf shrinkage: fewer cases than
  features); thresholds are quantiles of the held-out split's scores (above p99: out of scope,
  above p95: borderline).

Outcome: "in_scope", "borderline" (probability shown with a warning) or "out_of_scope" (no
probability; the reason names the check and the measured value against its bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from hospital_node.splits import split_of
from multimodal.data import HU_CLIP, PATH_MEAN, PATH_STD, PreparedCase, collate
from multimodal.model import FedsightModel
from vocab.ehr_schema import EhrSchema
from vocab.errors import ConfigError

Status = Literal["ok", "borderline", "out"]
Outcome = Literal["in_scope", "borderline", "out_of_scope"]
CHEST_REGIONS = ("chest",)  # header words that allow the case; "" (none named) decides nothing

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin (unit length).
_H = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])


@dataclass(frozen=True)
class ScopeConfig:
    """Bounds of every check (see the module docstring for why each value)."""

    # CT: lung = aerated parenchyma (HU) inside the body outline (tissue above body_hu).
    lung_hu: tuple[float, float] = (-950.0, -500.0)
    body_hu: float = -500.0
    # A chest field of view: lungs are ~30-45 % of the body volume; 5 % still admits an
    # expiration scan or a lung with large consolidation, while a head holds < 1 % air.
    min_lung_fraction: float = 0.05
    # 300 mL: a tenth of the smallest adult lung pair; sinuses and mastoids hold tens of mL.
    min_lung_ml: float = 300.0
    # Each side of the midline should hold this share of the lung volume; less is a warning
    # (a pneumonectomy is still a chest), not a refusal.
    min_side_share: float = 0.15
    # Pathology: tissue = mean optical density >= this (Macenko's transparency bound 0.15).
    tissue_od: float = 0.15
    min_tissue_fraction: float = 0.10
    # A tissue pixel counts as H&E-stained if its OD direction lies within this angle of the
    # H-E cone and its HSV saturation is at least min_saturation (dyes are coloured).
    max_cone_angle_deg: float = 25.0
    min_saturation: float = 0.08
    min_stained_fraction: float = 0.5
    # EHR: this hospital's observed range widened by margin x (max - min), on fields with at
    # least min_site_values observed values (fewer: schema ranges only).
    ehr_margin: float = 0.25
    min_site_values: int = 20
    # OOD: split seed of the site's train/held-out assignment (hospital_node.splits), quantiles
    # of held-out scores, and the fewest cases that make a fit meaningful.
    split_seed: int = 0
    borderline_quantile: float = 0.95
    out_quantile: float = 0.99
    min_train_cases: int = 10
    min_heldout_cases: int = 5
    batch_size: int = 16

    def __post_init__(self) -> None:
        checks = [
            ("lung_hu", -1000.0 <= self.lung_hu[0] < self.lung_hu[1] <= 0.0),
            ("min_lung_fraction", 0.0 <= self.min_lung_fraction < 1.0),
            ("min_lung_ml", self.min_lung_ml >= 0.0),
            ("min_side_share", 0.0 <= self.min_side_share <= 0.5),
            ("tissue_od", self.tissue_od > 0.0),
            ("min_tissue_fraction", 0.0 <= self.min_tissue_fraction <= 1.0),
            ("max_cone_angle_deg", 0.0 < self.max_cone_angle_deg < 90.0),
            ("min_saturation", 0.0 <= self.min_saturation < 1.0),
            ("min_stained_fraction", 0.0 <= self.min_stained_fraction <= 1.0),
            ("ehr_margin", self.ehr_margin >= 0.0),
            ("min_site_values", self.min_site_values >= 2),
            ("borderline_quantile", 0.0 < self.borderline_quantile < self.out_quantile),
            ("out_quantile", self.out_quantile < 1.0),
            ("min_train_cases", self.min_train_cases >= 2),
            ("min_heldout_cases", self.min_heldout_cases >= 1),
            ("batch_size", self.batch_size >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"ScopeConfig.{name} = {getattr(self, name)!r} is out of range")


@dataclass(frozen=True)
class Finding:
    """One check's result: status, the measured value and its bound, and the words to show."""

    check: str  # "ct_header", "ct_anatomy", "pathology", "ehr", "ood"
    status: Status
    message: str
    value: float | None = None
    bound: float | None = None


@dataclass(frozen=True)
class ScopeVerdict:
    findings: tuple[Finding, ...]
    ood_score: float | None = None
    ood_p95: float | None = None
    ood_p99: float | None = None

    @property
    def outcome(self) -> Outcome:
        status = {f.status for f in self.findings}
        return ("out_of_scope" if "out" in status else
                "borderline" if "borderline" in status else "in_scope")

    @property
    def refused(self) -> bool:
        return self.outcome == "out_of_scope"

    @property
    def reason(self) -> str:
        """Why the case is out of scope ("" when it is not)."""
        return " ".join(f.message for f in self.findings if f.status == "out")

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(f.message for f in self.findings if f.status == "borderline")

    @property
    def failed_checks(self) -> tuple[str, ...]:
        return tuple(sorted({f.check for f in self.findings if f.status != "ok"}))


def _out(check: str, message: str, value: float | None = None, bound: float | None = None
         ) -> Finding:
    return Finding(check, "out", message, value, bound)


# ---- CT ----
def check_ct_header(region: str) -> Finding | None:
    """A header naming a region other than the chest refuses; none named decides nothing."""
    if not region:
        return None
    if region in CHEST_REGIONS:
        return Finding("ct_header", "ok", "the CT header names the chest")
    return _out("ct_header", f"the CT's DICOM header describes a {region} examination, not a "
                "chest CT; this model reads chest CTs for lung nodules only.")


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    return np.stack([binary_fill_holes(s) for s in mask]) if mask.size else mask


def lung_measures(ct: np.ndarray, voxel_ml: float, cfg: ScopeConfig
                  ) -> tuple[float, float, float]:
    """(lung fraction of the body volume, lung volume mL, smaller side's share of the lung)
    of a (D, H, W) grid in [-1, 1] (HU_CLIP scaling; w runs to the patient's left)."""
    lo, hi = HU_CLIP
    hu = lo + (np.clip(ct, -1.0, 1.0) + 1.0) * (hi - lo) / 2
    body = _fill_holes_2d(hu > cfg.body_hu)
    lung = body & (hu >= cfg.lung_hu[0]) & (hu <= cfg.lung_hu[1])
    n_body, n_lung = int(body.sum()), int(lung.sum())
    if n_body == 0 or n_lung == 0:
        return 0.0, 0.0, 0.0
    w = np.arange(ct.shape[2])
    midline = float((body.sum((0, 1)) * w).sum() / n_body)  # body centroid across w
    per_w = lung.sum((0, 1))
    left = float(per_w[w > midline].sum()) / n_lung
    return n_lung / n_body, n_lung * voxel_ml, min(left, 1.0 - left)


def check_ct_anatomy(ct: object, voxel_ml: float, cfg: ScopeConfig) -> Finding:
    """Lungs inside the body: enough of them, on both sides. Never raises."""
    try:
        arr = np.asarray(ct, dtype=np.float32)
    except (TypeError, ValueError):
        return _out("ct_anatomy", "the CT volume is not numeric; it cannot be checked.")
    if arr.ndim != 3 or min(arr.shape) < 1:
        return _out("ct_anatomy", f"the CT volume has shape {arr.shape}, not a 3-D volume.")
    if not np.isfinite(arr).all():
        return _out("ct_anatomy", "the CT volume holds non-finite values.")
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        return _out("ct_anatomy", "the CT grid's voxel size is unknown.")
    frac, ml, side = lung_measures(arr, voxel_ml, cfg)
    if frac < cfg.min_lung_fraction or ml < cfg.min_lung_ml:
        return _out("ct_anatomy", f"the CT shows almost no air-filled lung inside the body "
                    f"(lung {100 * frac:.1f}% of the body volume, {ml:.0f} mL; a chest CT "
                    f"needs at least {100 * cfg.min_lung_fraction:.0f}% and "
                    f"{cfg.min_lung_ml:.0f} mL). This is not a chest CT the model can read.",
                    frac, cfg.min_lung_fraction)
    if side < cfg.min_side_share:
        return Finding("ct_anatomy", "borderline", f"lung air lies mostly on one side "
                       f"(smaller side {100 * side:.0f}% of the lung volume, expected at least "
                       f"{100 * cfg.min_side_share:.0f}%): check that the whole chest was "
                       "scanned.", side, cfg.min_side_share)
    return Finding("ct_anatomy", "ok", f"lung {100 * frac:.0f}% of the body volume", frac,
                   cfg.min_lung_fraction)


# ---- pathology ----
def _cone_angle_deg(u: np.ndarray) -> np.ndarray:
    """Angle (deg) between unit OD directions (N, 3) and the cone {a H + b E : a, b >= 0}."""
    basis = np.stack([_H, _E], 1)  # (3, 2)
    coef = u @ np.linalg.pinv(basis).T  # (N, 2) least-squares coefficients on the H-E plane
    proj = coef @ basis.T
    inside = (coef >= 0).all(1)
    cos_plane = np.linalg.norm(proj, axis=1)
    cos_edge = np.maximum(u @ _H, u @ _E)
    cos = np.where(inside, cos_plane, cos_edge)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def stain_measures(path: np.ndarray, cfg: ScopeConfig) -> tuple[float, float]:
    """(tissue fraction of the tile, H&E-stained fraction of the tissue) of a (3, S, S) tile
    normalised with PATH_MEAN/PATH_STD."""
    mean = np.asarray(PATH_MEAN, np.float64).reshape(3, 1, 1)
    std = np.asarray(PATH_STD, np.float64).reshape(3, 1, 1)
    rgb = np.clip(path.astype(np.float64) * std + mean, 0.0, 1.0).reshape(3, -1).T  # (N, 3)
    od = -np.log(np.maximum(rgb, 1.0 / 255.0))  # Beer-Lambert optical density, per channel
    tissue = od.mean(1) >= cfg.tissue_od
    n_tissue = int(tissue.sum())
    if n_tissue == 0:
        return 0.0, 0.0
    t_od, t_rgb = od[tissue], rgb[tissue]
    u = t_od / np.linalg.norm(t_od, axis=1, keepdims=True)
    mx = t_rgb.max(1)
    sat = np.where(mx > 0, (mx - t_rgb.min(1)) / np.maximum(mx, 1e-12), 0.0)
    stained = (_cone_angle_deg(u) <= cfg.max_cone_angle_deg) & (sat >= cfg.min_saturation)
    return n_tissue / tissue.size, float(stained.mean())


def check_pathology(path: object, cfg: ScopeConfig) -> Finding:
    """Stained tissue covers the tile in H&E colours. Never raises."""
    try:
        arr = np.asarray(path, dtype=np.float32)
    except (TypeError, ValueError):
        return _out("pathology", "the pathology image is not numeric; it cannot be checked.")
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.size == 0:
        return _out("pathology", f"the pathology image has shape {arr.shape}, not (3, S, S).")
    if not np.isfinite(arr).all():
        return _out("pathology", "the pathology image holds non-finite values.")
    tissue, stained = stain_measures(arr, cfg)
    if tissue < cfg.min_tissue_fraction:
        return _out("pathology", f"the pathology image shows almost no tissue (tissue "
                    f"{100 * tissue:.0f}% of the image, at least "
                    f"{100 * cfg.min_tissue_fraction:.0f}% needed); upload a tile from within "
                    "the specimen.", tissue, cfg.min_tissue_fraction)
    if stained < cfg.min_stained_fraction:
        return _out("pathology", f"the pathology image does not look H&E-stained (H&E colours "
                    f"in {100 * stained:.0f}% of the tissue, at least "
                    f"{100 * cfg.min_stained_fraction:.0f}% needed); the model reads H&E "
                    "slides only.", stained, cfg.min_stained_fraction)
    return Finding("pathology", "ok", f"H&E tissue {100 * tissue:.0f}% of the tile", stained,
                   cfg.min_stained_fraction)


# ---- EHR ----
@dataclass(frozen=True)
class EhrRanges:
    """Per field: the bounds the model accepts (schema range, narrowed to the site's range
    with margin where the site has enough values). NaN bound = no site bound."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    @classmethod
    def fit(cls, schema: EhrSchema, rows: Sequence[np.ndarray], cfg: ScopeConfig
            ) -> EhrRanges:
        lo, hi = [], []
        data = np.stack(rows) if rows else np.zeros((0, len(schema.fields)))
        for i, spec in enumerate(schema.fields):
            col = data[:, i] if data.size else np.zeros(0)
            col = col[np.isfinite(col)]
            if spec.levels or col.size < cfg.min_site_values:
                lo.append(math.nan)
                hi.append(math.nan)
                continue
            span = float(col.max() - col.min())
            lo.append(max(spec.lo, float(col.min()) - cfg.ehr_margin * span))
            hi.append(min(spec.hi, float(col.max()) + cfg.ehr_margin * span))
        return cls(tuple(lo), tuple(hi))


def check_ehr(ehr: object, schema: EhrSchema, ranges: EhrRanges | None) -> Finding:
    """Every recorded value inside the schema range and the site's covered range."""
    try:
        arr = np.asarray(ehr, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return _out("ehr", "the EHR values are not numeric.")
    if arr.shape != (len(schema.fields),):
        return _out("ehr", f"the EHR row has {arr.size} values; the schema has "
                    f"{len(schema.fields)} fields.")
    problems: list[Finding] = []
    for i, spec in enumerate(schema.fields):
        v = float(arr[i])
        if math.isnan(v):
            continue
        if not math.isfinite(v) or not spec.lo <= v <= spec.hi or (
                spec.levels and v not in spec.levels):
            problems.append(_out("ehr", f"EHR {spec.name} = {v:g} {spec.unit} is outside the "
                                 f"possible range {spec.lo:g}-{spec.hi:g} {spec.unit}.", v,
                                 spec.hi if v > spec.hi else spec.lo))
            continue
        if ranges is None or math.isnan(ranges.lo[i]):
            continue
        lo, hi = ranges.lo[i], ranges.hi[i]
        if not lo <= v <= hi:
            problems.append(_out("ehr", f"EHR {spec.name} = {v:g} {spec.unit} is outside what "
                                 f"this hospital's cases cover ({lo:.3g}-{hi:.3g} {spec.unit}, "
                                 "with margin); the model has not seen such patients.", v,
                                 hi if v > hi else lo))
    if problems:
        return _out("ehr", " ".join(p.message for p in problems), problems[0].value,
                    problems[0].bound)
    return Finding("ehr", "ok", "EHR inside the covered ranges")


# ---- learned OOD score ----
def _readout_module(model: FedsightModel) -> torch.nn.Module:
    """The layer whose input is the fused representation the diagnosis is read from."""
    head = getattr(model, "head", None)
    return head if isinstance(head, torch.nn.Module) else model.late_mlp


@torch.no_grad()
def fused_features(model: FedsightModel, cases: Sequence[PreparedCase], batch_size: int = 16
                   ) -> np.ndarray:
    """(N, P) the head's input for each case, captured by a forward pre-hook (the model's
    outputs are not changed). The model must be in eval mode."""
    inputs = model.cfg.inputs
    got: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].detach().float().cpu())

    handle = _readout_module(model).register_forward_pre_hook(hook)
    try:
        for i in range(0, len(cases), batch_size):
            chunk = list(cases[i:i + batch_size])
            model(collate(chunk, model.schema, inputs.ct_shape, inputs.path_size))
    finally:
        handle.remove()
    return torch.cat(got).numpy().astype(np.float64) if got else np.zeros((0, 0))


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf (2004) shrinkage covariance of rows x (N, P), towards mu*I."""
    n, p = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / p
    d2 = float(((s - mu * np.eye(p)) ** 2).sum())
    # sum_k ||x_k x_k' - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2 (since sum_k x_k x_k' = n S)
    b2 = (float((xc**2).sum(1) @ (xc**2).sum(1)) - n * float((s**2).sum())) / n**2
    delta = min(b2, d2) / d2 if d2 > 0 else 1.0
    return (1 - delta) * s + delta * mu * np.eye(p)


@dataclass(frozen=True)
class OodModel:
    """A Gaussian of this site's fused features and its held-out score quantiles."""

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    p95: float
    p99: float
    n_train: int
    n_heldout: int

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(N,) Mahalanobis distance of (N, P) features."""
        z = (feats - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("np,pq,nq->n", z, self.precision, z), 0.0))

    @classmethod
    def fit(cls, train: np.ndarray, heldout: np.ndarray, cfg: ScopeConfig) -> OodModel:
        mean = train.mean(0)
        sd = train.std(0)
        # Per-feature standardising first; a floor keeps a feature that never varies at this
        # site (a missing-modality token) from turning rounding noise into distance.
        scale = sd + 1e-3 * float(sd.mean() or 1.0)
        cov = ledoit_wolf((train - mean) / scale)
        precision = np.linalg.pinv(cov, hermitian=True)
        probe = cls(mean, scale, precision, 0.0, 0.0, len(train), len(heldout))
        s = probe.score(heldout)
        return cls(mean, scale, precision, float(np.quantile(s, cfg.borderline_quantile)),
                   float(np.quantile(s, cfg.out_quantile)), len(train), len(heldout))


def check_ood(score: float, ood: OodModel) -> Finding:
    if not math.isfinite(score) or score > ood.p99:
        return _out("ood", f"the case is unlike this hospital's cases (out-of-distribution "
                    f"score {score:.2f}, above the hospital's p99 {ood.p99:.2f}); the model's "
                    "probability would not be reliable.", score, ood.p99)
    if score > ood.p95:
        return Finding("ood", "borderline", f"the case is unusual for this hospital "
                       f"(out-of-distribution score {score:.2f}, above the p95 "
                       f"{ood.p95:.2f}); read the probability with caution.", score, ood.p95)
    return Finding("ood", "ok", "typical for this hospital", score, ood.p95)


# ---- the site's scope ----
@dataclass
class SiteScope:
    """Everything fitted at the serving hospital: EHR ranges and the OOD Gaussian."""

    model: FedsightModel
    cfg: ScopeConfig
    ehr_ranges: EhrRanges | None
    ood: OodModel | None
    notes: list[str] = field(default_factory=list)  # why a part was not fitted

    @classmethod
    def fit(cls, model: FedsightModel, cases: Sequence[PreparedCase],
            cfg: ScopeConfig = ScopeConfig()) -> SiteScope:
        """One batched forward over the site's cases (train split: Gaussian, held-out split:
        thresholds). Too few cases: that part is not fitted, and the note says so."""
        notes: list[str] = []
        rows = [c.ehr for c in cases if c.ehr is not None]
        ranges = EhrRanges.fit(model.schema, rows, cfg)
        train = [c for c in cases if split_of(c.case_id, cfg.split_seed) == "train"]
        held = [c for c in cases if split_of(c.case_id, cfg.split_seed) == "test"]
        ood = None
        if len(train) < cfg.min_train_cases or len(held) < cfg.min_heldout_cases:
            notes.append(f"out-of-distribution score not fitted: {len(train)} training and "
                         f"{len(held)} held-out cases at this hospital (needs "
                         f"{cfg.min_train_cases} and {cfg.min_heldout_cases})")
        else:
            feats = fused_features(model, [*train, *held], cfg.batch_size)
            ood = OodModel.fit(feats[:len(train)], feats[len(train):], cfg)
        return cls(model, cfg, ranges, ood, notes)

    def ood_score(self, case: PreparedCase) -> float | None:
        if self.ood is None:
            return None
        return float(self.ood.score(fused_features(self.model, [case], 1))[0])

    def check(self, case: PreparedCase) -> ScopeVerdict:
        """Every applicable check; the OOD score only when the input checks passed (a head CT
        needs no distance to be refused)."""
        cfg, findings = self.cfg, []
        if case.ct is not None:
            head = check_ct_header(case.ct_region)
            if head is not None:
                findings.append(head)
            findings.append(check_ct_anatomy(case.ct, _voxel_ml(case, self.model), cfg))
        if case.path is not None:
            findings.append(check_pathology(case.path, cfg))
        if case.ehr is not None:
            findings.append(check_ehr(case.ehr, self.model.schema, self.ehr_ranges))
        if any(f.status == "out" for f in findings) or self.ood is None:
            return ScopeVerdict(tuple(findings))
        score = self.ood_score(case)
        assert score is not None
        findings.append(check_ood(score, self.ood))
        return ScopeVerdict(tuple(findings), score, self.ood.p95, self.ood.p99)


def _voxel_ml(case: PreparedCase, model: FedsightModel) -> float:
    """Voxel volume in mL from the grid affine, else from the model grid's spacing."""
    if case.ct_affine is not None:
        try:
            v = abs(float(np.linalg.det(np.asarray(case.ct_affine, float)[:3, :3])))
            if math.isfinite(v) and v > 0:
                return v / 1000.0
        except (ValueError, np.linalg.LinAlgError):
            pass
    return float(np.prod(model.cfg.inputs.ct_spacing)) / 1000.0


def card_lines(v: ScopeVerdict) -> list[str]:
    """Markdown lines the diagnosis card adds for a borderline case ([] otherwise)."""
    if v.outcome != "borderline":
        return []
    lines = [f"**Warning:** {w}" for w in v.warnings]
    if v.ood_score is not None and v.ood_p95 is not None:
        lines.append(f"Out-of-distribution score: {v.ood_score:.2f} (this hospital's p95 "
                     f"{v.ood_p95:.2f})")
    return lines


def refusal_markdown(v: ScopeVerdict) -> str:
    """The card of a refused case: no probability, the reason and what to do."""
    return "\n".join([
        "### Not diagnosed — outside what this model was built for",
        "",
        f"Not diagnosed: {v.reason}",
        "",
        "No probability is shown: the model would give one for any input, and for this case "
        "it would not mean anything.",
    ])


__all__ = ["ScopeConfig", "ScopeVerdict", "Finding", "SiteScope", "EhrRanges", "OodModel",
           "check_ct_header", "check_ct_anatomy", "check_pathology", "check_ehr", "check_ood",
           "fused_features", "ledoit_wolf", "card_lines", "refusal_markdown"]

"""The explanation of one diagnosis: every number the UI shows or an answer quotes lives here.

`explain_case(model, case, cfg)` runs the model once per attribution method (no hidden state) and
returns an `Explanation`; `timings_ms` records what each step cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explain.attribution import joint_gradcam
from explain.config import ExplainConfig
from explain.modality import (
    ExpertUse,
    SubsetValue,
    present_modalities,
    shapley,
    subset_values,
)
from explain.tokens import EncoderTokens, image_tokens
from multimodal.data import Batch, PreparedCase, collate
from multimodal.model import FedsightModel
from vocab.modalities import MODALITIES


@dataclass(frozen=True)
class FieldContribution:
    """One EHR field: its recorded value (None = missing) and its contribution (logit units)."""

    name: str
    unit: str
    value: float | None
    contribution: float


@dataclass(frozen=True)
class CtLocation:
    """Where the CT map peaks: grid voxel (d, h, w), patient mm (LPS x, y, z) if the affine is
    known, and the share of the positive attribution mass on the peak slice."""

    voxel: tuple[int, int, int]
    mm: tuple[float, float, float] | None
    slice_share: float


@dataclass(frozen=True)
class Explanation:
    model_version: str
    probability: float  # calibrated P(malignant)
    logit: float  # calibrated logit (raw logit / temperature)
    temperature: float
    threshold: float
    uncertain_band: float
    present: tuple[str, ...]  # modalities the case has (and the model knows)
    missing: tuple[str, ...]
    ct_map: np.ndarray | None  # (D, H, W) signed LayerGradCam, + = towards malignant
    ct_location: CtLocation | None
    ct_top_slice: int | None  # the slice the viewer opens on
    path_map: np.ndarray | None  # (S, S) signed LayerGradCam
    ehr: tuple[FieldContribution, ...]  # every schema field when the case has EHR, else ()
    subsets: tuple[SubsetValue, ...]  # v(S) for every subset of `present`
    modality_contrib: dict[str, float]  # exact Shapley values, sum = v(present) - v(none)
    experts: tuple[ExpertUse, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)
    positive: str = "malignant"  # the served task's words for label 1 / 0 (ExplainConfig)
    negative: str = "benign"
    condition: str = "malignancy"  # what `probability` is a probability of

    @property
    def is_positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def decision(self) -> str:
        return self.positive if self.is_positive else self.negative

    def decision_at(self, probability: float) -> str:
        """The decision this explanation's threshold gives another probability."""
        return self.positive if probability >= self.threshold else self.negative

    @property
    def near_threshold(self) -> bool:
        return abs(self.probability - self.threshold) < self.uncertain_band

    def subset(self, modalities: tuple[str, ...] | set[str]) -> SubsetValue:
        want = set(modalities)
        for s in self.subsets:
            if set(s.modalities) == want:
                return s
        raise KeyError(f"no subset value for {sorted(want)}; present: {self.present}")

    @property
    def baseline(self) -> SubsetValue:
        """All modalities replaced by missing tokens: the model's prior."""
        return self.subset(())


def case_batch(model: FedsightModel, case: PreparedCase) -> Batch:
    inp = model.cfg.inputs
    return collate([case], model.schema, inp.ct_shape, inp.path_size)


def _ct_location(cam: np.ndarray, affine: np.ndarray | None) -> tuple[CtLocation, int]:
    pos = np.clip(cam, 0, None)
    per_slice = pos.sum(axis=(1, 2))  # (D,)
    total = float(per_slice.sum())
    src = pos if total > 0 else np.abs(cam)
    voxel = tuple(int(i) for i in np.unravel_index(int(np.argmax(src)), cam.shape))
    top = int(np.argmax(per_slice)) if total > 0 else voxel[0]
    share = float(per_slice[top] / total) if total > 0 else 0.0
    mm = None
    if affine is not None:
        p = np.asarray(affine, float) @ np.array([*voxel, 1.0])
        mm = (float(p[0]), float(p[1]), float(p[2]))
    return CtLocation(voxel, mm, share), top  # type: ignore[arg-type]


def explain_case(model: FedsightModel, case: PreparedCase, cfg: ExplainConfig,
                 model_version: str = "unversioned") -> Explanation:
    """Diagnose `case` and explain it (the model must be in eval mode)."""
    if model.training:
        raise ValueError("explain_case needs model.eval(): training mode adds router noise")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    batch = case_batch(model, case)
    present = present_modalities(model, batch)
    t["collate"] = (time.perf_counter() - t0) * 1e3

    # Gradient passes first: they compute the CT / pathology encoder outputs once, and every
    # later pass replays them.
    tokens: EncoderTokens = {}
    loc, top = None, None
    t0 = time.perf_counter()
    layers = {m: name for m, name in (("ct", cfg.ct_layer), ("path", cfg.path_layer))
              if m in present}
    maps = joint_gradcam(model, batch, layers, tokens, methods={"ct": cfg.ct_method})
    ct_map, path_map = maps.get("ct"), maps.get("path")
    if ct_map is not None:
        loc, top = _ct_location(ct_map, case.ct_affine)
    t["gradcam_ct_path"] = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    tokens = image_tokens(model, batch, tokens)  # nothing left to compute unless no gradients
    # one pass: every modality subset, the case as it is (last subset), every EHR field ablated
    subsets, experts, ehr_contrib = subset_values(model, batch, tokens, ehr_fields=True)
    t["forward_shapley_ehr"] = (time.perf_counter() - t0) * 1e3
    return _assemble(model, case, cfg, model_version, present, {"ct": ct_map, "path": path_map},
                     (loc, top), (subsets, experts, ehr_contrib), t)


def _assemble(model: FedsightModel, case: PreparedCase, cfg: ExplainConfig, model_version: str,
              present: tuple[str, ...], maps: dict[str, np.ndarray | None],
              location: tuple[CtLocation | None, int | None],
              values: tuple[list[Any], list[Any], Any], timings: dict[str, float]
              ) -> Explanation:
    """One case's Explanation from its passes (shared by explain_case and explain_cases)."""
    subsets, experts, ehr_contrib = values
    logit = subsets[-1].logit
    ehr: tuple[FieldContribution, ...] = ()
    if ehr_contrib is not None and case.ehr is not None:
        ehr = tuple(
            FieldContribution(f.name, f.unit, None if math.isnan(float(v)) else float(v),
                              float(c))
            for f, v, c in zip(model.schema.fields, case.ehr, ehr_contrib, strict=True))
    return Explanation(
        model_version=model_version,
        probability=1.0 / (1.0 + math.exp(-logit)),
        logit=logit,
        temperature=float(model.temperature),
        threshold=cfg.threshold,
        uncertain_band=cfg.uncertain_band,
        positive=cfg.positive,
        negative=cfg.negative,
        condition=cfg.condition,
        present=present,
        missing=tuple(m for m in MODALITIES if m not in present),
        ct_map=maps.get("ct"),
        ct_location=location[0],
        ct_top_slice=location[1],
        path_map=maps.get("path"),
        ehr=ehr,
        subsets=tuple(subsets),
        modality_contrib=shapley(subsets),
        experts=tuple(experts),
        timings_ms=timings,
    )


def explain_cases(model: FedsightModel, cases: list[PreparedCase], cfg: ExplainConfig,
                  model_version: str = "unversioned") -> list[Explanation]:
    """`explain_case` of several cases in one gradient pass and one subset pass
    (explain.batch: every step batches; the results equal the one-case calls within float
    tolerance, tested). `timings_ms` holds each case's share of the batch's time plus
    "batch" (its size)."""
    from explain.batch import batch_gradcam, batch_subset_values

    if model.training:
        raise ValueError("explain_cases needs model.eval(): training mode adds router noise")
    if not cases:
        return []
    n = len(cases)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    inp = model.cfg.inputs
    batch = collate(list(cases), model.schema, inp.ct_shape, inp.path_size)
    t["collate"] = (time.perf_counter() - t0) * 1e3 / n
    t0 = time.perf_counter()
    layers = {"ct": cfg.ct_layer, "path": cfg.path_layer}
    maps, tokens = batch_gradcam(model, batch, layers, methods={"ct": cfg.ct_method})
    locs = [_ct_location(m["ct"], c.ct_affine) if "ct" in m else (None, None)
            for m, c in zip(maps, cases, strict=True)]
    t["gradcam_ct_path"] = (time.perf_counter() - t0) * 1e3 / n
    t0 = time.perf_counter()
    rows = batch_subset_values(model, batch, tokens)
    t["forward_shapley_ehr"] = (time.perf_counter() - t0) * 1e3 / n
    t["batch"] = float(n)
    return [_assemble(model, case, cfg, model_version, tuple(row[0][-1].modalities), m, loc,
                      row, dict(t))
            for case, m, loc, row in zip(cases, maps, locs, rows, strict=True)]

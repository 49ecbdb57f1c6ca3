"""The model's input contract: one preprocessed case, and batches of them.

Hospital nodes produce `PreparedCase`s from DICOM/PNG/CSV (hospital_node.dataset); the UI produces
them from uploads; training, evaluation and explanations consume `Batch`es made by `collate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vocab.ehr_schema import EhrSchema

# CT intensities: Hounsfield units clipped to this window, then divided by its half-width, so
# air = -1, water = 0, dense bone = +1. Fixed (not per-site statistics) so every site agrees.
HU_CLIP = (-1000.0, 1000.0)
# Pathology tiles: RGB in [0, 1], then normalised with these (ImageNet) statistics.
PATH_MEAN = (0.485, 0.456, 0.406)
PATH_STD = (0.229, 0.224, 0.225)


@dataclass
class PreparedCase:
    """One patient on the model's grid. Any modality may be None (absent).

    ct:        (D, H, W) float32, HU scaled by HU_CLIP to [-1, 1], on the model grid.
    ct_affine: (4, 4) float64, model-grid voxel index (d, h, w, 1) -> patient mm (LPS x, y, z).
    path:      (3, S, S) float32, normalised with PATH_MEAN/PATH_STD.
    ehr:       (F,) float32 raw values in the schema's units, NaN where missing;
               None when the case has no EHR row at all.
    label:     0/1, or None when unknown (worklist cases).
    ct_region: body region the CT's DICOM headers name ("chest", "head", ...; "" = none named),
               a fixed word (hospital_node.dicom_header.body_region), never header text.
    """

    case_id: str
    ct: np.ndarray | None = None
    ct_affine: np.ndarray | None = None
    path: np.ndarray | None = None
    ehr: np.ndarray | None = None
    label: int | None = None
    site_id: str = ""
    meta: dict[str, float] = field(default_factory=dict)
    ct_region: str = ""

    def modalities(self) -> tuple[str, ...]:
        present = []
        if self.ct is not None:
            present.append("ct")
        if self.path is not None:
            present.append("path")
        if self.ehr is not None:
            present.append("ehr")
        return tuple(present)


@dataclass
class Batch:
    """Tensors for the model. Absent modalities have zeros in their slot and present=False;
    the model replaces them by learned missing-modality tokens, so slot values never matter.

    ct (B,1,D,H,W), ct_present (B,) bool
    path (B,3,S,S), path_present (B,) bool
    ehr (B,F) normalised with NaN->0, ehr_observed (B,F) bool, ehr_present (B,) bool
    label (B,) float32 (NaN where unknown)
    """

    ct: torch.Tensor
    ct_present: torch.Tensor
    path: torch.Tensor
    path_present: torch.Tensor
    ehr: torch.Tensor
    ehr_observed: torch.Tensor
    ehr_present: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, idx: torch.Tensor) -> Batch:
        """Rows `idx` (1-D long tensor) of every field."""
        return Batch(**{k: v.index_select(0, idx) for k, v in self.__dict__.items()})

    def present(self) -> torch.Tensor:
        """(B, 3) bool presence flags in MODALITIES order (ct, path, ehr)."""
        return torch.stack([self.ct_present, self.path_present, self.ehr_present], dim=1)

    def with_present(self, present: torch.Tensor) -> Batch:
        """Same tensors with new (B, 3) presence flags (slot values are left as they are)."""
        d = dict(self.__dict__)
        d["ct_present"], d["path_present"], d["ehr_present"] = present.unbind(1)
        return Batch(**d)

    def only(self, modalities: tuple[str, ...] | set[str]) -> Batch:
        """Mask every modality not in `modalities` as absent (via the present flags)."""
        keep = torch.tensor([m in modalities for m in ("ct", "path", "ehr")])
        return self.with_present(self.present() & keep)


def concat_batches(batches: list[Batch]) -> Batch:
    """Concatenate Batches along the case dimension."""
    if not batches:
        raise ValueError("concat_batches() needs at least one Batch")
    keys = batches[0].__dict__.keys()
    return Batch(**{k: torch.cat([b.__dict__[k] for b in batches]) for k in keys})


def normalise_ehr(values: np.ndarray, schema: EhrSchema) -> tuple[np.ndarray, np.ndarray]:
    """(F,) raw values -> (normalised values with NaN->0, observed mask)."""
    if values.shape != (len(schema.fields),):
        raise ValueError(
            f"EHR vector has shape {values.shape}, schema {schema.name!r} has "
            f"{len(schema.fields)} fields"
        )
    observed = ~np.isnan(values)
    centre = np.array([f.center for f in schema.fields], dtype=np.float32)
    scale = np.array([f.scale for f in schema.fields], dtype=np.float32)
    norm = np.where(observed, (values - centre) / scale, 0.0).astype(np.float32)
    return norm, observed


def collate(
    cases: list[PreparedCase],
    schema: EhrSchema,
    ct_shape: tuple[int, int, int],
    path_size: int,
) -> Batch:
    """Stack cases into a Batch; missing modalities get zero slots and present=False."""
    if not cases:
        raise ValueError("collate() needs at least one case")
    b, f = len(cases), len(schema.fields)
    ct = np.zeros((b, 1, *ct_shape), np.float32)
    path = np.zeros((b, 3, path_size, path_size), np.float32)
    ehr = np.zeros((b, f), np.float32)
    obs = np.zeros((b, f), bool)
    ct_p, path_p, ehr_p = np.zeros(b, bool), np.zeros(b, bool), np.zeros(b, bool)
    label = np.full(b, np.nan, np.float32)
    for i, c in enumerate(cases):
        if c.ct is not None:
            if c.ct.shape != tuple(ct_shape):
                raise ValueError(f"case CT shape {c.ct.shape} != model grid {tuple(ct_shape)}")
            ct[i, 0], ct_p[i] = c.ct, True
        if c.path is not None:
            if c.path.shape != (3, path_size, path_size):
                raise ValueError(
                    f"case pathology shape {c.path.shape} != (3, {path_size}, {path_size})"
                )
            path[i], path_p[i] = c.path, True
        if c.ehr is not None:
            ehr[i], obs[i] = normalise_ehr(c.ehr.astype(np.float32), schema)
            ehr_p[i] = bool(obs[i].any())
        if c.label is not None:
            label[i] = float(c.label)
    t = torch.from_numpy
    return Batch(t(ct), t(ct_p), t(path), t(path_p), t(ehr), t(obs), t(ehr_p), t(label))

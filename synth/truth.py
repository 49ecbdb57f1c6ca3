"""Ground truth of a synthetic site, kept in `<federation>/_truth/<site_id>/truth.json`.

Never inside a site data root: a node must not be able to read it. Tests, benchmarks and the
demo's "how close to Bayes" report use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vocab.errors import DataError
from vocab.site_layout import TRUTH_DIR

TRUTH_FILE = "truth.json"
TRUTH_VERSION = 1


@dataclass(frozen=True)
class LesionTruth:
    """One lung lesion. centre_mm: DICOM patient coordinates (LPS x, y, z), mm."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    kind: str  # "index" (follows the CT risk score) or "granuloma" (benign distractor)
    hu: float  # density painted at its core, before site offset and noise
    spiculation: float  # spike length / radius


@dataclass(frozen=True)
class CaseTruth:
    """Everything the generator knows about one case.

    latents:     z_shared, z_ct, z_path, z_ehr (standard normal)
    scores:      s_ct, s_path, s_ehr, the standard-normal score each modality renders
    bayes_prob:  sigmoid(logit), the probability of malignancy under the known model
    lesions:     CT lesions (empty when there is no nodule or no CT)
    atypia_bbox: pathology atypia region (x0, y0, x1, y1) px, half-open, in the written tile
                 (an ellipse inscribed in it); None without pathology
    ehr:         the EHR values as written to ehr.csv (None = empty cell)
    modalities:  which of "ct", "path", "ehr" were written for this case
    tasks:       further diseases (SynthConfig.tasks beyond "nodule"), e.g. tasks["fibrosis"] =
                 {"latents": {z_shared, z_ct, z_path, z_ehr}, "scores": {s_ct, s_path, s_ehr},
                 "logit", "bayes_prob", "label"} under that task's own label model; empty (and
                 absent from the file) when only the nodule task was generated
    """

    case_id: str
    site_id: str
    latents: dict[str, float]
    scores: dict[str, float]
    logit: float
    bayes_prob: float
    label: int
    modalities: tuple[str, ...]
    lesions: tuple[LesionTruth, ...] = ()
    atypia_bbox: tuple[int, int, int, int] | None = None
    ehr: dict[str, float | None] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def lesion_centres_mm(self) -> list[tuple[float, float, float]]:
        return [les.centre_mm for les in self.lesions]

    @property
    def lesion_radii_mm(self) -> list[float]:
        return [les.radius_mm for les in self.lesions]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        if not self.tasks:
            del d["tasks"]  # one-task truth files stay exactly as before
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CaseTruth:
        lesions = tuple(
            LesionTruth(
                tuple(les["centre_mm"]),
                les["radius_mm"],
                les["kind"],
                les["hu"],
                les["spiculation"],
            )
            for les in d.get("lesions", [])
        )
        bbox = d.get("atypia_bbox")
        return cls(
            case_id=d["case_id"],
            site_id=d["site_id"],
            latents=dict(d["latents"]),
            scores=dict(d["scores"]),
            logit=float(d["logit"]),
            bayes_prob=float(d["bayes_prob"]),
            label=int(d["label"]),
            modalities=tuple(d["modalities"]),
            lesions=lesions,
            atypia_bbox=None if bbox is None else tuple(bbox),
            ehr=dict(d.get("ehr", {})),
            tasks={k: dict(v) for k, v in d.get("tasks", {}).items()},
        )


def truth_path(out: Path, site_id: str) -> Path:
    return Path(out) / TRUTH_DIR / site_id / TRUTH_FILE


def save_truth(out: Path, site_id: str, cases: list[CaseTruth], extra: dict[str, Any]) -> Path:
    path = truth_path(out, site_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": TRUTH_VERSION,
        "site_id": site_id,
        **extra,
        "cases": [c.to_json() for c in cases],
    }
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_truth(out: Path, site_id: str) -> dict[str, CaseTruth]:
    """case_id -> CaseTruth for one site of a federation written by synth.federation.generate."""
    path = truth_path(out, site_id)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no synthetic truth for site {site_id!r}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"truth file {path} is not valid JSON: {e}") from None
    if doc.get("version") != TRUTH_VERSION:
        raise DataError(
            f"truth file {path} has version {doc.get('version')!r}, expected {TRUTH_VERSION}"
        )
    return {c["case_id"]: CaseTruth.from_json(c) for c in doc["cases"]}

"""Which model the app serves: the promoted version of a coordinator model store, one stored
version, or a bare checkpoint file (a locally trained model) - with its validation metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.privacy_record import summary as privacy_summary
from coordinator.store import CLINICAL, META, MODEL, ModelStore
from multimodal.checkpoint import load_checkpoint
from multimodal.model import FedsightModel
from ui.operating_point import OperatingPoint
from vocab.errors import CheckpointError


@dataclass
class ServedModel:
    model: FedsightModel
    version: str  # store version id, or "file:<name>" for a bare checkpoint
    round: int | None = None
    # This hospital's validation metrics for the version (name -> value), if the store has them.
    site_metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""
    privacy: str = privacy_summary(None, "")  # one line for the card (coordinator.privacy_record)
    calibration: str = ""  # one line for the card (calibration_summary)
    calibration_meta: dict[str, Any] | None = None  # the version's meta["calibration"]
    task: str = ""  # the task served ("" = the model's first task); set from the model
    # The decision threshold and where it came from (ui.operating_point); set by the service.
    operating_point: OperatingPoint | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task the served version has a head for (the app offers no other)."""
        return tuple(self.model.cfg.tasks)

    def __post_init__(self) -> None:
        if not self.calibration:  # built by hand (tests, benchmarks): say what the model has
            self.calibration = calibration_summary(None, "", self.model.temperature)
        self.task = self.model.serve_task


def _numbers(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {str(k): float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def load_served_model(path: Path, site_id: str, task: str | None = None) -> ServedModel:
    """`path`: a store root (has clinical.json), a version folder (model.pt + meta.json) or a
    checkpoint file; `task`: which of its tasks to serve (default: its first). Raises
    CheckpointError naming the path when nothing servable is there or it lacks the task."""
    path = Path(path)
    if path.is_dir() and (path / CLINICAL).is_file():
        store = ModelStore(path)
        version = store.clinical_version()
        if version is None:
            raise CheckpointError(f"model store {str(path)!r} has no clinical version yet "
                                  "(promote one first)")
        store.verify(version)
        return _from_version_dir(version.path, version.meta, site_id, task)
    if path.is_dir() and (path / MODEL).is_file():
        meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
        return _from_version_dir(path, meta, site_id, task)
    if path.is_file():
        model = load_checkpoint(path, task=task).eval()
        return ServedModel(model, f"file:{path.name}", source=str(path),
                           calibration=calibration_summary(None, "", model.temperature))
    raise CheckpointError(f"no model at {str(path)!r}: expected a model store (clinical.json), "
                          "a version folder (model.pt + meta.json) or a checkpoint file")


def _from_version_dir(folder: Path, meta: dict[str, Any], site_id: str,
                      task: str | None = None) -> ServedModel:
    model = load_checkpoint(folder / MODEL, task=task).eval()
    if model.serve_task != meta.get("task", model.cfg.task):
        # the version's metrics and calibration are its own task's, not this one's
        meta = {k: v for k, v in meta.items() if k not in ("metrics", "calibration")}
    hospitals = (meta.get("metrics") or {}).get("hospitals") or {}
    rnd = meta.get("round")
    cal = meta.get("calibration")
    cal = cal if isinstance(cal, dict) else None
    return ServedModel(model, str(meta.get("id") or folder.name),
                       int(rnd) if isinstance(rnd, int) else None,
                       _numbers(hospitals.get(site_id)), str(folder),
                       privacy_summary(meta.get("privacy"), site_id),
                       calibration_summary(cal, site_id, model.temperature, stored=True), cal)


def calibration_summary(cal: dict[str, Any] | None, site_id: str, temperature: float,
                        stored: bool = False) -> str:
    """The card's calibration line: "calibrated" only for a version whose federated fit
    (meta["calibration"]) exists and whose checkpoint carries that T; otherwise says why not.
    stored: the model came from a store version (which would carry a fit if it had one)."""
    if cal is None:
        if stored or temperature == 1.0:
            return ("**Uncalibrated** probability: this version has no fitted temperature "
                    "(too few held-out cases reported, or trained before calibration existed).")
        return (f"Temperature-scaled (T = {temperature:.2f}, fitted where this checkpoint was "
                "trained); its calibration error is not recorded.")
    t = cal.get("temperature")
    if not isinstance(t, int | float) or abs(float(t) - temperature) > 1e-6:
        return ("**Uncalibrated**: the version's calibration record does not match its model "
                f"(record T = {t!r}, model T = {temperature:.4g}).")
    mine = (cal.get("hospitals") or {}).get(site_id)
    where, ece = ("at this hospital", mine) if isinstance(mine, dict) else \
        ("pooled over hospitals", cal.get("pooled") or {})
    before, after, n = ece.get("ece_before"), ece.get("ece_after"), ece.get("n")
    if not all(isinstance(v, int | float) for v in (before, after, n)):
        return f"Calibrated (T = {float(t):.2f}); ECE not recorded."
    floor = ece.get("ece_floor")
    chance = (f"; about {floor:.3f} would arise by chance alone on so few cases"
              if isinstance(floor, int | float) and math.isfinite(floor) else "")
    return (f"Calibrated (federated temperature scaling, T = {float(t):.2f}); ECE {where} "
            f"{before:.3f} before, {after:.3f} after ({int(n)} held-out cases, cross-fitted"
            f"{chance}).")

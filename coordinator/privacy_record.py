"""The privacy block of a stored version: what each hospital's data is protected by in it.

A version carries every round of its lineage (parent versions included), so the guarantee for a
hospital is its latest reported cumulative epsilon (hospital_node.privacy: the node's ledger
composes every round it ever trained), and none at all (epsilon null) once any round of the
lineage merged an update of that hospital trained without DP. Only what hospitals reported is
recorded here; the coordinator cannot check it (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from coordinator.journal import ACCEPTED, RoundRecord
from vocab import records as K


def privacy_block(parent: Mapping[str, Any] | None, rec: RoundRecord, noise_multiplier: float,
                  max_grad_norm: float) -> dict[str, Any]:
    """{"dp": this round used DP-SGD, "noise_multiplier", "max_grad_norm",
    "hospitals": {site: {"epsilon": cumulative or None (not private), "delta"}},
    "complete": False when a parent version predates this record (its hospitals unknown)}."""
    prev = dict((parent or {}).get("privacy") or {})
    complete = bool(prev.get("complete", parent is None))
    hospitals: dict[str, dict[str, Any]] = {h: dict(v) for h, v in
                                            (prev.get("hospitals") or {}).items()}
    for name, h in rec.hospitals.items():
        if h.outcome != ACCEPTED:
            continue
        eps, delta = h.train.get(K.DP_EPSILON, math.nan), h.train.get(K.DP_DELTA, math.nan)
        private = math.isfinite(eps) and math.isfinite(delta) and eps >= 0
        if hospitals.get(name, {"epsilon": 0.0})["epsilon"] is None or not private:
            hospitals[name] = {"epsilon": None, "delta": None}  # once not private, never again
        else:
            hospitals[name] = {"epsilon": float(eps), "delta": float(delta)}
    return {"dp": noise_multiplier > 0, "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm, "hospitals": dict(sorted(hospitals.items())),
            "complete": complete}


def summary(block: Mapping[str, Any] | None, site_id: str) -> str:
    """One line for the clinician's model card (true for whatever version is served)."""
    hospitals = dict((block or {}).get("hospitals") or {})
    if not block or not hospitals:
        return "Privacy: no record of differential privacy for this version (treat as none)."
    if not block.get("complete", False) or any(v.get("epsilon") is None
                                               for v in hospitals.values()):
        return ("Privacy: not differentially private (some training data of this version was "
                "used without DP).")
    worst = max(hospitals.values(), key=lambda v: v["epsilon"])
    own = hospitals.get(site_id)
    here = (f"ε = {own['epsilon']:.2f} at δ = {own['delta']:g} for this hospital's patients; "
            if own else "")
    return (f"Privacy: trained with differential privacy (DP-SGD) at every hospital: {here}"
            f"at most ε = {worst['epsilon']:.2f} at δ = {worst['delta']:g} for any hospital "
            "(as reported by the hospitals).")

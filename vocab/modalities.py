"""Modality names and the 7 non-empty modality combinations."""

from __future__ import annotations

from itertools import combinations
from typing import Final, Literal

Modality = Literal["ct", "path", "ehr"]
MODALITIES: Final[tuple[Modality, ...]] = ("ct", "path", "ehr")
MODALITY_LABELS: Final[dict[str, str]] = {"ct": "CT", "path": "pathology", "ehr": "EHR"}


def modality_combinations() -> list[tuple[Modality, ...]]:
    """All 7 non-empty subsets of MODALITIES, singles first (CT, path, EHR, CT+path, ...)."""
    out: list[tuple[Modality, ...]] = []
    for k in range(1, len(MODALITIES) + 1):
        out.extend(combinations(MODALITIES, k))
    return out


def combo_name(combo: tuple[str, ...]) -> str:
    """'ct+path' style name of a modality combination, in canonical order."""
    unknown = [m for m in combo if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; expected one of {MODALITIES}")
    return "+".join(m for m in MODALITIES if m in combo)

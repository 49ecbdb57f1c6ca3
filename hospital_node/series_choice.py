"""Choose the primary axial CT series of a case (the rule is documented in README and config).

Rule, in order (each step only among the series that survived the previous ones):
1. Readable CT: Modality CT, SOP class CT Image or Enhanced CT Image (secondary captures and
   other classes are skipped), no disqualifying header problem (missing or implausible
   geometry, undecodable transfer syntax).
2. Not a localizer: ImageType without LOCALIZER/SCOUT, and at least `min_slices` frames.
3. Axial: the slice normal within `max_axial_deg` of the patient's head-foot axis (a gantry tilt
   of up to ~30 degrees is still an axial acquisition; sagittal/coronal reformats are not).
4. Preference, not exclusion: ORIGINAL/PRIMARY image type before DERIVED (reformats, MIPs)
   unless `require_original`, which makes it an exclusion.
5. Then `prefer`: "most_slices" (default: the thin reconstruction covers the chest at the finest
   step) or "thinnest" (smallest slice thickness / step first), the other as tie-break; then
   the lowest SeriesNumber, then the UID, so the choice is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hospital_node.ct_scan import CaseScan, SeriesFiles
from vocab.errors import ConfigError, DataProblem

Preference = Literal["most_slices", "thinnest"]


@dataclass(frozen=True)
class SeriesRule:
    """How a case's CT series is chosen among several (see the module docstring)."""

    min_slices: int = 3
    max_axial_deg: float = 35.0
    require_original: bool = False
    prefer: Preference = "most_slices"

    def __post_init__(self) -> None:
        if self.prefer not in ("most_slices", "thinnest"):
            raise ConfigError(f"series rule 'prefer' must be most_slices or thinnest, got "
                              f"{self.prefer!r}")
        if not 0 < self.max_axial_deg <= 90:
            raise ConfigError(f"series rule 'max_axial_deg' must be in (0, 90], got "
                              f"{self.max_axial_deg!r}")
        if self.min_slices < 1:
            raise ConfigError(f"series rule 'min_slices' must be >= 1, got {self.min_slices!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeriesRule:
        types = {"min_slices": int, "max_axial_deg": (int, float), "require_original": bool,
                 "prefer": str}
        unknown = sorted(str(k) for k in set(d) - set(types))
        if unknown:
            raise ConfigError(f"unknown series rule key(s) {unknown}; known: {sorted(types)}")
        for k, v in d.items():
            if not isinstance(v, types[k]) or (types[k] is int and isinstance(v, bool)):
                raise ConfigError(f"series rule {k!r} has the wrong type "
                                  f"({type(v).__name__})")
        return cls(**d)


@dataclass
class Choice:
    """The chosen series (None when no series qualifies) and what the report should say."""

    series: SeriesFiles | None
    problems: list[DataProblem]
    reason: str = ""


def _axial_angle(s: SeriesFiles) -> float:
    iop = s.instances[0].frames[0].orientation
    normal = np.cross(iop[:3], iop[3:])
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])) / float(np.linalg.norm(normal)))))


def _thickness(s: SeriesFiles) -> float:
    t = [i.slice_thickness for i in s.instances if i.slice_thickness]
    return float(np.median(t)) if t else math.inf


def _is_original(s: SeriesFiles) -> bool:
    it = s.instances[0].image_type
    return len(it) >= 2 and it[0] == "ORIGINAL" and it[1] == "PRIMARY"


def _is_derived(s: SeriesFiles) -> bool:
    """Explicitly DERIVED or SECONDARY (an absent ImageType says nothing either way)."""
    it = s.instances[0].image_type
    return bool(it) and (it[0] == "DERIVED" or (len(it) >= 2 and it[1] == "SECONDARY"))


def _origin_rank(s: SeriesFiles) -> int:
    return 0 if _is_original(s) else 2 if _is_derived(s) else 1


def _exclusion(s: SeriesFiles, rule: SeriesRule) -> str:
    """Why the series cannot be the case's CT ('' if it can)."""
    fatal = [p for p in s.problems if p.fatal]
    if fatal:
        return f"{fatal[0].code} ({fatal[0].message.split(': ', 1)[-1]})"
    if not s.instances or not s.instances[0].frames:
        return "no readable frames"
    if any(w in s.instances[0].image_type for w in ("LOCALIZER", "SCOUT")):
        return "a localizer (ImageType LOCALIZER)"
    if s.n_frames < rule.min_slices:
        return f"{s.n_frames} slice(s), fewer than {rule.min_slices}"
    angle = _axial_angle(s)
    if angle > rule.max_axial_deg:
        return f"not axial (slice normal {angle:.0f} deg from head-foot, limit " \
               f"{rule.max_axial_deg:g})"
    if rule.require_original and not _is_original(s):
        return f"not ORIGINAL/PRIMARY (ImageType {'/'.join(s.instances[0].image_type)})"
    return ""


def choose_series(scan: CaseScan, rule: SeriesRule) -> Choice:
    """Pick one series by `rule`; the others are reported as skipped with their reason."""
    if not scan.series:
        return Choice(None, [DataProblem("ct.empty", f"{scan.folder_rel}: no DICOM image in "
                                         "the CT folder", scan.folder_rel)])
    reasons = {s.uid: _exclusion(s, rule) for s in scan.series}
    eligible = [s for s in scan.series if not reasons[s.uid]]
    if not eligible:
        if len(scan.series) == 1:  # one series: its own problems say it best
            only = scan.series[0]
            probs = [p for p in only.problems if p.fatal] or [DataProblem(
                "ct.no_usable_series", f"{scan.folder_rel}: {only.label}: {reasons[only.uid]}",
                scan.folder_rel)]
            return Choice(None, probs)
        detail = "; ".join(f"{s.label}: {reasons[s.uid]}" for s in scan.series)
        return Choice(None, [DataProblem("ct.no_usable_series", f"{scan.folder_rel}: none of "
                                         f"{len(scan.series)} series is a usable axial CT: "
                                         f"{detail}", scan.folder_rel)])

    def key(s: SeriesFiles) -> tuple:
        slices, thin = -s.n_frames, _thickness(s)
        order = (slices, thin) if rule.prefer == "most_slices" else (thin, slices)
        num = s.instances[0].series_number
        return (_origin_rank(s), *order, num if num is not None else 1 << 30, s.uid)

    eligible.sort(key=key)
    chosen = eligible[0]
    why = (f"{'ORIGINAL/PRIMARY, ' if _is_original(chosen) else ''}axial, {chosen.n_frames} "
           f"slices" + (f", {_thickness(chosen):g} mm thick" if _thickness(chosen) < math.inf
                        else ""))
    problems = []
    if len(scan.series) > 1:
        skipped = "; ".join(
            f"{s.label}: {reasons[s.uid] or 'ranked lower (' + _rank_note(s, chosen, rule) + ')'}"
            for s in scan.series if s is not chosen)
        problems.append(DataProblem("ct.series_chosen", f"{scan.folder_rel}: "
                                    f"{len(scan.series)} series; used {chosen.label} ({why}); "
                                    f"skipped: {skipped}", scan.folder_rel, fatal=False))
    if _is_derived(chosen):
        problems.append(DataProblem("ct.derived_series", f"{scan.folder_rel}: {chosen.label} is "
                                    "not ORIGINAL/PRIMARY (a reformat or derived image); used "
                                    "as the only axial CT", scan.folder_rel, "ImageType",
                                    fatal=False))
    problems += [p for p in chosen.problems if not p.fatal]
    return Choice(chosen, problems, why)


def _rank_note(s: SeriesFiles, chosen: SeriesFiles, rule: SeriesRule) -> str:
    if _origin_rank(s) > _origin_rank(chosen):
        return "not ORIGINAL/PRIMARY"
    return f"{s.n_frames} slices, {_thickness(s):g} mm" if _thickness(s) < math.inf \
        else f"{s.n_frames} slices"

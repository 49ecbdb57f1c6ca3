"""Read the chosen CT series of a case into a Hounsfield-unit volume.

The read path of a CT case, top to bottom:
  hospital_node.ct_scan.scan_case        walk the folder, read headers (bounded), group series
  hospital_node.series_choice            pick the primary axial CT series by a documented rule
  read_series (here)                     geometry from checked frame headers, then pixels -> HU
  hospital_node.preprocess.ct_to_grid    resample onto the model grid (finite values checked)

Classic CT (one file per slice) and Enhanced CT (one multi-frame object) both arrive here as a
list of frames with checked geometry (hospital_node.dicom_header.FrameGeom), so one piece of
code sorts, checks and stacks both.

Why our own geometry code rather than highdicom's volume API or SimpleITK's series reader
(docs/ingestion.md has the comparison): both refuse or silently resample what hospitals do send
(gantry-tilted stacks and uneven gaps, which we keep with a sheared affine and report), neither
bounds memory before decoding, and SimpleITK would add a 100 MB binary to every node. The
crash-prone part of the old reader was unchecked header values; those are now parsed and
range-checked in one place (dicom_header) before any geometry runs.

Decisions:
- Gantry tilt (GantryDetectorTilt != 0 or slices stacked obliquely to their own plane) is a
  warning, not an exclusion: the affine is built from the real stacking vector (a sheared affine),
  so resampling to the model grid (preprocess.ct_to_grid) puts every voxel where it belongs.
- Uneven slice gaps are a warning; the stack is linearly interpolated along the slice normal to a
  uniform step (the median gap) so that one affine describes the whole volume.
- A gap of about twice (or more) the regular neighbouring step is a hole: missing slices, fatal.
- The decoded size (rows x columns x frames x bytes) is checked against a per-case budget before
  any pixel data is decoded.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hospital_node.ct_scan import IDENTIFYING_TAGS, CaseScan, SeriesFiles, scan_case
from hospital_node.dicom_header import READ_ERRORS, FrameGeom, HeaderError, Instance, read_dataset
from hospital_node.series_choice import SeriesRule, choose_series
from vocab.errors import DataProblem

__all__ = ["IDENTIFYING_TAGS", "CtSeries", "read_ct_series", "read_series"]

ORIENTATION_TOL = 1e-3   # direction cosines: differences below this are rounding
SPACING_TOL = 1e-3       # mm, pixel spacing agreement between slices
UNEVEN_REL_TOL = 0.05    # gaps within 5% of the median are "even"
TILT_MIN_DEG = 0.5       # below this an oblique stack is rounding noise
MIN_STEP_MM, MAX_STEP_MM = 0.05, 50.0   # plausible slice step along the normal
MAX_EXTENT_MM = 3000.0   # a whole-body scan is ~2 m
MAX_CASE_DECODED_BYTES = 768 << 20      # ~1400 slices of 512x512 int16
MIN_SLICES = 2           # an Enhanced CT may legitimately hold a 2-frame slab; the choice rule
                         # asks for 3 by default (series_choice.SeriesRule.min_slices)


@dataclass
class CtSeries:
    """A CT volume in HU on a uniform stack.

    hu:            (Z, Y, X) float32 Hounsfield units, slices sorted along the slice normal.
    affine:        (4, 4) voxel index (z, y, x, 1) -> patient mm (LPS); sheared when tilted.
    spacing:       (z, y, x) mm; z is the uniform stacking step along the slice normal.
    source_offsets:(N,) the original slices' positions along the normal (sorted, mm).
    tilt_deg:      angle between the stacking direction and the slice normal.
    body_region:   the body region the headers name (a fixed word, "" when none is named).
    chosen:        how the series was chosen (for the local report), "" if there was no choice.
    problems:      every problem found; `usable` is False when any is fatal.
    """

    hu: np.ndarray | None
    affine: np.ndarray | None
    spacing: tuple[float, float, float] | None
    source_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tilt_deg: float = 0.0
    series_uid: str = ""
    chosen: str = ""
    problems: list[DataProblem] = field(default_factory=list)
    # Body region the headers name (dicom_header.body_region: a fixed word, "" = none named).
    body_region: str = ""

    @property
    def usable(self) -> bool:
        return self.hu is not None and not any(p.fatal for p in self.problems)


def _holes(gaps: np.ndarray) -> list[int]:
    """Indices of gaps that are >= ~2x the regular step around them (missing slices).

    The reference is the neighbouring gaps (2 either side), which must agree with each other:
    a series whose step changes on purpose (4 mm then 7 mm) is uneven, not holed.
    """
    out = []
    for i, g in enumerate(gaps):
        ref = np.concatenate([gaps[max(0, i - 2):i], gaps[i + 1:i + 3]])
        if ref.size == 0:
            continue
        lo, hi = float(ref.min()), float(ref.max())
        if hi > lo * (1 + UNEVEN_REL_TOL):
            continue
        ratio = g / float(np.median(ref))
        if ratio >= 1.8 and abs(ratio - round(ratio)) < 0.2:
            out.append(i)
    return out


def _frame_pixels(ds: object, inst: Instance) -> np.ndarray:
    """(F, rows, cols) stored values of an instance, decoded after the size was checked."""
    if "PixelData" not in ds:  # type: ignore[operator]
        raise HeaderError("dicom.no_pixel_data", "PixelData", "no PixelData element")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = np.asarray(ds.pixel_array)  # type: ignore[attr-defined]
    n = len(inst.frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (n, inst.rows, inst.columns):
        raise HeaderError("dicom.bad_value", "PixelData", f"decoded pixel data has shape "
                          f"{tuple(arr.shape)}, header says {(n, inst.rows, inst.columns)}")
    return arr


def _native_pixels_short(inst: Instance) -> str:
    """For uncompressed transfer syntaxes the file must hold at least the pixel bytes the header
    announces: a header that lies about Rows/Columns/frames is caught before any allocation."""
    if inst.transfer_syntax_compressed:
        return ""
    need = inst.decoded_bytes
    if inst.file.size < need:
        return f"file holds {inst.file.size} bytes, the header announces {need} bytes of pixels"
    return ""


def read_series(series: SeriesFiles, folder_rel: str) -> CtSeries:
    """Geometry checks over the series' frames, then decode pixels into one HU volume."""
    frel = folder_rel

    def fail(code: str, msg: str, fld: str = "", file: str = "") -> CtSeries:
        return CtSeries(None, None, None, problems=[DataProblem(code, f"{file or frel}: {msg}",
                                                                file or frel, fld)])

    frames: list[tuple[Instance, FrameGeom]] = [(i, f) for i in series.instances
                                                for f in i.frames]
    if len(frames) < MIN_SLICES:
        return fail("ct.too_few_slices", f"{len(frames)} slice(s), need >= {MIN_SLICES}")
    decoded = sum(i.decoded_bytes for i in series.instances)
    if decoded > MAX_CASE_DECODED_BYTES:
        return fail("ct.too_large", f"the series decodes to {decoded} bytes, over the per-case "
                    f"budget of {MAX_CASE_DECODED_BYTES} bytes")

    iops = np.array([f.orientation for _, f in frames])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        return fail("ct.inconsistent_orientation", "ImageOrientationPatient differs between "
                    "slices", "ImageOrientationPatient")
    pxs = np.array([f.spacing for _, f in frames])
    if np.abs(pxs - pxs[0]).max() > SPACING_TOL:
        return fail("ct.inconsistent_spacing", f"PixelSpacing differs between slices "
                    f"({sorted({tuple(p) for p in pxs.tolist()})})", "PixelSpacing")
    shapes = {(i.rows, i.columns) for i, _ in frames}
    if len(shapes) > 1:
        return fail("ct.inconsistent_shape", f"slice sizes differ {sorted(shapes)}", "Rows")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)  # dicom_header checked: two orthonormal unit vectors

    positions = np.array([f.position for _, f in frames])
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    frames = [frames[i] for i in order]
    positions, offsets = positions[order], offsets[order]
    gaps = np.diff(offsets)
    if gaps.min() < 1e-3:
        return fail("ct.duplicate_slices", "two slices at the same position",
                    "ImagePositionPatient")
    extent = float(offsets[-1] - offsets[0])
    if extent > MAX_EXTENT_MM:
        return fail("ct.implausible_geometry", f"slices span {extent:.0f} mm along the normal, "
                    f"over {MAX_EXTENT_MM:g} mm", "ImagePositionPatient")
    stack = positions[-1] - positions[0]
    stack_unit = stack / np.linalg.norm(stack)
    resid = (positions - positions[0]) - np.outer((positions - positions[0]) @ stack_unit,
                                                  stack_unit)
    if np.linalg.norm(resid, axis=1).max() > 0.5 * float(pxs[0].min()):
        return fail("ct.inconsistent_positions", "slice positions are not on one line",
                    "ImagePositionPatient")
    problems: list[DataProblem] = []
    holes = _holes(gaps)
    if holes:
        desc = ", ".join(f"{gaps[i]:.2f} mm after slice {i + 1}" for i in holes)
        return fail("ct.missing_slices", f"gap(s) of about twice the regular step: {desc}",
                    "ImagePositionPatient")
    step = float(np.median(gaps))
    if not MIN_STEP_MM <= step <= MAX_STEP_MM:
        return fail("ct.implausible_geometry", f"slice step {step:g} mm outside the plausible "
                    f"{MIN_STEP_MM}-{MAX_STEP_MM} mm", "ImagePositionPatient")
    uneven = bool(np.abs(gaps - step).max() > UNEVEN_REL_TOL * step)
    if uneven:
        distinct = sorted({round(float(g), 2) for g in gaps})
        problems.append(DataProblem("ct.uneven_spacing", f"{frel}: uneven slice gaps "
                                    f"{distinct} mm (median {step:.2f}); interpolated to a "
                                    f"uniform {step:.2f} mm step", frel, "ImagePositionPatient",
                                    fatal=False))
    cos_t = float(np.clip(abs(stack_unit @ normal), -1.0, 1.0))
    tilt = math.degrees(math.acos(cos_t))
    tag_tilt = frames[0][0].tilt_deg
    if tilt > TILT_MIN_DEG or abs(tag_tilt) > TILT_MIN_DEG:
        problems.append(DataProblem("ct.gantry_tilt", f"{frel}: gantry tilt {tag_tilt:.1f} deg "
                                    f"(GantryDetectorTilt), slices stacked {tilt:.1f} deg off "
                                    "their normal; geometry corrected with a sheared affine",
                                    frel, "GantryDetectorTilt", fatal=False))

    rows, cols = next(iter(shapes))
    for inst in series.instances:
        short = _native_pixels_short(inst)
        if short:
            return fail("dicom.unreadable", short, "PixelData", inst.file.rel)
    hu: np.ndarray | None = None  # allocated once the first instance decoded as announced
    slot = {(id(i), f.index): k for k, (i, f) in enumerate(frames)}
    for inst in series.instances:
        try:
            ds = read_dataset(inst.file, pixels=True)
            raw = _frame_pixels(ds, inst)
            pad = ds.get("PixelPaddingValue")
        except HeaderError as e:
            return fail(e.code, str(e), e.keyword, inst.file.rel)
        except READ_ERRORS as e:
            return fail("dicom.unreadable", f"pixel data unreadable ({type(e).__name__})",
                        "PixelData", inst.file.rel)
        if hu is None:
            hu = np.empty((len(frames), rows, cols), np.float32)
        for fr in inst.frames:
            out = hu[slot[(id(inst), fr.index)]]
            np.multiply(raw[fr.index], np.float32(fr.slope), out=out, casting="unsafe")
            out += np.float32(fr.intercept)
            if isinstance(pad, int):
                out[raw[fr.index] == pad] = -1000.0  # outside the field of view: air
    assert hu is not None  # frames is non-empty, so some instance filled it
    if not np.isfinite(hu).all():
        return fail("ct.non_finite", "HU values are not finite after rescale", "RescaleSlope")
    along = stack / (offsets[-1] - offsets[0])  # stacking vector per mm along the normal
    if uneven:
        n = int(math.floor((offsets[-1] - offsets[0]) / step + 1e-6)) + 1
        target = offsets[0] + step * np.arange(n)
        idx = np.clip(np.searchsorted(offsets, target, side="right") - 1, 0, len(offsets) - 2)
        w = ((target - offsets[idx]) / (offsets[idx + 1] - offsets[idx])).astype(np.float32)
        hu = hu[idx] * (1 - w)[:, None, None] + hu[idx + 1] * w[:, None, None]
    row_sp, col_sp = float(pxs[0][0]), float(pxs[0][1])  # between rows, between columns
    affine = np.eye(4)
    affine[:3, 0] = along * step
    affine[:3, 1] = col_dir * row_sp  # moving down one row follows the column direction
    affine[:3, 2] = row_dir * col_sp
    affine[:3, 3] = positions[0]
    region = next((i.body_region for i in series.instances if i.body_region), "")
    return CtSeries(hu.astype(np.float32, copy=False), affine, (step, row_sp, col_sp),
                    offsets, tilt, series.uid, problems=problems, body_region=region)


def read_case_ct(scan: CaseScan, rule: SeriesRule = SeriesRule()) -> CtSeries:
    """Choose the case's series (series_choice) and read it; problems of every stage kept."""
    choice = choose_series(scan, rule)
    problems = scan.problems + choice.problems
    if choice.series is None:
        if not any(p.fatal for p in problems):
            problems.append(DataProblem("ct.no_usable_series", f"{scan.folder_rel}: no usable "
                                        "CT series", scan.folder_rel))
        return CtSeries(None, None, None, problems=problems)
    series = read_series(choice.series, scan.folder_rel)
    series.problems = problems + series.problems
    series.chosen = choice.reason
    return series


def read_ct_series(folder: Path, root: Path | None = None,
                   rule: SeriesRule = SeriesRule()) -> CtSeries:
    """Scan `folder` (nested folders included), choose its CT series and read it.

    Never raises for bad input. `root` is the site root: files must stay inside it (symlinks
    leading out are refused) and messages name paths relative to it (default: the folder's
    parent, so messages read '<case>/<file>').
    """
    folder = Path(folder)
    base = Path(root) if root is not None else folder.parent
    if not folder.is_dir():
        rel = folder.name
        return CtSeries(None, None, None, problems=[DataProblem(
            "ct.empty", f"{rel}: no CT folder", rel)])
    return read_case_ct(scan_case(folder, base), rule)

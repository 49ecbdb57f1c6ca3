"""Read one CT series (a folder of single-frame DICOM files) into a Hounsfield-unit volume.

Geometry is taken from ImagePositionPatient/ImageOrientationPatient (LPS patient mm), never from
file names or InstanceNumber. Decisions:

- Gantry tilt (GantryDetectorTilt != 0 or slices stacked obliquely to their own plane) is a
  warning, not an exclusion: the affine is built from the real stacking vector (a sheared affine),
  so resampling to the model grid (preprocess.ct_to_grid) puts every voxel where it belongs.
- Uneven slice gaps are a warning; the stack is linearly interpolated along the slice normal to a
  uniform step (the median gap) so that one affine describes the whole volume.
- A gap of about twice (or more) the regular neighbouring step is a hole: missing slices, fatal.
- A file named like DICOM (.dcm/.dicom/.ima) that is not readable DICOM, or any DICOM file that is
  not a readable CT image, makes the series unusable (it may be a lost slice). Other non-DICOM
  files (LICENSE, notes) are reported and ignored; hidden files and DICOMDIR are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, CTImageStorage

from vocab.errors import DataProblem

# Tags that identify a patient; reported by keyword only (values never leave this module).
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "PatientBirthName", "IssuerOfPatientID", "MedicalRecordLocator", "AccessionNumber",
)
ORIENTATION_TOL = 1e-3   # direction cosines: differences below this are rounding
SPACING_TOL = 1e-3       # mm, pixel spacing agreement between slices
UNEVEN_REL_TOL = 0.05    # gaps within 5% of the median are "even"
TILT_MIN_DEG = 0.5       # below this an oblique stack is rounding noise
MIN_SLICES = 3
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Errors pydicom raises for malformed files; anything else is a bug and should surface.
_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
                AttributeError, IndexError, NotImplementedError, RuntimeError)


@dataclass
class CtSeries:
    """A CT volume in HU on a uniform stack.

    hu:            (Z, Y, X) float32 Hounsfield units, slices sorted along the slice normal.
    affine:        (4, 4) voxel index (z, y, x, 1) -> patient mm (LPS); sheared when tilted.
    spacing:       (z, y, x) mm; z is the uniform stacking step along the slice normal.
    source_offsets:(N,) the original slices' positions along the normal (sorted, mm).
    tilt_deg:      angle between the stacking direction and the slice normal.
    problems:      every problem found; `usable` is False when any is fatal.
    """

    hu: np.ndarray | None
    affine: np.ndarray | None
    spacing: tuple[float, float, float] | None
    source_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tilt_deg: float = 0.0
    series_uid: str = ""
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.hu is not None and not any(p.fatal for p in self.problems)


def _rel(path: Path, base: Path | None) -> str:
    if base is None:
        return path.name
    try:
        return str(path.relative_to(base))
    except ValueError:
        return path.name


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR"


def _read_header(path: Path, rel: str) -> tuple[FileDataset | None, DataProblem | None]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # A file that claims to be DICOM may be a damaged slice; anything else is clutter.
        claims = path.suffix.lower() in DICOM_SUFFIXES
        what = "named like DICOM but not a DICOM file" if claims else "not DICOM, ignored"
        return None, DataProblem("dicom.not_dicom", f"{rel}: {what}", rel, fatal=claims)
    except _READ_ERRORS as e:
        return None, DataProblem("dicom.unreadable",
                                 f"{rel}: unreadable DICOM ({type(e).__name__})", rel)
    # pydicom reads leniently: a file cut short parses as a header with elements missing.
    if any(kw not in ds for kw in ("Rows", "Columns")) and _truncated(path):
        return None, DataProblem("dicom.unreadable", f"{rel}: file ends early (truncated)", rel)
    if "SOPClassUID" not in ds and "Modality" not in ds:
        claims = path.suffix.lower() in DICOM_SUFFIXES
        return None, DataProblem("dicom.not_dicom", f"{rel}: no DICOM image header", rel,
                                 fatal=claims)
    return ds, None


def _truncated(path: Path) -> bool:
    """True when a full read finds no complete pixel data (only asked of odd-looking headers)."""
    try:
        ds = pydicom.dcmread(path)
        return "PixelData" not in ds or len(ds.PixelData) == 0
    except _READ_ERRORS:
        return True


def _collapse(problems: list[DataProblem]) -> list[DataProblem]:
    """One problem per code for a series: '…and N more files' instead of one line per slice."""
    out: dict[str, DataProblem] = {}
    extra: dict[str, int] = {}
    for p in problems:
        if p.code in out:
            extra[p.code] = extra.get(p.code, 0) + 1
        else:
            out[p.code] = p
    return [DataProblem(p.code, p.message + (f" (and {extra[p.code]} more file(s))"
                                             if p.code in extra else ""),
                        p.file, p.field, p.fatal) for p in out.values()]


def _header_problems(ds: FileDataset, rel: str) -> list[DataProblem]:
    out: list[DataProblem] = []
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        out.append(DataProblem("dicom.not_ct", f"{rel}: Modality is {modality or 'missing'!r}, "
                               "expected 'CT'", rel, "Modality"))
        return out
    sop = str(ds.get("SOPClassUID", ""))
    if sop != CTImageStorage:
        name = UID(sop).name if sop else "missing"
        out.append(DataProblem("dicom.unsupported_sop_class", f"{rel}: SOP class {name}; only "
                               "single-frame CT Image Storage is supported", rel, "SOPClassUID"))
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
               "Columns"):
        if kw not in ds:
            out.append(DataProblem("dicom.missing_geometry", f"{rel}: {kw} missing", rel, kw))
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        out.append(DataProblem("dicom.unsupported_transfer_syntax",
                               f"{rel}: no TransferSyntaxUID in file meta", rel,
                               "TransferSyntaxUID"))
    else:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            out.append(DataProblem("dicom.unsupported_transfer_syntax",
                                   f"{rel}: transfer syntax {UID(tsyntax).name} cannot be "
                                   "decoded here (install pylibjpeg codecs or python-gdcm)",
                                   rel, "TransferSyntaxUID"))
    return out


def _identifying(headers: list[FileDataset], folder_rel: str) -> DataProblem | None:
    found = sorted({kw for ds in headers for kw in IDENTIFYING_TAGS
                    if kw in ds and str(ds.get(kw, "") or "").strip()})
    if not found:
        return None
    return DataProblem("dicom.identifying_tags",
                       f"{folder_rel}: identifying tags present: {', '.join(found)} "
                       "(de-identify before use; values are not read or reported)",
                       folder_rel, ",".join(found), fatal=False)


def _slice_hu(ds: FileDataset) -> np.ndarray:
    """Stored values -> HU; PixelPaddingValue (outside the field of view) becomes air."""
    raw = ds.pixel_array
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    pad = ds.get("PixelPaddingValue")
    if isinstance(pad, int):
        hu[raw == pad] = -1000.0
    return hu


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


def read_ct_series(folder: Path, root: Path | None = None) -> CtSeries:
    """Read every file in `folder` as one CT series; never raises for bad input.

    `root` only shortens file names in problem messages (paths relative to the site root).
    """
    folder = Path(folder)
    frel = _rel(folder, root)
    problems: list[DataProblem] = []

    def fail(extra: list[DataProblem] | None = None) -> CtSeries:
        return CtSeries(None, None, None, problems=problems + (extra or []))

    files = sorted(p for p in folder.iterdir() if _is_candidate(p)) if folder.is_dir() else []
    if not files:
        return fail([DataProblem("ct.empty", f"{frel}: no files in CT folder", frel)])

    headers: list[tuple[Path, FileDataset]] = []
    for path in files:
        rel = _rel(path, root)
        ds, prob = _read_header(path, rel)
        if ds is None:
            problems.extend([prob] if prob else [])
            continue
        problems.extend(_header_problems(ds, rel))
        headers.append((path, ds))
    problems = _collapse(problems)
    ident = _identifying([ds for _, ds in headers], frel)
    if ident:
        problems.append(ident)

    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series_uids) > 1:
        problems.append(DataProblem("case.duplicate", f"{frel}: {len(series_uids)} series "
                                    "(SeriesInstanceUID) in one case folder; expected one",
                                    frel, "SeriesInstanceUID"))
    if any(p.fatal for p in problems):
        return fail()
    if len(headers) < MIN_SLICES:
        return fail([DataProblem("ct.too_few_slices", f"{frel}: {len(headers)} slice(s), need "
                                 f">= {MIN_SLICES}", frel)])

    # Geometry consistency.
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        return fail([DataProblem("ct.inconsistent_orientation", f"{frel}: "
                                 "ImageOrientationPatient differs between slices", frel,
                                 "ImageOrientationPatient")])
    pxs = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in headers])
    if np.abs(pxs - pxs[0]).max() > SPACING_TOL:
        return fail([DataProblem("ct.inconsistent_spacing", f"{frel}: PixelSpacing differs "
                                 f"between slices ({sorted({tuple(p) for p in pxs})})", frel,
                                 "PixelSpacing")])
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(shapes) > 1:
        return fail([DataProblem("ct.inconsistent_shape", f"{frel}: slice sizes differ "
                                 f"{sorted(shapes)}", frel, "Rows")])
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        return fail([DataProblem("ct.bad_orientation", f"{frel}: ImageOrientationPatient is "
                                 "not two orthonormal vectors", frel, "ImageOrientationPatient")])
    normal /= np.linalg.norm(normal)

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    headers = [headers[i] for i in order]
    positions, offsets = positions[order], offsets[order]
    gaps = np.diff(offsets)
    if gaps.min() < 1e-3:
        return fail([DataProblem("ct.duplicate_slices", f"{frel}: two slices at the same "
                                 "position", frel, "ImagePositionPatient")])
    # All positions must lie on one line (the stacking direction).
    stack = positions[-1] - positions[0]
    stack_unit = stack / np.linalg.norm(stack)
    resid = (positions - positions[0]) - np.outer((positions - positions[0]) @ stack_unit,
                                                  stack_unit)
    if np.linalg.norm(resid, axis=1).max() > 0.5 * float(pxs[0].min()):
        return fail([DataProblem("ct.inconsistent_positions", f"{frel}: slice positions are not "
                                 "on one line", frel, "ImagePositionPatient")])

    holes = _holes(gaps)
    if holes:
        desc = ", ".join(f"{gaps[i]:.2f} mm after slice {i + 1}" for i in holes)
        return fail([DataProblem("ct.missing_slices", f"{frel}: gap(s) of about twice the "
                                 f"regular step: {desc}", frel, "ImagePositionPatient")])
    step = float(np.median(gaps))
    uneven = bool(np.abs(gaps - step).max() > UNEVEN_REL_TOL * step)
    if uneven:
        distinct = sorted({round(float(g), 2) for g in gaps})
        problems.append(DataProblem("ct.uneven_spacing", f"{frel}: uneven slice gaps "
                                    f"{distinct} mm (median {step:.2f}); interpolated to a "
                                    f"uniform {step:.2f} mm step", frel, "ImagePositionPatient",
                                    fatal=False))

    cos_t = float(np.clip(abs(stack_unit @ normal), -1.0, 1.0))
    tilt = math.degrees(math.acos(cos_t))
    tag_tilt = float(headers[0][1].get("GantryDetectorTilt", 0) or 0)
    if tilt > TILT_MIN_DEG or abs(tag_tilt) > TILT_MIN_DEG:
        problems.append(DataProblem("ct.gantry_tilt", f"{frel}: gantry tilt {tag_tilt:.1f} deg "
                                    f"(GantryDetectorTilt), slices stacked {tilt:.1f} deg off "
                                    "their normal; geometry corrected with a sheared affine",
                                    frel, "GantryDetectorTilt", fatal=False))

    # Pixels, in sorted order.
    slices = []
    for path, _ in headers:
        rel = _rel(path, root)
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                return fail([DataProblem("dicom.no_pixel_data", f"{rel}: no PixelData element",
                                         rel, "PixelData")])
            slices.append(_slice_hu(ds))
        except _READ_ERRORS as e:
            return fail([DataProblem("dicom.unreadable", f"{rel}: pixel data unreadable "
                                     f"({type(e).__name__})", rel, "PixelData")])
    if any(s.shape != slices[0].shape for s in slices):
        return fail([DataProblem("ct.inconsistent_shape", f"{frel}: decoded slice sizes differ",
                                 frel, "PixelData")])
    hu = np.stack(slices)  # (Z, Y, X)
    # Stacking vector per unit step along the normal (includes the tilt shear).
    along = stack / (offsets[-1] - offsets[0])
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
    return CtSeries(hu.astype(np.float32, copy=False), affine, (step, row_sp, col_sp),
                    offsets, tilt, series_uids[0], problems)

"""Read one DICOM file's header, bounded, and parse what a CT volume needs into checked numbers.

This is the "check" stage of the CT read path for a single instance: every numeric header value
is parsed and range-checked here (finite, positive and plausible spacing, an orthonormal
orientation, a non-zero rescale slope, a matrix and decoded size within budget), so the geometry
code downstream only ever sees checked numbers. Classic CT (one frame per file) and Enhanced CT
(one multi-frame object, geometry and rescale in the per-frame and shared functional groups,
PS3.3 C.7.6.16) give the same `FrameGeom` list.

Reads are bounded before anything decodes: the file size is capped, a deflated transfer syntax is
inflated with an output cap first (pydicom inflates the whole file at once), and the pixel data is
never touched here (`stop_before_pixels`).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
)

from hospital_node.site_files import SiteFile
from vocab.errors import DataProblem

MAX_FILE_BYTES = 1 << 30        # one DICOM file; an Enhanced CT of 1000 512x512 frames is 0.5 GiB
MAX_INFLATE_BYTES = 256 << 20   # a deflated dataset (rare for CT; a 512x512 slice is 0.5 MB)
MIN_MATRIX, MAX_MATRIX = 16, 4096
MAX_FRAMES = 5000
PIXEL_SPACING_MM = (0.01, 20.0)  # in-plane; CT is 0.2-1.5 mm, 20 mm is already absurd
MAX_POSITION_MM = 1e5            # |coordinate| in patient space (100 m)
SLOPE_RANGE = (1e-6, 1e6)        # |RescaleSlope|
MAX_INTERCEPT = 1e6
ORTHO_TOL = 1e-2                 # direction cosines: unit length and orthogonal within this
BITS_ALLOWED = (8, 16, 32)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC, multi-frame SC
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"               # DICOMDIR
SUPPORTED_SOP = (CTImageStorage, EnhancedCTImageStorage)
# Errors pydicom raises while parsing malformed files (never a programming error of ours):
# LookupError covers an unknown SpecificCharacterSet, struct/zlib/Overflow bad binary data.
READ_ERRORS = (InvalidDicomError, BytesLengthException, EOFError, OSError, ValueError,
               LookupError, TypeError, AttributeError, NotImplementedError, RuntimeError,
               struct.error, zlib.error, OverflowError, RecursionError)
DICM_OFFSET = 128


class HeaderError(Exception):
    """A header value that is missing or out of range: code, DICOM keyword, message."""

    def __init__(self, code: str, keyword: str, message: str) -> None:
        super().__init__(message)
        self.code, self.keyword = code, keyword


@dataclass(frozen=True)
class FrameGeom:
    """One 2D frame: where it sits and how its stored values become HU."""

    position: tuple[float, float, float]       # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, ...]             # ImageOrientationPatient, 6 direction cosines
    spacing: tuple[float, float]               # PixelSpacing: between rows, between columns
    slope: float
    intercept: float
    index: int = 0                             # frame number inside its file (0 for classic)


@dataclass
class Instance:
    """One readable DICOM image file of a CT case folder (header only, checked)."""

    file: SiteFile
    series_uid: str
    sop_uid: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    series_number: int | None
    rows: int
    columns: int
    bits_allocated: int
    slice_thickness: float | None
    tilt_deg: float = 0.0                      # GantryDetectorTilt (0 when absent or bad)
    transfer_syntax_compressed: bool = True    # unknown counts as compressed (no size check)
    body_region: str = ""                      # body_region(): a fixed word, never header text
    frames: list[FrameGeom] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)  # fatal ones disqualify it

    @property
    def enhanced(self) -> bool:
        return self.sop_class == EnhancedCTImageStorage

    @property
    def decoded_bytes(self) -> int:
        return self.rows * self.columns * max(1, len(self.frames)) * self.bits_allocated // 8


def is_dicom_file(f: SiteFile) -> bool:
    """Part 10 magic ('DICM' after the 128-byte preamble). Exports without it are not accepted."""
    try:
        with f.path.open("rb") as fh:
            head = fh.read(DICM_OFFSET + 4)
    except OSError:
        return False
    return len(head) == DICM_OFFSET + 4 and head[DICM_OFFSET:] == b"DICM"


MAX_META_ELEMENT = 1 << 16  # one file-meta element; real ones are < 100 bytes


def _file_meta(path: Path) -> tuple[str, int]:
    """(TransferSyntaxUID, offset where the dataset starts) from the Part 10 file meta group.

    Parsed here, bounded, because pydicom's meta reader trusts the group length and element
    lengths it finds (a flipped byte there reads gigabytes). Explicit VR little endian, always.
    """
    ts, offset = "", DICM_OFFSET + 4
    with path.open("rb") as fh:
        fh.seek(offset)
        while True:
            head = fh.read(8)
            if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
                return ts, offset
            elem, vr = struct.unpack("<H", head[2:4])[0], head[4:6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                more = fh.read(4)
                if len(more) < 4:
                    return ts, offset
                length, size = struct.unpack("<I", more)[0], 12
            else:
                length, size = struct.unpack("<H", head[6:8])[0], 8
            if length > MAX_META_ELEMENT:
                raise HeaderError("dicom.unreadable", "FileMetaInformationGroupLength",
                                  f"file meta element of {length} bytes")
            value = fh.read(length)
            if elem == 0x0010:
                ts = value.rstrip(b"\x00 ").decode("ascii", "replace")
            offset += size + length


def _inflated_size_ok(f: SiteFile) -> bool:
    """For a deflated dataset: does it inflate to at most MAX_FILE_BYTES? (Others: True.)"""
    ts, start = _file_meta(f.path)
    if ts != DeflatedExplicitVRLittleEndian:
        return True
    with f.path.open("rb") as fh:
        fh.seek(start)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(1 << 20):
            # At most 1 MiB of output per call, counted and dropped: a bomb stops at the
            # budget without ever holding more than a megabyte of it.
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > MAX_INFLATE_BYTES:
                    return False
                chunk = inflater.unconsumed_tail
    return True


class _ClampedReader(io.BufferedReader):
    """A file whose read(n) never asks for more than what is left in it.

    pydicom reads an element's value with `read(length)` using the length written in the file;
    CPython allocates `length` bytes before reading, so two flipped bytes in a length field
    (0x9283xxxx) cost gigabytes for a 500 KB file. Clamping n to the bytes left keeps every
    allocation within the file size, which is capped (MAX_FILE_BYTES).
    """

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n >= 0:
            n = min(n, max(0, self._size - self.tell()))
        return super().read(n)


def _check_caps(f: SiteFile) -> None:
    if f.size > MAX_FILE_BYTES:
        raise HeaderError("dicom.too_large", "", f"{f.size} bytes, over the {MAX_FILE_BYTES} "
                          "byte limit per file")
    if not _inflated_size_ok(f):
        raise HeaderError("dicom.too_large", "TransferSyntaxUID", "deflated data inflates to "
                          f"more than {MAX_INFLATE_BYTES} bytes")


def read_dataset(f: SiteFile, *, pixels: bool) -> Dataset:
    """pydicom read with the file-size and inflation caps; raises READ_ERRORS or HeaderError."""
    _check_caps(f)
    with _ClampedReader(f.path, f.size) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns per odd value; we check values ourselves
        return pydicom.dcmread(fh, stop_before_pixels=not pixels)


def read_header(f: SiteFile) -> tuple[Dataset, bool]:
    """(header without pixel data, whether the file goes on past the header).

    pydicom parses a file cut short leniently, as a header that simply ends; a file whose parse
    reaches end-of-file never got to its pixel data (truncated, or no image at all).
    """
    _check_caps(f)
    with _ClampedReader(f.path, f.size) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        more = fh.tell() < f.size
    return ds, more


def _finite(values: list[float], keyword: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} is not a finite number")


def floats(ds: Dataset, keyword: str, n: int, *, required: bool = True) -> tuple[float, ...] | None:
    """n finite floats from a (multi-)valued element; HeaderError when missing or malformed."""
    try:
        raw = ds[keyword].value if keyword in ds else None
    except READ_ERRORS:  # pydicom converts DS/IS lazily: 'abc' raises here
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} is not numeric") from None
    if raw is None or raw == "":
        if required:
            raise HeaderError("dicom.missing_geometry", keyword, f"{keyword} missing")
        return None
    seq = list(raw) if isinstance(raw, list | tuple) or hasattr(raw, "__iter__") and not \
        isinstance(raw, str | bytes) else [raw]
    if len(seq) != n:
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} has {len(seq)} value(s), "
                          f"expected {n}")
    try:
        out = [float(v) for v in seq]
    except (TypeError, ValueError):
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} is not numeric") from None
    _finite(out, keyword)
    return tuple(out)


def _int(ds: Dataset, keyword: str, lo: int, hi: int) -> int:
    try:
        raw = ds[keyword].value if keyword in ds else None
    except READ_ERRORS:
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} is not an integer") from None
    if raw is None or raw == "":
        raise HeaderError("dicom.missing_geometry", keyword, f"{keyword} missing")
    try:
        v = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} is not an integer") from None
    if not lo <= v <= hi:
        raise HeaderError("dicom.bad_value", keyword, f"{keyword} = {v} outside {lo}-{hi}")
    return v


def check_orientation(iop: tuple[float, ...]) -> None:
    r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
    if (abs(np.linalg.norm(r) - 1) > ORTHO_TOL or abs(np.linalg.norm(c) - 1) > ORTHO_TOL
            or abs(float(r @ c)) > ORTHO_TOL):
        raise HeaderError("ct.bad_orientation", "ImageOrientationPatient",
                          "ImageOrientationPatient is not two orthonormal unit vectors")


def check_spacing(sp: tuple[float, ...]) -> None:
    lo, hi = PIXEL_SPACING_MM
    if not all(lo <= v <= hi for v in sp):
        raise HeaderError("dicom.bad_value", "PixelSpacing", f"PixelSpacing {list(sp)} mm "
                          f"outside the plausible {lo}-{hi} mm")


def check_position(pos: tuple[float, ...]) -> None:
    if max(abs(v) for v in pos) > MAX_POSITION_MM:
        raise HeaderError("dicom.bad_value", "ImagePositionPatient", "ImagePositionPatient "
                          f"beyond {MAX_POSITION_MM:g} mm")


def rescale(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept); absent means identity (some scanners store HU directly)."""
    s = floats(ds, "RescaleSlope", 1, required=False)
    i = floats(ds, "RescaleIntercept", 1, required=False)
    slope = s[0] if s else 1.0
    intercept = i[0] if i else 0.0
    if not SLOPE_RANGE[0] <= abs(slope) <= SLOPE_RANGE[1]:
        raise HeaderError("dicom.bad_value", "RescaleSlope", f"RescaleSlope {slope:g} is zero "
                          "or implausible")
    if abs(intercept) > MAX_INTERCEPT:
        raise HeaderError("dicom.bad_value", "RescaleIntercept", f"RescaleIntercept "
                          f"{intercept:g} implausible")
    return slope, intercept


def _group(fg: Dataset, seq: str) -> Dataset | None:
    """First item of a functional-group macro sequence, if present."""
    if seq in fg and fg[seq].VR == "SQ" and len(fg[seq].value) > 0:
        return fg[seq].value[0]
    return None


def _enhanced_frames(ds: Dataset, n_frames: int) -> list[FrameGeom]:
    """Per-frame geometry and rescale: a macro in the per-frame item wins over the shared one."""
    shared = _group(ds, "SharedFunctionalGroupsSequence") or Dataset()
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) != n_frames:
        raise HeaderError("dicom.missing_geometry", "PerFrameFunctionalGroupsSequence",
                          f"PerFrameFunctionalGroupsSequence has {0 if per is None else len(per)}"
                          f" item(s), NumberOfFrames is {n_frames}")

    def macro(item: Dataset, seq: str) -> Dataset:
        got = _group(item, seq) or _group(shared, seq)
        if got is None:
            raise HeaderError("dicom.missing_geometry", seq, f"{seq} missing (per-frame and "
                              "shared functional groups)")
        return got

    frames = []
    for k, item in enumerate(per):
        pos = floats(macro(item, "PlanePositionSequence"), "ImagePositionPatient", 3)
        iop = floats(macro(item, "PlaneOrientationSequence"), "ImageOrientationPatient", 6)
        sp = floats(macro(item, "PixelMeasuresSequence"), "PixelSpacing", 2)
        pvt = _group(item, "PixelValueTransformationSequence") or _group(
            shared, "PixelValueTransformationSequence") or Dataset()
        slope, intercept = rescale(pvt)
        frames.append(FrameGeom(pos, iop, sp, slope, intercept, k))  # type: ignore[arg-type]
    return frames


def _classic_frame(ds: Dataset) -> FrameGeom:
    pos = floats(ds, "ImagePositionPatient", 3)
    iop = floats(ds, "ImageOrientationPatient", 6)
    sp = floats(ds, "PixelSpacing", 2)
    slope, intercept = rescale(ds)
    return FrameGeom(pos, iop, sp, slope, intercept)  # type: ignore[arg-type]


def transfer_syntax_problem(ds: Dataset, rel: str) -> DataProblem | None:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not ts:
        return DataProblem("dicom.unsupported_transfer_syntax", f"{rel}: no TransferSyntaxUID "
                           "in file meta", rel, "TransferSyntaxUID")
    try:
        available = get_decoder(UID(str(ts))).is_available
    except (NotImplementedError, ValueError):
        available = False
    if available:
        return None
    name = UID(str(ts)).name
    retired = " (a retired transfer syntax)" if UID(str(ts)).is_retired else ""
    return DataProblem("dicom.unsupported_transfer_syntax", f"{rel}: transfer syntax "
                       f"{name}{retired} cannot be decoded here", rel, "TransferSyntaxUID")


def _text(ds: Dataset, keyword: str) -> str:
    try:
        v = ds.get(keyword, "")
        return str(v if v is not None else "").strip()
    except READ_ERRORS:
        return ""


# Body region named by the header (BodyPartExamined, ProtocolName, Study/SeriesDescription),
# reduced to a fixed word so that no header text travels further (it may hold anything).
# Substrings for words that are unambiguous inside compounds ("CHESTABDPELVIS"), whole tokens
# for short ones ("HEAD" but not "FOREHEAD"-like accidents). Chest wins: a trauma or
# chest-abdomen-pelvis study contains the chest.
REGION_TEXT_TAGS = ("BodyPartExamined", "ProtocolName", "StudyDescription", "SeriesDescription")
_CHEST_SUBSTR = ("CHEST", "THORA", "LUNG", "PULMO", "WHOLEBODY")
_CHEST_TOKENS = frozenset({"THX", "TORAX", "THORAX", "WB"})
_OTHER_REGIONS: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    ("head", ("BRAIN", "SKULL", "CRANI", "NEURO", "ORBIT", "SINUS", "MAXILLOFAC", "CEREB"),
     frozenset({"HEAD", "IAC", "FACE"})),
    ("neck", ("CERVICAL",), frozenset({"NECK"})),
    ("abdomen", ("ABDOM", "LIVER", "KIDNEY", "RENAL", "PANCREA"), frozenset({"ABD"})),
    ("pelvis", ("PELVI",), frozenset({"HIP"})),
    ("spine", ("SPINE",), frozenset()),
    ("extremity", ("EXTREMIT", "KNEE", "ANKLE", "WRIST", "ELBOW", "SHOULDER", "FOOT", "HAND"),
     frozenset({"ARM", "LEG"})),
)


def body_region(ds: Dataset) -> str:
    """'chest', another region word ('head', 'neck', 'abdomen', 'pelvis', 'spine',
    'extremity') or '' when the header names none (absent or uninformative text)."""
    text = " ".join(_text(ds, k) for k in REGION_TEXT_TAGS).upper()
    if not text.strip():
        return ""
    squashed = "".join(ch for ch in text if ch.isalpha())
    tokens = set("".join(ch if ch.isalpha() else " " for ch in text).split())
    if any(w in squashed for w in _CHEST_SUBSTR) or tokens & _CHEST_TOKENS:
        return "chest"
    for region, substr, toks in _OTHER_REGIONS:
        if any(w in squashed for w in substr) or tokens & toks:
            return region
    return ""


def parse_instance(f: SiteFile, ds: Dataset) -> Instance:
    """Checked Instance from a header; problems (with codes) say what disqualifies it."""
    rel = f.rel
    sop_class = _text(ds, "SOPClassUID")
    try:
        raw_type = ds.get("ImageType") or ()
        image_type = tuple(str(v).upper() for v in (
            [raw_type] if isinstance(raw_type, str) else raw_type))
    except READ_ERRORS:
        image_type = ()
    number = None
    try:
        number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except READ_ERRORS:  # IS 'inf' raises OverflowError inside pydicom
        number = None
    inst = Instance(f, _text(ds, "SeriesInstanceUID"), _text(ds, "SOPInstanceUID"),
                    _text(ds, "Modality"), sop_class, image_type, number, 0, 0, 0, None)
    inst.body_region = body_region(ds)
    if inst.modality != "CT":
        inst.problems.append(DataProblem("dicom.not_ct", f"{rel}: Modality is "
                                         f"{inst.modality or 'missing'!r}, expected 'CT'", rel,
                                         "Modality"))
        return inst
    if sop_class not in SUPPORTED_SOP:
        name = UID(sop_class).name if sop_class else "missing"
        code = ("dicom.secondary_capture" if sop_class.startswith(SECONDARY_CAPTURE_PREFIX)
                else "dicom.unsupported_sop_class")
        inst.problems.append(DataProblem(code, f"{rel}: SOP class {name}; only CT Image "
                                         "Storage and Enhanced CT Image Storage are read", rel,
                                         "SOPClassUID"))
        return inst
    try:
        inst.rows = _int(ds, "Rows", MIN_MATRIX, MAX_MATRIX)
        inst.columns = _int(ds, "Columns", MIN_MATRIX, MAX_MATRIX)
        inst.bits_allocated = _int(ds, "BitsAllocated", 8, 32)
        if inst.bits_allocated not in BITS_ALLOWED:
            raise HeaderError("dicom.bad_value", "BitsAllocated", f"BitsAllocated "
                              f"{inst.bits_allocated} not one of {list(BITS_ALLOWED)}")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise HeaderError("dicom.bad_value", "SamplesPerPixel", "SamplesPerPixel is not 1 "
                              "(CT is monochrome)")
        thick = floats(ds, "SliceThickness", 1, required=False)
        inst.slice_thickness = thick[0] if thick and thick[0] > 0 else None
        tilt = floats(ds, "GantryDetectorTilt", 1, required=False)
        inst.tilt_deg = tilt[0] if tilt and abs(tilt[0]) <= 90 else 0.0
        if inst.enhanced:
            n = _int(ds, "NumberOfFrames", 1, MAX_FRAMES)
            inst.frames = _enhanced_frames(ds, n)
        else:
            inst.frames = [_classic_frame(ds)]
        for fr in inst.frames:
            check_orientation(fr.orientation)
            check_spacing(fr.spacing)
            check_position(fr.position)
    except HeaderError as e:
        inst.problems.append(DataProblem(e.code, f"{rel}: {e}", rel, e.keyword))
        inst.frames = []
        return inst
    except READ_ERRORS as e:  # a value pydicom cannot even convert (bad VR, broken sequence)
        inst.problems.append(DataProblem("dicom.bad_value", f"{rel}: malformed header value "
                                         f"({type(e).__name__})", rel))
        inst.frames = []
        return inst
    ts = transfer_syntax_problem(ds, rel)
    if ts:
        inst.problems.append(ts)
    else:
        uid = UID(str(ds.file_meta.TransferSyntaxUID))
        inst.transfer_syntax_compressed = uid.is_compressed or uid.is_deflated
    return inst

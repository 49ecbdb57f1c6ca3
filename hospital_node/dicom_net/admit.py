"""What the DICOM entry accepts, decided from the header before any pixel is decoded.

CT only (classic and Enhanced CT Image Storage), transfer syntaxes pydicom can decode here,
and a decoded-size budget: Rows x Columns x frames x samples x BitsAllocated / 8 is checked
against `max_pixel_bytes` before anything inflates or decodes pixels (pydicom decodes RLE and
deflate to full size before one could look).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

CT_SOP_CLASSES: Final = (uid.CTImageStorage, uid.EnhancedCTImageStorage)
# Proposed in this order of preference; filtered by what this installation decodes. Big endian
# (retired) and video syntaxes are not offered.
CANDIDATE_SYNTAXES: Final = (
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless, uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless,
    uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
)


@dataclass(frozen=True)
class Status:
    """A C-STORE response status with a stable code for logs (never patient values)."""

    value: int
    code: str


SUCCESS: Final = Status(0x0000, "stored")
DUPLICATE: Final = Status(0x0000, "duplicate")  # already durable: success, stored once
SOP_CLASS_NOT_SUPPORTED: Final = Status(0x0122, "refused.sop_class")
OUT_OF_RESOURCES: Final = Status(0xA700, "refused.out_of_resources")
TOO_LARGE: Final = Status(0xA700, "refused.pixel_budget")
NOT_CT: Final = Status(0xA900, "refused.not_ct")  # data set does not match SOP class
CANNOT_UNDERSTAND: Final = Status(0xC000, "refused.cannot_understand")
BURNED_IN: Final = Status(0xC001, "refused.burned_in_annotation")
NO_STUDY: Final = Status(0xC002, "refused.no_study_uid")


def decodable_syntaxes() -> tuple[str, ...]:
    """The candidate transfer syntaxes this installation can decode (pylibjpeg etc.)."""
    out = []
    for ts in CANDIDATE_SYNTAXES:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return tuple(out)


def pixel_bytes(ds: Dataset) -> int | None:
    """Decoded pixel size from the header; None when Rows/Columns/BitsAllocated are unusable."""
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if min(rows, cols, bits, frames, samples) <= 0:
        return None
    return rows * cols * frames * samples * bits // 8


def check(ds: Dataset, context_sop_class: str, max_pixel_bytes: int) -> Status | None:
    """None when the instance may be stored, else the refusal status."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in CT_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED
    if sop != context_sop_class or str(ds.get("Modality", "")) != "CT":
        return NOT_CT
    if not str(ds.get("StudyInstanceUID", "") or "").strip():
        return NO_STUDY
    if "PixelData" not in ds:
        return CANNOT_UNDERSTAND
    size = pixel_bytes(ds)
    if size is None:
        return CANNOT_UNDERSTAND
    if size > max_pixel_bytes:
        return TOO_LARGE
    # Burned-in text cannot be removed by header de-identification (PS3.15 E.1: pixel cleaning
    # is a separate option this entry does not implement): refuse rather than keep it.
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return BURNED_IN
    return None


def inflate_bounded(raw: bytes, limit: int) -> bytes | None:
    """Inflate a Deflated Explicit VR Little Endian data set; None past `limit` bytes."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or d.unconsumed_tail:
        return None
    return out

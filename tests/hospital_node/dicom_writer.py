"""Test helper: write small CT/MR series, tiles and CSVs the way a scanner/hospital would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

INTERCEPT = -1024.0


def sphere_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  centre_vox: tuple[float, float, float], radius_mm: float,
                  inside: float = 60.0, outside: float = -1000.0) -> np.ndarray:
    """(Z, Y, X) HU volume with a ball of `inside` HU around a voxel position."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre_vox, spacing,
                                                   strict=True))
    return np.where(d2 <= radius_mm**2, inside, outside).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float] = (2.5, 1, 1),
                 origin: tuple[float, float, float] = (-32.0, -32.0, -20.0), *,
                 modality: str = "CT", offsets: list[float] | None = None,
                 series_uid: str | None = None, identifying: bool = False,
                 order: list[int] | None = None, tilt_tag: float | None = None) -> list[Path]:
    """One axial series (IOP 1,0,0,0,1,0). Slice k sits at origin z + offsets[k] (default
    k * spacing[0]); files are numbered in `order` (default shuffled-free 0..N-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    z, rows, cols = hu.shape
    offs = offsets if offsets is not None else [k * spacing[0] for k in range(z)]
    uid = series_uid or generate_uid()
    study = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    paths = []
    for n, k in enumerate(order if order is not None else range(z)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + offs[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, INTERCEPT
        if tilt_tag is not None:
            ds.GantryDetectorTilt = tilt_tag
        if identifying:
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-77", "19500101"
        ds.PixelData = np.round(hu[k] - INTERCEPT).astype(np.int16).tobytes()
        path = folder / f"{n + 1:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_tile(path: Path, size: int = 96, mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(size)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    rgb[..., 0] = 230  # pinkish
    img = Image.fromarray(rgb, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if mode == "RGB" else img.convert(mode)).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    lines = [",".join(header)] + [",".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """mtime_ns and sha256 of every file under root."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_enhanced(path: Path, hu: np.ndarray, spacing: tuple[float, float, float] = (2.5, 1, 1),
                   origin: tuple[float, float, float] = (-32.0, -32.0, -20.0),
                   image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL", "NONE")
                   ) -> Path:
    """One Enhanced CT object (multi-frame) as current scanners export it: orientation, pixel
    measures and rescale in the shared functional groups, each frame's position in its own."""
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    z, rows, cols = hu.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", list(image_type)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), generate_uid(), 3
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, z
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def item(**kw: object) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    shared.PixelMeasuresSequence = Sequence([item(PixelSpacing=[spacing[1], spacing[2]],
                                                  SliceThickness=spacing[0])])
    shared.PixelValueTransformationSequence = Sequence([item(
        RescaleSlope=1, RescaleIntercept=INTERCEPT, RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(z):
        fg = Dataset()
        fg.PlanePositionSequence = Sequence([item(ImagePositionPatient=[
            origin[0], origin[1], origin[2] + k * spacing[0]])])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.round(hu - INTERCEPT).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path

"""Chest CT phantom with nodules, written as a DICOM series the way a scanner writes one.

Coordinates are DICOM patient coordinates (LPS, mm): +x towards the patient's left, +y posterior,
+z superior. Axial slices, ImageOrientationPatient (1,0,0,0,1,0): column index -> +x, row
index -> +y. InstanceNumber 1 is the most superior slice; z decreases with the instance number.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from synth.config import SiteConfig, SynthConfig
from synth.model import sigmoid

# Tissue values in HU before the site's offset and noise.
AIR, FAT, SOFT, BLOOD, LUNG = -1000.0, -100.0, 40.0, 45.0, -850.0
CORTICAL, CANCELLOUS, RIB = 700.0, 250.0, 650.0
HU_MIN, HU_MAX = -1024.0, 3071.0
RESCALE_INTERCEPT = -1024.0
# Deterministic UID root (pydicom's registered example root); entropy makes each UID unique.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_UID = generate_uid(UID_PREFIX, entropy_srcs=["fedsight-synth-implementation"])


@dataclass(frozen=True)
class Lesion:
    """A nodule in patient mm; kind 'index' (carries CT risk) or 'granuloma' (calcified)."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    kind: str
    hu: float
    spiculation: float  # spike length as a fraction of the radius (0 = smooth)


@dataclass(frozen=True)
class Geometry:
    """Where the voxels are: voxel (k, r, c) -> (x0 + c*dx, y0 + r*dx, z0 - k*dz)."""

    n_slices: int
    matrix: int
    pixel_mm: float
    slice_mm: float
    origin_mm: tuple[float, float, float]  # ImagePositionPatient of slice 1 (top-left pixel)

    def z_of(self, k: np.ndarray | int) -> np.ndarray:
        return self.origin_mm[2] - np.asarray(k, dtype=np.float64) * self.slice_mm

    def voxel_of(self, p_mm: tuple[float, float, float]) -> tuple[int, int, int]:
        """Nearest voxel (slice, row, column) of a patient-mm point."""
        x0, y0, z0 = self.origin_mm
        return (
            round((z0 - p_mm[2]) / self.slice_mm),
            round((p_mm[1] - y0) / self.pixel_mm),
            round((p_mm[0] - x0) / self.pixel_mm),
        )


def _smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian-correlated noise (FFT filter), for tissue texture."""
    white = rng.standard_normal(shape)
    spec = np.fft.rfftn(white)
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    f2 = sum(f * f for f in freqs)
    field = np.fft.irfftn(spec * np.exp(-2.0 * (np.pi * sigma_vox) ** 2 * f2), s=shape)
    return (field / (field.std() + 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class _Body:
    """Patient-specific anatomy sizes (mm) and centring; shapes are analytic in these."""

    cx: float
    cy: float
    a: float  # body half-width
    b: float  # body half-depth
    fat: float

    def lungs(self, u: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Lung mask; t in [0, 1] from apex (top) to the diaphragm (bottom)."""
        scale = np.clip(np.sqrt(np.clip(t, 0, None) / 0.3), 0, 1) * np.clip((0.97 - t) / 0.17, 0, 1)
        ai, bi = self.a - self.fat, self.b - self.fat
        lx, ly = 0.47 * ai, -0.05 * bi
        sa, sb = 0.36 * ai * scale + 1e-6, 0.66 * bi * scale + 1e-6
        left = ((u - lx) / sa) ** 2 + ((v - ly) / sb) ** 2 <= 1.0
        right = ((u + lx) / sa) ** 2 + ((v - ly) / sb) ** 2 <= 1.0
        return left | right

    def heart(self, u: np.ndarray, v: np.ndarray, t: np.ndarray, margin: float = 0.0) -> np.ndarray:
        hs = np.clip(np.sin(np.pi * np.clip((t - 0.42) / 0.5, 0, 1)), 0, 1) + 1e-6
        ha, hb = 0.30 * self.a * hs + margin, 0.34 * self.b * hs + margin
        return ((u - 0.08 * self.a) / ha) ** 2 + ((v + 0.22 * self.b) / hb) ** 2 <= 1.0


def _render_anatomy(
    body: _Body, geom: Geometry, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) HU volume of the chest without lesions, and the lung mask."""
    n, m = geom.n_slices, geom.matrix
    x = (geom.origin_mm[0] + np.arange(m) * geom.pixel_mm).astype(np.float32)
    y = (geom.origin_mm[1] + np.arange(m) * geom.pixel_mm).astype(np.float32)
    u = (x - body.cx)[None, None, :]
    v = (y - body.cy)[None, :, None]
    z = geom.z_of(np.arange(n))[:, None, None].astype(np.float32)
    t = (np.arange(n)[:, None, None] / max(n - 1, 1)).astype(np.float32)
    a = body.a * (0.9 + 0.1 * t)  # the chest widens towards the abdomen
    b = body.b * (0.92 + 0.08 * t)
    ai, bi = a - body.fat, b - body.fat
    outer = (u / a) ** 2 + (v / b) ** 2
    inner = (u / ai) ** 2 + (v / bi) ** 2
    hu = np.full((n, m, m), AIR, np.float32)
    hu[np.broadcast_to(outer <= 1.0, hu.shape)] = FAT
    hu[np.broadcast_to(inner <= 1.0, hu.shape)] = SOFT
    lung = body.lungs(u, v, t) & (inner <= 1.0)
    # Parenchyma texture: one smooth 2D field, shifted per slice (a 3D FFT cost ~40 ms/case).
    tex2d = _smooth_noise((m, m), 1.5, rng)
    shifts = rng.integers(0, m, (n, 2))
    tex = np.stack([np.roll(tex2d, tuple(sh), (0, 1)) for sh in shifts])
    hu = np.where(lung, LUNG + 25.0 * tex, hu)
    hu = np.where(body.heart(u, v, t), SOFT + 8.0 * tex, hu)
    aorta = ((u - 0.12 * body.a) ** 2 + (v - 0.42 * body.b) ** 2 <= 12.0**2) & (t > 0.12)
    hu = np.where(aorta, BLOOD, hu)
    sr = 0.15 * body.b
    sv = (u**2 + (v - 0.66 * body.b) ** 2) / sr**2
    hu = np.where(sv <= 1.0, CORTICAL, hu)
    hu = np.where(sv <= 0.6, CANCELLOUS, hu)
    # Ribs: a ring just inside the fat, interrupted anteriorly, repeating every ~22 mm in z.
    ring = (inner <= 1.0) & ((u / (ai - 9.0)) ** 2 + (v / (bi - 9.0)) ** 2 >= 1.0)
    angle = np.abs(np.arctan2(u, -v))  # 0 = anterior midline
    rib_z = np.mod(z + 7.0, 22.0) < 8.0
    segments = np.sin(7.0 * angle + 0.25 * z) > -0.2  # a slice cuts ribs obliquely: arcs
    hu = np.where(ring & (angle > 0.45) & rib_z & segments, RIB, hu)
    lung_mask = np.broadcast_to(lung, hu.shape) & (hu < -500.0)
    return hu, lung_mask


def fibrosis_severity(score: float) -> tuple[float, float]:
    """(amplitude HU, extent) of the basal fibrosis pattern for a fibrosis CT score t_ct.

    Both increase monotonically: amplitude 25 + 55 softplus(1.2 t) HU (~30 at t=-2, ~63 at 0,
    ~160 at 2, capped at 200); extent = fraction of the scan above its bottom that is involved,
    0.20 + 0.25 sigmoid(1.2 t) (0.22 .. 0.45), plus a 0.08 ramp: the pattern never reaches above
    44 % of the scan from the apex, so the upper lungs stay clear whatever the score.
    """
    amp = float(min(25.0 + 55.0 * np.logaddexp(0.0, 1.2 * score), 200.0))
    return amp, float(0.20 + 0.25 * sigmoid(1.2 * score))


def _band_noise(
    shape: tuple[int, ...], s_fine: float, s_coarse: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance band-passed noise (difference of Gaussian filters of one white field)."""
    spec = np.fft.rfftn(rng.standard_normal(shape))
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    f2 = sum(f * f for f in freqs)
    gain = np.exp(-2.0 * (np.pi * s_fine) ** 2 * f2) - np.exp(-2.0 * (np.pi * s_coarse) ** 2 * f2)
    field = np.fft.irfftn(spec * gain, s=shape)
    return field / (field.std() + 1e-12)


def _paint_fibrosis(
    hu: np.ndarray,
    lung: np.ndarray,
    body: _Body,
    geom: Geometry,
    score: float,
    rng: np.random.Generator,
) -> None:
    """Add basal, posterior-weighted reticulation + ground glass to lung voxels (in place).

    Reticulation: the zero-crossing network of band-passed noise (thin bright lines around
    air-filled cells); ground glass: smooth patches. Both scale with fibrosis_severity(score).
    Drawn from its own stream, before the lesions, so nodules paint over it unchanged.
    """
    n, m = geom.n_slices, geom.matrix
    amp, extent = fibrosis_severity(score)
    t = np.arange(n) / max(n - 1, 1)  # 0 apex .. 1 bottom of the scan; lungs end at 0.97
    basal = np.clip((t - (0.97 - extent)) / 0.08, 0.0, 1.0)
    ks = np.flatnonzero(basal > 0)
    if not len(ks):
        return
    y = geom.origin_mm[1] + np.arange(m) * geom.pixel_mm - body.cy
    depth = 0.66 * (body.b - body.fat)  # lung half-depth: -1 anterior .. +1 posterior
    post = np.clip(0.55 + 0.45 * y / depth, 0.1, 1.0)[None, :, None]
    shape = (len(ks), m, m)
    band = _band_noise(shape, 0.6, 2.2, rng)
    reticular = np.exp(-((band / 0.45) ** 2))  # 1 on the network lines, ~0 inside the cells
    patches = sigmoid(2.0 * _smooth_noise(shape, 4.0, rng) + 0.5 * score)
    add = amp * basal[ks][:, None, None] * post * (reticular + 0.5 * patches)  # <= 1.5 amp
    sub = hu[ks]
    hu[ks] = np.where(lung[ks], sub + add.astype(np.float32), sub)


def _place(
    body: _Body, geom: Geometry, radius: float, rng: np.random.Generator
) -> tuple[float, float, float] | None:
    """A random centre whose whole sphere (plus margin) lies in lung, away from the heart."""
    n = geom.n_slices
    for _ in range(200):
        t = rng.uniform(0.3, 0.78)
        k = t * (n - 1)
        z = float(geom.z_of(k))
        ai, bi = body.a * (0.9 + 0.1 * t) - body.fat, body.b * (0.92 + 0.08 * t) - body.fat
        side = rng.choice([-1.0, 1.0])
        lx, ly = side * 0.47 * ai, -0.05 * bi
        sa, sb = 0.36 * ai, 0.66 * bi
        ang, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
        shrink = np.clip(1.0 - (radius + 6.0) / min(sa, sb), 0.0, 1.0)
        u = lx + sa * shrink * rr * np.cos(ang)
        v = ly + sb * shrink * rr * np.sin(ang)
        if shrink <= 0 or body.heart(np.array(u), np.array(v), np.array(t), radius + 6.0):
            continue
        if (u / (ai - 12.0)) ** 2 + (v / (bi - 12.0)) ** 2 > 1.0:
            continue  # keep clear of the rib ring
        return (float(u + body.cx), float(v + body.cy), z)
    return None


def _paint(
    hu: np.ndarray, lung: np.ndarray, geom: Geometry, les: Lesion, rng: np.random.Generator
) -> None:
    """Paint one lesion into hu (in place), only over lung voxels."""
    reach = les.radius_mm * (1.0 + les.spiculation) + 2.0
    k0, r0, c0 = geom.voxel_of(les.centre_mm)
    dk, dp = int(np.ceil(reach / geom.slice_mm)) + 1, int(np.ceil(reach / geom.pixel_mm)) + 1
    ks = np.arange(max(k0 - dk, 0), min(k0 + dk + 1, geom.n_slices))
    rs = np.arange(max(r0 - dp, 0), min(r0 + dp + 1, geom.matrix))
    cs = np.arange(max(c0 - dp, 0), min(c0 + dp + 1, geom.matrix))
    if not (len(ks) and len(rs) and len(cs)):
        return
    ox = geom.origin_mm[0] + cs * geom.pixel_mm - les.centre_mm[0]
    oy = geom.origin_mm[1] + rs * geom.pixel_mm - les.centre_mm[1]
    oz = geom.z_of(ks) - les.centre_mm[2]
    off = np.stack(np.broadcast_arrays(ox[None, None, :], oy[None, :, None], oz[:, None, None]), -1)
    d = np.linalg.norm(off, axis=-1)
    r_eff = np.full(d.shape, les.radius_mm)
    if les.spiculation > 0:
        spikes = rng.standard_normal((int(rng.integers(6, 13)), 3))
        spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
        cosang = (off / np.maximum(d, 1e-6)[..., None]) @ spikes.T  # (..., n_spikes)
        r_eff = r_eff * (1.0 + les.spiculation * (np.clip(cosang, 0, 1) ** 24).max(-1))
    member = np.clip(r_eff - d + 0.5, 0.0, 1.0)  # 1 mm soft edge
    sub = np.ix_(ks, rs, cs)
    region = hu[sub]
    hu[sub] = np.where(lung[sub], region + member * (les.hu - region), region)


def render_ct(
    cfg: SynthConfig,
    site: SiteConfig,
    score: float,
    rng: np.random.Generator,
    fibrosis_score: float | None = None,
    fibrosis_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, Geometry, list[Lesion]]:
    """One patient's chest: (D, H, W) HU (float32, with site offset+noise), geometry, lesions.

    The index nodule follows the CT score s_ct: present with probability sigmoid(2 s + 1.5);
    radius 7 + 3 s mm, density -250 + 180 s HU (ground glass -> solid), spiculation for s > 0.3.
    fibrosis_score (t_ct of the second disease, with its own fibrosis_rng): basal reticulation /
    ground glass (_paint_fibrosis); None = no fibrosis pattern and exactly the one-task volume.
    """
    m = cfg.ct_matrix
    px = site.fov_mm / m
    n = int(round(cfg.chest_length_mm / site.slice_thickness_mm))
    body = _Body(
        cx=float(rng.normal(0, 6)),
        cy=float(rng.normal(0, 6)),
        a=float(rng.uniform(135, 158)),
        b=float(rng.uniform(98, 115)),
        fat=float(rng.uniform(8, 24)),
    )
    table_z = float(np.round(rng.uniform(-60, 60), 1))  # table position differs per exam
    xy0 = round(-site.fov_mm / 2 + px / 2, 2)
    origin = (xy0, xy0, table_z)
    geom = Geometry(n, m, px, site.slice_thickness_mm, origin)
    hu, lung = _render_anatomy(body, geom, rng)
    if fibrosis_score is not None:
        if fibrosis_rng is None:
            raise ValueError("render_ct: fibrosis_score needs its own fibrosis_rng")
        _paint_fibrosis(hu, lung, body, geom, fibrosis_score, fibrosis_rng)

    lesions: list[Lesion] = []
    if rng.random() < sigmoid(2.0 * score + 1.5):
        radius = float(
            np.clip(7.0 + 3.0 * score + rng.normal(0, 0.8), cfg.min_nodule_radius_mm, 16.0)
        )
        density = float(np.clip(-250.0 + 180.0 * score + rng.normal(0, 40), -450.0, 60.0))
        spic = float(np.clip(0.35 * (score - 0.3), 0.0, 0.7))
        centre = _place(body, geom, radius, rng)
        if centre is not None:
            lesions.append(
                Lesion(centre, round(radius, 2), "index", round(density, 1), round(spic, 3))
            )
    for _ in range(int(rng.poisson(cfg.granulomas_per_ct))):
        radius = float(rng.uniform(2.0, 3.5))
        centre = _place(body, geom, radius, rng)
        if centre is not None:
            lesions.append(
                Lesion(
                    centre,
                    round(radius, 2),
                    "granuloma",
                    round(float(rng.uniform(300, 900)), 1),
                    0.0,
                )
            )
    for les in lesions:
        _paint(hu, lung, geom, les, rng)

    hu = hu + site.hu_offset + rng.normal(0.0, site.noise_sigma_hu, hu.shape).astype(np.float32)
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.float32), geom, lesions


def _ds(s: float) -> str:
    """A DICOM DS string (<= 16 chars) that round-trips to the same float."""
    return f"{s:.10g}"


# Elements that differ between the slices of one series.
_PER_SLICE = frozenset(
    Tag(k)
    for k in (
        "SOPInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "SliceLocation",
        "PixelData",
    )
)


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


class _SliceEncoder:
    """Bytes of `ds.save_as(..., enforce_file_format=True)` without re-encoding what is constant.

    pydicom spends ~2 ms per file encoding ~55 elements; a series shares all but five of them, so
    the constant runs (in tag order) are encoded once and only the per-slice elements each time.
    tests/synth/test_ct.py checks the output equals pydicom's own save_as byte for byte.
    """

    def __init__(self, template: Dataset, varying: frozenset) -> None:
        self._parts: list[bytes | object] = []
        run = Dataset()
        for elem in template:  # iterates in ascending tag order
            if elem.tag in varying:
                if len(run):
                    self._parts.append(_encode(run))
                    run = Dataset()
                self._parts.append(elem.tag)
            else:
                run.add(elem)
        if len(run):
            self._parts.append(_encode(run))

    def encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        out = [fp.getvalue()]
        for part in self._parts:
            if isinstance(part, bytes):
                out.append(part)
            else:
                single = Dataset()
                single.add(ds[part])
                out.append(_encode(single))
        return b"".join(out)


def write_series(
    folder: Path,
    hu: np.ndarray,
    geom: Geometry,
    *,
    uid_key: list[str],
    when: dt.datetime,
    site: SiteConfig,
) -> list[Path]:
    """Write hu (D, H, W) as one CT series of D single-frame files, explicit VR little endian.

    De-identified on purpose: no PatientName, PatientID, PatientBirthDate or other PN/date of the
    patient; PatientIdentityRemoved=YES. UIDs come from uid_key, so same key -> same UIDs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.rint(hu - RESCALE_INTERCEPT).astype("<i2")
    study_uid = generate_uid(UID_PREFIX, entropy_srcs=[*uid_key, "study"])
    series_uid = generate_uid(UID_PREFIX, entropy_srcs=[*uid_key, "series"])
    frame_uid = generate_uid(UID_PREFIX, entropy_srcs=[*uid_key, "frame"])
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FEDSIGHT_SYNTH1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ""  # set per slice below; keeps the tag order of a fresh dataset
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.Modality = "CT"
    ds.Manufacturer = "fedsight-synth"
    ds.ManufacturerModelName = site.scanner_model
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"AXIAL {_ds(geom.slice_mm)}mm"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom; no patient data"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(geom.slice_mm)
    ds.SpacingBetweenSlices = _ds(geom.slice_mm)
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [_ds(geom.origin_mm[0]), _ds(geom.origin_mm[1]), "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geom.matrix
    ds.PixelSpacing = [_ds(geom.pixel_mm), _ds(geom.pixel_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = b""
    ds["PixelData"].VR = "OW"  # what pydicom resolves 'OB or OW' to for 16-bit pixels
    encoder = _SliceEncoder(ds, _PER_SLICE)
    paths = []
    for k in range(geom.n_slices):
        sop_uid = generate_uid(UID_PREFIX, entropy_srcs=[*uid_key, "sop", str(k)])
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        z = _ds(float(geom.z_of(k)))
        ds.ImagePositionPatient = [_ds(geom.origin_mm[0]), _ds(geom.origin_mm[1]), z]
        ds.SliceLocation = z
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        path.write_bytes(encoder.encode(ds))
        paths.append(path)
    return paths

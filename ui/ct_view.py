"""The CT view a radiologist reads: the series at its own in-plane resolution, windowed in HU,
with the model's attribution map carried from the model grid onto the native voxels.

Pieces, top to bottom:
  read_native        the site's (or an upload's) DICOM files -> NativeVolume, through the
                     hospital node's own reader (scan_case -> choose_series -> read_series), so
                     the view shows the series the model was fed, with the same checks
  NativeVolume       int16 HU, in-plane downsampled to <= CtViewConfig.max_inplane, its affine
                     (voxel -> patient mm, LPS; sheared when the gantry was tilted) and one
                     SliceLabel per slice (DICOM InstanceNumber, table position in mm)
  NativeMap          the attribution map (model grid) resampled onto native slices, lazily per
                     slice, cached: stepping slices never recomputes the explanation
  CtViews            per open diagnosis: an LRU of native volumes bounded in count and bytes;
                     an evicted worklist volume is read again from the site's files, an evicted
                     upload (its files are gone) falls back to the model-grid view with a note

Resampling goes through the two affines the reader keeps, never through array shapes:
native voxel -> mm (CtSeries.affine, after in-plane block averaging) -> grid voxel
(inverse of the grid affine from preprocess.ct_to_grid), trilinear in the grid map.

Windowing is the DICOM linear VOI function (PS3.3 C.11.2.1.2.1), applied through a 64 Ki-entry
lookup table over the int16 HU values: exact for every stored value and ~1 ms for 512 x 512.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from explain.answers import NativePlace
from explain.explanation import Explanation
from hospital_node.ct_scan import SeriesFiles, scan_case
from hospital_node.dicom_header import READ_ERRORS, HeaderError, read_header
from hospital_node.dicom_series import CtSeries, read_case_ct
from hospital_node.series_choice import SeriesRule, choose_series
from hospital_node.site_config import read_site_config
from hospital_node.site_files import check_dir
from multimodal.data import HU_CLIP, PreparedCase
from ui import render
from vocab.errors import DataProblem
from vocab.site_layout import CT_DIR

log = logging.getLogger(__name__)  # handles and timings only: no case ids, files or tag values

# (width, level) in HU. Lung first: the app is for lung nodules.
WINDOW_PRESETS: Final[dict[str, tuple[float, float]]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (2000.0, 500.0),
}
DEFAULT_PRESET: Final = "lung"
MIN_WIDTH, MAX_WIDTH = 1.0, 8000.0
MIN_LEVEL, MAX_LEVEL = -2000.0, 4000.0
# A native slice is a source slice when it lies within this distance of it (positions carry a
# few decimals); otherwise it was interpolated (uneven gaps) and is labelled "between" its two
# neighbours, with the distance to the nearer one.
EXACT_SLICE_MM = 0.02
# The re-read series must sit where the grid was centred (preprocess centres the grid on the
# series): farther apart than this, the files changed since the diagnosis and the view says so.
CENTRE_TOL_MM = 1.0


@dataclass(frozen=True)
class CtViewConfig:
    """Memory and look of the native view.

    max_inplane:  in-plane size cap; larger series are block-averaged by an integer factor.
    max_volumes:  native volumes kept at once (one per open diagnosis, least recently used out).
    max_bytes:    all kept views together: int16 HU plus each view's map cache counted at
                  capacity (map_slices x 0.5 MiB at 512 px). Default: 4 views of 512 x 512 x
                  ~190 slices (~95 + 32 MiB each) in 512 MiB; longer series keep fewer views.
    map_slices:   resampled map slices cached per open diagnosis (float16, 0.5 MiB each at 512).
    top_fraction: the outlined "top region" is where the map is >= this share of its peak.
    lazy:         read a worklist series on the first slice request, not when the diagnosis
                  opens: the diagnosis returns at its old latency (grid view) and the app's
                  follow-up request shows the native view (docs/ui.md); an API client that
                  never asks for a slice costs no read. False reads before it returns.
    wait_s:       how long a request waits for another request's read of the same series.
    """

    max_inplane: int = 512
    max_volumes: int = 4
    max_bytes: int = 512 << 20
    map_slices: int = 64
    top_fraction: float = 0.5
    lazy: bool = True
    wait_s: float = 30.0

    def __post_init__(self) -> None:
        if not 64 <= self.max_inplane <= 2048:
            raise ValueError(f"max_inplane must be 64..2048, got {self.max_inplane!r}")
        if not 1 <= self.max_volumes <= 64:
            raise ValueError(f"max_volumes must be 1..64, got {self.max_volumes!r}")
        if self.max_bytes < 1 << 20:
            raise ValueError(f"max_bytes must be >= 1 MiB, got {self.max_bytes!r}")
        if not 1 <= self.map_slices <= 4096:
            raise ValueError(f"map_slices must be 1..4096, got {self.map_slices!r}")
        if not 0.0 < self.top_fraction < 1.0:
            raise ValueError(f"top_fraction must be in (0, 1), got {self.top_fraction!r}")
        if not 0.0 <= self.wait_s <= 600.0:
            raise ValueError(f"wait_s must be 0..600 s, got {self.wait_s!r}")


def check_window(width: float, level: float) -> tuple[float, float]:
    """(width, level) as floats, or ValueError naming the bad one."""
    w, c = float(width), float(level)
    if not (math.isfinite(w) and MIN_WIDTH <= w <= MAX_WIDTH):
        raise ValueError(f"window width {width!r} HU outside {MIN_WIDTH:g}..{MAX_WIDTH:g}")
    if not (math.isfinite(c) and MIN_LEVEL <= c <= MAX_LEVEL):
        raise ValueError(f"window level {level!r} HU outside {MIN_LEVEL:g}..{MAX_LEVEL:g}")
    return w, c


def window_values(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """DICOM linear VOI (PS3.3 C.11.2.1.2.1) to 0..255 uint8, for any HU array."""
    w, c = check_window(width, level)
    x = np.asarray(hu, np.float64)
    if w <= 1.0:  # the standard's w = 1 case: a threshold at c - 0.5
        y = np.where(x <= c - 0.5, 0.0, 255.0)
    else:
        y = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


_LUT_CACHE: OrderedDict[tuple[float, float], np.ndarray] = OrderedDict()
_LUT_LOCK = threading.Lock()


def window_lut(width: float, level: float) -> np.ndarray:
    """(65536,) uint8: the window for every int16 value (index = HU + 32768); 8 kept."""
    key = check_window(width, level)
    with _LUT_LOCK:
        lut = _LUT_CACHE.get(key)
        if lut is None:
            lut = window_values(np.arange(-32768, 32768), *key)
            _LUT_CACHE[key] = lut
            while len(_LUT_CACHE) > 8:
                _LUT_CACHE.popitem(last=False)
        else:
            _LUT_CACHE.move_to_end(key)
    return lut


def apply_window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """int16 HU (any shape) -> uint8 grey through the cached lookup table."""
    if hu.dtype != np.int16:
        raise TypeError(f"apply_window needs int16 HU, got {hu.dtype}")
    return window_lut(width, level)[hu.astype(np.int32) + 32768]


@dataclass(frozen=True)
class SliceLabel:
    """Which acquired slice a native slice is, in the words of the DICOM headers.

    instances: InstanceNumber of the source slice (one), or of the two source slices a slice
               interpolated across an uneven gap lies between; None where a header lacks it.
    frame:     1-based frame number inside an Enhanced (multi-frame) CT instance, else None.
    table_mm:  patient z (LPS, + = superior) of the slice centre, mm.
    nearest_mm:for an interpolated slice, its distance to the nearer source slice (along the
               slice normal); that slice is instances[nearest].
    """

    instances: tuple[int | None, ...]
    frame: int | None
    table_mm: float
    nearest_mm: float = 0.0
    nearest: int = 0

    def text(self) -> str:
        def num(i: int | None) -> str:
            return "?" if i is None else str(i)

        if len(self.instances) == 2:
            who = (f"between instances {num(self.instances[0])} and {num(self.instances[1])} "
                   f"(interpolated, {self.nearest_mm:.1f} mm from "
                   f"{num(self.instances[self.nearest])})")
        else:
            who = f"instance {num(self.instances[0])}"
            if self.frame is not None:
                who += f" frame {self.frame}"
        return f"{who} · table {self.table_mm:+.1f} mm"


@dataclass
class NativeVolume:
    """A CT series as acquired (in-plane block-averaged to <= max_inplane), int16 HU."""

    hu: np.ndarray  # (Z, Y, X) int16
    affine: np.ndarray  # (4, 4) voxel (z, y, x, 1) -> patient mm (LPS)
    labels: tuple[SliceLabel, ...]
    tilt_deg: float = 0.0
    inplane_factor: int = 1

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.hu.nbytes)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm per voxel step along (z, y, x) (norms of the affine's columns)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(s[0]), float(s[1]), float(s[2])

    def centre_mm(self) -> np.ndarray:
        return (self.affine @ np.append((np.asarray(self.hu.shape, float) - 1) / 2, 1.0))[:3]

    def voxel_of(self, mm: tuple[float, float, float] | np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) index of a patient point."""
        return (np.linalg.inv(self.affine) @ np.append(np.asarray(mm, float), 1.0))[:3]


def downsample_inplane(hu: np.ndarray, affine: np.ndarray, max_inplane: int
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Block-average rows/columns by k = ceil(max(Y, X) / max_inplane) (a trailing partial block
    is dropped); returns (hu, affine, k) with the affine moved to the new voxel centres."""
    z, y, x = hu.shape
    k = max(1, math.ceil(max(y, x) / max_inplane))
    if k == 1:
        return hu, affine, 1
    yy, xx = (y // k) * k, (x // k) * k
    out = hu[:, :yy, :xx].reshape(z, yy // k, k, xx // k, k).mean(axis=(2, 4), dtype=np.float32)
    scale = np.eye(4)
    scale[1, 1] = scale[2, 2] = k
    scale[1, 3] = scale[2, 3] = (k - 1) / 2  # new voxel centre in old index units
    return out, affine @ scale, k


def _instance_number(ds: object) -> int | None:
    try:
        v = ds.get("InstanceNumber")  # type: ignore[attr-defined]
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def slice_labels(series: CtSeries, files: SeriesFiles, hu_shape: tuple[int, int, int],
                 affine: np.ndarray) -> tuple[SliceLabel, ...]:
    """One label per native slice: the source frames sorted as read_series sorts them (along
    the slice normal, stable), matched to the uniform native stack by position."""
    frames = [(inst, f) for inst in files.instances for f in inst.frames]
    iop = np.asarray(frames[0][1].orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    offsets = np.array([np.asarray(f.position, float) @ normal for _, f in frames])
    order = np.argsort(offsets, kind="stable")
    offsets = offsets[order]
    numbers: dict[int, int | None] = {}
    for inst, _ in frames:
        if id(inst) not in numbers:
            try:
                numbers[id(inst)] = _instance_number(read_header(inst.file)[0])
            except (HeaderError, *READ_ERRORS):  # read once already; a label is not worth a crash
                numbers[id(inst)] = None
    src = [(numbers[id(frames[i][0])], frames[i][0].enhanced, frames[i][1].index)
           for i in order]
    step = float(series.spacing[0]) if series.spacing else 1.0
    centre_yx = [(hu_shape[1] - 1) / 2, (hu_shape[2] - 1) / 2]
    labels = []
    for k in range(hu_shape[0]):
        table = float((affine @ np.array([k, *centre_yx, 1.0]))[2])
        t = offsets[0] + step * k
        j = int(np.argmin(np.abs(offsets - t)))
        if abs(offsets[j] - t) <= EXACT_SLICE_MM:
            num, enhanced, frame = src[j]
            labels.append(SliceLabel((num,), frame + 1 if enhanced else None, table))
        else:
            lo = int(np.clip(np.searchsorted(offsets, t) - 1, 0, len(offsets) - 2))
            labels.append(SliceLabel((src[lo][0], src[lo + 1][0]), None, table,
                                     float(abs(offsets[j] - t)), int(j == lo + 1)))
    return tuple(labels)


def native_from_series(series: CtSeries, files: SeriesFiles, cfg: CtViewConfig
                       ) -> NativeVolume:
    """A usable CtSeries (and the files it came from) -> NativeVolume."""
    if series.hu is None or series.affine is None:
        raise ValueError("native_from_series needs a usable CtSeries (hu is None)")
    hu, affine, k = downsample_inplane(series.hu, series.affine, cfg.max_inplane)
    # int16 holds every CT value (-1024..3071 typical, metal up to ~30000): half of float32.
    hu16 = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    labels = slice_labels(series, files, hu16.shape, affine)
    return NativeVolume(hu16, affine, labels, float(series.tilt_deg), k)


def read_native(folder: Path, root: Path, rule: SeriesRule, cfg: CtViewConfig
                ) -> tuple[CtSeries, NativeVolume | None]:
    """Read a case folder as the node does (read_case_ct), plus its native view. The series is
    the one read_case_ct chose (choose_series is a pure function of the scan)."""
    scan = scan_case(Path(folder), Path(root))
    series = read_case_ct(scan, rule)
    if not series.usable:
        return series, None
    chosen = choose_series(scan, rule).series
    if chosen is None or chosen.uid != series.series_uid:
        return series, None
    return series, native_from_series(series, chosen, cfg)


def site_case_reader(root: Path, cfg: CtViewConfig = CtViewConfig(),
                     rule: SeriesRule | None = None) -> Callable[[str], NativeVolume | None]:
    """case id -> its native volume, from <root>/ct/<case id> (vocab.site_layout; the same
    folder discover() gives the loader) with the site's series rule (site.json, as load_site
    uses). Read-only; None when it cannot be read now."""
    root = Path(root).resolve()
    rule = rule if rule is not None else read_site_config(root).series_rule

    def read(case_id: str) -> NativeVolume | None:
        folder = root / CT_DIR / case_id
        if Path(case_id).name != case_id or isinstance(check_dir(folder, root), DataProblem):
            return None
        return read_native(folder, root, rule, cfg)[1]

    return read


class NativeMap:
    """The grid attribution map on native slices: trilinear through native -> mm -> grid,
    computed per slice on first view and kept (float16) in a bounded per-diagnosis cache."""

    def __init__(self, grid_map: np.ndarray, grid_affine: np.ndarray, vol: NativeVolume,
                 cfg: CtViewConfig) -> None:
        self.grid_map = np.ascontiguousarray(grid_map, np.float32)
        # native index -> grid index, one 4x4
        self.to_grid = np.linalg.inv(np.asarray(grid_affine, float)) @ vol.affine
        self.vmax = float(np.abs(self.grid_map).max())
        self.top = cfg.top_fraction * float(self.grid_map.max())
        self.shape = vol.hu.shape
        self.capacity = cfg.map_slices
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        # The map is trilinear between grid voxels (5 mm by default): sampling it every
        # ~grid/2.5 and enlarging bilinearly is indistinguishable on screen and ~10x cheaper
        # than sampling every native pixel (docs/benchmarks.md).
        grid_mm = float(np.linalg.norm(np.asarray(grid_affine, float)[:3, :3], axis=0).min())
        px_mm = float(min(vol.spacing[1:]))
        self.stride = int(np.clip(grid_mm / (2.5 * px_mm), 1, 8))
        s, (ny, nx) = self.stride, self.shape[1:]
        cy, cx = -(-ny // s), -(-nx // s)
        # Coarse sample j sits at native index s*j + (s-1)/2: exactly where a bilinear
        # enlargement by s (align_corners=False) puts its source samples.
        ys, xs = np.mgrid[0:cy, 0:cx].astype(np.float64) * s + (s - 1) / 2
        self._yx = (ys, xs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())

    def grid_coords(self, k: int) -> np.ndarray:
        """(3, cy, cx) grid indices of native slice k's coarse sample points."""
        m = self.to_grid
        ys, xs = self._yx
        return np.stack([m[c, 0] * k + m[c, 1] * ys + m[c, 2] * xs + m[c, 3] for c in range(3)])

    def slice(self, k: int) -> np.ndarray:
        """(Y, X) float16 attribution on native slice k."""
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
        # Outside the grid the model saw nothing: 0 attribution (cval), not an edge copy.
        coarse = map_coordinates(self.grid_map, self.grid_coords(k), order=1, mode="constant",
                                 cval=0.0, prefilter=False)
        s, (ny, nx) = self.stride, self.shape[1:]
        if s > 1:
            t = torch.from_numpy(coarse)[None, None]
            coarse = F.interpolate(t, scale_factor=s, mode="bilinear",
                                   align_corners=False)[0, 0, :ny, :nx].numpy()
        out = coarse.astype(np.float16)
        with self._lock:
            self._cache[k] = out
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return out


@dataclass(frozen=True)
class CtFrame:
    """One rendered slice: the image, its 0-based index, slice count and caption."""

    image: np.ndarray
    index: int
    n_slices: int
    label: str
    native: bool


@dataclass
class _Open:
    """One open diagnosis' CT: the model-grid data always, the native parts when kept."""

    grid_ct: np.ndarray
    grid_affine: np.ndarray | None
    grid_map: np.ndarray | None
    peak_mm: tuple[float, float, float] | None
    reader: Callable[[], NativeVolume | None] | None  # None: files gone (upload)
    note: str = ""
    native_n: int = 0  # slices of the native volume once seen (slider range stays stable)
    vol: NativeVolume | None = None
    nmap: NativeMap | None = None
    # set once the first native read (if any) is over; renders that may wait do
    ready: threading.Event = field(default_factory=threading.Event)
    load_lock: threading.Lock = field(default_factory=threading.Lock)  # one reader at a time


class CtViews:
    """Native CT views of open diagnoses, memory-bounded (CtViewConfig.max_volumes/max_bytes)."""

    def __init__(self, cfg: CtViewConfig = CtViewConfig(),
                 case_reader: Callable[[str], NativeVolume | None] | None = None) -> None:
        self.cfg = cfg
        # worklist case id -> native volume from the site's files (site_case_reader); None:
        # no site (tests, uploads only)
        self.case_reader = case_reader
        # Uploads: read with the case, waiting for their diagnosis to open (a refused upload's
        # volume is dropped by the bound).
        self._pending: OrderedDict[str, NativeVolume] = OrderedDict()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._kept: OrderedDict[str, None] = OrderedDict()  # handles holding a native volume
        self._lock = threading.RLock()
        self.reads = 0  # native reads from files (re-reads after eviction included)

    # ---- memory ----
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes(self._open[h]) for h in self._kept)

    def _bytes(self, o: _Open) -> int:
        """A kept view's volume plus its map cache at capacity: the bound holds however far
        the clinician steps."""
        return 0 if o.vol is None else o.vol.nbytes + self._map_reserve(o.vol)

    def _map_reserve(self, vol: NativeVolume) -> int:
        return self.cfg.map_slices * vol.hu.shape[1] * vol.hu.shape[2] * 2  # float16 slices

    def _evict(self, keep: str) -> None:
        """Drop least recently used native volumes (never `keep`) until within budget."""
        while self._kept and (len(self._kept) > self.cfg.max_volumes
                              or self.kept_bytes() > self.cfg.max_bytes):
            victim = next((h for h in self._kept if h != keep), None)
            if victim is None:
                break
            del self._kept[victim]
            o = self._open.get(victim)
            if o is not None:
                o.vol, o.nmap = None, None
            log.info("native CT view %s evicted", victim[:8])

    def _attach(self, handle: str, o: _Open, vol: NativeVolume | None) -> None:
        if vol is None:
            return
        if vol.nbytes + self._map_reserve(vol) > self.cfg.max_bytes:
            o.note = "the series is larger than the native-view memory budget; showing the grid"
            return
        if o.grid_affine is not None:
            # The grid was centred on the series it was cut from (preprocess.ct_to_grid).
            gshape = np.asarray(o.grid_ct.shape, float)
            gcentre = (o.grid_affine @ np.append((gshape - 1) / 2, 1.0))[:3]
            if np.linalg.norm(gcentre - vol.centre_mm()) > CENTRE_TOL_MM:
                o.note = ("the series on disk no longer matches the one diagnosed; showing the "
                          "model grid")
                o.reader = None
                return
        o.vol = vol
        o.native_n = vol.n_slices
        o.nmap = (NativeMap(o.grid_map, o.grid_affine, vol, self.cfg)
                  if o.grid_map is not None and o.grid_affine is not None else None)
        self._kept[handle] = None
        self._kept.move_to_end(handle)
        self._evict(keep=handle)

    # ---- open / close ----
    def upload_reader(self, case_id: str) -> Callable[[Path], CtSeries]:
        """A series reader for ui.uploads (same result as read_ct_series) that also keeps the
        native volume for `case_id`, read before the uploaded files are deleted."""

        def read(folder: Path) -> CtSeries:
            series, native = read_native(folder, Path(folder).parent, SeriesRule(), self.cfg)
            if native is not None:
                with self._lock:
                    self._pending[case_id] = native
                    while len(self._pending) > 2:
                        self._pending.popitem(last=False)
            return series

        return read

    def open_case(self, handle: str, case: PreparedCase, e: Explanation, from_site: bool,
                  max_open: int = 64) -> None:
        """Register a diagnosed case: a worklist case reads its series from the site's files,
        an upload takes the volume kept by upload_reader."""
        if case.ct is None:
            return
        with self._lock:
            native = self._pending.pop(case.case_id, None)
        reader = None
        if from_site and self.case_reader is not None:
            read, cid = self.case_reader, case.case_id
            reader = lambda: read(cid)  # noqa: E731
        peak = e.ct_location.mm if e.ct_location is not None else None
        self.open(handle, case.ct, case.ct_affine, e.ct_map, peak, native, reader, max_open)

    def open(self, handle: str, grid_ct: np.ndarray, grid_affine: np.ndarray | None,
             grid_map: np.ndarray | None, peak_mm: tuple[float, float, float] | None,
             native: NativeVolume | None = None,
             reader: Callable[[], NativeVolume | None] | None = None,
             max_open: int = 64) -> None:
        """Register a diagnosis. `native`: a volume already read (uploads); `reader`: how to
        read it (again) from files; with neither the view is the model grid."""
        o = _Open(grid_ct, grid_affine, grid_map, peak_mm, reader)
        later = native is None and reader is not None and self.cfg.lazy
        if native is None and reader is not None and not later:
            native = self._read(o)  # outside the lock: other diagnoses keep stepping slices
        with self._lock:
            self._open[handle] = o
            while len(self._open) > max_open:
                old, _ = self._open.popitem(last=False)
                self._kept.pop(old, None)
            if not later:
                self._attach(handle, o, native)
                if native is None and not o.note:
                    o.note = "native series not available; showing the model grid"
                o.ready.set()

    def _load(self, handle: str, o: _Open) -> None:
        """The deferred first read (lazy); concurrent requests wait for the first one's."""
        if not o.load_lock.acquire(timeout=self.cfg.wait_s):
            return
        try:
            if o.ready.is_set():
                return
            vol = self._read(o)
            with self._lock:
                if self._open.get(handle) is o:  # still open (not pushed out meanwhile)
                    self._attach(handle, o, vol)
                if o.vol is None and not o.note:
                    o.note = "native series not available; showing the model grid"
        finally:
            o.ready.set()
            o.load_lock.release()

    def _read(self, o: _Open) -> NativeVolume | None:
        if o.reader is None:
            return None
        self.reads += 1
        try:
            return o.reader()
        except (OSError, ValueError) as e:  # files moved or changed: the grid view still works
            log.warning("native CT read failed (%s)", type(e).__name__)
            return None

    def _get(self, handle: str, wait: bool = True) -> _Open:
        with self._lock:
            o = self._open.get(handle)
            if o is None:
                raise KeyError(handle)
            self._open.move_to_end(handle)
        if not o.ready.is_set():
            if not wait:
                return o
            self._load(handle, o)  # outside the views' lock: other diagnoses keep stepping
        with self._lock:
            reread = o.vol is None and bool(o.native_n) and o.reader is not None
        if reread:  # evicted earlier: read again, outside the lock
            vol = self._read(o)
            with self._lock:
                if o.vol is None:
                    self._attach(handle, o, vol)
                if o.vol is None and not o.note:
                    o.note = "the native series could not be read again; showing the grid"
        with self._lock:
            if o.vol is None and o.native_n and not o.note:
                o.note = ("native view released to save memory (uploaded files are deleted); "
                          "showing the model grid; diagnose again for the native view")
            if o.vol is not None:
                self._kept.move_to_end(handle)
            return o

    def is_native(self, handle: str) -> bool:
        with self._lock:
            o = self._open.get(handle)
            return o is not None and o.vol is not None

    # ---- what the app shows ----
    def top_index(self, handle: str, grid_top: int, wait: bool = True) -> int:
        """The slice to open on: the native slice through the map's peak, else grid_top."""
        o = self._get(handle, wait)
        vol = o.vol  # read once: an eviction by another request may clear it
        if vol is not None and o.peak_mm is not None:
            k = int(round(float(vol.voxel_of(o.peak_mm)[0])))
            return int(np.clip(k, 0, vol.n_slices - 1))
        return grid_top

    def n_slices(self, handle: str) -> int:
        o = self._get(handle)
        return o.vol.n_slices if o.vol is not None else int(o.grid_ct.shape[0])

    def render(self, handle: str, index: int, width: float, level: float, wait: bool = True
               ) -> CtFrame:
        """Slice `index` of the native view, or of the grid view when there is none (yet:
        wait=False does not read a series deferred by CtViewConfig.lazy)."""
        width, level = check_window(width, level)
        o = self._get(handle, wait)
        wl = f"W {width:g} / L {level:g}"
        vol, nmap = o.vol, o.nmap  # read once: an eviction by another request may clear them
        if vol is None:
            return self._render_grid(o, index, width, level, wl)
        k = int(np.clip(index, 0, vol.n_slices - 1))
        grey = apply_window(vol.hu[k], width, level)
        attr = nmap.slice(k) if nmap is not None else None
        img = render.native_overlay(grey, attr, nmap.vmax if nmap else 0.0,
                                    nmap.top if nmap else 0.0)
        render.draw_scale_bar(img, vol.spacing[2])
        label = (f"Slice {k + 1} of {vol.n_slices} · {vol.labels[k].text()} · {wl}")
        if vol.tilt_deg > 0.5:
            label += f" · gantry tilt {vol.tilt_deg:.1f}°"
        return CtFrame(img, k, vol.n_slices, label, True)

    def _render_grid(self, o: _Open, index: int, width: float, level: float, wl: str
                     ) -> CtFrame:
        n = int(o.grid_ct.shape[0])
        k = int(np.clip(index, 0, n - 1))
        lo, hi = HU_CLIP
        hu = np.rint(lo + (o.grid_ct[k] + 1.0) * (hi - lo) / 2).astype(np.int16)
        grey = apply_window(hu, width, level)
        vmax = float(np.abs(o.grid_map).max()) if o.grid_map is not None else 0.0
        top = self.cfg.top_fraction * float(o.grid_map.max()) if o.grid_map is not None else 0.0
        attr = o.grid_map[k] if o.grid_map is not None else None
        img = render.native_overlay(grey, attr, vmax, top)
        where = ""
        if o.grid_affine is not None:
            z = float((o.grid_affine @ np.array([k, (o.grid_ct.shape[1] - 1) / 2,
                                                 (o.grid_ct.shape[2] - 1) / 2, 1.0]))[2])
            where = f" · z {z:+.1f} mm"
        label = f"Model grid slice {k + 1} of {n}{where} · {wl}"
        if not o.ready.is_set():
            label += " · the series at full resolution loads with the next slice request"
        elif o.note:
            label += f" · {o.note}"
        return CtFrame(img, k, n, label, False)

    def place(self, handle: str) -> NativePlace | None:
        """Where the map peaks, in the series' own terms (for explain.answers), if known."""
        try:
            o = self._get(handle)
        except KeyError:
            return None
        vol = o.vol
        if vol is None or o.peak_mm is None:
            return None
        z, y, x = vol.voxel_of(o.peak_mm)
        k, r, c = (int(round(float(v))) for v in (z, y, x))
        inside = 0 <= k < vol.n_slices and 0 <= r < vol.hu.shape[1] and 0 <= c < vol.hu.shape[2]
        kk = int(np.clip(k, 0, vol.n_slices - 1))
        lab = vol.labels[kk]
        who = lab.text().split(" · ")[0]
        # Row/column in the stored image's own pixel units (before any in-plane averaging).
        f = vol.inplane_factor
        return NativePlace(kk, vol.n_slices, who, lab.table_mm, r * f + (f - 1) // 2,
                           c * f + (f - 1) // 2, inside)




class FrameFiles:
    """Frames as PNG files for Gradio, encoded at zlib level 1.

    Gradio PNG-encodes a returned array at zlib's default level 6: ~150 ms for a 512 x 512
    frame on our 2-core machine, against ~40 ms at level 1 for a ~15% larger file
    (docs/benchmarks.md). A returned file path is copied into Gradio's own cache instead, so
    the app hands it a file written here: a private 0700 folder under the system temp dir
    (where Gradio accepts files from), the `keep` newest frames kept, the folder removed at
    exit. Gradio's cache holds the same images anyway (delete_cache in ui.app).
    """

    def __init__(self, keep: int = 64) -> None:
        import atexit
        import shutil
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="fedsight-ct-"))
        self.keep = keep
        self._files: list[Path] = []
        self._lock = threading.Lock()
        self._n = 0
        atexit.register(shutil.rmtree, self.dir, True)

    def write(self, img: np.ndarray) -> str:
        from PIL import Image

        with self._lock:
            self._n += 1
            path = self.dir / f"{self._n:08d}.png"
        Image.fromarray(img).save(path, format="PNG", compress_level=1)
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.keep:
                self._files.pop(0).unlink(missing_ok=True)
        return str(path)


__all__ = ["WINDOW_PRESETS", "DEFAULT_PRESET", "CtViewConfig", "CtViews", "CtFrame", "FrameFiles",
           "NativeVolume", "NativeMap", "SliceLabel", "apply_window", "window_values",
           "window_lut", "read_native", "site_case_reader", "native_from_series",
           "downsample_inplane"]

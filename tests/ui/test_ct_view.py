"""The native CT view (ui.ct_view): windowing, map alignment through the two affines, slice
labels against the DICOM headers, the real tilted GE head series, bounded memory, and the
service / "where?" answer on top of it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.ndimage import map_coordinates

from explain.answers import NativePlace, answer_where
from hospital_node.preprocess import ct_to_grid
from hospital_node.series_choice import SeriesRule
from multimodal.grid import InputConfig
from synth.truth import load_truth
from tests.ui.conftest import ct_case_with_ct, zip_series
from ui.ct_view import (
    WINDOW_PRESETS,
    CtViewConfig,
    CtViews,
    NativeMap,
    NativeVolume,
    SliceLabel,
    apply_window,
    check_window,
    read_native,
    window_values,
)
from ui.service import DiagnosisService

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HEAD = DATA / "ct-head-ge"
needs_head = pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})")
INPUTS = InputConfig()


# ---- windowing ----
def _dicom_window_by_hand(x: float, w: float, c: float) -> int:
    """PS3.3 C.11.2.1.2.1, written out as the standard states it, to 0..255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return int(np.clip(round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255))


@pytest.mark.parametrize("preset", list(WINDOW_PRESETS))
def test_presets_window_like_the_dicom_formula(preset: str) -> None:
    w, c = WINDOW_PRESETS[preset]
    hu = np.array([-3000, -1350, -1000, -600, -351, 0, 50, 225, 500, 1500, 3000], np.int16)
    got = apply_window(hu, w, c)
    want = [_dicom_window_by_hand(float(x), w, c) for x in hu]
    assert got.tolist() == want
    # the preset's edges: everything below the window is black, above it white
    assert apply_window(np.array([c - w / 2 - 1], np.int16), w, c)[0] == 0
    assert apply_window(np.array([c + w / 2 + 1], np.int16), w, c)[0] == 255


@settings(max_examples=60, deadline=None)
@given(st.floats(2, 8000), st.floats(-2000, 4000),
       st.lists(st.integers(-32768, 32767), min_size=1, max_size=40))
def test_lookup_table_equals_formula(w: float, c: float, values: list[int]) -> None:
    hu = np.array(values, np.int16)
    got = apply_window(hu, w, c)
    assert np.array_equal(got, window_values(hu, w, c))
    for x, g in zip(values, got.tolist(), strict=True):
        assert abs(g - _dicom_window_by_hand(float(x), w, c)) <= 1  # float rounding at .5 only


@pytest.mark.parametrize(("w", "c", "msg"), [(0.5, 0, "width 0.5"), (9000, 0, "width 9000"),
                                              (400, 5000, "level 5000"),
                                              (float("nan"), 0, "width nan")])
def test_bad_window_names_the_value(w: float, c: float, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        check_window(w, c)


# ---- a synthetic series with a known lesion ----
@pytest.fixture(scope="module")
def lesion_case(federation: Path, site_root: Path):
    truth = load_truth(federation, "site_a")
    cid = next(c for c in sorted(truth) if truth[c].lesions and (site_root / "ct" / c).is_dir())
    series, vol = read_native(site_root / "ct" / cid, site_root, SeriesRule(), CtViewConfig())
    assert vol is not None, series.problems
    grid, gaff = ct_to_grid(series, INPUTS)
    return cid, truth[cid].lesions[0], series, vol, grid, gaff


def _blob(shape: tuple[int, ...], centre: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    idx = np.indices(shape).astype(np.float32)
    d2 = sum((idx[i] - centre[i]) ** 2 for i in range(3))
    return np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)


def _pixel_mm_by_pydicom(path: Path, row: float, col: float) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    return ipp + iop[:3] * dc * col + iop[3:] * dr * row


def _files_by_instance(folder: Path) -> dict[int, Path]:
    out = {}
    for f in sorted(folder.rglob("*")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the GE folder holds a LICENSE file
            continue
        if "InstanceNumber" in ds and "ImagePositionPatient" in ds:
            out[int(ds.InstanceNumber)] = f
    return out


def test_map_peak_lands_in_the_lesion_in_native_voxels(lesion_case, site_root: Path) -> None:
    cid, lesion, _, vol, grid, gaff = lesion_case
    centre = np.asarray(lesion.centre_mm, float)
    g_idx = (np.linalg.inv(gaff) @ np.append(centre, 1.0))[:3]
    nmap = NativeMap(_blob(grid.shape, g_idx), gaff, vol, CtViewConfig())
    peaks = [(float(nmap.slice(k).max()), k) for k in range(vol.n_slices)]
    k = max(peaks)[1]
    r, c = np.unravel_index(int(np.argmax(nmap.slice(k))), nmap.slice(k).shape)
    # Independent: the pixel's mm from the DICOM file of that slice, read with pydicom.
    inst = vol.labels[k].instances
    assert len(inst) == 1 and inst[0] is not None  # synthetic slices are even: no interpolation
    f = _files_by_instance(site_root / "ct" / cid)[inst[0]]
    mm = _pixel_mm_by_pydicom(f, r * vol.inplane_factor, c * vol.inplane_factor)
    assert np.linalg.norm(mm - centre) <= max(lesion.radius_mm, vol.spacing[0]), (mm, centre)
    # and the HU there is the lesion's (denser than aerated lung), i.e. image and map agree
    assert vol.hu[k, r, c] > -500


def test_coarse_sampling_matches_full_trilinear(lesion_case) -> None:
    _, _, _, vol, grid, gaff = lesion_case
    rng = np.random.default_rng(0)
    gmap = rng.normal(size=grid.shape).astype(np.float32)
    nmap = NativeMap(gmap, gaff, vol, CtViewConfig())
    k = vol.n_slices // 2
    ys, xs = np.mgrid[0:vol.hu.shape[1], 0:vol.hu.shape[2]]
    pts = np.stack([np.full(ys.shape, k), ys, xs, np.ones(ys.shape)]).reshape(4, -1)
    g = (np.linalg.inv(gaff) @ (vol.affine @ pts))[:3].reshape(3, *ys.shape)
    full = map_coordinates(gmap, g, order=1, mode="constant", cval=0.0)
    err = np.abs(nmap.slice(k).astype(np.float32) - full)
    assert err.max() < 0.1 * np.abs(gmap).max() and err.mean() < 0.01 * np.abs(gmap).max()


def _trilinear_by_hand(grid: np.ndarray, p: np.ndarray) -> float:
    """Value at continuous grid index p: 0 outside [0, n-1] on any axis, else 8 corners."""
    if any(not 0 <= p[i] <= grid.shape[i] - 1 for i in range(3)):
        return 0.0
    lo = np.minimum(np.floor(p).astype(int), np.asarray(grid.shape) - 2)
    t = p - lo
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = ((t[0] if dz else 1 - t[0]) * (t[1] if dy else 1 - t[1])
                     * (t[2] if dx else 1 - t[2]))
                out += w * float(grid[lo[0] + dz, lo[1] + dy, lo[2] + dx])
    return out


@settings(max_examples=25, deadline=None)
@given(st.floats(-180, 180), st.floats(-25, 25), st.floats(-30, 30), st.integers(0, 2 ** 16))
def test_map_follows_the_affines_for_any_orientation_and_tilt(
        rot_deg: float, tilt_deg: float, shift_mm: float, seed: int) -> None:
    """A rotated in-plane orientation and a gantry tilt (sheared stacking): every native
    voxel's map value equals trilinear interpolation, written out here, at the grid index its
    patient position has; native pixels of 2.5 mm make the view sample every pixel."""
    from hospital_node.preprocess import grid_affine

    th, ph = np.radians(rot_deg), np.radians(tilt_deg)
    row_dir = np.array([np.cos(th), np.sin(th), 0.0])
    col_dir = np.array([-np.sin(th), np.cos(th), 0.0])
    step, px, shape = 3.0, 2.5, (12, 40, 40)
    aff = np.eye(4)
    aff[:3, 0] = step * np.array([0.0, np.sin(ph), np.cos(ph)])  # sheared when tilted
    aff[:3, 1], aff[:3, 2] = col_dir * px, row_dir * px
    aff[:3, 3] = [shift_mm, -shift_mm, 0.0]
    aff[:3, 3] -= aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    vol = NativeVolume(np.zeros(shape, np.int16), aff,
                       tuple(SliceLabel((i + 1,), None, 0.0) for i in range(shape[0])))
    inputs = InputConfig(ct_shape=(8, 16, 16), ct_spacing=(6.0, 6.5, 6.5))
    gaff = grid_affine(np.zeros(3), inputs)
    rng = np.random.default_rng(seed)
    gmap = rng.normal(size=inputs.ct_shape).astype(np.float32)
    nmap = NativeMap(gmap, gaff, vol, CtViewConfig())
    assert nmap.stride == 1
    tol = 2e-3 * float(np.abs(gmap).max()) + 1e-4  # float16 storage
    for _ in range(40):
        k, r, c = (int(rng.integers(n)) for n in shape)
        g = (np.linalg.inv(gaff) @ aff @ [k, r, c, 1.0])[:3]
        edge = np.abs(np.stack([g, g - (np.asarray(inputs.ct_shape) - 1)])).min()
        if edge < 1e-3:  # on the grid's border: in or out is float rounding, either is right
            continue
        assert float(nmap.slice(k)[r, c]) == pytest.approx(_trilinear_by_hand(gmap, g), abs=tol)


def test_labels_match_dicom_headers(lesion_case, site_root: Path) -> None:
    cid, _, _, vol, _, _ = lesion_case
    files = _files_by_instance(site_root / "ct" / cid)
    assert len(vol.labels) == vol.n_slices == len(files)
    ny, nx = vol.hu.shape[1:]
    for k, lab in enumerate(vol.labels):
        (num,) = lab.instances
        f = files[num]
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        # the native slice's position is that file's position
        np.testing.assert_allclose((vol.affine @ [k, 0, 0, 1])[:3],
                                   _pixel_mm_by_pydicom(f, (vol.inplane_factor - 1) / 2,
                                                        (vol.inplane_factor - 1) / 2), atol=0.01)
        centre = _pixel_mm_by_pydicom(f, (int(ds.Rows) - 1) / 2, (int(ds.Columns) - 1) / 2)
        assert lab.table_mm == pytest.approx(centre[2], abs=0.01)
        assert lab.text() == f"instance {num} · table {centre[2]:+.1f} mm"
    # sorted inferior -> superior although the files number superior -> inferior
    assert [lab.table_mm for lab in vol.labels] == sorted(lab.table_mm for lab in vol.labels)


# ---- the real GE head series: tilted, uneven gaps ----
@pytest.fixture(scope="module")
def head():
    series, vol = read_native(HEAD, DATA, SeriesRule(), CtViewConfig())
    assert vol is not None, series.problems
    return series, vol


@needs_head
def test_real_tilted_series_labels_come_from_the_files(head) -> None:
    _, vol = head
    files = _files_by_instance(HEAD)
    assert vol.tilt_deg == pytest.approx(18.5, abs=0.1)
    normal = None
    for k, lab in enumerate(vol.labels):
        pos = (vol.affine @ [k, 0, 0, 1])[:3]
        if normal is None:
            ds = pydicom.dcmread(files[lab.instances[0]], stop_before_pixels=True)
            iop = np.array(ds.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
        offs = [float(np.array(pydicom.dcmread(files[i], stop_before_pixels=True)
                               .ImagePositionPatient, float) @ normal) for i in lab.instances]
        if len(offs) == 1:  # an acquired slice: exactly that file's position
            np.testing.assert_allclose(pos, _pixel_mm_by_pydicom(files[lab.instances[0]], 0, 0),
                                       atol=0.05)
        else:  # interpolated across an uneven gap: between the two files it names
            assert min(offs) - 0.01 < pos @ normal < max(offs) + 0.01
            assert f"{lab.nearest_mm:.1f} mm from" in lab.text()
    exact = {lab.instances[0] for lab in vol.labels if len(lab.instances) == 1}
    assert {1, 2, 14, 28} <= exact  # first, last and slices of the regular 4 mm part
    assert any(len(lab.instances) == 2 for lab in vol.labels)  # the 7 mm part is interpolated


@needs_head
def test_real_series_renders_every_slice_and_window(head) -> None:
    series, vol = head
    grid, gaff = ct_to_grid(series, INPUTS)
    views = CtViews()
    peak = tuple(float(v) for v in vol.centre_mm())
    gmap = _blob(grid.shape, (np.linalg.inv(gaff) @ np.append(peak, 1))[:3], 2.0)
    views.open("h", grid, gaff, gmap, peak, native=vol)
    for k in range(vol.n_slices):
        for w, c in [*WINDOW_PRESETS.values(), (80.0, 40.0)]:
            f = views.render("h", k, w, c)
            assert f.native and f.image.shape == (512, 512, 3) and f.image.dtype == np.uint8
    f = views.render("h", 8, 80, 40)
    assert "instance 9" in f.label and "gantry tilt 18.5°" in f.label
    place = views.place("h")
    assert place is not None and place.inside
    # the peak was put at the volume centre: the answer's slice and pixel say so
    z, y, x = vol.voxel_of(peak)
    assert place.slice_index == round(z) and (place.row, place.column) == (round(y), round(x))


# ---- memory ----
def _vol(n: int = 10, size: int = 64) -> NativeVolume:
    aff = np.diag([2.0, 0.8, 0.8, 1.0])
    labels = tuple(SliceLabel((i + 1,), None, 2.0 * i) for i in range(n))
    return NativeVolume(np.zeros((n, size, size), np.int16), aff, labels)


def _grid(shift_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An (8, 16, 16) grid centred on _vol()'s centre, as preprocess.ct_to_grid centres it."""
    gaff = np.diag([4.0, 3.0, 3.0, 1.0])
    gaff[:3, 3] = _vol().centre_mm() - gaff[:3, :3] @ [3.5, 7.5, 7.5] + shift_mm
    return np.zeros((8, 16, 16), np.float32), gaff


def test_eviction_keeps_memory_bounded_and_rereads() -> None:
    cfg = CtViewConfig(max_volumes=2, max_bytes=2 << 20)  # ~0.6 MiB per view: count binds
    views = CtViews(cfg)
    reads = {"n": 0}

    def reader() -> NativeVolume:
        reads["n"] += 1
        return _vol()

    grid, gaff = _grid()
    gmap = np.ones_like(grid)
    for h in ("a", "b", "c"):
        views.open(h, grid, gaff, gmap, None, reader=reader)
        views.render(h, 3, 1500, -600)
        assert views.kept_bytes() <= cfg.max_bytes
    assert reads["n"] == 3 and not views.is_native("a") and views.is_native("c")
    f = views.render("a", 3, 1500, -600)  # evicted worklist view: read again
    assert f.native and reads["n"] == 4 and not views.is_native("b")
    assert sum(views.is_native(h) for h in "abc") == 2


def test_evicted_upload_falls_back_to_the_grid_with_a_note() -> None:
    views = CtViews(CtViewConfig(max_volumes=1))
    grid, gaff = _grid()
    views.open("up", grid, gaff, None, None, native=_vol())  # no reader: files are gone
    assert views.render("up", 0, 350, 50).native
    views.open("other", grid, gaff, None, None, native=_vol())
    f = views.render("up", 0, 350, 50)
    assert not f.native and f.image.shape == (16, 16, 3)
    assert "model grid slice 1 of 8" in f.label.lower() and "diagnose again" in f.label


def test_lazy_read_on_the_first_slice_request() -> None:
    views = CtViews(CtViewConfig(lazy=True))
    grid, gaff = _grid()
    views.open("h", grid, gaff, None, None, reader=_vol)
    first = views.render("h", 2, 1500, -600, wait=False)  # what diagnose returns
    assert not first.native and "loads with the next slice request" in first.label
    assert views.reads == 0
    assert views.render("h", 2, 1500, -600).native and views.reads == 1
    assert views.render("h", 3, 1500, -600).native and views.reads == 1
    eager = CtViews(CtViewConfig(lazy=False))
    eager.open("h", grid, gaff, None, None, reader=_vol)
    assert eager.reads == 1 and eager.render("h", 2, 1500, -600, wait=False).native


def test_volume_over_budget_is_not_kept() -> None:
    views = CtViews(CtViewConfig(max_bytes=1 << 20))
    grid, gaff = _grid()
    views.open("big", grid, gaff, None, None, native=_vol(n=40, size=128))  # 1.25 MiB
    f = views.render("big", 0, 1500, -600)
    assert not f.native and "memory budget" in f.label and views.kept_bytes() == 0


def test_changed_series_on_disk_is_not_mixed_with_the_diagnosis() -> None:
    views = CtViews()
    grid, gaff = _grid(shift_mm=5.0)  # the files now hold a series 5 mm away from the grid's
    views.open("h", grid, gaff, None, None, reader=_vol)
    f = views.render("h", 0, 1500, -600)
    assert not f.native and "no longer matches" in f.label


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_volumes must be 1..64, got 0"):
        CtViewConfig(max_volumes=0)
    with pytest.raises(ValueError, match="top_fraction"):
        CtViewConfig(top_fraction=1.5)


# ---- the service and the "where?" answer ----
def test_worklist_diagnosis_shows_native_slices(service: DiagnosisService, site_root: Path
                                                ) -> None:
    cid = ct_case_with_ct(site_root)
    d = service.diagnose_case(cid)
    assert d.ct_image is not None and "W 1500 / L -600" in d.ct_label
    if not d.ct_native:  # the series is read on the first slice request
        assert "loads with the next slice request" in d.ct_label
    f = service.ct_frame(d.handle, None)  # what the app asks for next: reads the series
    n_files = len(list((site_root / "ct" / cid).iterdir()))
    assert f.native and f.n_slices == n_files and f.image.shape[:2] == (128, 128)  # synth 128
    assert "instance" in f.label
    bone = service.ct_frame(d.handle, 0, 2000, 500)
    assert bone.index == 0 and "W 2000 / L 500" in bone.label
    assert not np.array_equal(bone.image, service.ct_slice(d.handle, 0))  # lung differs
    where = service.ask(d.handle, "Where in the CT?")
    place = service.ct_views.place(d.handle)
    assert place is not None and place.slice_label in where
    assert f"table position {place.table_mm:+.1f} mm" in where
    with pytest.raises(Exception, match="window width 0"):
        service.ct_frame(d.handle, 0, 0, 40)


def test_upload_keeps_native_volume_after_files_are_deleted(service: DiagnosisService,
                                                            site_root: Path, tmp_path: Path
                                                            ) -> None:
    cid = ct_case_with_ct(site_root)
    copy = tmp_path / "series"
    shutil.copytree(site_root / "ct" / cid, copy)
    z = zip_series(copy, tmp_path / "s.zip")
    d = service.diagnose_upload([z], None, {"age": 70})
    assert not z.exists()
    if d.explanation is None:  # refused as out of scope: nothing to view
        pytest.skip("upload refused by the scope check")
    assert d.ct_native and "instance" in d.ct_label
    assert service.ct_frame(d.handle, 1).native


def test_where_answer_uses_native_place(service: DiagnosisService, site_root: Path) -> None:
    d = service.diagnose_case(ct_case_with_ct(site_root))
    e = d.explanation
    place = NativePlace(4, 30, "instance 26", -112.25, 60, 70, True)
    text = answer_where(e, place)
    assert "instance 26 (slice 5 of 30 as acquired, table position -112.2 mm)" in text
    assert "row 61, column 71" in text
    outside = answer_where(e, dataclasses.replace(place, inside=False))
    assert "outside the scanned volume" in outside
    assert "of the model grid" in answer_where(e, None)  # no native geometry: grid words


def test_overlay_outlines_the_top_region_and_draws_a_scale_bar(lesion_case) -> None:
    from ui.render import OUTLINE, draw_scale_bar

    _, lesion, _, vol, grid, gaff = lesion_case
    centre = np.asarray(lesion.centre_mm, float)
    views = CtViews()
    gmap = _blob(grid.shape, (np.linalg.inv(gaff) @ np.append(centre, 1.0))[:3])
    views.open("h", grid, gaff, gmap, tuple(centre), native=vol)
    k = views.top_index("h", 0)
    assert k == round(float(vol.voxel_of(centre)[0]))
    img = views.render("h", k, 1500, -600).image
    ys, xs = np.nonzero((img == OUTLINE).all(axis=2))
    _, r, c = vol.voxel_of(centre)
    assert ys.size > 0 and ys.min() < r < ys.max() and xs.min() < c < xs.max()

    bar = np.zeros((512, 512, 3), np.uint8)
    draw_scale_bar(bar, 0.5)  # 256 mm wide: the largest round length <= 64 mm is 50 mm
    row = (bar[:, :, 0] == 255).sum(axis=1)
    assert row.max() == 100  # 50 mm at 0.5 mm per pixel


def test_app_ct_slice_endpoint_takes_a_window(service: DiagnosisService, site_root: Path
                                              ) -> None:
    from ui.app import build_app
    from ui.config import UiConfig

    app = build_app(service, UiConfig())
    fns = {d.api_name: d.fn for d in app.fns.values() if d.api_name}
    handle = fns["diagnose"](ct_case_with_ct(site_root))[0]
    png, caption = fns["ct_slice"](handle, 2, 350, 50)
    img = np.asarray(Image.open(png))
    assert caption.startswith("Slice 2 of ") and "W 350 / L 50" in caption
    assert np.array_equal(img, service.ct_slice(handle, 1, 350, 50))  # lossless, same frame
    _, caption_default = fns["ct_slice"](handle, 2)  # the old two-argument call: lung
    assert "W 1500 / L -600" in caption_default
    assert fns["ct_slice"]("", 1, 350, 50) == (None, "")
    # a new handle in the browser: the peak slice, natively, and the slider's native range
    png, caption, slider = fns["ct_open"](handle, 2000, 500)
    place = service.ct_views.place(handle)
    assert slider.value == place.slice_index + 1 and "as acquired" in slider.label
    assert "W 2000 / L 500" in caption and Path(png).is_file()

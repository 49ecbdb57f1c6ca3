"""Views for the app, drawn with numpy (overlays) and HTML (bar charts): no matplotlib.

The pathology overlay is sent at the model's resolution (a 128x128 tile) and enlarged by the
browser without smoothing (CSS `image-rendering: pixelated`). The CT is drawn on the series' own
slices (ui.ct_view: `native_overlay`, `draw_scale_bar`); `ct_slice_overlay` draws the model grid
(the fallback view, and the baseline of benchmarks/bench_ct_view.py).

Overlays: red = evidence towards malignant, blue = towards benign; opacity follows |attribution|
scaled by the largest |value| of the whole map (so slices are comparable).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

from multimodal.data import PATH_MEAN, PATH_STD

RED = np.array([230, 40, 30], np.float32)
BLUE = np.array([40, 90, 230], np.float32)
MAX_ALPHA = 0.65


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (crisp voxels, no interpolation)."""
    return img.repeat(factor, 0).repeat(factor, 1) if factor > 1 else img


def blend(base: np.ndarray, attr: np.ndarray, vmax: float) -> np.ndarray:
    """base (H, W, 3) float32 0..255, attr (H, W) signed -> (H, W, 3) uint8 overlay."""
    if vmax <= 0:
        return base.clip(0, 255).astype(np.uint8)
    a = np.clip(attr / vmax, -1.0, 1.0)[..., None]  # (H, W, 1)
    alpha = MAX_ALPHA * np.abs(a)
    colour = np.where(a > 0, RED, BLUE)
    return (base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def ct_slice_overlay(ct: np.ndarray, cam: np.ndarray | None, index: int, scale: int = 1
                     ) -> np.ndarray:
    """ct, cam: (D, H, W); ct in [-1, 1]. Slice `index` as (H*scale, W*scale, 3) uint8."""
    if not 0 <= index < ct.shape[0]:
        raise IndexError(f"slice {index} outside 0..{ct.shape[0] - 1}")
    grey = ((ct[index] + 1.0) * 127.5).astype(np.float32)
    base = np.repeat(grey[..., None], 3, axis=2)
    if cam is None:
        return upscale(base.clip(0, 255).astype(np.uint8), scale)
    vmax = float(np.abs(cam).max())
    return upscale(blend(base, cam[index], vmax), scale)


def path_overlay(path: np.ndarray, cam: np.ndarray | None) -> np.ndarray:
    """path: (3, S, S) normalised tile, cam: (S, S) -> (S, S, 3) uint8."""
    mean = np.asarray(PATH_MEAN, np.float32)[:, None, None]
    std = np.asarray(PATH_STD, np.float32)[:, None, None]
    rgb = ((path * std + mean).clip(0, 1) * 255).transpose(1, 2, 0).astype(np.float32)
    if cam is None:
        return rgb.astype(np.uint8)
    return blend(rgb, cam, float(np.abs(cam).max()))


def bar_html(labels: Sequence[str], values: Sequence[float], title: str) -> str:
    """Signed horizontal bars (red > 0, blue < 0) as plain HTML: the browser draws them, so a
    chart costs neither a PNG encode nor a file fetch."""
    vmax = max((abs(v) for v in values), default=0.0) or 1.0
    rows = []
    for lab, v in zip(labels, values, strict=True):
        w = 50.0 * abs(v) / vmax
        left = 50.0 if v >= 0 else 50.0 - w
        colour = "#e6281e" if v > 0 else "#285ae6"
        rows.append(
            f'<div style="display:flex;align-items:center;height:20px;font-size:13px">'
            f'<span style="width:150px;overflow:hidden;white-space:nowrap">{escape(lab)}</span>'
            f'<span style="position:relative;flex:1;height:12px;background:linear-gradient('
            f'90deg,transparent 49.8%,#888 49.8%,#888 50.2%,transparent 50.2%)">'
            f'<span style="position:absolute;left:{left:.1f}%;width:{w:.1f}%;height:100%;'
            f'background:{colour}"></span></span>'
            f'<span style="width:56px;text-align:right">{v:+.2f}</span></div>')
    return (f'<div class="fs-bars"><div style="font-weight:600;margin-bottom:4px">'
            f'{escape(title)}</div>{"".join(rows)}</div>')


# ---- the native CT view (ui.ct_view) ----
OUTLINE = np.array([255, 215, 0], np.uint8)  # yellow: apart from both red and blue
SCALE_STEPS_MM = (5, 10, 20, 50, 100, 200)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbour erosion removed)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def native_overlay(grey: np.ndarray, attr: np.ndarray | None, vmax: float, top: float
                   ) -> np.ndarray:
    """grey (H, W) uint8 (windowed), attr (H, W) signed or None -> (H, W, 3) uint8: translucent
    red/blue heat map (as `blend`) and, where attr >= top > 0, the top region's outline."""
    out = np.empty((*grey.shape, 3), np.uint8)
    if attr is None or vmax <= 0:
        out[...] = grey[..., None]
        return out
    # Same colours and opacity as `blend`, per channel on (H, W) planes: ~3x faster at 512.
    a = np.clip(attr.astype(np.float32) * np.float32(1.0 / vmax), -1.0, 1.0)
    alpha = np.abs(a) * np.float32(MAX_ALPHA)
    g = grey.astype(np.float32)
    pos = a > 0
    for c in range(3):
        colour = np.where(pos, RED[c], BLUE[c])
        out[..., c] = g + alpha * (colour - g) + np.float32(0.5)  # rounded like a cast of .5
    if top > 0:
        out[outline(a >= top)] = OUTLINE
    return out


def draw_scale_bar(img: np.ndarray, mm_per_px: float) -> None:
    """A bar of a round length (about a fifth of the width) with its length in mm, drawn in
    place at the lower left; nothing when the spacing is unknown."""
    from PIL import Image, ImageDraw

    h, w = img.shape[:2]
    if not mm_per_px > 0 or w < 48:
        return
    width_mm = w * mm_per_px
    mm = max((s for s in SCALE_STEPS_MM if s <= width_mm / 4), default=None)
    if mm is None:
        return
    px = int(round(mm / mm_per_px))
    x0, y0 = max(4, w // 40), h - max(8, h // 30)
    thick = max(2, h // 160)
    img[y0 - thick - 1:y0 + 1, x0 - 1:x0 + px + 1] = 0  # dark frame: readable on bright bone
    img[y0 - thick:y0, x0:x0 + px] = 255
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((x0, y0 - thick - 13), f"{mm} mm", fill=(255, 255, 255))
    img[...] = np.asarray(pil)

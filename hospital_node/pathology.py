"""Read one pathology tile (PNG/TIFF) as RGB uint8, with the checks a tile must pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vocab.errors import DataProblem

MIN_SIDE = 64
# Colour modes Pillow converts to RGB without losing the stain colours (alpha is dropped).
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass
class PathTile:
    """rgb: (H, W, 3) uint8, or None when unusable; problems explain why."""

    rgb: np.ndarray | None
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.rgb is not None and not any(p.fatal for p in self.problems)


def read_tile(path: Path, rel: str) -> PathTile:
    """Never raises for bad input; `rel` is the name used in problem messages."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            mode, size = im.mode, im.size
            if mode not in _COLOUR_MODES:
                return PathTile(None, [DataProblem("path.not_rgb", f"{rel}: image mode {mode!r} "
                                                   "(grayscale or single-channel), expected RGB "
                                                   "H&E", rel)])
            if mode == "P" and "transparency" not in im.info and _palette_is_gray(im):
                return PathTile(None, [DataProblem("path.not_rgb", f"{rel}: grayscale palette "
                                                   "image, expected RGB H&E", rel)])
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        return PathTile(None, [DataProblem("path.unreadable", f"{rel}: not a readable image "
                                           f"({type(e).__name__})", rel)])
    except (OSError, ValueError, SyntaxError) as e:
        # Pillow raises OSError for truncated data and SyntaxError for some malformed headers.
        return PathTile(None, [DataProblem("path.unreadable", f"{rel}: image data unreadable "
                                           f"({type(e).__name__})", rel)])
    if min(size) < MIN_SIDE:
        return PathTile(None, [DataProblem("path.too_small", f"{rel}: {size[0]}x{size[1]} px, "
                                           f"need at least {MIN_SIDE}x{MIN_SIDE}", rel)])
    return PathTile(rgb)


def _palette_is_gray(im: Image.Image) -> bool:
    pal = np.asarray(im.convert("RGB"), dtype=np.int16)
    return bool((np.abs(pal[..., 0] - pal[..., 1]).max() == 0)
                and (np.abs(pal[..., 1] - pal[..., 2]).max() == 0))

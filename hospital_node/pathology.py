"""Read one pathology tile (PNG/TIFF) as RGB uint8, with the checks a tile must pass.

Bounded before decoding: the file size is capped by the caller (hospital_node.site_files), the
pixel count is checked from the header before `load()`, and Pillow's own decompression-bomb
limit is set explicitly (Pillow only warns below twice its limit, so its warning is an error here).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vocab.errors import DataProblem

MIN_SIDE = 64
MAX_TILE_BYTES = 256 << 20     # a file; a 4096x4096 RGB PNG is ~50 MB uncompressed
MAX_TILE_PIXELS = 6000 * 6000  # decoded RGB ~108 MB; whole slides are tiled before they get here
Image.MAX_IMAGE_PIXELS = MAX_TILE_PIXELS  # explicit (Pillow's default is 89 Mpx)
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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_TILE_PIXELS:
                    return PathTile(None, [DataProblem(
                        "path.too_large", f"{rel}: {w}x{h} px, over the {MAX_TILE_PIXELS} pixel "
                        "limit; not decoded", rel)])
                im.load()  # decode now: truncated files fail here, not later
                mode, size = im.mode, im.size
                if mode not in _COLOUR_MODES:
                    return PathTile(None, [DataProblem("path.not_rgb", f"{rel}: image mode "
                                                       f"{mode!r} (grayscale or single-channel), "
                                                       "expected RGB H&E", rel)])
                if mode == "P" and "transparency" not in im.info and _palette_is_gray(im):
                    return PathTile(None, [DataProblem("path.not_rgb", f"{rel}: grayscale "
                                                       "palette image, expected RGB H&E", rel)])
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow checks the header's size at open(), before our own check could run.
        return PathTile(None, [DataProblem("path.too_large", f"{rel}: over the "
                                           f"{MAX_TILE_PIXELS} pixel limit; not decoded", rel)])
    except UnidentifiedImageError as e:
        return PathTile(None, [DataProblem("path.unreadable", f"{rel}: not a readable image "
                                           f"({type(e).__name__})", rel)])
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        # Pillow raises OSError for truncated data and SyntaxError for some malformed headers;
        # struct/zlib errors come from broken chunks.
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

"""H&E-like pathology tile: eosin-stained stroma and haematoxylin-stained nuclei.

Colour follows the Beer-Lambert stain model used by colour deconvolution (Ruifrok & Johnston):
optical density = C_H * v_H + C_E * v_E, RGB = 255 * exp(-OD). Hospitals differ in the stain
vectors (hue) and dye strength. Nuclear density, size, pleomorphism and darkness (atypia) follow
the pathology score s_path, strongest inside one elliptical atypia region recorded in the truth.
"""

from __future__ import annotations

import numpy as np

from synth.config import SiteConfig

# Ruifrok-Johnston stain vectors (OD per unit dye in R, G, B).
_V_H = np.array([0.650, 0.704, 0.286])
_V_E = np.array([0.072, 0.990, 0.105])
# Direction a positive stain_shift moves the vectors: haematoxylin bluer, eosin more purple.
_SHIFT_H = np.array([0.15, 0.0, 0.25])
_SHIFT_E = np.array([0.20, -0.05, 0.25])
_OD_SCALE = 1.8  # OD of one unit of dye: nuclei come out purple-blue, stroma pink


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def stain_vectors(site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    """This hospital's (haematoxylin, eosin) vectors."""
    s = site.stain_shift
    return _unit(np.abs(_V_H + s * _SHIFT_H)), _unit(np.abs(_V_E + s * _SHIFT_E))


def _smooth(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance smooth noise (FFT Gaussian filter); anisotropic sigma gives fibres."""
    white = rng.standard_normal(shape)
    fy, fx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.rfftfreq(shape[1]), indexing="ij")
    field = np.fft.irfftn(
        np.fft.rfft2(white) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2)), s=shape
    )
    return field / (field.std() + 1e-12)


def _nuclei(
    h: np.ndarray,
    n: int,
    level: np.ndarray | float,
    centres: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Stamp n nuclei into the haematoxylin map h (in place, max-composited, wrapping edges).

    level: atypia per nucleus (0 normal .. ~3 very atypical): bigger, more variable, more
    elongated, irregular and darker nuclei as it grows.
    """
    if n == 0:
        return
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), (n,))
    radius = 3.2 * np.exp(0.22 * level) * np.exp(rng.normal(0, 0.08 + 0.07 * level))
    radius = np.clip(radius, 2.0, 9.0)
    ecc = np.clip(0.1 + 0.08 * level + rng.normal(0, 0.05, n), 0.0, 0.6)  # elongation
    theta = rng.uniform(0, np.pi, n)
    irreg = np.clip(0.05 * level, 0.0, 0.25)  # boundary wobble amplitude
    phase = rng.uniform(0, 2 * np.pi, n)
    dark = np.clip(0.85 + 0.15 * level + rng.normal(0, 0.05, n), 0.6, 1.6)  # hyperchromasia
    half = int(np.ceil(radius.max() * (1 + ecc.max()) * (1 + irreg.max()))) + 1
    off = np.arange(-half, half + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")  # (P, P)
    cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    fx = centres[:, 1, None, None] % 1.0
    fy = centres[:, 0, None, None] % 1.0
    px, py = dx[None] - fx, dy[None] - fy  # sub-pixel centres
    ua = (px * cos_t + py * sin_t) / (radius * (1 + ecc))[:, None, None]
    va = (-px * sin_t + py * cos_t) / (radius * (1 - ecc))[:, None, None]
    rho = np.sqrt(ua**2 + va**2)
    ang = np.arctan2(va, ua)
    rho = rho / (1.0 + irreg[:, None, None] * np.sin(3 * ang + phase[:, None, None]))
    inside = np.clip((1.0 - rho) * radius[:, None, None] + 0.5, 0.0, 1.0)  # 1 px soft edge
    chroma = 0.8 + 0.2 * rng.random(inside.shape)  # granular chromatin
    val = inside * chroma * dark[:, None, None]
    size = h.shape[0]
    iy = (np.floor(centres[:, 0]).astype(int)[:, None, None] + dy[None]) % size
    ix = (np.floor(centres[:, 1]).astype(int)[:, None, None] + dx[None]) % size
    np.maximum.at(h, (iy.ravel(), ix.ravel()), val.ravel())


def _density(level: float) -> float:
    """Nuclei per px^2; crowding grows with atypia (the main cue at low resolution)."""
    return 0.0018 * float(np.exp(0.45 * level))


def collagen_fraction(score: float) -> float:
    """Target area fraction of collagen bands for a fibrosis pathology score t_path (monotone:
    ~0.05 at t=-2, ~0.21 at 0, ~0.41 at 2)."""
    return float(0.03 + 0.42 / (1.0 + np.exp(-(1.3 * score - 0.3))))


def _streaks(shape: tuple[int, int], frac: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask (0..1) of roughly parallel bands covering ~frac of the tile.

    Anisotropic smooth noise (long along one random direction, thin across it) thresholded at
    its (1 - frac) quantile: elongated, wavy streaks like the collagen of fibrotic lung.
    """
    theta = rng.uniform(0, np.pi)
    fy, fx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.rfftfreq(shape[1]), indexing="ij")
    along = fx * np.cos(theta) + fy * np.sin(theta)
    across = -fx * np.sin(theta) + fy * np.cos(theta)
    gain = np.exp(-2 * np.pi**2 * ((4.0 * across) ** 2 + (16.0 * along) ** 2))
    field = np.fft.irfftn(np.fft.rfft2(rng.standard_normal(shape)) * gain, s=shape)
    field /= field.std() + 1e-12
    q = np.quantile(field, 1.0 - frac)
    return np.clip((field - q) / 0.3 + 0.5, 0.0, 1.0)


def _paint_collagen(
    eosin: np.ndarray, hema: np.ndarray, score: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Dense eosinophilic collagen bands (fraction collagen_fraction(score)), paucicellular:
    eosin rises to ~0.9 in the bands and nuclei there fade (collagen displaces cells)."""
    band = _streaks(eosin.shape, collagen_fraction(score), rng)
    dense = np.clip(0.9 + 0.04 * _smooth(eosin.shape, 1.5, rng), 0.8, 1.0)
    return eosin + band * (dense - eosin), hema * (1.0 - 0.6 * band)


def render_tile(
    site: SiteConfig,
    score: float,
    size: int,
    rng: np.random.Generator,
    fibrosis_score: float | None = None,
    fibrosis_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(size, size, 3) uint8 H&E tile and its atypia region bbox (x0, y0, x1, y1), half-open.

    Inside the region (an ellipse inscribed in the bbox) atypia = s_path; outside it is
    0.4 * s_path, so the whole tile carries the signal and the region carries it most.
    fibrosis_score (t_path of the second disease, with its own fibrosis_rng): collagen bands
    (_paint_collagen); None = exactly the one-task tile.
    """
    shape = (size, size)
    # Stroma: fibrous eosin with pale gaps (fat / lumen), as in a core biopsy.
    fibres = _smooth(shape, 2.5, rng) + 0.5 * _smooth(shape, 8.0, rng)
    eosin = np.clip(0.42 + 0.12 * fibres, 0.05, 0.9)
    pale = _smooth(shape, 14.0, rng) > 1.6
    eosin = np.where(pale, 0.06, eosin)

    # Atypia region: 40-65 % of the tile edge, anywhere in the tile.
    w = int(rng.integers(int(0.40 * size), int(0.65 * size) + 1))
    hgt = int(rng.integers(int(0.40 * size), int(0.65 * size) + 1))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - hgt + 1))
    bbox = (x0, y0, x0 + w, y0 + hgt)

    hema = np.zeros(shape, np.float64)
    area = size * size
    level_out = max(0.0, 1.0 + 0.4 * score)
    level_in = max(0.0, 1.0 + score)
    n_out = int(rng.poisson(_density(level_out) * area))
    c_out = rng.uniform(0, size, (n_out, 2))
    cy, cx, ry, rx = (y0 + y0 + hgt) / 2, (x0 + x0 + w) / 2, hgt / 2, w / 2
    in_region = ((c_out[:, 0] - cy) / ry) ** 2 + ((c_out[:, 1] - cx) / rx) ** 2 <= 1.0
    c_out = c_out[~in_region]  # the region is re-populated at its own density below
    n_in = int(rng.poisson(_density(level_in) * np.pi * rx * ry))
    ang, rr = rng.uniform(0, 2 * np.pi, n_in), np.sqrt(rng.uniform(0, 1, n_in))
    c_in = np.stack([cy + ry * rr * np.sin(ang), cx + rx * rr * np.cos(ang)], 1)
    _nuclei(hema, len(c_out), level_out, c_out, rng)
    _nuclei(hema, len(c_in), level_in, c_in, rng)
    hema = hema + 0.04 * np.clip(_smooth(shape, 3.0, rng), 0, None)  # faint background stain
    if fibrosis_score is not None:
        if fibrosis_rng is None:
            raise ValueError("render_tile: fibrosis_score needs its own fibrosis_rng")
        eosin, hema = _paint_collagen(eosin, hema, fibrosis_score, fibrosis_rng)

    v_h, v_e = stain_vectors(site)
    k = _OD_SCALE * site.stain_strength
    od = k * (
        hema[..., None] * v_h
        + eosin[..., None] * (1.0 - 0.7 * np.clip(hema, 0, 1))[..., None] * v_e
    )
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 3.0, (*shape, 3))  # camera noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), bbox

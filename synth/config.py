"""Knobs of the synthetic federation: one frozen `SynthConfig`, one `SiteConfig` per hospital.

Every field has a "why". `SynthConfig.default(n_sites, seed)` is the embedded default used by
`fedsight synth` and the demo; tests shrink it with `sizes=`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vocab.errors import ConfigError

# Per-hospital tables for the default federation, cycled when n_sites > len(table). Values are
# chosen to differ the way real hospitals do (see synth/README.md), not drawn at random, so the
# default federation is easy to talk about ("site_c is the one without pathology").
_SIZES = (90, 70, 50, 40, 60, 80)
_PREVALENCE = (0.30, 0.15, 0.45, 0.25, 0.10, 0.50)
_SLICE_MM = (5.0, 8.0, 6.0, 5.0, 8.0, 6.0)
_NOISE_HU = (12.0, 22.0, 16.0, 28.0, 18.0, 14.0)
_HU_OFFSET = (0.0, 6.0, -5.0, 3.0, -3.0, 5.0)
_FOV_MM = (350.0, 360.0, 340.0, 350.0, 345.0, 355.0)
_STAIN_SHIFT = (0.0, 0.6, -0.5, 0.3, -0.8, 0.9)
_STAIN_STRENGTH = (1.0, 1.15, 0.9, 1.05, 0.85, 1.2)
_AGE_MEAN = (63.0, 58.0, 68.0, 61.0, 55.0, 66.0)
_CT_MISSING = (0.05, 0.10, 0.0, 0.15, 0.05, 0.10)
_PATH_MISSING = (0.10, 0.20, 1.0, 0.05, 0.15, 0.10)  # 1.0: the hospital has no pathology at all
_EHR_CELL_MISSING = (0.03, 0.08, 0.05, 0.12, 0.05, 0.03)
_SCANNERS = ("SYNTH-CT 64", "SYNTH-CT 16", "SYNTH-CT 128", "SYNTH-CT 32")
# Second disease (opt-in, SynthConfig.tasks): fibrotic ILD is rarer and its case mix differs from
# the nodule one, so a site's nodule prevalence says little about its fibrosis prevalence.
_FIBROSIS_PREVALENCE = (0.20, 0.12, 0.30, 0.18, 0.08, 0.25)
# Tasks the generator knows, in the order they may appear; the first is always written.
KNOWN_TASKS = ("nodule", "fibrosis")


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: its size, case mix, scanner, stain and what it tends to lack."""

    site_id: str
    n_cases: int
    # Fraction of malignant cases; sets this site's intercept b0 of the label model.
    prevalence: float
    # Scanner protocol: thicker slices = fewer, coarser slices (30-50 for a 250 mm chest).
    slice_thickness_mm: float
    # Gaussian scanner noise (HU, per voxel) and calibration offset (HU, whole volume).
    noise_sigma_hu: float
    hu_offset: float
    # Reconstruction field of view across the 128 px matrix -> pixel spacing differs by site.
    fov_mm: float
    # H&E stain: shift moves the stain colours (-1 redder .. +1 bluer), strength scales dye.
    stain_shift: float
    stain_strength: float
    # Mean patient age; age also carries the EHR risk factor (covariate shift across sites).
    age_mean: float
    # Probability that a case has no CT series / no pathology tile (1.0 = modality absent).
    ct_missing_rate: float
    path_missing_rate: float
    # Probability that one EHR cell is empty.
    ehr_cell_missing_rate: float
    scanner_model: str = "SYNTH-CT 64"
    # Fraction of fibrosis-positive cases (used only when "fibrosis" is in SynthConfig.tasks).
    fibrosis_prevalence: float = 0.20

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("n_cases", self.n_cases >= 1),
            ("prevalence", 0.01 <= self.prevalence <= 0.99),
            ("fibrosis_prevalence", 0.01 <= self.fibrosis_prevalence <= 0.99),
            ("slice_thickness_mm", 1.0 <= self.slice_thickness_mm <= 20.0),
            ("noise_sigma_hu", 0.0 <= self.noise_sigma_hu <= 100.0),
            ("hu_offset", abs(self.hu_offset) <= 50.0),
            ("fov_mm", 300.0 <= self.fov_mm <= 500.0),
            ("stain_shift", -1.0 <= self.stain_shift <= 1.0),
            ("stain_strength", 0.5 <= self.stain_strength <= 1.5),
            ("age_mean", 30.0 <= self.age_mean <= 85.0),
            ("ct_missing_rate", 0.0 <= self.ct_missing_rate <= 1.0),
            ("path_missing_rate", 0.0 <= self.path_missing_rate <= 1.0),
            ("ehr_cell_missing_rate", 0.0 <= self.ehr_cell_missing_rate <= 0.5),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(
                    f"site {self.site_id!r}: {name}={getattr(self, name)!r} is out of range"
                )
        if not self.site_id.replace("_", "").isalnum():
            raise ConfigError(f"site_id must be letters/digits/underscore, got {self.site_id!r}")


@dataclass(frozen=True)
class LabelModel:
    """The known model the labels are drawn from (synth/README.md, "generative model").

    logit = b0(site) + a*z_shared + b*z_ct + c*z_path + d*z_ehr, label ~ Bernoulli(sigmoid(logit)).
    Modality m renders s_m = w_shared*z_shared + sqrt(1 - w_shared^2)*z_m (a standard normal).
    With a=b=c=d=1.4 and w_shared=0.6: Bayes AUC ~0.91 from the latents, ~0.78 from any one
    modality's score, ~0.875 from all three scores together (tests/synth/test_model.py).
    """

    a: float = 1.4  # weight of the factor every modality shows a part of
    b: float = 1.4  # CT-only factor (nodule size, density, margin)
    c: float = 1.4  # pathology-only factor (nuclear density, size, pleomorphism)
    d: float = 1.4  # EHR-only factor (age, pack-years, family history, CEA)
    # How much of each modality's score is the shared factor: higher = modalities more redundant,
    # so fusion gains less; 0.6 leaves each modality mostly its own information.
    w_shared: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.w_shared < 1.0:
            raise ConfigError(f"w_shared must be in [0, 1), got {self.w_shared!r}")


def default_fibrosis_model() -> LabelModel:
    """The second disease's label model: a stronger shared factor (seen by every modality and,
    through SynthConfig.fibrosis_coupling, partly shared with the nodule task), a CT-heavy own
    part (fibrosis is a CT diagnosis first) and a weaker EHR part."""
    return LabelModel(a=1.8, b=1.4, c=1.2, d=1.0, w_shared=0.5)


MAX_SITES = 999


def default_site_id(i: int) -> str:
    """site_a .. site_z for the first 26 (as always), then site_026 .. site_998. Site knobs cycle
    through the table above; every site draws its own patients (its own random stream)."""
    return f"site_{chr(ord('a') + i)}" if i < 26 else f"site_{i:03d}"


def _default_sites(n_sites: int, sizes: tuple[int, ...] | None) -> tuple[SiteConfig, ...]:
    if not 1 <= n_sites <= MAX_SITES:
        raise ConfigError(f"n_sites must be 1..{MAX_SITES}, got {n_sites!r}")
    if sizes is not None and len(sizes) != n_sites:
        raise ConfigError(f"sizes has {len(sizes)} entries for {n_sites} sites")
    sites = []
    for i in range(n_sites):
        k = i % len(_SIZES)
        sites.append(
            SiteConfig(
                site_id=default_site_id(i),
                n_cases=_SIZES[k] if sizes is None else int(sizes[i]),
                prevalence=_PREVALENCE[k],
                slice_thickness_mm=_SLICE_MM[k],
                noise_sigma_hu=_NOISE_HU[k],
                hu_offset=_HU_OFFSET[k],
                fov_mm=_FOV_MM[k],
                stain_shift=_STAIN_SHIFT[k],
                stain_strength=_STAIN_STRENGTH[k],
                age_mean=_AGE_MEAN[k],
                ct_missing_rate=_CT_MISSING[k],
                path_missing_rate=_PATH_MISSING[k],
                ehr_cell_missing_rate=_EHR_CELL_MISSING[k],
                scanner_model=_SCANNERS[i % len(_SCANNERS)],
                fibrosis_prevalence=_FIBROSIS_PREVALENCE[k],
            )
        )
    return tuple(sites)


@dataclass(frozen=True)
class SynthConfig:
    """The whole synthetic federation. Same config (incl. seed) -> byte-identical files."""

    # Root of every random stream; each case/modality gets its own child stream, so changing one
    # site's size does not change another site's patients.
    seed: int = 0
    sites: tuple[SiteConfig, ...] = field(default_factory=lambda: _default_sites(4, None))
    label_model: LabelModel = field(default_factory=LabelModel)
    # CT matrix: 128 x 128 px per slice keeps a series ~1.3 MB while a 5 mm nodule still spans
    # 3+ pixels; the model grid (multimodal.grid) is coarser anyway.
    ct_matrix: int = 128
    # Cranio-caudal extent of the scan; 250 mm covers the lungs from apex to diaphragm.
    chest_length_mm: float = 250.0
    # Pathology tile edge (px); the model sees it resized to InputConfig.path_size (128).
    path_tile_px: int = 256
    # Index nodules are at least this big so the nearest voxel of any protocol is inside them.
    min_nodule_radius_mm: float = 5.0
    # Mean number of small calcified granulomas per CT (label-independent distractors).
    granulomas_per_ct: float = 0.6
    # Diseases written: "nodule" always (labels.csv); ("nodule", "fibrosis") adds fibrotic ILD
    # (labels/fibrosis.csv) with its own latent model and signal in every modality.
    tasks: tuple[str, ...] = ("nodule",)
    # The fibrosis label model (same closed forms as label_model, its own weights).
    fibrosis_model: LabelModel = field(default_factory=default_fibrosis_model)
    # Correlation of the fibrosis shared factor with the nodule one: 0 = unrelated diseases,
    # near 1 = the same patients are at risk. 0.7 makes the labels correlated (phi ~0.09) but far
    # from identical, so a nodule model transfers some, not all, of what fibrosis needs.
    fibrosis_coupling: float = 0.7
    # Share of each site's patients whose labels are written; the others keep their images and
    # EHR but appear in no labels file (a hospital holds far more images than labels: the
    # self-supervised pretraining stage learns from them). Truth keeps every label.
    labelled_fraction: float = 1.0

    def __post_init__(self) -> None:
        tasks = self.tasks
        if (
            not isinstance(tasks, tuple | list)
            or not tasks
            or any(t not in KNOWN_TASKS for t in tasks)
            or len(set(tasks)) != len(tasks)
            or tasks[0] != KNOWN_TASKS[0]
        ):
            raise ConfigError(
                f"tasks must be distinct ids from {list(KNOWN_TASKS)} starting with "
                f"{KNOWN_TASKS[0]!r}, got {tasks!r}"
            )
        object.__setattr__(self, "tasks", tuple(tasks))  # a list from a caller -> hashable tuple
        if not 0.0 <= self.fibrosis_coupling < 1.0:
            raise ConfigError(
                f"fibrosis_coupling must be in [0, 1), got {self.fibrosis_coupling!r}"
            )
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ConfigError(
                f"labelled_fraction must be in (0, 1], got {self.labelled_fraction!r}"
            )
        if not self.sites:
            raise ConfigError("a federation needs at least one site")
        ids = [s.site_id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"site ids must be unique, got {ids}")
        if not 64 <= self.ct_matrix <= 512:
            raise ConfigError(f"ct_matrix must be 64..512, got {self.ct_matrix!r}")
        if not 100.0 <= self.chest_length_mm <= 500.0:
            raise ConfigError(f"chest_length_mm must be 100..500, got {self.chest_length_mm!r}")
        if not 64 <= self.path_tile_px <= 1024:
            raise ConfigError(f"path_tile_px must be 64..1024, got {self.path_tile_px!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed!r}")

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @classmethod
    def default(
        cls, n_sites: int = 4, seed: int = 0, sizes: tuple[int, ...] | None = None, **kw: Any
    ) -> SynthConfig:
        """The embedded default: n_sites hospitals of 40..90 patients (~250 for 4 sites).

        sizes: patients per site (overrides the default table); kw: other SynthConfig fields.
        """
        return cls(seed=seed, sites=_default_sites(n_sites, sizes), **kw)

    def with_site(self, site_id: str, **changes: Any) -> SynthConfig:
        """A copy with one site's knobs changed (e.g. a larger draw for a test)."""
        if site_id not in {s.site_id for s in self.sites}:
            raise ConfigError(f"no site {site_id!r}; sites: {[s.site_id for s in self.sites]}")
        sites = tuple(replace(s, **changes) if s.site_id == site_id else s for s in self.sites)
        return replace(self, sites=sites)

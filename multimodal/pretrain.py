"""Self-supervised pretraining of the image encoders on unlabelled cases (VICReg).

Every hospital holds far more images than labels. Here the CT conv path and the pathology
backbone learn from two augmented views of each unlabelled case: the embeddings of the two views
should agree (invariance), every embedding dimension should vary across the batch (variance) and
dimensions should not duplicate each other (covariance).

Why VICReg (Bardes, Ponce & LeCun, ICLR 2022) and not SimCLR, BYOL or masked reconstruction:
- SimCLR needs many negatives per batch; a hospital trains on batches of 16 on two cores, and
  negatives cannot be pooled across hospitals without moving embeddings off-site.
- BYOL/SimSiam avoid negatives but rely on an asymmetric predictor and stop-gradient (BYOL also on
  a momentum teacher that would have to be federated too) to avoid collapse, which is fragile at
  small batch sizes; VICReg's variance term prevents collapse explicitly, per batch, with no
  extra network state.
- Masked-patch reconstruction (MAE) suits ViTs with many patches; our CT grid is 32x64x64 with a
  patchify stem to 16^3 cells and a conv path, and a lesion is 1-3 voxels, which a pixel
  reconstruction loss mostly ignores.
Each modality has its own small projector (`SSLHeads`), which travels with the encoders in a
federated pretraining run and is dropped afterwards. Views are scanner- and stain-like: CT
intensity offset/scale, noise, left-right flip and a random crop resized back; pathology flips,
90-degree rotations, stain jitter and a crop resized back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from multimodal.config import _from_dict, _to_dict
from multimodal.data import Batch, PreparedCase
from multimodal.model import FedsightModel
from multimodal.train import _deterministic, as_batch
from vocab.errors import ConfigError

SSL_MODALITIES = ("ct", "path")
HEADS_PREFIX = "ssl."  # state-dict prefix of the projectors in a pretraining run's arrays


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    proj_dim: int = 128
    # VICReg's coefficients (the paper's defaults: 25, 25, 1)
    sim_coef: float = 25.0
    std_coef: float = 25.0
    cov_coef: float = 1.0
    modalities: tuple[str, ...] = SSL_MODALITIES
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in SSL_MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(f"pretrain modalities must be a non-empty subset of "
                              f"{SSL_MODALITIES}, got {self.modalities!r}")
        # upper bounds: a config arrives over the wire, and a hospital must not be made to
        # allocate or loop without end
        if not (1 <= self.epochs <= 1000 and 2 <= self.batch_size <= 4096 and self.lr > 0
                and 2 <= self.proj_dim <= 8192 and self.weight_decay >= 0):
            raise ConfigError(f"pretrain: epochs >= 1 and <= 1000, batch_size >= 2 (the "
                              f"variance term needs two cases) and <= 4096, lr > 0, proj_dim "
                              f">= 2 and <= 8192, weight_decay >= 0; got {self!r}")
        coefs = (self.sim_coef, self.std_coef, self.cov_coef)
        if min(coefs) < 0 or max(coefs) <= 0:
            raise ConfigError(f"pretrain: sim_coef, std_coef, cov_coef must be >= 0 and not all "
                              f"0, got {coefs!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def _width(model: FedsightModel, m: str) -> int:
    if m == "ct":
        return 2 * model.cfg.ct_channels[-1]
    return 2 * model.encoders["path"].backbone.feature_info.channels()[-1]


class SSLHeads(nn.Module):
    """One projector per pretrained modality: pooled features (mean+max) -> proj_dim."""

    def __init__(self, model: FedsightModel, cfg: PretrainConfig) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(_width(model, m), 2 * cfg.proj_dim),
                             nn.LayerNorm(2 * cfg.proj_dim), nn.GELU(),
                             nn.Linear(2 * cfg.proj_dim, cfg.proj_dim))
            for m in cfg.modalities if m in model.cfg.modalities})


# What VICReg trains (`features`): the CT conv path and the pathology backbone. The token
# projections, the CT learned-path gate and the nodule evidence are the task's and never
# pretrained, so a task model keeps its own (e.g. another ct_deep_gate_init).
PRETRAINED_PARTS = {"ct": ("stem.", "blob.", "blob_proj.", "stages."), "path": ("backbone.",)}


def encoder_keys(model: FedsightModel, modalities: Sequence[str] = SSL_MODALITIES) -> list[str]:
    """State-dict keys of the pretrained encoder parts (what a pretraining run moves)."""
    prefixes = tuple(f"encoders.{m}.{p}" for m in modalities for p in PRETRAINED_PARTS[m])
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def features(model: FedsightModel, m: str, x: torch.Tensor) -> torch.Tensor:
    """(B, 2C) mean+max pooled last feature map of modality m's encoder."""
    if m == "ct":
        f, _ = model.encoders["ct"].conv_features(x)
    else:
        f = model.encoders["path"].feature_layer(model.encoders["path"].backbone(x)[-1])
    f = f.flatten(2)  # (B, C, N)
    return torch.cat([f.mean(-1), f.amax(-1)], 1)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, cfg: PretrainConfig
           ) -> tuple[torch.Tensor, dict[str, float]]:
    """VICReg loss of two (N, K) embedding batches and its three parts (paper, Algorithm 1)."""
    n, k = z1.shape
    sim = F.mse_loss(z1, z2)
    std = sum(F.relu(1.0 - torch.sqrt(z.var(0) + 1e-4)).mean() for z in (z1, z2))
    cov = z1.new_zeros(())
    for z in (z1, z2):
        c = z - z.mean(0)
        c = (c.T @ c) / (n - 1)  # (K, K)
        off = c - torch.diag(torch.diagonal(c))
        cov = cov + off.pow(2).sum() / k
    loss = cfg.sim_coef * sim + cfg.std_coef * std + cfg.cov_coef * cov
    return loss, {"sim": float(sim.detach()), "std": float(std.detach()),
                  "cov": float(cov.detach())}


def _crop_resize(x: torch.Tensor, gen: torch.Generator, lo: float) -> torch.Tensor:
    """A random crop of each case (side fraction in [lo, 1] per axis) resized back."""
    size = x.shape[2:]
    out = []
    for i in range(x.shape[0]):
        sl = [slice(None), slice(None)]
        for s in size:
            f = lo + (1 - lo) * float(torch.rand((), generator=gen))
            n = max(2, round(f * s))
            o = int(torch.randint(0, s - n + 1, (), generator=gen))
            sl.append(slice(o, o + n))
        crop = x[i:i + 1][tuple(sl)]
        mode = "trilinear" if x.dim() == 5 else "bilinear"
        out.append(F.interpolate(crop, size=size, mode=mode, align_corners=False))
    return torch.cat(out)


def ct_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (B, 1, D, H, W) in HU/1000 -> a scanner-like view: crop 80-100 % resized back,
    left-right flip, calibration offset (+-30 HU) and scale (+-5 %), noise (~15 HU)."""
    b = x.shape[0]
    v = _crop_resize(x, gen, 0.8)
    flip = torch.rand(b, generator=gen) < 0.5
    v = torch.where(flip.view(b, 1, 1, 1, 1), v.flip(-1), v)
    shift = (torch.rand(b, 1, 1, 1, 1, generator=gen) - 0.5) * 0.06
    scale = 1 + (torch.rand(b, 1, 1, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(v.shape, generator=gen) * 0.015
    return v * scale + shift + noise


def path_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (B, 3, S, S) normalised RGB -> a stain-like view: crop 70-100 % resized back, flips,
    90-degree rotation, per-channel stain scale (+-10 %) and shift (+-0.2 sd)."""
    b = x.shape[0]
    v = _crop_resize(x, gen, 0.7)
    f = torch.rand(3, b, generator=gen) < 0.5
    v = torch.where(f[0].view(b, 1, 1, 1), v.flip(-1), v)
    v = torch.where(f[1].view(b, 1, 1, 1), v.flip(-2), v)
    v = torch.where(f[2].view(b, 1, 1, 1), v.transpose(-1, -2), v)
    scale = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.4
    return v * scale + shift


VIEWS = {"ct": ct_view, "path": path_view}


def _inputs(b: Batch, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (b.ct, b.ct_present) if m == "ct" else (b.path, b.path_present)


def ssl_loss(model: FedsightModel, heads: SSLHeads, b: Batch, cfg: PretrainConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over pretrained modalities of VICReg on the present rows' two views."""
    total = b.ct.new_zeros(())
    parts: dict[str, float] = {}
    for m in heads.proj:
        x, present = _inputs(b, m)
        x = x[present]
        if x.shape[0] < 2:  # the variance term needs two cases
            continue
        z1 = heads.proj[m](features(model, m, VIEWS[m](x, gen)))
        z2 = heads.proj[m](features(model, m, VIEWS[m](x, gen)))
        loss, p = vicreg(z1, z2, cfg)
        total = total + loss
        parts[f"ssl_{m}"] = float(loss.detach())
    return total, parts


@torch.no_grad()
def objective(model: FedsightModel, heads: SSLHeads, cases: Sequence[PreparedCase] | Batch,
              cfg: PretrainConfig, seed: int = 12345) -> dict[str, float]:
    """The pretraining objective on fixed views of `cases` (same seed = same views): what
    pretraining should lower, measured without training."""
    model.eval()
    heads.eval()
    full = as_batch(model, cases)
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    n = 0
    for idx in torch.arange(len(full)).split(cfg.batch_size):
        _, parts = ssl_loss(model, heads, full.select(idx), cfg, gen)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def pretrain_local(model: FedsightModel, heads: SSLHeads, cases: Sequence[PreparedCase] | Batch,
                   cfg: PretrainConfig) -> list[dict[str, float]]:
    """Train the pretrained modalities' encoders and their projectors on `cases` (labels are not
    read: unlabelled cases count). Other parameters are not touched."""
    t0 = time.perf_counter()
    full = as_batch(model, cases)
    named = dict(model.named_parameters())
    groups = [[p for n, p in named.items() if n in set(encoder_keys(model, (m,)))]
              + list(heads.proj[m].parameters()) for m in heads.proj]
    params = [p for g in groups for p in g]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train()
    heads.train()
    history: list[dict[str, float]] = []
    try:
        with _deterministic():
            for epoch in range(cfg.epochs):
                sums: dict[str, float] = {}
                nb = 0
                for idx in torch.randperm(len(full), generator=gen).split(cfg.batch_size):
                    loss, parts = ssl_loss(model, heads, full.select(idx), cfg, gen)
                    if not parts:
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for group in groups:  # per modality: one must not starve the other
                        torch.nn.utils.clip_grad_norm_(group, 1.0)
                    opt.step()
                    nb += 1
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                history.append({"epoch": float(epoch), "seconds": time.perf_counter() - t0,
                                **{k: v / max(nb, 1) for k, v in sums.items()}})
    finally:
        model.eval()
        heads.eval()
    return history


def load_pretrained_encoders(model: FedsightModel, state: dict[str, torch.Tensor],
                             modalities: Sequence[str] = SSL_MODALITIES) -> list[str]:
    """Copy the pretrained modalities' encoder weights from `state` (a pretraining run's arrays
    or a pretrained version's state dict) into `model`; returns the keys copied. A key the model
    expects but the state lacks, or of another shape, is a ConfigError naming it."""
    own = model.state_dict()
    keys = encoder_keys(model, modalities)
    missing = [k for k in keys if k not in state]
    wrong = [k for k in keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ConfigError(f"pretrained encoder weights do not fit this model: missing "
                          f"{missing[:3]}, other shape {wrong[:3]}")
    with torch.no_grad():
        for k in keys:
            own[k].copy_(state[k])
    return keys

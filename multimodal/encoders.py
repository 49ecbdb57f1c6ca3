"""Modality encoders: each maps its input to a few tokens of width d_model.

CT (MONAI 3D blocks) -> prod(ct_cells) tokens; pathology (timm by name) -> prod(path_cells) tokens;
EHR -> one token per schema field. Each encoder exposes `feature_layer`, an identity module whose
output is the last feature map (for LayerGradCam in explain/).
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, ResidualUnit

from multimodal.config import ModelConfig
from vocab.ehr_schema import EhrSchema
from vocab.errors import ConfigError


class CTEncoder(nn.Module):
    """Patchify stem + stride-2 residual units (GroupNorm: no batch statistics, so absent or
    other rows never change a case's features, and site-local batch stats don't fight FedAvg)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.ct_channels
        norm = ("group", {"num_groups": 4})
        # space-to-depth stem: (1, 32, 64, 64) -> (ch0, 16, 16, 16)
        self.stem = Convolution(3, 1, ch[0], strides=cfg.ct_stem_stride,
                                kernel_size=cfg.ct_stem_stride, padding=0, act="GELU", norm=norm)
        self.stages = nn.Sequential(*[
            ResidualUnit(3, ch[i - 1] if i else ch[0], ch[i], strides=2, kernel_size=3,
                         subunits=1, act="GELU", norm=norm)
            for i in range(len(ch))
        ])
        self.feature_layer = nn.Identity()  # output: (B, C, d, h, w) last conv feature map
        self.pool = nn.AdaptiveAvgPool3d(cfg.ct_cells)
        self.proj = nn.Linear(ch[-1], cfg.d_model)
        self.n_tokens = cfg.ct_cells[0] * cfg.ct_cells[1] * cfg.ct_cells[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, D, H, W)
        f = self.feature_layer(self.stages(self.stem(x)))  # (B, C, d, h, w)
        t = self.pool(f).flatten(2).transpose(1, 2)  # (B, T, C)
        return self.proj(t)  # (B, T, D)


def _largest_divisor(c: int, at_most: int) -> int:
    return max(g for g in range(1, at_most + 1) if c % g == 0)


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 8) -> nn.Module:
    """Replace every BatchNorm2d (incl. timm's BatchNormAct2d: norm + drop + act) in place by
    GroupNorm, so features of one case never depend on the other cases in its batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            gn = nn.GroupNorm(_largest_divisor(c, max_groups), c)
            new: nn.Module = gn
            if hasattr(child, "act"):  # timm BatchNormAct2d
                new = nn.Sequential(gn, getattr(child, "drop", nn.Identity()), child.act)
            setattr(module, name, new)
        else:
            batchnorm_to_groupnorm(child, max_groups)
    return module


class PathologyEncoder(nn.Module):
    """Any timm backbone by name (pretrained=False), feature map pooled to a small grid."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not timm.is_model(cfg.path_backbone):
            raise ConfigError(
                f"unknown timm architecture {cfg.path_backbone!r} for path_backbone "
                f"(see timm.list_models())"
            )
        # features_only + the last stage: no classifier/head parameters that would never train
        self.backbone = timm.create_model(cfg.path_backbone, pretrained=False, features_only=True,
                                          out_indices=(-1,))
        if cfg.path_norm == "group":
            batchnorm_to_groupnorm(self.backbone)
        self.feature_layer = nn.Identity()  # output: (B, C, h, w) last feature map
        self.pool = nn.AdaptiveAvgPool2d(cfg.path_cells)
        self.proj = nn.Linear(self.backbone.feature_info.channels()[-1], cfg.d_model)
        self.n_tokens = cfg.path_cells[0] * cfg.path_cells[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, S, S)
        f = self.feature_layer(self.backbone(x)[-1])  # (B, C, h, w)
        t = self.pool(f).flatten(2).transpose(1, 2)  # (B, T, C)
        return self.proj(t)  # (B, T, D)


class EHREncoder(nn.Module):
    """One token per schema field.

    numeric/binary: value * w_f + b_f, refined by a small shared MLP;
    categorical:    a per-field embedding over the field's levels;
    missing field:  a learned per-field missing embedding; plus a field-identity embedding.
    """

    def __init__(self, cfg: ModelConfig, schema: EhrSchema) -> None:
        super().__init__()
        d, fields = cfg.d_model, schema.fields
        n = len(fields)
        self.n_tokens = n
        self.w = nn.Parameter(torch.randn(n, d) * 0.5)
        self.b = nn.Parameter(torch.zeros(n, d))
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ehr_hidden), nn.GELU(),
                                 nn.Linear(cfg.ehr_hidden, d))
        self.missing = nn.Parameter(torch.randn(n, d) * 0.02)
        self.field_emb = nn.Parameter(torch.randn(n, d) * 0.02)
        self.norm = nn.LayerNorm(d)
        # categorical fields: levels stored as raw codes; the Batch carries normalised values,
        # so keep centre/scale to map back to the nearest level index.
        cat = [i for i, f in enumerate(fields) if f.kind == "categorical"]
        self.register_buffer("is_cat", torch.tensor([f.kind == "categorical" for f in fields]),
                             persistent=False)
        self.cat_fields = cat
        n_levels = sum(len(fields[i].levels) for i in cat)
        self.cat_emb = nn.Embedding(max(n_levels, 1), d) if cat else None
        offs, o = [], 0
        for j, i in enumerate(cat):
            offs.append(o)
            levels = torch.tensor(fields[i].levels, dtype=torch.float32)
            self.register_buffer(f"cat_levels_{j}", levels, persistent=False)
            o += len(fields[i].levels)
        self.cat_offsets = offs
        self.cat_center = [fields[i].center for i in cat]
        self.cat_scale = [fields[i].scale for i in cat]

    def forward(self, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        # x: (B, F) normalised values (0 where missing), observed: (B, F) bool
        tok = x.unsqueeze(-1) * self.w + self.b  # (B, F, D)
        tok = tok + self.mlp(tok)
        if self.cat_emb is not None:
            for j, i in enumerate(self.cat_fields):
                raw = x[:, i] * self.cat_scale[j] + self.cat_center[j]  # (B,)
                levels = getattr(self, f"cat_levels_{j}")
                lvl = (raw.unsqueeze(-1) - levels).abs().argmin(-1)  # (B,)
                emb = self.cat_emb(lvl + self.cat_offsets[j])  # (B, D)
                tok = torch.cat([tok[:, :i], emb.unsqueeze(1), tok[:, i + 1:]], dim=1)
        tok = torch.where(observed.unsqueeze(-1), tok, self.missing.expand_as(tok))
        return self.norm(tok + self.field_emb)  # (B, F, D)


def build_encoder(name: str, cfg: ModelConfig, schema: EhrSchema) -> nn.Module:
    """Encoder factory by modality name; raises on unknown names."""
    if name == "ct":
        return CTEncoder(cfg)
    if name == "path":
        return PathologyEncoder(cfg)
    if name == "ehr":
        return EHREncoder(cfg, schema)
    raise ConfigError(f"unknown modality {name!r}; expected ct, path or ehr")



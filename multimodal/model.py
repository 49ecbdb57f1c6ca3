"""The fused diagnosis model: modality tokens -> MoE transformer blocks -> fusion-token head.

Bottom-up: Attention, Block (pre-norm attention + MoE FFN), FedsightModel. Absent modalities are
replaced by learned missing-modality tokens at the token level (torch.where), and encoders run only
on the rows where their modality is present, so a missing slot's values can never leak into the
output (not even through batch statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from multimodal.config import ModelConfig
from multimodal.data import Batch
from multimodal.encoders import build_encoder
from multimodal.moe import MoE
from vocab.ehr_schema import get_schema
from vocab.errors import ConfigError

# Token groups for expert-load accounting: the fusion token, each modality's real tokens, and
# learned missing-modality tokens (any modality).
EXPERT_GROUPS: tuple[str, ...] = ("fusion", "ct", "path", "ehr", "missing")
_GROUP = {name: i for i, name in enumerate(EXPERT_GROUPS)}


@dataclass
class ModelOutput:
    """logit: (B,) fused diagnosis logit (uncalibrated; divide by model.temperature).
    aux_logits: modality -> (B,) logit of that modality's own head (meaningful where present).
    moe_loss: weighted balance + z losses summed over blocks (0 for late fusion / no fusion).
    """

    logit: torch.Tensor | None
    aux_logits: dict[str, torch.Tensor]
    moe_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def pool_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens -> (B, 2D): mean and max over tokens."""
    return torch.cat([t.mean(1), t.amax(1)], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(cfg.d_model, cfg.expert_hidden, cfg.n_experts, cfg.top_k,
                       cfg.shared_expert, cfg.router_noise, cfg.router_noise_std,
                       cfg.expert_capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, D)
        return x + self.moe(self.ln2(x))  # (B, T, D)


class FedsightModel(nn.Module):
    """CT + pathology + EHR -> diagnosis logit, robust to any subset of modalities."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.schema = get_schema(cfg.inputs.ehr_schema)
        d = cfg.d_model
        self.encoders = nn.ModuleDict({m: build_encoder(m, cfg, self.schema)
                                       for m in cfg.modalities})
        self.n_tokens = {m: self.encoders[m].n_tokens for m in cfg.modalities}
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(n, d) * 0.02)
                                         for m, n in self.n_tokens.items()})
        self.type_emb = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02)
                                          for m in cfg.modalities})
        # aux heads read mean+max over the modality's tokens: a lesion sits in one CT cell and a
        # mean over all cells dilutes it (the CT-only model did not learn with a mean readout)
        self.aux_heads = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, 1))
                                        for m in cfg.modalities})
        n_total = 1 + sum(self.n_tokens.values())
        if cfg.fusion == "moe":
            self.fusion_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.pos_emb = nn.Parameter(torch.randn(1, n_total, d) * 0.02)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
            self.ln_f = nn.LayerNorm(d)
            # The head reads the fusion token and more tokens, so every token's last-block expert
            # output reaches the diagnosis (a fusion-token-only readout left last-block experts
            # without gradient). "modality": mean and max per modality, so that a lesion in one
            # CT cell is not averaged away over all 20 tokens (measured with the earlier CT
            # encoder: fused model, CT alone: AUC 0.51 with "mean", 0.57 with "modality"; fused
            # over 3 seeds 0.723 with "mean", 0.745 with "modality").
            n_read = 2 * len(cfg.modalities) if cfg.head_readout == "modality" else 1
            # head_skip: the head also reads each modality's encoder tokens (mean+max) from before
            # the blocks, normalised together as in late fusion
            n_skip = 2 * len(cfg.modalities) if cfg.head_skip else 0
            self.skip_norm = nn.LayerNorm(n_skip * d) if cfg.head_skip else None
            self.head = nn.Linear((1 + n_read + n_skip) * d, 1)
            # one more head per extra task (vocab.tasks), same input as the first task's
            self.task_heads = nn.ModuleDict({t: nn.Linear((1 + n_read + n_skip) * d, 1)
                                             for t in cfg.extra_tasks})
            if cfg.lora_tasks:
                from multimodal import lora

                layers = lora.target_layers(self, cfg.lora_targets)
                self.adapters = nn.ModuleDict({t: lora.build_adapters(layers, cfg.lora_rank,
                                                                      cfg.lora_alpha)
                                               for t in cfg.lora_tasks})
                lora.install_hooks(layers, self.adapters, self._active_adapters)
        else:  # dense late fusion: concat pooled modality features -> MLP
            m = len(cfg.modalities)
            self.late_mlp = nn.Sequential(nn.LayerNorm(2 * m * d), nn.Linear(2 * m * d, d),
                                          nn.GELU(),
                                          nn.Linear(d, 1))
        # Not state: fitted on validation data and stored in the checkpoint next to the weights
        # (one per task; `temperature` is the served task's).
        self.temperature = 1.0
        self.temperatures: dict[str, float] = {}
        # The task whose head `logit` is (a served model object answers for one task).
        self.serve_task = cfg.task
        self._computing: str = cfg.task
        n_blocks = cfg.n_blocks if cfg.fusion == "moe" else 0
        self._counts = torch.zeros(n_blocks, len(EXPERT_GROUPS), cfg.n_experts,
                                   dtype=torch.float64)

    # ---- tasks ----
    def _active_adapters(self) -> nn.ModuleDict | None:
        ad = getattr(self, "adapters", None)
        return ad[self._computing] if ad is not None and self._computing in ad else None

    def use_task(self, task: str) -> FedsightModel:
        """Serve `task`: `logit` and `temperature` become that task's (returns self)."""
        if task not in self.cfg.tasks:
            raise ConfigError(f"this model has no head for task {task!r}; it has "
                              f"{list(self.cfg.tasks)}")
        self.serve_task = task
        self.temperature = float(self.temperatures.get(task, 1.0))
        return self

    def task_temperatures(self) -> dict[str, float]:
        """Every task's temperature; the served task's is `temperature` (what callers set)."""
        return {**self.temperatures, self.serve_task: float(self.temperature)}

    # ---- encoders (named for explain/: model.ct_encoder.feature_layer etc.) ----
    @property
    def ct_encoder(self) -> nn.Module | None:
        return self.encoders["ct"] if "ct" in self.encoders else None

    @property
    def path_encoder(self) -> nn.Module | None:
        return self.encoders["path"] if "path" in self.encoders else None

    @property
    def ehr_encoder(self) -> nn.Module | None:
        return self.encoders["ehr"] if "ehr" in self.encoders else None

    def _encode(self, m: str, inputs: tuple[torch.Tensor, ...],
                present: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T_m, D): encoder output on present rows, learned missing tokens elsewhere."""
        b = present.shape[0]
        missing = self.missing[m].unsqueeze(0).expand(b, -1, -1)  # (B, T, D)
        idx = present.nonzero().squeeze(1)  # (P,)
        if idx.numel() == 0:
            tok = missing
        else:
            enc = self.encoders[m](*(x.index_select(0, idx) for x in inputs))  # (P, T, D)
            full = enc.new_zeros(missing.shape).index_copy(0, idx, enc)  # (B, T, D)
            tok = torch.where(present.view(b, 1, 1), full, missing)
        return tok + self.type_emb[m]

    def forward_tensors(
        self,
        ct: torch.Tensor, ct_present: torch.Tensor,
        path: torch.Tensor, path_present: torch.Tensor,
        ehr: torch.Tensor, ehr_observed: torch.Tensor, ehr_present: torch.Tensor,
        fuse: bool = True, task: str | None = None,
    ) -> ModelOutput:
        """Plain-tensor entry point (what Captum wraps). Shapes as in multimodal.data.Batch.
        task: whose head `logit` is (default: the served task); its adapters, if any, are on."""
        task = task or self.serve_task
        if task not in self.cfg.tasks:
            raise ConfigError(f"this model has no head for task {task!r}; it has "
                              f"{list(self.cfg.tasks)}")
        self._computing = task
        try:
            return self._forward(ct, ct_present, path, path_present, ehr, ehr_observed,
                                 ehr_present, fuse, task)
        finally:
            self._computing = self.cfg.task

    def _forward(self, ct: torch.Tensor, ct_present: torch.Tensor, path: torch.Tensor,
                 path_present: torch.Tensor, ehr: torch.Tensor, ehr_observed: torch.Tensor,
                 ehr_present: torch.Tensor, fuse: bool, task: str) -> ModelOutput:
        inputs = {"ct": ((ct,), ct_present), "path": ((path,), path_present),
                  "ehr": ((ehr, ehr_observed), ehr_present)}
        tokens = {m: self._encode(m, *inputs[m]) for m in self.cfg.modalities}  # (B, T_m, D)
        aux = {m: self.aux_heads[m](pool_tokens(t)).squeeze(-1)
               for m, t in tokens.items()}  # (B,)
        zero = ct.new_zeros(())
        if not fuse:
            return ModelOutput(None, aux, zero, zero, zero)
        if self.cfg.fusion == "late":
            feats = torch.cat([pool_tokens(t) for t in tokens.values()], dim=-1)  # (B, 2*M*D)
            return ModelOutput(self.late_mlp(feats).squeeze(-1), aux, zero, zero, zero)

        b = ct.shape[0]
        x = torch.cat([self.fusion_token.expand(b, -1, -1), *tokens.values()], 1)  # (B, T, D)
        x = x + self.pos_emb
        groups = self._token_groups({m: inputs[m][1] for m in tokens}, b)  # (B, T)
        bal, z = zero, zero
        for i, block in enumerate(self.blocks):
            x = block(x)
            b_loss, z_loss = block.moe.last_aux
            bal, z = bal + b_loss, z + z_loss
            self._count(i, block.moe.last_indices, groups)
        x = self.ln_f(x)  # (B, T, D)
        parts, start = [x[:, 0]], 1
        if self.cfg.head_readout == "mean":
            parts.append(x[:, 1:].mean(1))
        else:
            for m in tokens:
                parts.append(pool_tokens(x[:, start:start + self.n_tokens[m]]))
                start += self.n_tokens[m]
        if self.skip_norm is not None:
            parts.append(self.skip_norm(torch.cat([pool_tokens(t) for t in tokens.values()], -1)))
        head = self.head if task == self.cfg.task else self.task_heads[task]
        logit = head(torch.cat(parts, -1)).squeeze(-1)  # (B,)
        moe_loss = self.cfg.balance_coef * bal + self.cfg.z_coef * z
        nb = len(self.blocks)
        return ModelOutput(logit, aux, moe_loss, bal / nb, z / nb)

    def forward(self, batch: Batch, fuse: bool = True, task: str | None = None) -> ModelOutput:
        return self.forward_tensors(batch.ct, batch.ct_present, batch.path, batch.path_present,
                                    batch.ehr, batch.ehr_observed, batch.ehr_present, fuse=fuse,
                                    task=task)

    @torch.no_grad()
    def predict_proba(self, batch: Batch, calibrated: bool = True) -> torch.Tensor:
        """(B,) probability of the positive class (temperature-scaled unless calibrated=False)."""
        logit = self.forward(batch).logit
        t = self.temperature if calibrated else 1.0
        return torch.sigmoid(logit / t)

    # ---- router noise + expert token counts (federated per-expert aggregation) ----
    def set_router_noise_scale(self, scale: float) -> None:
        for block in getattr(self, "blocks", []):
            block.moe.router.noise_scale = float(scale)

    def _token_groups(self, present: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        cols = [torch.full((b, 1), _GROUP["fusion"], dtype=torch.long)]
        for m, p in present.items():
            g = torch.where(p, _GROUP[m], _GROUP["missing"]).long()  # (B,)
            cols.append(g.view(b, 1).expand(b, self.n_tokens[m]).cpu())
        return torch.cat(cols, 1)  # (B, T)

    @torch.no_grad()
    def _count(self, block: int, indices: torch.Tensor, groups: torch.Tensor) -> None:
        e = self.cfg.n_experts
        g = groups.reshape(-1, 1).expand(-1, indices.shape[-1]).reshape(-1)  # (N*k,)
        flat = g * e + indices.reshape(-1).cpu()
        c = torch.bincount(flat, minlength=len(EXPERT_GROUPS) * e)
        self._counts[block] += c.view(len(EXPERT_GROUPS), e).double()

    def expert_counts(self, by_group: bool = False) -> torch.Tensor:
        """Tokens routed to each expert since the last reset (each token counts top_k times).

        (n_blocks, n_experts), or (n_blocks, len(EXPERT_GROUPS), n_experts) with by_group.
        """
        c = self._counts.clone()
        return c if by_group else c.sum(1)

    def reset_expert_counts(self) -> None:
        self._counts.zero_()


def build_model(cfg: ModelConfig | None = None, seed: int | None = None) -> FedsightModel:
    """Build a model (parameters initialised from `seed` when given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return FedsightModel(cfg or ModelConfig())

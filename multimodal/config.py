"""Config dataclasses for the model and its training loop (frozen; unknown keys are errors).

Every size lives here so that one architecture scales from two CPU cores (defaults) up by config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from multimodal.grid import InputConfig
from vocab.errors import ConfigError
from vocab.modalities import MODALITIES

T = TypeVar("T")


def _from_dict(cls: type[T], d: dict[str, Any], nested: dict[str, type] | None = None) -> T:
    """Build a frozen dataclass from a plain dict; unknown keys raise ConfigError naming them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(names)}"
        )
    hints = _hints(cls)
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if nested and k in nested:
            if not isinstance(v, dict):
                raise ConfigError(f"{cls.__name__}.{k} must be an object, got {v!r}")
            v = _from_dict(nested[k], v)
        else:  # JSON round-trips tuples as lists; ints stand for floats
            v = _checked(f"{cls.__name__}.{k}", hints.get(k), v)
        kw[k] = v
    try:
        return cls(**kw)
    except (TypeError, ValueError, ArithmeticError) as e:  # a check met a value it cannot read
        raise ConfigError(f"{cls.__name__}: {e}") from None


_WANT: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a finite number",
                         str: "a string"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(where: str, hint: Any, v: Any) -> Any:
    """`v` as the field's declared type (bool, int, finite float, str, a Literal, a tuple of
    those), or ConfigError naming the field and the value. Other types: left to the class."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise ConfigError(f"{where} must be a list, got {v!r}")
        items = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(v):
            raise ConfigError(f"{where} must have {len(items)} items, got {v!r}")
        return tuple(_checked(f"{where}[{i}]", h, x)
                     for i, (h, x) in enumerate(zip(items, v, strict=True)))
    if origin is Literal:
        ok = any(type(v) is type(a) and v == a for a in args)
    elif hint is bool:
        ok = isinstance(v, bool)
    elif hint is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif hint is float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    elif hint is str:
        ok = isinstance(v, str)
    else:
        return v
    if not ok:
        want = f"one of {list(args)}" if origin is Literal else _WANT[hint]
        raise ConfigError(f"{where} must be {want}, got {v!r}")
    return v


def _to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists, nested dataclasses become dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Token count per patient: 1 fusion + prod(ct_cells) + prod(path_cells) + F."""

    inputs: InputConfig = field(default_factory=InputConfig)
    # Which modality encoders exist. A single-modality baseline is the same model with one entry;
    # modalities not listed are always treated as absent (learned missing tokens).
    modalities: tuple[str, ...] = MODALITIES
    # "moe": tokens -> transformer blocks with MoE FFN -> fusion token head (the model).
    # "late": dense late-fusion baseline: concat pooled encoder features -> MLP (same encoders).
    fusion: Literal["moe", "late"] = "moe"
    # What the diagnosis head reads besides the fusion token (moe fusion only): "modality" = mean
    # and max of each modality's tokens after the blocks; "mean" = the mean of all tokens.
    head_readout: Literal["modality", "mean"] = "modality"
    # The head also reads each modality's encoder tokens (mean+max, before the blocks): the blocks
    # then add cross-modal interactions on top of what late fusion sees (3 training seeds:
    # available-cases AUC 0.822 with, 0.811 without; docs/benchmarks.md).
    head_skip: bool = True
    d_model: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    dropout: float = 0.1  # attention dropout (training only)
    # CT: patchify stem (space-to-depth conv) so the 32x64x64 grid costs ~10 ms on 2 cores;
    # stem stride (2,4,4) -> 16^3 cells, then stride-2 residual units with these channels.
    ct_stem_stride: tuple[int, int, int] = (2, 4, 4)
    ct_channels: tuple[int, ...] = (16, 32, 64)
    # Fixed lung-nodule enhancement channel in front of the stem (encoders.BlobFilter).
    ct_blob_filter: bool = True
    # The CT conv path's residual gate at initialisation (encoders.CTEncoder): 0 = closed, the
    # conv path enters only as far as training finds it useful (on the 346-case synthetic
    # training split it stays ~0 and the CT-only AUC is 0.80 vs 0.66 with the paths summed);
    # 1 = plain sum. Without the blob channel the conv path is the only one: must be non-zero.
    ct_deep_gate_init: float = 0.0
    ct_cells: tuple[int, int, int] = (2, 2, 2)  # CT feature map pooled to this grid -> tokens
    # Pathology: any timm architecture by name (pretrained=False: hospitals are offline).
    # mobilenetv3_small_050 measured 5.5 / 13 ms fwd / fwd+bwd at 128x128 (resnet10t: 18 / 41).
    path_backbone: str = "mobilenetv3_small_050"
    # "group": the timm backbone's BatchNorm layers become GroupNorm. Batch statistics depend on
    # which cases share a batch (absent rows, batch of one) and differ between hospitals, which
    # biases FedAvg; GroupNorm is per case. "batch" keeps the timm default.
    path_norm: Literal["group", "batch"] = "group"
    path_cells: tuple[int, int] = (2, 2)  # pathology feature map pooled to this grid -> tokens
    ehr_hidden: int = 32  # hidden width of the MLP refining each numeric EHR field token
    # Mixture of experts (per block): routed experts + one always-on shared expert.
    n_experts: int = 16
    top_k: int = 2
    shared_expert: bool = True
    expert_hidden: int = 64  # small experts: 16 x (64->64->64) keeps the block cheap on CPU
    # Router noise (training only) spreads early routing so no expert dies before it learns;
    # annealed linearly to 0 over router_noise_steps optimiser steps (set by the train loop).
    router_noise: Literal["none", "gaussian", "gumbel"] = "gaussian"
    router_noise_std: float = 1.0
    router_noise_steps: int = 100
    # Switch/GShard load-balancing loss coefficient (1.0 at perfect balance, times this).
    balance_coef: float = 0.1
    # Per-patient expert capacity (moe.py): an expert takes at most
    # ceil(factor * tokens * top_k / n_experts) of one patient's token slots; 0 = plain top-k.
    # 1.0 bounds every expert's share at 1.14x the mean on the default 21-token patient.
    expert_capacity_factor: float = 1.0
    # Router z-loss (ST-MoE): keeps float32 router logits small; cheap stabiliser.
    z_coef: float = 1e-3
    # Tasks (vocab.tasks): the head `task` is the model's first task; each of `extra_tasks` gets
    # its own head on the same shared backbone (encoders, MoE blocks), reading the same features.
    task: str = "nodule"
    extra_tasks: tuple[str, ...] = ()
    # Extra tasks that also have low-rank adapters (multimodal.lora) on the blocks, active only
    # while that task is computed: the first task's outputs stay exactly the base model's.
    lora_tasks: tuple[str, ...] = ()
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("attn", "experts", "shared", "router")

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(
                f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities!r}"
            )
        if self.fusion not in ("moe", "late"):
            raise ConfigError(f"fusion must be 'moe' or 'late', got {self.fusion!r}")
        if self.head_readout not in ("modality", "mean"):
            raise ConfigError(f"head_readout must be 'modality' or 'mean', got "
                              f"{self.head_readout!r}")
        sizes = {"d_model": self.d_model, "n_heads": self.n_heads, "n_experts": self.n_experts,
                 "expert_hidden": self.expert_hidden, "ehr_hidden": self.ehr_hidden,
                 **{f"ct_channels[{i}]": c for i, c in enumerate(self.ct_channels)},
                 **{f"ct_cells[{i}]": c for i, c in enumerate(self.ct_cells)},
                 **{f"path_cells[{i}]": c for i, c in enumerate(self.path_cells)},
                 **{f"ct_stem_stride[{i}]": c for i, c in enumerate(self.ct_stem_stride)}}
        small = {k: v for k, v in sizes.items() if v < 1}
        if small or self.n_blocks < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sizes must be >= 1 (got {small}), n_blocks >= 0 (got "
                              f"{self.n_blocks}), dropout in [0, 1) (got {self.dropout})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.router_noise not in ("none", "gaussian", "gumbel"):
            raise ConfigError(
                f"router_noise must be none|gaussian|gumbel, got {self.router_noise!r}"
            )
        if self.expert_capacity_factor < 0:
            raise ConfigError(f"expert_capacity_factor must be >= 0 (0 = no capacity limit), "
                              f"got {self.expert_capacity_factor}")
        if len(self.ct_channels) < 1:
            raise ConfigError("ct_channels needs at least one stage")
        if not math.isfinite(self.ct_deep_gate_init) or (
                not self.ct_blob_filter and self.ct_deep_gate_init == 0):
            raise ConfigError(f"ct_deep_gate_init must be finite, and non-zero without the blob "
                              f"filter (the conv path is then the CT's only path), got "
                              f"{self.ct_deep_gate_init!r}")

        tasks = (self.task, *self.extra_tasks)
        if len(set(tasks)) != len(tasks) or not all(
                isinstance(t, str) and t.replace("_", "").isalnum() and t.islower() for t in tasks):
            raise ConfigError(f"task and extra_tasks must be distinct lower-case ids, got "
                              f"{tasks!r}")
        if self.extra_tasks and self.fusion != "moe":
            raise ConfigError("extra task heads need fusion 'moe' (they read the fused tokens)")
        stray = [t for t in self.lora_tasks if t not in self.extra_tasks]
        if stray or len(set(self.lora_tasks)) != len(self.lora_tasks):
            raise ConfigError(f"lora_tasks must be distinct extra_tasks, got {self.lora_tasks!r} "
                              f"(extra_tasks {self.extra_tasks!r})")
        from multimodal.lora import TARGETS

        bad = [t for t in self.lora_targets if t not in TARGETS]
        if bad or self.lora_rank < 1 or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora: rank >= 1, alpha > 0, targets from {list(TARGETS)}; got "
                              f"rank {self.lora_rank!r}, alpha {self.lora_alpha!r}, targets "
                              f"{self.lora_targets!r}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task this model has a head for, the first task first."""
        return (self.task, *self.extra_tasks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, nested={"inputs": InputConfig})

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def check_dp_params(noise_multiplier: float, max_grad_norm: float) -> bool:
    """True when DP-SGD is on (both > 0), False when off (both 0); ConfigError otherwise."""
    if noise_multiplier == 0 and max_grad_norm == 0:
        return False
    if not (math.isfinite(noise_multiplier) and math.isfinite(max_grad_norm)) or \
            noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ConfigError(f"DP-SGD needs dp-noise-multiplier > 0 and dp-max-grad-norm > 0 "
                          f"together (both 0 = off), got {noise_multiplier} and {max_grad_norm}")
    return True


@dataclass(frozen=True)
class TrainConfig:
    """One local training run (a hospital's round, or the pooled baseline)."""

    epochs: int = 12
    # Progressive modality alignment: the first stage1_epochs train each encoder with its own
    # auxiliary head only (no fusion); the rest train everything (stage 2). A federated round may
    # override the stage explicitly (train_local(stage=...)).
    stage1_epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.05  # small sites (~100 cases) overfit the image encoders quickly
    batch_size: int = 16
    grad_clip: float = 1.0
    # Probability of hiding each present modality of a training case (never all of them), so the
    # fused head sees every missing-modality pattern it meets at test time.
    modality_dropout: float = 0.3
    # Probability of hiding each recorded EHR field of a training case (marked missing). Why:
    # the EHR encoder memorised its few hundred training rows and, without this, adding the EHR
    # to a CT *lowered* the fused model's AUC (CT 0.80, CT+EHR 0.76-0.78); with 0.5: 0.79-0.84.
    ehr_field_dropout: float = 0.5
    # Label-preserving random flips (CT left-right, pathology both axes), per case.
    augment: bool = True
    # Weight of the per-modality auxiliary losses in stage 2 (stage 1 uses only them).
    aux_weight: float = 0.5
    # "loss_ratio": per-modality weights follow each modality's convergence (see train.py);
    # "equal": all modality losses weighted 1.
    loss_weighting: Literal["loss_ratio", "equal"] = "loss_ratio"
    loss_ratio_alpha: float = 1.0  # strength of the re-weighting (GradNorm's alpha)
    seed: int = 0
    # FedProx proximal coefficient mu (0 = plain local training / FedAvg).
    fedprox_mu: float = 0.0
    # DP-SGD (multimodal.dp): Gaussian noise multiplier and per-sample clipping norm; both 0 =
    # off, both > 0 = on (grad_clip and loss-ratio weighting are then not used).
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.stage1_epochs < 0:
            raise ConfigError(f"epochs/stage1_epochs must be >= 0, got {self.epochs}/"
                              f"{self.stage1_epochs}")
        if not 0.0 <= self.ehr_field_dropout < 1.0:
            raise ConfigError(f"ehr_field_dropout must be in [0, 1), got "
                              f"{self.ehr_field_dropout}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.loss_weighting not in ("loss_ratio", "equal"):
            raise ConfigError(f"loss_weighting must be loss_ratio|equal, got "
                              f"{self.loss_weighting!r}")
        if self.batch_size < 1 or self.lr <= 0 or self.fedprox_mu < 0:
            raise ConfigError("batch_size must be >= 1, lr > 0, fedprox_mu >= 0")
        check_dp_params(self.dp_noise_multiplier, self.dp_max_grad_norm)

    @property
    def dp(self) -> bool:
        """DP-SGD on (multimodal.dp)."""
        return check_dp_params(self.dp_noise_multiplier, self.dp_max_grad_norm)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

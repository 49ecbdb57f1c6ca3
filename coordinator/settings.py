"""Run configuration of a federated run, parsed once where it enters (the ServerApp).

Flower's run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`) is a
flat dict of scalars; `RunSettings.from_run_config` turns it into one frozen dataclass. Keys are
Flower-style kebab-case; unknown keys are errors (a typo must not silently run the default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from coordinator.robust import ROBUST_NAMES, RobustName, RobustRule
from coordinator.screening import ScreenRule
from multimodal.config import check_dp_params
from vocab import records as K
from vocab.errors import ConfigError
from vocab.json_config import json_object
from vocab.transport import check_transport

StrategyName = Literal["fedavg", "fedprox", "fedadam"]
AggregationName = Literal["per-expert", "examples"]
SECAGG_MODULUS = 2 ** 32  # Flower's SecAgg+ modulus_range (its maximum)


@dataclass(frozen=True)
class RunSettings:
    """Everything one federated run shares across hospitals (field name = key with '-' -> '_')."""

    num_rounds: int = 3
    # Server-side update rule: FedAvg, FedProx (clients add mu/2 ||w - w_global||^2) or FedAdam
    # (server-side Adam on the aggregated pseudo-gradient).
    strategy: StrategyName = "fedavg"
    # "per-expert": each MoE expert averaged with the hospitals' token counts for that expert
    # (unused experts keep the global copy), the rest by examples; "examples": plain FedAvg.
    aggregation: AggregationName = "per-expert"
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 0.1  # FedAdam eta
    server_tau: float = 1e-3  # FedAdam tau (adaptivity)
    # A round aggregates only if at least this many hospitals sent usable updates; fewer and the
    # global model is kept (the round is recorded as failed, the run goes on).
    min_hospitals: int = 2
    # Share of the connected hospitals sampled each round to train / to evaluate (Flower's
    # sampling): a federation of 100 hospitals need not train or evaluate all of them per round.
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # How arrays travel (vocab.transport): "fp16" sends the model down and each update up as
    # float16 (half the bytes); sparse-experts lets a hospital leave out the experts it did not
    # change. Measured in docs/benchmarks.md ("Scale").
    transport: str = "fp32"
    sparse_experts: bool = False
    round_timeout: float = 3600.0  # seconds to wait for replies before a round moves on
    # Update screening: an update whose norm has robust z-score (median/MAD) above screen_z AND
    # is more than screen_ratio x the median norm is left out (needs >= 3 updates to judge).
    screen_z: float = 3.5
    screen_ratio: float = 3.0
    # An update under screen_free_ratio x the others' median norm is a free-rider (the model
    # sent back unchanged); one whose cosine to the coordinate-wise median update is under
    # screen_min_cosine points away from the federation (coordinator.screening).
    screen_free_ratio: float = 0.01
    screen_min_cosine: float = 0.1
    # Merge rule per parameter group after screening (coordinator.robust): "none" = weighted
    # mean; Flower's median, trimmed-mean (robust-beta cut at each end), krum or multikrum
    # (robust-byzantine attackers assumed).
    robust_aggregation: RobustName = "none"
    robust_beta: float = 0.25
    robust_byzantine: int = 1
    # Secure aggregation (SecAgg+, Flower's SecAggPlusWorkflow + secaggplus_mod; docs/
    # secure_aggregation.md): the coordinator sees only the sum of the hospitals' updates, so
    # per-hospital screening and robust-aggregation are off. Clipping range of each weighted
    # update value, integer levels over it, seconds per protocol stage (a silent hospital is
    # dropped after it), public caps on a hospital's num-examples and per-expert token count.
    secure_aggregation: bool = False
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 2 ** 24
    secagg_timeout: float = 600.0
    secagg_example_scale: float = 10_000.0
    secagg_token_scale: float = 1e7
    # Local training (sent to hospitals each round; defaults shared with the hospital side).
    local_epochs: int = K.DEFAULT_LOCAL_EPOCHS
    lr: float = K.DEFAULT_LR
    batch_size: int = K.DEFAULT_BATCH_SIZE
    # Record-level differential privacy at every hospital (DP-SGD, multimodal.dp): Gaussian noise
    # multiplier and per-sample clipping norm, both 0 = off. Each hospital accounts its own
    # epsilon and may refuse a round past its budget (hospital_node.privacy, docs/privacy.md).
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0
    # Rounds 1..stage1_rounds train each encoder with its own head (progressive alignment);
    # later rounds train the fused model.
    stage1_rounds: int = 1
    # JSON objects of overrides for multimodal ModelConfig / TrainConfig (tests use tiny models).
    model_json: str = "{}"
    train_json: str = "{}"
    seed: int = 0  # model init + hospitals' train/test split
    # Model store folder (coordinator side); relative paths are relative to the SuperLink's cwd.
    store_dir: str = "fedsight-store"
    run_name: str = "fedsight"  # logical name of this training campaign (store metadata)
    resume: bool = False  # continue the latest unfinished run in the store
    # Simulation only: folder of site roots; virtual node i trains on the i-th site (sorted).
    federation_dir: str = ""
    cache_dir: str = ""  # hospital-side preprocessed cache root ("" = per-user default)
    max_cases: int = 0  # hospital-side cap on cases used (0 = all); keeps tests small
    # Federated adaptation (multimodal.adapt, docs/adaptation.md): train a new task's head
    # ("head") or its LoRA adapters and head ("lora") on top of the base version `adapt-base`
    # (a version id of store-dir, or a model.pt path); only those arrays travel. "none" = train
    # the whole model on `task` ("" = the model's first task).
    task: str = ""
    adapt: str = "none"
    adapt_base: str = ""
    # Simulation only: where the virtual hospitals find published versions (the base); a real
    # hospital sets its own node config models-dir.
    models_dir: str = ""
    # Federated self-supervised pretraining (docs/pretraining.md): every hospital's cases with a
    # CT or pathology image, labelled or not, train the image encoders with VICReg; only the
    # encoders and their projectors travel; each round's version is kind "pretrained" (no
    # trained head: the app and `fedsight evaluate` refuse to serve it). pretrain-json:
    # multimodal.pretrain.PretrainConfig overrides. init-encoders: a pretrained version (id of
    # store-dir, version folder or model.pt) whose encoder weights start this run's model.
    pretrain: bool = False
    pretrain_json: str = "{}"
    init_encoders: str = ""

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num-rounds must be >= 1, got {self.num_rounds!r}")
        if self.strategy not in ("fedavg", "fedprox", "fedadam"):
            raise ConfigError(f"strategy must be fedavg|fedprox|fedadam, got {self.strategy!r}")
        if self.aggregation not in ("per-expert", "examples"):
            raise ConfigError(
                f"aggregation must be per-expert|examples, got {self.aggregation!r}"
            )
        if self.min_hospitals < 1:
            raise ConfigError(f"min-hospitals must be >= 1, got {self.min_hospitals!r}")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{key.replace('_', '-')} must be in (0, 1], got "
                                  f"{getattr(self, key)!r}")
        check_transport(self.transport)
        if self.screen_z <= 0 or self.screen_ratio < 1:
            raise ConfigError(
                f"screen-z must be > 0 and screen-ratio >= 1, got {self.screen_z!r}/"
                f"{self.screen_ratio!r}"
            )
        if self.screen_free_ratio < 0 or not -1.0 <= self.screen_min_cosine <= 1.0:
            raise ConfigError(
                f"screen-free-ratio must be >= 0 and screen-min-cosine in [-1, 1], got "
                f"{self.screen_free_ratio!r}/{self.screen_min_cosine!r}")
        if self.robust_aggregation not in ROBUST_NAMES:
            raise ConfigError(f"robust-aggregation must be one of {'|'.join(ROBUST_NAMES)}, "
                              f"got {self.robust_aggregation!r}")
        if not 0.0 <= self.robust_beta < 0.5 or self.robust_byzantine < 0:
            raise ConfigError(f"robust-beta must be in [0, 0.5) and robust-byzantine >= 0, got "
                              f"{self.robust_beta!r}/{self.robust_byzantine!r}")
        self._check_secure_aggregation()
        for key in ("model_json", "train_json", "pretrain_json"):
            self.json_overrides(key)
        check_dp_params(self.dp_noise_multiplier, self.dp_max_grad_norm)
        self._check_adapt()

    def _check_adapt(self) -> None:
        from vocab.tasks import check_task_id

        if self.task:
            check_task_id(self.task)
        if self.adapt not in K.ADAPT_METHODS:
            raise ConfigError(f"adapt must be one of {'|'.join(K.ADAPT_METHODS)}, got "
                              f"{self.adapt!r}")
        if self.adapt != "none" and not (self.task and self.adapt_base):
            raise ConfigError(f"adapt = {self.adapt!r} needs task (the new task) and adapt-base "
                              f"(the base version), got task={self.task!r}, "
                              f"adapt-base={self.adapt_base!r}")
        if self.adapt != "none" and (self.secure_aggregation or self.strategy == "fedadam"):
            raise ConfigError("adapt needs strategy fedavg|fedprox without secure-aggregation "
                              "(not built for adapter rounds)")
        if self.pretrain and (self.adapt != "none" or self.task or self.secure_aggregation
                              or self.dp_noise_multiplier or self.strategy == "fedadam"):
            raise ConfigError("pretrain = true reads no labels: it takes no task or adapt, and "
                              "is not built with secure-aggregation, DP-SGD or fedadam")
        if self.init_encoders and self.adapt != "none":
            raise ConfigError("init-encoders starts a new model; an adaptation run keeps its "
                              "base's encoders (adapt-base)")

    def _check_secure_aggregation(self) -> None:
        for key in ("secagg_clipping_range", "secagg_timeout", "secagg_example_scale",
                    "secagg_token_scale"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{key.replace('_', '-')} must be finite and > 0, got {v!r}")
        # SecAgg+ needs >= 3 hospitals; the modular sum (2**32) of 3 quantised values must fit
        if not 2 <= self.secagg_quantization_range < SECAGG_MODULUS // 3:
            raise ConfigError(f"secagg-quantization-range must be in [2, "
                              f"{SECAGG_MODULUS // 3 - 1}] (3 hospitals x range < 2**32), got "
                              f"{self.secagg_quantization_range!r}")
        if self.secure_aggregation and (self.transport != "fp32" or self.sparse_experts):
            raise ConfigError(
                f"secure-aggregation = true needs transport = 'fp32' and sparse-experts = false "
                f"(SecAgg+ quantises and masks the whole update itself), got "
                f"{self.transport!r} / {self.sparse_experts!r}")
        if self.secure_aggregation and self.robust_aggregation != "none":
            raise ConfigError(
                f"secure-aggregation = true needs robust-aggregation = 'none', got "
                f"{self.robust_aggregation!r}: under secure aggregation the coordinator only "
                "sees the sum of the hospitals' updates, and robust merges need each update")

    @property
    def screen_rule(self) -> ScreenRule:
        """Under DP-SGD the direction check only records its scores: each hospital's update is
        mostly Gaussian noise by design, so honest updates score near chance and were rejected
        (docs/benchmarks.md, "Privacy"); size, free-rider and structure checks stay."""
        dp = check_dp_params(self.dp_noise_multiplier, self.dp_max_grad_norm)
        return ScreenRule(self.screen_z, self.screen_ratio, self.screen_free_ratio,
                          -math.inf if dp else self.screen_min_cosine)

    @property
    def robust_rule(self) -> RobustRule:
        return RobustRule(self.robust_aggregation, self.robust_beta, self.robust_byzantine)

    def json_overrides(self, key: str) -> dict[str, Any]:
        return json_object(getattr(self, key), key.replace("_", "-"))

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = sorted(n.replace("_", "-") for n in fields)
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {known}")
            kw[name] = _coerce(key, value, fields[name].type)
        return cls(**kw)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a TOML scalar against the field type (ints are accepted for floats)."""
    ann = str(annotation)
    if ann == "bool":
        ok = isinstance(value, bool)
    elif ann == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str and Literal[str, ...]
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"run-config {key!r} must be {ann}, got {type(value).__name__} "
                          f"{value!r}")
    return value

"""Every key of the Flower messages between coordinator and hospital nodes.

The wire contract, in one place, for both sides (they never import each other). Hospital replies
may carry only the model arrays and numbers under the metric keys below (aggregates and counts),
never case ids, file names, DICOM tag values or raw patient values (DESIGN.md invariant 1).
A test inspects every outgoing record against this whitelist.
"""

from __future__ import annotations

import re
from typing import Final

ARRAYS: Final = "arrays"  # ArrayRecord: model state_dict
METRICS: Final = "metrics"  # MetricRecord: aggregates only
CONFIG: Final = "config"  # ConfigRecord: per-round values from the strategy
NUM_EXAMPLES: Final = "num-examples"
EXPERT_TOKENS_PREFIX: Final = "expert-tokens"  # f"{prefix}.{layer}.{expert}" -> token count

# ---- coordinator -> hospital: ConfigRecord "config" ----
SERVER_ROUND: Final = "server-round"  # set by Flower's FedAvg
PROXIMAL_MU: Final = "proximal-mu"  # set by Flower's FedProx
STAGE: Final = "stage"  # 1: encoders with own heads, 2: fused model
LOCAL_EPOCHS: Final = "local-epochs"
LR: Final = "lr"
BATCH_SIZE: Final = "batch-size"
# Their defaults, in one place: RunSettings (coordinator), RoundConfig (hospital) and
# [tool.flwr.app.config] in pyproject.toml (which Flower reads; a test keeps it equal).
DEFAULT_LOCAL_EPOCHS: Final = 2
DEFAULT_LR: Final = 2e-3
DEFAULT_BATCH_SIZE: Final = 16
MODEL_JSON: Final = "model-json"  # ModelConfig as JSON (the architecture of the arrays sent)
TRAIN_JSON: Final = "train-json"  # TrainConfig overrides as JSON
SEED: Final = "seed"  # split seed + local training seed
MAX_CASES: Final = "max-cases"
# The federation's EHR schema (vocab.ehr_schema): its id and content hash (sha256 hex). A node
# whose site schema differs refuses the round (vocab.errors.EhrSchemaMismatch).
EHR_SCHEMA: Final = "ehr-schema"
EHR_SCHEMA_HASH: Final = "ehr-schema-hash"
# DP-SGD at every hospital (multimodal.dp): both 0 = off, both > 0 = on.
DP_NOISE_MULTIPLIER: Final = "dp-noise-multiplier"
DP_MAX_GRAD_NORM: Final = "dp-max-grad-norm"
# How arrays travel (vocab.transport): "fp32" | "fp16" (float16 model down, float16 update up),
# and whether a hospital leaves out the experts it routed no token to.
TRANSPORT: Final = "transport"
SPARSE_EXPERTS: Final = "sparse-experts"
# Federated adaptation to a new task (multimodal.adapt): the task id, the method ("lora" |
# "head"; "none" = ordinary training of the whole model) and the sha256 of the base version's
# model.pt, which every hospital holds locally (published versions): only the adapter and head
# arrays travel, in both directions.
TASK: Final = "task"
ADAPT: Final = "adapt"
BASE_SHA256: Final = "base-sha256"
ADAPT_METHODS: Final = ("none", "lora", "head")
# Federated self-supervised pretraining of the image encoders (multimodal.pretrain): the
# PretrainConfig as JSON; present and non-empty = a pretraining round. Only the CT / pathology
# encoders and their projectors travel; the held-out loss a hospital reports is the VICReg
# objective on fixed views of its held-out cases (no labels are read).
PRETRAIN_JSON: Final = "pretrain-json"

# ---- hospital -> coordinator: MetricRecord "metrics" (train and evaluate replies) ----
TRAIN_LOSS: Final = "train-loss"
TRAIN_SECONDS: Final = "train-seconds"
LOSS: Final = "loss"  # held-out binary cross-entropy of the fused head
AUC: Final = "auc"  # NaN when the held-out split has one class only
ACCURACY: Final = "accuracy"
N_EVAL: Final = "n"  # held-out cases evaluated (= num-examples of an evaluate reply)
# After a DP round: the hospital's cumulative (lifetime) epsilon at its delta, from its ledger.
DP_EPSILON: Final = "dp-epsilon"
DP_DELTA: Final = "dp-delta"
TRAIN_METRIC_KEYS: Final = frozenset({NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, DP_EPSILON,
                                      DP_DELTA})
# Federated temperature scaling (multimodal.calibration.GridStats, lists of sums over the
# held-out cases: NLL per grid temperature, reliability-bin sums; never a case's value).
CALIB_NLL: Final = "calib-nll"
CALIB_N: Final = "calib-n"
CALIB_BINS: Final = "calib-bins"
CALIB_KEYS: Final = frozenset({CALIB_NLL, CALIB_N, CALIB_BINS})
EVAL_METRIC_KEYS: Final = frozenset({NUM_EXAMPLES, LOSS, AUC, ACCURACY, N_EVAL, *CALIB_KEYS})

# ---- query "data statistics": ConfigRecord "site" {"site-id"} + MetricRecord "metrics" ----
SITE: Final = "site"
SITE_ID: Final = "site-id"
QUERY_METRIC_KEYS: Final = frozenset({
    "cases-total", "cases-usable", "cases-excluded", "cases-train", "cases-test",
    "positives-train", "positives-test", "with-ct", "with-path", "with-ehr",
    "feedback-train", "feedback-changed",  # clinician feedback used as training labels (counts)
})

_EXPERT_PARAM = re.compile(r"(?:^|\.)blocks\.(\d+)\.moe\.experts\.(\d+)\.")


def expert_of(param_name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed-expert parameter (model array name), None for anything else:
    the rule both sides use for per-expert aggregation and sparse expert transport."""
    m = _EXPERT_PARAM.search(param_name)
    return (int(m.group(1)), int(m.group(2))) if m else None


_EXPERT_KEY = re.compile(re.escape(EXPERT_TOKENS_PREFIX) + r"\.\d+\.\d+")
# Site ids are hospital names chosen by hospital IT (site.json / node config), never patient data.
SITE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_allowed_metric(key: str, kind: str) -> bool:
    """Is `key` a whitelisted metric key for a reply of `kind` (train|evaluate|query)?"""
    if kind == "train":
        return key in TRAIN_METRIC_KEYS or bool(_EXPERT_KEY.fullmatch(key))
    if kind == "evaluate":
        return key in EVAL_METRIC_KEYS
    if kind == "query":
        return key in QUERY_METRIC_KEYS
    raise ValueError(f"unknown reply kind {kind!r}; expected train|evaluate|query")

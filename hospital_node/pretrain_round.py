"""A self-supervised pretraining round at a hospital (round config pretrain-json): VICReg on
every usable case with a CT or pathology image, labelled or not (labels are never read).

Only the received arrays (the image encoders and their "ssl."-prefixed projectors) train and go
back. Evaluation reports the pretraining objective on fixed views of the held-out split (the
same split as task rounds, so a case never trains in one kind of round and tests the other) as
the loss; there is no AUC to report. docs/pretraining.md.
"""

from __future__ import annotations

import math
import time
from typing import Any

from hospital_node.task import NodeSettings, RoundConfig, TrainOutcome, _load
from vocab import records as K
from vocab.errors import ConfigError, DataError
from vocab.json_config import json_object


def image_cases(node: NodeSettings, inputs: Any, seed: int, max_cases: int = 0
                ) -> tuple[list[Any], list[Any]]:
    """(train, test): the site's usable cases with a CT or a pathology image, on the fixed split."""
    from hospital_node.splits import split_of

    site = _load(node.data_dir, inputs, node.cache_dir, "")
    cases = sorted((c for c in site.cases if c.ct is not None or c.path is not None),
                   key=lambda c: c.case_id)
    if max_cases > 0:
        cases = cases[:max_cases]
    train = [c for c in cases if split_of(c.case_id, seed) == "train"]
    test = [c for c in cases if split_of(c.case_id, seed) == "test"]
    return train, test


def _setup(cfg: RoundConfig, state: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The model and projectors holding the received arrays, and the pretraining config."""
    from multimodal.model import FedsightModel
    from multimodal.pretrain import (
        HEADS_PREFIX,
        PretrainConfig,
        SSLHeads,
        encoder_keys,
        load_pretrained_encoders,
    )

    if cfg.dp_noise_multiplier or cfg.dp_max_grad_norm:
        raise ConfigError("DP-SGD is not built for pretraining rounds")
    pcfg = PretrainConfig.from_dict(json_object(cfg.pretrain_json, "pretrain-json"))
    model = FedsightModel(cfg.model_config())
    heads = SSLHeads(model, pcfg)
    mods = tuple(heads.proj)
    expected = set(encoder_keys(model, mods)) | {HEADS_PREFIX + k for k in heads.state_dict()}
    if set(state) != expected:  # exactly the pretraining arrays, nothing else
        raise ConfigError(f"a pretraining round needs the encoder and projector arrays; got "
                          f"{len(set(state) - expected)} unexpected and "
                          f"{len(expected - set(state))} missing")
    load_pretrained_encoders(model, state, mods)
    heads.load_state_dict({k[len(HEADS_PREFIX):]: v for k, v in state.items()
                           if k.startswith(HEADS_PREFIX)}, strict=True)
    return model, heads, pcfg


def _arrays(model: Any, heads: Any, keys: set[str]) -> dict[str, Any]:
    from multimodal.pretrain import HEADS_PREFIX

    own = model.state_dict() | {HEADS_PREFIX + k: v for k, v in heads.state_dict().items()}
    return {k: own[k] for k in keys}


def pretrain(node: NodeSettings, cfg: RoundConfig, state: dict[str, Any],
             start_step: int = 0) -> TrainOutcome:
    from multimodal.pretrain import pretrain_local

    t0 = time.perf_counter()
    model, heads, pcfg = _setup(cfg, state)
    train, _ = image_cases(node, model.cfg.inputs, cfg.seed, cfg.max_cases)
    if len(train) < 2:
        raise DataError("fewer than two cases with an image at this site: nothing to pretrain on")
    run = pcfg.from_dict({**pcfg.to_dict(), "epochs": max(cfg.local_epochs, 1),
                          "seed": cfg.seed * 1000 + cfg.server_round})
    history = pretrain_local(model, heads, train, run)
    last = history[-1] if history else {}
    loss = sum(v for k, v in last.items() if k.startswith("ssl_")) if last else math.nan
    metrics = {K.NUM_EXAMPLES: float(len(train)), K.TRAIN_LOSS: float(loss),
               K.TRAIN_SECONDS: time.perf_counter() - t0}
    return TrainOutcome(_arrays(model, heads, set(state)), metrics, start_step)


def evaluate_objective(node: NodeSettings, cfg: RoundConfig, state: dict[str, Any]
                       ) -> dict[str, Any]:
    """The objective (sum over modalities) on fixed views of the held-out image cases."""
    from multimodal.pretrain import objective

    model, heads, pcfg = _setup(cfg, state)
    _, test = image_cases(node, model.cfg.inputs, cfg.seed, cfg.max_cases)
    n = len(test)
    out = {K.NUM_EXAMPLES: float(n), K.N_EVAL: float(n), K.LOSS: math.nan, K.AUC: math.nan,
           K.ACCURACY: math.nan}
    parts = objective(model, heads, test, pcfg, seed=cfg.seed) if n >= 2 else {}
    if parts:
        out[K.LOSS] = float(sum(parts.values()))
    return out

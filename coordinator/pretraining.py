"""Federated self-supervised pretraining of the image encoders (run config pretrain = true), and
a task run that starts from a pretrained version (init-encoders). docs/pretraining.md.

A pretraining round sends the CT and pathology encoders and their VICReg projectors
(multimodal.pretrain) and nothing else; hospitals train them on every case with an image,
labelled or not, and report the objective on fixed views of their held-out cases. Each round's
version is a complete checkpoint of kind "pretrained": the seeded (or init-encoders) model with
the pretrained encoders in it, plus the projectors in the checkpoint meta so that a killed run
resumes where it stopped. Its head was never trained, so multimodal.checkpoint.load_checkpoint
refuses to serve it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.settings import RunSettings
from coordinator.store import ModelStore
from vocab.errors import CheckpointError, ConfigError

KIND = "pretrained"  # version meta "kind"; the checkpoint's is multimodal.checkpoint's (a test)
HEADS_KEY = "ssl_heads"  # checkpoint meta: the projectors' state dict


@dataclass(frozen=True)
class PretrainPlan:
    pcfg: Any  # multimodal.pretrain.PretrainConfig
    modalities: tuple[str, ...]  # those the model has
    base_state: dict[str, torch.Tensor]  # the whole model the pretrained encoders go into
    initial: dict[str, torch.Tensor]  # encoders + "ssl."-prefixed projectors: what travels

    def config_json(self) -> str:
        return json.dumps(self.pcfg.to_dict(), sort_keys=True)

    def full_state(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from multimodal.pretrain import HEADS_PREFIX

        return {**self.base_state,
                **{k: v for k, v in arrays.items() if not k.startswith(HEADS_PREFIX)}}

    def checkpoint_meta(self, arrays: dict[str, torch.Tensor]) -> dict[str, Any]:
        from multimodal.pretrain import HEADS_PREFIX

        heads = {k[len(HEADS_PREFIX):]: v.detach().cpu() for k, v in arrays.items()
                 if k.startswith(HEADS_PREFIX)}
        return {"kind": KIND, HEADS_KEY: heads, "pretrain_config": self.pcfg.to_dict()}

    def meta(self) -> dict[str, Any]:
        return {"kind": KIND, "pretrain": {"config": self.pcfg.to_dict(),
                                           "modalities": list(self.modalities),
                                           "arrays": len(self.initial)}}

    def resume_arrays(self, model_path: Path) -> dict[str, torch.Tensor]:
        """The travelling arrays of a stored pretraining version (encoders + projectors)."""
        from multimodal.checkpoint import read_checkpoint
        from multimodal.pretrain import HEADS_PREFIX

        ck = read_checkpoint(model_path)
        heads = (ck.get("meta") or {}).get(HEADS_KEY)
        if not isinstance(heads, dict):
            raise CheckpointError(f"version {str(model_path)!r} holds no pretraining projectors: "
                                  "it is not a pretraining version")
        state = ck["state_dict"]
        out = {k: state[k] for k in self.initial if not k.startswith(HEADS_PREFIX)}
        out |= {HEADS_PREFIX + k: v for k, v in heads.items()}
        if set(out) != set(self.initial):
            raise CheckpointError(f"version {str(model_path)!r} does not match this run's "
                                  "pretraining arrays")
        return out


def with_pretrained_encoders(model: Any, ref: str, store: ModelStore) -> list[str]:
    """Copy the encoders of pretrained version `ref` into `model` (ConfigError naming the version
    when it is not a pretraining version or its encoders do not fit this model)."""
    from multimodal.checkpoint import read_checkpoint
    from multimodal.pretrain import load_pretrained_encoders

    path, _ = store.resolve(ref, "init-encoders")
    try:
        ck = read_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"init-encoders {ref!r}: {e}") from None
    meta = ck.get("meta") or {}
    if meta.get("kind") != KIND:
        raise ConfigError(f"init-encoders {ref!r} is not a pretraining version (kind "
                          f"{meta.get('kind', 'model')!r})")
    mods = tuple((meta.get("pretrain_config") or {}).get("modalities") or ())
    mods = tuple(m for m in mods if m in model.cfg.modalities)
    try:
        return load_pretrained_encoders(model, ck["state_dict"], mods)
    except ConfigError as e:
        raise ConfigError(f"init-encoders {ref!r}: {e}") from None


def initial_model_state(settings: RunSettings, cfg: Any, store: ModelStore
                        ) -> dict[str, torch.Tensor]:
    """A new run's starting model: seeded init, with a pretrained version's encoders when
    init-encoders names one."""
    from multimodal.model import build_model

    model = build_model(cfg, seed=settings.seed)
    if settings.init_encoders:
        with_pretrained_encoders(model, settings.init_encoders, store)
    return model.state_dict()


def plan_pretraining(settings: RunSettings, cfg: Any, store: ModelStore) -> PretrainPlan | None:
    """None unless pretrain = true; else what travels and the model it goes into."""
    if not settings.pretrain:
        return None
    from multimodal.model import build_model
    from multimodal.pretrain import HEADS_PREFIX, PretrainConfig, SSLHeads, encoder_keys

    try:
        pcfg = PretrainConfig.from_dict(settings.json_overrides("pretrain_json"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pretrain-json: {e}") from None
    model = build_model(cfg, seed=settings.seed)
    if settings.init_encoders:  # continue an earlier pretraining
        with_pretrained_encoders(model, settings.init_encoders, store)
    torch.manual_seed(settings.seed)  # the projectors' init, the same on a resumed run
    heads = SSLHeads(model, pcfg)
    mods = tuple(heads.proj)
    if not mods:
        raise ConfigError(f"pretrain: the model has none of the pretrained modalities "
                          f"{list(pcfg.modalities)} (its modalities: {list(cfg.modalities)})")
    own = model.state_dict()
    initial = {k: own[k] for k in encoder_keys(model, mods)}
    initial |= {HEADS_PREFIX + k: v for k, v in heads.state_dict().items()}
    return PretrainPlan(pcfg, mods, own, initial)

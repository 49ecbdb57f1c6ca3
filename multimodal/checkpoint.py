"""Checkpoints: state_dict + model config + temperature + format version, in one torch file.

A checkpoint only loads into a model of the same config; otherwise CheckpointError names the
differing config keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multimodal.config import ModelConfig
from multimodal.model import FedsightModel
from vocab.errors import CheckpointError, ConfigError

FORMAT = "fedsight-model"
VERSION = 1
PRETRAINED_KIND = "pretrained"  # meta "kind" of a pretraining version (coordinator.pretraining)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (sorted), with both values."""
    fa, fb = _flatten(a), _flatten(b)
    return [f"{k}: {fa.get(k, '<absent>')!r} != {fb.get(k, '<absent>')!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, "<absent>") != fb.get(k, "<absent>")]


def save_checkpoint(model: FedsightModel, path: str | Path,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write the model (weights, config, temperature) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temps = model.task_temperatures()
    torch.save({
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # one per task; the first task's is also "temperature", as before tasks existed
        "temperature": temps.get(model.cfg.task, 1.0),
        "temperatures": temps,
        "meta": dict(meta or {}),
    }, path)
    return path


def stored_config(ck: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model config with keys added since it was written filled by their
    defaults (a one-task checkpoint from before tasks existed reads as task "nodule")."""
    cfg = ck.get("model_config")
    if not isinstance(cfg, dict):
        return {}
    try:
        return ModelConfig.from_dict(cfg).to_dict()
    except (ConfigError, TypeError, ValueError):
        return cfg


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated for format and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fedsight model checkpoint")
    if ck.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {ck.get('version')!r}; "
            f"this code reads version {VERSION}"
        )
    return ck


def load_checkpoint(path: str | Path, expected: ModelConfig | None = None,
                    task: str | None = None) -> FedsightModel:
    """Build the model stored in `path`, serving `task` (default: its first task). If
    `expected` is given and differs from the stored config, raise CheckpointError naming the
    differing keys; a task the checkpoint has no head for is a CheckpointError too, and so is
    a pretraining version (its encoders were pretrained, its head never trained)."""
    ck = read_checkpoint(path)
    if (ck.get("meta") or {}).get("kind") == PRETRAINED_KIND:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a self-supervised pretraining version: its encoders "
            "are pretrained but no task head was trained, so it gives no diagnosis; start a "
            "task run from it (run config init-encoders) and use that run's versions")
    if expected is not None:
        diff = config_diff(expected.to_dict(), stored_config(ck))
        if diff:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was saved with another model config; differing keys "
                f"(expected != checkpoint): {'; '.join(diff)}"
            )
    try:
        cfg = ModelConfig.from_dict(ck["model_config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config: {e}") from e
    model = FedsightModel(cfg)
    _load_state(model, ck, path)
    if task is not None:
        if task not in cfg.tasks:
            raise CheckpointError(f"checkpoint {str(path)!r} has no head for task {task!r}; its "
                                  f"tasks: {list(cfg.tasks)}")
        model.use_task(task)
    return model


def load_into(model: FedsightModel, path: str | Path) -> FedsightModel:
    """Load weights + temperature from `path` into an existing model of the same config."""
    ck = read_checkpoint(path)
    diff = config_diff(model.cfg.to_dict(), stored_config(ck))
    if diff:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match this model's config; differing keys "
            f"(model != checkpoint): {'; '.join(diff)}"
        )
    _load_state(model, ck, path)
    return model


def _load_state(model: FedsightModel, ck: dict[str, Any], path: str | Path) -> None:
    try:
        model.load_state_dict(ck["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} weights do not fit the model: {e}") from e
    temps = ck.get("temperatures")
    model.temperatures = ({str(k): float(v) for k, v in temps.items()}
                          if isinstance(temps, dict) else {})
    model.temperatures.setdefault(model.cfg.task, float(ck.get("temperature", 1.0)))
    model.serve_task = model.cfg.task
    model.temperature = model.temperatures[model.cfg.task]
    model.eval()

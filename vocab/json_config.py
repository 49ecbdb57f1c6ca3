"""Parse a JSON-object config value (run config carries nested configs as JSON strings)."""

from __future__ import annotations

import json
import math
from typing import Any

from vocab.errors import ConfigError


def json_object(text: str, key: str) -> dict[str, Any]:
    """`text` as a dict ("" means {}); ConfigError naming `key` and the value otherwise."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key} is not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {text!r}")
    return value


def json_safe(x: Any) -> Any:
    """NaN/inf -> None through dicts and lists (json.dumps would write invalid JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x

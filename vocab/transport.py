"""How model arrays travel between coordinator and hospitals (both sides use this; numpy only).

Two cost levers (issue 12), both chosen per run by the coordinator:

- `fp16`: the global model goes down as float16, and each hospital sends its *update* (local
  weights minus the weights it received) up as float16, which the coordinator adds to its own
  float32 global. Why the update and not the weights: a weight of ~0.05 in float16 is off by
  ~3e-5, a tenth of a typical per-round change; the update itself is small, so float16 keeps
  it to about 3 significant digits.
- `sparse experts`: a hospital leaves out every routed expert it sent no token to in the whole
  round (their weights did not change: no gradient, and AdamW skips a parameter without one);
  the coordinator fills them in from its global copy. Never under DP (noise changes every
  parameter, and token counts are not reported then).

Integer and bool buffers always travel as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

import numpy as np

from vocab.errors import ConfigError

Transport = Literal["fp32", "fp16"]
TRANSPORTS: Final = ("fp32", "fp16")

State = Mapping[str, np.ndarray]


def check_transport(mode: str) -> Transport:
    if mode not in TRANSPORTS:
        raise ConfigError(f"transport must be one of {'|'.join(TRANSPORTS)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def pack_global(state: State, mode: Transport) -> dict[str, np.ndarray]:
    """Coordinator -> hospital: the global model in the run's transport precision."""
    if mode == "fp32":
        return dict(state)
    return {k: v.astype(np.float16) if _floating(v) else v for k, v in state.items()}


def unpack_global(arrays: State, dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """Hospital side: received arrays in the model's own dtypes (float16 -> float32)."""
    return {k: v.astype(dtypes[k]) if k in dtypes and v.dtype != dtypes[k] else v
            for k, v in arrays.items()}


def pack_update(local: State, received: State, mode: Transport,
                leave_out: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Hospital -> coordinator: weights (fp32) or float16 updates local - received (fp16),
    without the keys in `leave_out` (experts this hospital did not touch)."""
    skip = frozenset(leave_out)
    out: dict[str, np.ndarray] = {}
    for k, v in local.items():
        if k in skip:
            continue
        if mode == "fp16" and _floating(v):
            out[k] = (v.astype(np.float32) - received[k].astype(np.float32)).astype(np.float16)
        else:
            out[k] = v
    return out


def unpack_update(arrays: State, global_state: State, mode: Transport,
                  may_leave_out: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Coordinator side: a hospital's full local state in the global dtypes. Keys it left out
    (only those in `may_leave_out`) are the global copy; any other missing or extra key is left
    as it is for screening to refuse (a malformed update)."""
    allowed = frozenset(may_leave_out)
    out: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        g = global_state.get(k)
        if mode == "fp16" and g is not None and _floating(g) and _floating(v) \
                and v.shape == g.shape:
            out[k] = (g.astype(np.float32) + v.astype(np.float32)).astype(g.dtype)
        else:
            out[k] = v
    for k in allowed - set(arrays):
        if k in global_state:
            out[k] = global_state[k]
    return out

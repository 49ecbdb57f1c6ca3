"""Hospital side of secure aggregation: Flower's own `secaggplus_mod` around our Message-API
train handler (docs/secure_aggregation.md).

`secure_train_mod` is the one mod to put on the ClientApp's train handler
(`@app.train(mods=[secure_train_mod])`):

* a train message without SecAgg+ configs (a plain round) goes straight to the handler;
* a SecAgg+ message goes to Flower's `secaggplus_mod` unchanged (key agreement, Shamir shares,
  masking: all Flower's code, nothing cryptographic here); in its "collect masked vectors"
  stage the mod calls `_LegacyAdapter`, which turns Flower's legacy FitIns into our Message-API
  content (`arrays` + `config`), runs the handler, and returns the weighted vector of
  vocab.secagg as a legacy FitRes for the mod to quantise and mask.

Nothing of the update leaves in plaintext: the FitRes carries the constant weight
FLOWER_WEIGHT, (after the mod clears it) no arrays, and as metrics only vocab.secagg.CLEAR_METRICS
(the hospital's DP epsilon/delta, when it trained with DP); example and token counts and the
training loss travel inside the masked vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from vocab import records as K
from vocab import secagg as S

_FITINS_ARRAYS = "fitins.parameters"  # flwr.compat.common.recorddict_compat's legacy keys
_FITINS_CONFIG = "fitins.config"


class SecureAggError(ValueError):
    """This hospital cannot take part in the secure round (message: numbers and keys only)."""


def weighted_vector(layout: S.Layout, global_state: Mapping[str, np.ndarray],
                    local_state: Mapping[str, np.ndarray], metrics: Mapping[str, float]
                    ) -> list[np.ndarray]:
    """The vector this hospital adds to the secure sum (vocab.secagg's order), float64.

    Refuses (SecureAggError) what would silently corrupt the sum: arrays not matching the
    layout, non-finite values, a count above its public scale. Values beyond the clip range are
    clipped by Flower; their fraction is summed too, so the coordinator sees that it happened."""
    if set(local_state) != set(layout.keys):
        raise SecureAggError("trained arrays do not match the secure-aggregation layout")
    n = float(metrics.get(K.NUM_EXAMPLES, 0))
    if not (math.isfinite(n) and 0 < n <= layout.example_scale):
        raise SecureAggError(f"num-examples {n:g} outside (0, {layout.example_scale:g}]")
    tokens = {t: float(metrics.get(t, 0.0)) for t in layout.token_keys}
    for t, v in tokens.items():
        if not (math.isfinite(v) and 0 <= v <= layout.token_scale):
            raise SecureAggError(f"{t} = {v:g} outside [0, {layout.token_scale:g}]")
    weights = {S.EXAMPLES: n / layout.example_scale,
               **{t: v / layout.token_scale for t, v in tokens.items()}}
    out: list[np.ndarray] = []
    clipped = total = 0
    for key, group in zip(layout.keys, layout.groups, strict=True):
        local, glob = np.asarray(local_state[key]), np.asarray(global_state[key])
        if local.size != glob.size:
            raise SecureAggError(f"array {key!r} has shape {local.shape}, global {glob.shape}")
        local = local.reshape(glob.shape)  # Flower's Array turns a 0-d buffer into shape (1,)
        d = weights[group] * (local.astype(np.float64) - glob.astype(np.float64))
        if not np.all(np.isfinite(d)):
            raise SecureAggError(f"non-finite values in array {key!r}")
        clipped += int(np.count_nonzero(np.abs(d) > layout.clip))
        total += d.size
        # never 0-d: Flower 1.42's unmask stage leaves a 0-d array's offset and weight
        # uncorrected (dequantize returns a numpy scalar, `vec += offset` rebinds it)
        out.append(np.atleast_1d(d))
    loss = float(metrics.get(K.TRAIN_LOSS, math.nan))
    loss = min(max(loss, 0.0), S.LOSS_CAP) / S.LOSS_CAP * layout.clip \
        if math.isfinite(loss) else 0.0
    out.append(np.array([weights[S.EXAMPLES]]))
    out.extend(np.array([weights[t]]) for t in layout.token_keys)
    out.append(np.array([weights[S.EXAMPLES] * loss]))
    out.append(np.array([clipped / max(total, 1)]))
    return out


class _LegacyAdapter:
    """call_next for secaggplus_mod: legacy FitIns in, our handler, legacy FitRes out."""

    def __init__(self, handler: ClientAppCallable) -> None:
        self.handler = handler

    def __call__(self, msg: Message, context: Context) -> Message:
        content = msg.content
        arrays = [bytes_to_ndarray(a.data) for a in content.array_records[_FITINS_ARRAYS].values()]
        config = dict(content.config_records[_FITINS_CONFIG])
        layout = S.Layout.from_json(str(config.pop(S.LAYOUT)))
        if len(arrays) != len(layout.keys):
            raise SecureAggError("received arrays do not match the secure-aggregation layout")
        global_state = dict(zip(layout.keys, arrays, strict=True))
        # The handler sees an ordinary Message-API train message ("arrays" + "config").
        msg.content = RecordDict({K.ARRAYS: ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in global_state.items()}),
                                  K.CONFIG: ConfigRecord(config)})
        reply = self.handler(msg, context)
        local = {k: a.numpy() for k, a in reply.content[K.ARRAYS].items()}
        metrics = {k: float(v) for k, v in reply.content[K.METRICS].items()
                   if not isinstance(v, list)}
        vector = weighted_vector(layout, global_state, local, metrics)
        clear = {k: v for k, v in metrics.items() if k in S.CLEAR_METRICS and math.isfinite(v)}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), S.FLOWER_WEIGHT,
                        clear)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def is_secagg(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def secure_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mod for the train handler: SecAgg+ messages through Flower's secaggplus_mod, plain train
    messages untouched (Flower's mod alone would fail on them: it requires its configs)."""
    if not is_secagg(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _LegacyAdapter(call_next))


"""Wire contract of secure aggregation (SecAgg+), shared by coordinator and hospital node.

Under SecAgg+ the coordinator sees only the SUM of the hospitals' vectors, so each hospital sends
the weighted pieces of the per-expert mean, and the sum yields numerators and denominators:

    for every model array k:  w_k * (local_k - global_k),  w_k = n / example_scale for shared
                              arrays, tokens(layer, expert) / token_scale for a routed expert's
    then, in this order:      [n / example_scale], [tokens(t) / token_scale for t in token_keys],
                              [n / example_scale * train-loss / LOSS_CAP * clip],
                              [fraction of clipped values]

The coordinator divides each group's summed numerator by its summed weight (docs/
secure_aggregation.md). The layout (which array is weighted by which count, the scales, the clip
range) is public: the coordinator sends it as JSON in the round's config under LAYOUT.
Stdlib only (vocab imports no Flower).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Final

from vocab import records as K

LAYOUT: Final = "secagg-layout"  # fit config key: Layout.to_json()
EXAMPLES: Final = "num-examples"  # group of the arrays weighted by examples (vocab.records key)
# Flower's own weight (FitRes.num_examples / max_weight) is made neutral: every hospital sends
# FLOWER_WEIGHT with max_weight FLOWER_WEIGHT, so Flower's weighted mean is the plain mean.
FLOWER_WEIGHT: Final = 1
# A hospital's training loss is capped at LOSS_CAP and sent as a fraction of it times the clip
# range (so any loss up to the cap fits Flower's clipping range); the coordinator scales back.
LOSS_CAP: Final = 100.0
# The only train metrics a hospital sends in the clear beside its masked vector (Flower does not
# mask metrics): its DP accounting, which the coordinator records per hospital in each version's
# privacy block (coordinator.privacy_record). Everything else travels inside the masked sum.
CLEAR_METRICS: Final = frozenset({K.DP_EPSILON, K.DP_DELTA})


@dataclass(frozen=True)
class Layout:
    keys: tuple[str, ...]  # model arrays, in the order of the vector
    groups: tuple[str, ...]  # per key: EXAMPLES or an expert-tokens.{layer}.{expert} metric key
    token_keys: tuple[str, ...]  # the expert-token counts summed, in order
    example_scale: float  # public cap on a hospital's num-examples this round
    token_scale: float  # public cap on a hospital's token count per expert this round
    clip: float  # Flower's clipping_range: every vector value must lie in [-clip, clip]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.groups) or len(set(self.keys)) != len(self.keys):
            raise ValueError("secagg layout: keys and groups differ in length or repeat")
        if any(g != EXAMPLES and g not in self.token_keys for g in self.groups):
            raise ValueError("secagg layout: a group is neither examples nor a token key")
        for v in (self.example_scale, self.token_scale, self.clip):
            if not (math.isfinite(v) and v > 0):
                raise ValueError("secagg layout: scales and clip must be finite and > 0")

    @property
    def extras(self) -> int:
        """Vector entries after the model arrays: examples, tokens, loss, clipped."""
        return 1 + len(self.token_keys) + 2

    def to_json(self) -> str:
        return json.dumps({"keys": list(self.keys), "groups": list(self.groups),
                           "token_keys": list(self.token_keys),
                           "example_scale": self.example_scale,
                           "token_scale": self.token_scale, "clip": self.clip})

    @classmethod
    def from_json(cls, text: str) -> Layout:
        d = json.loads(text)
        if not isinstance(d, dict) or set(d) != {"keys", "groups", "token_keys",
                                                  "example_scale", "token_scale", "clip"}:
            raise ValueError("secagg layout: unexpected fields")
        return cls(tuple(map(str, d["keys"])), tuple(map(str, d["groups"])),
                   tuple(map(str, d["token_keys"])), float(d["example_scale"]),
                   float(d["token_scale"]), float(d["clip"]))

"""What happened in each round, per hospital: screening verdicts, metrics, bytes, time.

Filled in by the strategy's hooks, read by the ServerApp when it stores the round's model. Holds
hospital names (site ids), numbers and reasons only - nothing about any patient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vocab.json_config import json_safe

# What became of a hospital selected for training in a round.
ACCEPTED, REJECTED, DROPPED = "accepted", "rejected", "dropped"


@dataclass
class HospitalRound:
    selected: bool = False  # sent a training message this round
    # accepted: merged; rejected: its reply came and the coordinator refused the update
    # (screening, malformed); dropped: no usable reply (lost, timed out, or the node reported
    # an error). "" while the round runs or for a hospital only asked to evaluate.
    outcome: str = ""
    reason: str = ""  # why its update was rejected / dropped
    update_norm: float = math.nan
    cosine: float = math.nan  # screening's direction score (coordinator.screening)
    num_examples: int = 0
    bytes_down: int = 0  # global model sent to it this round (train + evaluate)
    bytes_up: int = 0  # its training reply (arrays + metrics)
    train: dict[str, float] = field(default_factory=dict)  # train-loss etc. (no token counts)
    eval: dict[str, float] = field(default_factory=dict)  # held-out loss, auc, accuracy, n


@dataclass
class RoundRecord:
    round: int
    started: float  # unix time
    finished: float = math.nan
    status: str = "running"  # aggregated | too-few-hospitals | running
    hospitals: dict[str, HospitalRound] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)  # example-weighted eval means
    # federated temperature scaling of this round's model (FederatedFit.to_meta()); {} when
    # too few held-out cases reported their sums
    calibration: dict[str, Any] = field(default_factory=dict)

    def hospital(self, name: str) -> HospitalRound:
        return self.hospitals.setdefault(name, HospitalRound())

    def outcomes(self) -> dict[str, dict[str, str]]:
        """{site: {"outcome", "reason"}} for every hospital selected for training."""
        return {name: {"outcome": h.outcome, "reason": h.reason}
                for name, h in sorted(self.hospitals.items()) if h.selected}

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def audit_data(self, run_id: str, version: str | None, model_bytes: int) -> dict[str, Any]:
        """The round as the audit log records it: every hospital messaged, what became of its
        update (accepted / rejected with the reason / none received), bytes, pooled metrics."""
        hs = sorted(self.hospitals.items())
        return json_safe({
            "run_id": run_id, "round": self.round, "status": self.status, "version": version,
            "seconds": self.seconds,
            "selected": [name for name, h in hs if h.selected],
            "accepted": [name for name, h in hs if h.outcome == ACCEPTED],
            "rejected": {name: h.reason for name, h in hs if h.outcome == REJECTED},
            "dropped": {name: h.reason for name, h in hs if h.outcome == DROPPED},
            "bytes": {name: {"down": h.bytes_down, "up": h.bytes_up} for name, h in hs},
            "model_bytes": model_bytes, "pooled": dict(self.pooled)})


def pooled_means(per_hospital: dict[str, dict[str, float]], weight_key: str = "n"
                 ) -> dict[str, float]:
    """Example-weighted mean of every metric over hospitals where it is finite."""
    keys = sorted({k for m in per_hospital.values() for k in m if k != weight_key})
    out: dict[str, float] = {}
    for k in keys:
        pairs = [(m[k], m.get(weight_key, 1.0)) for m in per_hospital.values()
                 if k in m and math.isfinite(m[k])]
        total = sum(w for _, w in pairs)
        if total > 0:
            out[k] = sum(v * w for v, w in pairs) / total
    out[weight_key] = float(sum(m.get(weight_key, 0.0) for m in per_hospital.values()))
    return out

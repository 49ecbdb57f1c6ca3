"""The state of one federated run, shared explicitly by the runner and the strategy, and stored as
`<store>/runs/<run_id>.json` (coordinator.store) after every round, so a resumed run continues
from it.

Status machine: running -> completed | failed | stopped; a stopped or failed run may be resumed
(running again). Holds site ids, numbers and reasons only: nothing about any patient.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from vocab.errors import ConfigError

RUN_STATES = ("running", "completed", "failed", "stopped")


@dataclass
class RunState:
    run_id: str
    config: dict[str, Any]  # the run config (RunSettings.to_run_config) it started with
    num_rounds: int
    started: float = field(default_factory=time.time)
    status: str = "running"
    rounds_completed: int = 0
    last_version: str | None = None
    versions: list[str] = field(default_factory=list)
    # One entry per finished round: round, status, seconds, version, and every selected
    # hospital's outcome {site: {"outcome": accepted|rejected|dropped, "reason": ...}}.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # Per hospital: the data statistics it reported when first identified (counts only).
    hospitals: dict[str, dict[str, float]] = field(default_factory=dict)
    flwr_run_ids: list[int] = field(default_factory=list)  # Flower runs that served it
    finished: float | None = None
    ended_reason: str = ""  # why a failed / stopped run ended

    def __post_init__(self) -> None:
        if self.status not in RUN_STATES:
            raise ConfigError(f"run {self.run_id!r}: status {self.status!r} is not one of "
                              f"{RUN_STATES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """A stored run record; keys this version does not know are refused, not dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"run record {data.get('run_id')!r} has unknown keys {unknown}")
        return cls(**data)

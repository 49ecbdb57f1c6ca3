"""A hospital's privacy budget: its settings, its ledger, and the check before every DP round.

The ledger is this hospital's own record of every DP-SGD round it trained (run, round, noise
multiplier, sampling rate, steps, delta and the cumulative epsilon after it), kept outside the
site root as an append-only hash-chained log (vocab.audit's format, kind "privacy.round").
Epsilon is composed over *all* entries, across monthly runs, by Opacus's RDP accountant
(multimodal.dp.epsilon), so a budget is a lifetime budget.

A ledger that cannot be read or does not verify (edited, lines deleted, torn) stops training
until an operator resolves it: it is never reset or re-chained silently. What goes back to the
coordinator is one of the fixed sentences of PrivacyRefusal, never numbers about the data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vocab.errors import ConfigError, PrivacyRefusal

log = logging.getLogger("flwr.fedsight.node")

BUDGET, DELTA, LEDGER, LEDGER_KEY = ("privacy-budget", "privacy-delta", "privacy-ledger",
                                     "privacy-ledger-key")
NODE_KEYS: Final = frozenset({BUDGET, DELTA, LEDGER, LEDGER_KEY})
DEFAULT_DELTA: Final = 1e-5


@dataclass(frozen=True)
class PrivacySettings:
    """What the hospital sets in its node config (flower-supernode --node-config)."""

    ledger: Path
    budget: float = 0.0  # lifetime epsilon; 0 = no budget (DP then optional, still recorded)
    delta: float = DEFAULT_DELTA
    ledger_key: Path | None = None  # HMAC key file for the ledger (vocab.audit)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and self.budget >= 0):
            raise ConfigError(f"node config {BUDGET} must be a finite epsilon >= 0, got "
                              f"{self.budget}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"node config {DELTA} must be in (0, 1), got {self.delta}")

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], data_dir: Path,
                         cache_dir: Path | None) -> PrivacySettings:
        def number(key: str, default: float) -> float:
            try:
                return float(node_config.get(key, default))
            except (TypeError, ValueError):
                raise ConfigError(f"node config {key} must be a number, got "
                                  f"{node_config.get(key)!r}") from None

        ledger = node_config.get(LEDGER)
        key = node_config.get(LEDGER_KEY)
        return cls(Path(str(ledger)) if ledger else default_ledger(data_dir, cache_dir),
                   number(BUDGET, 0.0), number(DELTA, DEFAULT_DELTA),
                   Path(str(key)) if key else None)


def default_ledger(data_dir: Path, cache_dir: Path | None) -> Path:
    """Outside the site root (hospital files are read-only to fedsight): in the node's cache
    folder, else in the user's state folder under a name derived from the site root's path."""
    if cache_dir is not None:
        return cache_dir / "privacy-ledger.jsonl"
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return state / "fedsight" / "privacy" / f"{tag}.jsonl"


@dataclass(frozen=True)
class LedgerEntry:
    run: int
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float  # cumulative, after this round, at `delta`
    time: str = ""


class Ledger:
    """The hospital's privacy ledger (one file, append-only)."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings

    def _log(self) -> Any:
        from vocab.audit import AuditLog, read_key

        key = read_key(self.settings.ledger_key, self.settings.ledger) \
            if self.settings.ledger_key is not None else None
        return AuditLog(self.settings.ledger, key)

    def entries(self) -> list[LedgerEntry]:
        """Every round recorded; PrivacyRefusal(LEDGER) if the file cannot be read or does not
        verify (the detail goes to this hospital's log only)."""
        from vocab.audit import PRIVACY_ROUND, AuditError, read_events, verify

        path = self.settings.ledger
        if not path.exists():
            return []
        try:
            result = verify(path, self._log().key)
            if not result.ok:
                raise AuditError(str(result))
            out = []
            for ev in read_events(path):
                if ev.kind != PRIVACY_ROUND:
                    raise AuditError(f"{path}: entry {ev.seq}: kind {ev.kind!r} is not "
                                     f"{PRIVACY_ROUND}")
                d = dict(ev.data)
                out.append(LedgerEntry(int(d["run"]), int(d["round"]),
                                       float(d["noise_multiplier"]), float(d["sample_rate"]),
                                       int(d["steps"]), float(d["delta"]), float(d["epsilon"]),
                                       ev.time))
            return out
        except (AuditError, OSError, KeyError, TypeError, ValueError) as e:
            log.error("privacy ledger refused: %s: %s", type(e).__name__, e)
            raise PrivacyRefusal(PrivacyRefusal.LEDGER) from None

    def spent(self, extra: Any = None) -> float:
        """Cumulative epsilon at the hospital's delta over the ledger (plus `extra`, a
        multimodal.dp.DPSpend not yet recorded)."""
        from multimodal.dp import epsilon

        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries()]
        if extra is not None:
            history.append(extra.as_tuple())
        return epsilon(history, self.settings.delta)

    def check(self, spend: Any, n_cases: int) -> float:
        """The cumulative epsilon this round would bring (DPSpend `spend`, None = no DP);
        PrivacyRefusal if the hospital's settings forbid the round."""
        if spend is None:
            self.entries()  # a broken ledger blocks every round, DP or not
            if self.settings.budget > 0:
                raise PrivacyRefusal(PrivacyRefusal.NEEDS_DP)
            return math.inf
        if n_cases > 0 and self.settings.delta > 1.0 / n_cases:
            raise PrivacyRefusal(PrivacyRefusal.DELTA)
        after = self.spent(spend)
        if self.settings.budget > 0 and after > self.settings.budget:
            log.warning("privacy budget %.3g: this round would bring epsilon to %.3g; refused",
                        self.settings.budget, after)
            raise PrivacyRefusal(PrivacyRefusal.EXHAUSTED)
        return after

    def record(self, run: int, server_round: int, spend: Any) -> float:
        """Append a trained round; returns the cumulative epsilon after it."""
        from vocab.audit import PRIVACY_ROUND

        after = self.spent(spend)
        self._log().append(PRIVACY_ROUND, "node", {
            "run": int(run), "round": int(server_round),
            "noise_multiplier": float(spend.noise_multiplier),
            "sample_rate": float(spend.sample_rate), "steps": int(spend.steps),
            "delta": float(self.settings.delta), "epsilon": float(after),
            "accountant": "rdp"})
        return after

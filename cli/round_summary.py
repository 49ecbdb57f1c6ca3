"""How the CLI prints rounds: version, pooled metrics, then every hospital selected for the round
with what became of its update (merged / rejected: reason / dropped: reason)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Why a round stored no model, for statuses whose name alone does not say (coordinator.secure_agg)
STATUS_TEXT = {
    "secagg-failed": "secure aggregation halted: too many hospitals left the protocol",
}


def print_round(meta: dict[str, Any], prefix: str = "[demo]") -> None:
    """One stored version's round: time, pooled metrics, then each hospital."""
    print(f"{prefix} round {meta['round']}: version {meta['id']} in "
          f"{meta.get('round_seconds') or 0:.0f} s, pooled "
          f"{fmt_metrics(meta['metrics'].get('pooled', {}))}")
    print(f"{prefix}   {calibration_text(meta.get('calibration'))}")
    screening = meta.get("screening", {})
    hospitals = meta["metrics"].get("hospitals", {})
    for site in sorted(set(hospitals) | set(screening)):
        _hospital_line(prefix, site, hospitals.get(site, {}), screening.get(site))


def print_run_rounds(run: Mapping[str, Any], metas: Mapping[str, dict[str, Any]],
                     prefix: str = "[coordinator]", after_round: int = 0) -> None:
    """Every round of a stored run record after `after_round`, including rounds that stored no
    version (too few usable updates): each selected hospital is named with its outcome."""
    for entry in run.get("rounds", []):
        if entry.get("round", 0) <= after_round:
            continue
        meta = metas.get(entry.get("version") or "")
        if meta is not None:
            print_round(meta, prefix)
            continue
        status = entry.get("status")
        why = STATUS_TEXT.get(str(status))
        print(f"{prefix} round {entry['round']}: {status}{f' ({why})' if why else ''}, no "
              f"version stored (global model kept)")
        for site, o in sorted(entry.get("hospitals", {}).items()):
            _hospital_line(prefix, site, {}, o)


def _hospital_line(prefix: str, site: str, metrics: Mapping[str, Any],
                   screening: Mapping[str, Any] | None) -> None:
    print(f"{prefix}   {site:<12} {fmt_metrics(dict(metrics)) or '(no evaluation)'}  "
          f"({outcome_text(screening)})")


def outcome_text(screening: Mapping[str, Any] | None) -> str:
    """'update merged', 'update rejected: why', 'dropped: why' or 'evaluated only'."""
    if screening is None:
        return "evaluated only"
    outcome = screening.get("outcome") or ("accepted" if screening.get("accepted") else "")
    reason = screening.get("reason") or "no reply"
    if outcome == "accepted":
        return "update merged"
    if outcome == "dropped":
        return f"dropped: {reason}"
    return f"update rejected: {reason}"


def calibration_text(cal: Mapping[str, Any] | None) -> str:
    """'calibration: T=1.42, pooled ECE 0.081 -> 0.034 (cross-fitted, n=148)' or why none."""
    if not isinstance(cal, Mapping):
        return "calibration: none (too few held-out cases reported sums): uncalibrated"
    pooled = cal.get("pooled") or {}
    return (f"calibration: T={float(cal.get('temperature', 1)):.2f}, pooled ECE "
            f"{pooled.get('ece_before', float('nan')):.3f} -> "
            f"{pooled.get('ece_after', float('nan')):.3f} (cross-fitted, n={cal.get('n')})")


def fmt_metrics(metrics: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
            return str(int(v))  # counts (n, num-examples)
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={one(v)}" for k, v in sorted(metrics.items()) if v is not None)

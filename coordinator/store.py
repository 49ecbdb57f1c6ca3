"""Model store: every round's global model as a content-hashed, versioned artifact.

Layout (documented for the clinician UI in coordinator/README.md):

    <store>/versions/<version_id>/model.pt    multimodal.checkpoint format (weights + config)
    <store>/versions/<version_id>/meta.json   round, run, config, parent, metrics, time, sha256
    <store>/runs/<run_id>.json                one training campaign: rounds, status, versions
    <store>/clinical.json                     the version clinicians get + promotion history
    <store>/audit.jsonl                       hash-chained audit log (vocab.audit): runs, rounds,
                                              promotions, rollbacks; no case ids

version_id = "<seq:04d>-<first 12 hex of sha256(model.pt)>"; seq orders versions in the store.
Writes go to a temporary folder first and are renamed into place, so a crash never leaves a
half-written version that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vocab import audit
from vocab.errors import ConfigError, FedsightError

META = "meta.json"
MODEL = "model.pt"
CLINICAL = "clinical.json"
AUDIT = "audit.jsonl"
# How a run that did not complete ended: the ServerApp raised (failed) or was stopped by the
# operator (`flwr stop`, timeout, Ctrl-C); "running" and "completed" are the others.
RUN_END_STATES = ("failed", "stopped")


class StoreError(FedsightError):
    """A model store operation was refused or the store is inconsistent (message says why)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{str(path)!r} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class Version:
    id: str
    path: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    def hospital_metrics(self) -> dict[str, dict[str, float | None]]:
        return dict(self.meta.get("metrics", {}).get("hospitals", {}))


@dataclass(frozen=True)
class PromotionCheck:
    ok: bool
    reasons: tuple[str, ...]


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def audit_log(self) -> audit.AuditLog:
        """The store's audit log (keyed by $FEDSIGHT_AUDIT_KEY_FILE when set)."""
        return audit.AuditLog.open(self.root / AUDIT)

    # ---- versions ----
    def add_version(self, write_model: Any, meta: Mapping[str, Any]) -> Version:
        """Store a new version. `write_model(path)` writes model.pt; `meta` is completed with
        id, seq, sha256 and created time."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".new-"))
        write_model(tmp / MODEL)
        digest = sha256_file(tmp / MODEL)
        seq = self._next_seq()
        vid = f"{seq:04d}-{digest[:12]}"
        full = {**meta, "id": vid, "seq": seq, "sha256": digest,
                "created": meta.get("created", time.time())}
        _write_json(tmp / META, _json_safe(full))
        final = self.versions_dir / vid
        os.replace(tmp, final)
        return Version(vid, final, full)

    def _next_seq(self) -> int:
        seqs = [v.meta.get("seq", 0) for v in self.list_versions()]
        return max(seqs, default=0) + 1

    def list_versions(self) -> list[Version]:
        if not self.versions_dir.is_dir():
            return []
        out = []
        for d in self.versions_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / META).is_file():
                out.append(Version(d.name, d, _read_json(d / META)))
        return sorted(out, key=lambda v: v.meta.get("seq", 0))

    def resolve(self, ref: str, key: str) -> tuple[Path, str]:
        """(model.pt path, version id or "") of a run-config reference `key` = `ref`: a model.pt
        path, a version folder, or a version id of this store (ConfigError naming both)."""
        p = Path(ref)
        if p.suffix == ".pt" or p.is_file():
            return p, ""
        if p.is_dir():
            return p / MODEL, p.name
        try:
            v = self.get(ref)
        except StoreError as e:
            raise ConfigError(f"{key} {ref!r}: not a model.pt, a version folder, or a version "
                              f"of store {self.root}: {e}") from None
        return v.model_path, v.id

    def get(self, version_id: str) -> Version:
        matches = [v for v in self.list_versions()
                   if v.id == version_id or v.id.startswith(version_id)
                   or v.id.split("-", 1)[-1].startswith(version_id)]
        if len(matches) != 1:
            known = [v.id for v in self.list_versions()][-10:]
            what = "no" if not matches else "more than one"
            raise StoreError(f"{what} version matches {version_id!r}; recent: {known}")
        return matches[0]

    def verify(self, version: Version) -> None:
        """Raise StoreError if model.pt no longer has the recorded sha256."""
        actual = sha256_file(version.model_path)
        if actual != version.meta.get("sha256"):
            raise StoreError(f"version {version.id}: model.pt sha256 {actual[:12]} does not "
                             f"match meta.json {str(version.meta.get('sha256'))[:12]}")

    # ---- runs (for resume and history) ----
    def write_run(self, run: Mapping[str, Any]) -> None:
        path = self.root / "runs" / f"{run['run_id']}.json"
        new = dict(run)
        if new.get("status") == "running" and path.is_file():
            old = _read_json(path)
            # A run the operator's side ended (end_run after `flwr stop`, a timeout, Ctrl-C)
            # stays ended against a late write of the ServerApp it stopped: that process may
            # still finish a round before the stop reaches it, and on a busy machine it did,
            # after the store said 'stopped'. A resume appends its Flower run id: a new write.
            if old.get("status") in RUN_END_STATES and \
                    old.get("flwr_run_ids") == new.get("flwr_run_ids"):
                new |= {k: old[k] for k in ("status", "ended_reason", "finished") if k in old}
        _write_json(path, _json_safe(new))

    def list_runs(self) -> list[dict[str, Any]]:
        d = self.root / "runs"
        runs = [_read_json(p) for p in d.glob("*.json")] if d.is_dir() else []
        return sorted(runs, key=lambda r: r.get("started", 0))

    def latest_unfinished_run(self) -> dict[str, Any] | None:
        runs = [r for r in self.list_runs() if r.get("status") != "completed"]
        return runs[-1] if runs else None

    def run_with_flwr_id(self, flwr_run_id: int) -> dict[str, Any] | None:
        """The store's run that a Flower run id (`flwr run`) served, if any."""
        runs = [r for r in self.list_runs() if flwr_run_id in r.get("flwr_run_ids", [])]
        return runs[-1] if runs else None

    def end_run(self, run_id: str, status: str, reason: str, actor: str = "coordinator"
                ) -> dict[str, Any]:
        """Record that a run ended without completing (status 'failed' or 'stopped'), as the
        operator's side saw it: a ServerApp stopped by `flwr stop` or killed cannot write this
        itself. A completed run is left as it is; the audit log gets a run-failed entry."""
        if status not in RUN_END_STATES:
            raise StoreError(f"end_run status must be one of {RUN_END_STATES}, got {status!r}")
        run = next((r for r in self.list_runs() if r.get("run_id") == run_id), None)
        if run is None:
            raise StoreError(f"no run {run_id!r} in store {str(self.root)!r}")
        if run.get("status") == "completed":
            return run
        run = {**run, "status": status, "ended_reason": reason, "finished": time.time()}
        self.write_run(run)
        self.audit_log.append(audit.RUN_FAILED, actor, {
            "run_id": run_id, "error": reason, "status": status,
            "rounds_completed": run.get("rounds_completed", 0)})
        return run

    # ---- clinical pointer ----
    def clinical(self) -> dict[str, Any]:
        p = self.root / CLINICAL
        return _read_json(p) if p.is_file() else {"version": None, "history": []}

    def clinical_version(self) -> Version | None:
        vid = self.clinical().get("version")
        return self.get(vid) if vid else None

    def check_promotion(self, candidate: Version, metric: str = "auc", margin: float = 0.02,
                        higher_is_better: bool = True, max_ece: float | None = None
                        ) -> PromotionCheck:
        """Refuse a candidate worse than the clinical version at any hospital by > margin, and
        (with max_ece) one without a federated calibration or whose pooled cross-fitted ECE
        exceeds max_ece."""
        reasons = calibration_reasons(candidate, max_ece) if max_ece is not None else []
        current = self.clinical_version()
        if current is None:
            return PromotionCheck(not reasons, tuple(reasons))
        cand = candidate.hospital_metrics()
        for hospital, cur_m in sorted(current.hospital_metrics().items()):
            cur = cur_m.get(metric)
            if cur is None or not math.isfinite(cur):
                continue
            new = (cand.get(hospital) or {}).get(metric)
            if new is None or not math.isfinite(new):
                reasons.append(f"hospital {hospital}: no {metric} for {candidate.id} "
                               f"(clinical {current.id} has {cur:.3f})")
                continue
            worse = cur - new if higher_is_better else new - cur
            if worse > margin:
                reasons.append(f"hospital {hospital}: {metric} {new:.3f} vs clinical {cur:.3f} "
                               f"({current.id}), worse by {worse:.3f} > margin {margin}")
        return PromotionCheck(not reasons, tuple(reasons))

    def promote(self, version_id: str, metric: str = "auc", margin: float = 0.02,
                force: bool = False, note: str = "", actor: str = "",
                max_ece: float | None = None) -> Version:
        cand = self.get(version_id)
        self.verify(cand)
        check = self.check_promotion(cand, metric, margin, max_ece=max_ece)
        if not check.ok and not force:
            raise StoreError(f"refusing to promote {cand.id}: " + "; ".join(check.reasons))
        log = self.audit_log
        log.check()  # a promotion that cannot be audited does not happen
        state = self.clinical()
        history = list(state.get("history", []))
        entry = {"version": cand.id, "action": "promote", "time": time.time(),
                 "forced": bool(force and not check.ok), "note": note,
                 "previous": state.get("version")}
        history.append(entry)
        _write_json(self.root / CLINICAL, {"version": cand.id, "history": history})
        log.append(audit.MODEL_PROMOTED, actor or audit.local_actor(),
                   {k: entry[k] for k in ("version", "previous", "forced", "note")}
                   | {"metric": metric, "margin": margin, "max_ece": max_ece,
                      "check": list(check.reasons)})
        return cand

    def rollback(self, actor: str = "") -> Version:
        """Point clinicians back at the version that was clinical before the current one."""
        state = self.clinical()
        history = list(state.get("history", []))
        current = state.get("version")
        if current is None:
            raise StoreError("nothing to roll back: no version is clinical")
        previous = next((h.get("previous") for h in reversed(history)
                         if h.get("version") == current and h.get("action") == "promote"), None)
        if previous is None:
            raise StoreError(f"nothing to roll back to: {current} was the first clinical version")
        target = self.get(previous)
        self.verify(target)
        log = self.audit_log
        log.check()
        history.append({"version": target.id, "action": "rollback", "time": time.time(),
                        "previous": current})
        _write_json(self.root / CLINICAL, {"version": target.id, "history": history})
        log.append(audit.MODEL_ROLLED_BACK, actor or audit.local_actor(),
                   {"version": target.id, "previous": current})
        return target


def calibration_reasons(version: Version, max_ece: float) -> list[str]:
    """Why `version` fails the calibration gate ([] when it passes)."""
    cal = version.meta.get("calibration")
    if not isinstance(cal, dict):
        return [f"{version.id} has no federated calibration (uncalibrated probabilities)"]
    ece = (cal.get("pooled") or {}).get("ece_after")
    if not isinstance(ece, int | float) or not math.isfinite(ece):
        return [f"{version.id}: no pooled ECE in its calibration"]
    if ece > max_ece:
        return [f"{version.id}: pooled ECE {ece:.3f} after temperature scaling exceeds "
                f"{max_ece}"]
    return []


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x

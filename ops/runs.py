"""A federated run as the coordinator's operator drives it: refuse a resume that would race a
run still active on the SuperLink, submit, wait with progress lines, stop the run on timeout or
Ctrl-C/SIGTERM (`flwr stop`), and keep the model store's run record (running / completed /
failed / stopped) in step with what the SuperLink says."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from coordinator.store import ModelStore
from ops.flwr_cli import (
    ACTIVE,
    RunFailed,
    RunLost,
    RunTimedOut,
    run_status,
    stop_run,
    submit_run,
    wait_run,
)
from vocab.errors import FedsightError

# Flower's final statuses -> the store's end states (finished:completed is the runner's own).
_END_STATE = {"finished:failed": "failed", "finished:stopped": "stopped"}


class ResumeRefused(FedsightError):
    """--resume while the run to resume is still active on the SuperLink."""


class RunInterrupted(RunFailed):
    """The operator interrupted the wait (Ctrl-C, SIGTERM); the run was stopped."""


@dataclass(frozen=True)
class RunRequest:
    app: Path
    flwr_home: Path
    store: Path
    run_config: dict[str, Any]
    timeout: float
    resume: bool = False


def check_resume(store: ModelStore, flwr_home: Path) -> None:
    """Refuse --resume while the latest unfinished run's last Flower run is still pending,
    starting or running on the SuperLink: a second ServerApp would race it for the same rounds."""
    run = store.latest_unfinished_run()
    ids = (run or {}).get("flwr_run_ids") or []
    if not ids:
        return
    try:
        status = run_status(flwr_home, int(ids[-1]))
    except RunLost:
        return  # the SuperLink forgot it (restarted in memory): nothing to race
    if status in ACTIVE:
        raise ResumeRefused(
            f"run {run['run_id']!r} is still {status} on the SuperLink as Flower run {ids[-1]}; "
            f"wait for it, or stop it first (`flwr stop {ids[-1]}`) and then resume")


def reconcile(store: ModelStore, flwr_run_id: int, state: str, reason: str) -> str | None:
    """Record in the store's run that this Flower run served how it ended ('failed' or
    'stopped'), unless it completed or already says so; a ServerApp stopped or killed cannot
    write that itself (or wrote 'failed' while being stopped). Returns the state written."""
    run = store.run_with_flwr_id(flwr_run_id)
    if run is None or run.get("status") in ("completed", state):
        return None
    # The store's run may since be served by a newer Flower run (a resume): leave it to that.
    if run.get("flwr_run_ids", [])[-1:] != [flwr_run_id]:
        return None
    store.end_run(run["run_id"], state, reason)
    return state


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, kill) interrupts the wait like Ctrl-C does."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_and_wait(req: RunRequest, say: Callable[[str], None] = print,
                 wait: Callable[..., str] = wait_run) -> tuple[int, str]:
    """Submit the run and wait for it; returns (Flower run id, final status). Every way the
    wait can end leaves the SuperLink and the store agreeing: a timeout or an interrupt stops
    the run and records it 'stopped'; a run Flower finished as failed/stopped is recorded so."""
    store = ModelStore(req.store)
    if req.resume:
        check_resume(store, req.flwr_home)
    run_id = submit_run(req.app, req.flwr_home, req.run_config)
    say(f"run {run_id} submitted; waiting")
    try:
        with _sigterm_as_interrupt():
            status = wait(req.flwr_home, run_id, req.timeout,
                          on_status=lambda s: say(f"run {run_id}: {s}"))
    except RunTimedOut as e:
        _stop(req, store, run_id, f"timeout after {req.timeout:.0f} s", say)
        raise RunFailed(f"{e}; stopped it") from None
    except KeyboardInterrupt:
        _stop(req, store, run_id, "interrupted by the operator", say)
        raise RunInterrupted(f"run {run_id} stopped (interrupted)") from None
    except RunLost as e:
        reconcile(store, run_id, "failed", f"lost by the SuperLink: {e}")
        raise
    if status != "finished:completed":
        reconcile(store, run_id, _END_STATE.get(status, "failed"), f"Flower reports {status}")
    return run_id, status


def _stop(req: RunRequest, store: ModelStore, run_id: int, reason: str,
          say: Callable[[str], None], settle: float = 30.0) -> None:
    """`flwr stop`, then wait (up to settle seconds) until Flower reports the run finished, so
    that the ServerApp has written its last record before the store is told 'stopped'."""
    try:
        stopped = stop_run(req.flwr_home, run_id)
    except RunFailed as e:
        say(f"run {run_id}: flwr stop failed ({e})")
        stopped = False
    say(f"run {run_id}: {'stopped' if stopped else 'could not be stopped'} ({reason})")
    end = time.monotonic() + settle
    while stopped and time.monotonic() < end:
        try:
            if run_status(req.flwr_home, run_id).startswith("finished"):
                break
        except RunFailed:
            break
        time.sleep(1.0)
    reconcile(store, run_id, "stopped", reason)

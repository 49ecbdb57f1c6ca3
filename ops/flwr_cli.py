"""The `flwr` CLI as fedsight drives it: one connection (CONNECTION) in $FLWR_HOME/config.toml,
JSON replies, and the run lifecycle (submit, status, wait, stop, log).

Flower 1.42's `flwr ... --format json` exits 0 even when it fails; the reply then is
{"success": false, "error-message": "... [code: 16] Run ID not found."} or "... Connection to
the SuperLink is unavailable ...". wait_run turns both into errors instead of waiting.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.processes import BINDIR, process_env, source_root
from vocab.errors import ConfigError, FedsightError

CONNECTION = "fedsight"
ACTIVE = ("pending", "starting", "running")  # Flower run statuses before "finished:*"
_NOT_FOUND = "Run ID not found"
_UNAVAILABLE = "Connection to the SuperLink is unavailable"


class RunFailed(FedsightError):
    """The federated run could not be submitted or did not finish successfully."""


class RunLost(RunFailed):
    """The SuperLink does not know the run (restarted without its state) or is unreachable."""


class RunTimedOut(RunFailed):
    """The run did not finish within the caller's timeout."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class RegistrationFailed(FedsightError):
    """The SuperLink did not register a hospital's SuperNode public key."""


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> None:
    """$FLWR_HOME/config.toml with one connection named CONNECTION (the default)."""
    from ops.keys import TlsFiles

    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    if root_cert is None:
        lines.append("insecure = true")
    else:
        TlsFiles(root_cert).check(server=False)
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_json(flwr_home: Path, args: list[str], timeout: float,
              error: type[FedsightError], name: str) -> dict[str, Any]:
    """Run `flwr ARGS --format json` against the connection in flwr_home and return its JSON
    reply; `error` ("flwr <name> failed", exit code, output tail) when there is none."""
    cmd = [str(BINDIR / "flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(cmd, env=process_env(flwr_home), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise error(f"flwr {name} gave no answer within {timeout:.0f} s") from None
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise error(f"flwr {name} failed (exit {proc.returncode}): "
                    f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None


def _why(out: dict[str, Any]) -> str:
    """Flower's error message on one line (it starts with a 'Using SuperLink' banner)."""
    return " ".join(str(out.get("error-message", out)).split())


def register_node(flwr_home: Path, public_key: Path) -> int:
    """Register a hospital's SuperNode public key with the SuperLink (`flwr supernode
    register`); returns the node id the SuperLink gave it."""
    from ops.keys import check_node_public_key

    check_node_public_key(public_key)
    out = flwr_json(flwr_home, ["supernode", "register", str(Path(public_key).resolve()),
                                CONNECTION], 120, RegistrationFailed, "supernode register")
    if not out.get("success") or not out.get("node-id"):
        raise RegistrationFailed(f"the SuperLink did not register {str(public_key)!r}: "
                                 f"{_why(out)}")
    return int(out["node-id"])


def supernodes(flwr_home: Path) -> list[dict[str, Any]]:
    """`flwr supernode list`: one dict per node ('node-id', 'status', ...); [] if unreachable."""
    try:
        out = flwr_json(flwr_home, ["supernode", "list", CONNECTION], 60, RunFailed,
                        "supernode list")
    except RunFailed:
        return []
    return list(out.get("nodes", []))


def online_count(flwr_home: Path) -> int:
    return sum("online" in str(x.get("status", "")).lower() for x in supernodes(flwr_home))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is JSON-compatible


def submit_run(app_dir: Path, flwr_home: Path, run_config: dict[str, Any],
               federation_config: dict[str, Any] | None = None) -> int:
    """`flwr run APP fedsight --run-config FILE --format json` -> Flower run id.
    federation_config (simulation): e.g. {"num-supernodes": 3, "client-resources-num-cpus": 1}."""
    cfg_file = flwr_home / "run-config.toml"
    cfg_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    args = ["run", str(app_dir), CONNECTION, "--run-config", str(cfg_file)]
    if federation_config:
        args += ["--federation-config",
                 " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    out = flwr_json(flwr_home, args, 300, RunFailed, "run")
    if not out.get("success") or not out.get("run-id"):
        raise RunFailed(f"flwr run refused the run: {_why(out)}")
    return int(out["run-id"])


def run_status(flwr_home: Path, run_id: int) -> str:
    """The run's Flower status ('pending', 'running', 'finished:completed', ...). Raises RunLost
    when the SuperLink does not know the run, RunFailed when it cannot be asked."""
    out = flwr_json(flwr_home, ["ls", CONNECTION, "--run-id", str(run_id)], 120, RunFailed,
                    "ls")
    if not out.get("success", True):
        why = _why(out)
        if _NOT_FOUND in why:
            raise RunLost(f"run {run_id} is unknown to the SuperLink (it restarted without its "
                          "state database, or the run id is wrong)")
        raise RunFailed(f"flwr ls --run-id {run_id} failed: {why}")
    runs = out.get("runs", [])
    if not runs:
        raise RunLost(f"run {run_id} is unknown to the SuperLink")
    return str(runs[0].get("status", ""))


def list_runs(flwr_home: Path) -> list[dict[str, Any]]:
    """`flwr ls`: every run the SuperLink knows ('run-id', 'status', ...)."""
    out = flwr_json(flwr_home, ["ls", CONNECTION], 120, RunFailed, "ls")
    if not out.get("success", True):
        raise RunFailed(f"flwr ls failed: {_why(out)}")
    return list(out.get("runs", []))


def stop_run(flwr_home: Path, run_id: int) -> bool:
    """`flwr stop RUN`; True if the SuperLink stopped it (False: unknown or already finished)."""
    out = flwr_json(flwr_home, ["stop", str(run_id), CONNECTION], 120, RunFailed, "stop")
    return bool(out.get("success"))


def run_log(flwr_home: Path, run_id: int) -> str:
    """The ServerApp's log of a run (`flwr log RUN --show`): Flower starts the ServerApp in its
    own process, so this is the only place its output (our per-round, per-hospital lines) lands."""
    cmd = [str(BINDIR / "flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        proc = subprocess.run(cmd, env=process_env(flwr_home), capture_output=True, text=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout


def wait_run(flwr_home: Path, run_id: int, timeout: float, poll: float = 1.0,
             max_poll: float = 10.0, unreachable_grace: float = 30.0,
             on_status: Callable[[str], None] | None = None,
             clock: Callable[[], float] = time.monotonic) -> str:
    """Poll until the run is finished; returns its status ('finished:completed' on success).

    Never waits silently: on_status gets every new status; a run the SuperLink does not know
    raises RunLost at once, a SuperLink unreachable for longer than unreachable_grace raises
    RunLost, the timeout raises RunTimedOut (the caller stops the run). Each poll starts a
    `flwr ls` process (~1 s of CPU), so the interval grows from `poll` to `max_poll`: on two
    cores, polling every 2 s took a visible share from the training."""
    end = clock() + timeout
    status, unreachable_since = "", None
    while True:
        try:
            new = run_status(flwr_home, run_id)
            unreachable_since = None
        except RunLost:
            raise
        except RunFailed as e:
            unreachable_since = unreachable_since or clock()
            if clock() - unreachable_since > unreachable_grace:
                raise RunLost(f"run {run_id}: SuperLink unreachable for more than "
                              f"{unreachable_grace:.0f} s ({e})") from None
            new = status
        if new != status:
            status = new
            if on_status is not None:
                on_status(status)
        if status.startswith("finished"):
            return status
        if clock() >= end:
            raise RunTimedOut(f"run {run_id} still {status or 'unknown'} after "
                              f"{timeout:.0f} s", status)
        wait = poll if unreachable_since is None else min(poll, 2.0)
        time.sleep(max(0.0, min(wait, end - clock())))
        poll = min(poll * 1.5, max_poll)


def app_dir() -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]): the source checkout."""
    root = source_root()
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"no pyproject.toml next to the installed packages ({root}); pass "
                          "--app with the fedsight source folder")
    return root

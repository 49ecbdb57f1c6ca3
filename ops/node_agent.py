"""`fedsight node start`: check the site, the coordinator, certificate and node key, then
supervise this hospital's `flower-supernode` (ops.supervise): restarted with backoff after any
exit (a SuperLink restart ends every SuperNode), with the same node config, site id and node key,
next to one long-lived task worker (hospital_node.worker). Signals go to the SuperNode; the agent
then stops the worker and exits. Log lines name the site and exit codes, never patient data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.keys import AUTH_NEEDS_TLS, check_auth_key, check_certificate
from ops.processes import BINDIR, process_env, reap_clientapps
from ops.supervise import Backoff, Supervisor
from vocab.errors import ConfigError, DataError, FedsightError

__all__ = ["AUTH_NEEDS_TLS", "NodeStart", "check_auth_key", "prepare", "start",
           "supernode_command"]


class CoordinatorUnreachable(FedsightError):
    """No TCP connection to the coordinator's SuperLink."""


@dataclass(frozen=True)
class NodeStart:
    data: Path
    coordinator: str  # HOST:PORT of the SuperLink
    tls_ca: Path | None = None  # None = insecure (loopback tests only)
    site_id: str = ""
    cache_dir: Path | None = None
    clientapp_port: int = 9094  # SuperNode's local ClientAppIo API port
    max_retries: int = 0  # 0 = retry forever (a coordinator restart must not kill the node)
    # Run tasks in a long-lived worker beside the SuperNode (hospital_node.worker) instead of
    # paying the imports in the fresh process Flower starts for every message.
    worker: bool = True
    # OpenSSH ECDSA private key whose public half the coordinator registered (its --node-auth).
    auth_key: Path | None = None
    backoff: Backoff = field(default_factory=Backoff)  # SuperNode restarts
    # This hospital's privacy settings (hospital_node.privacy): lifetime epsilon budget (0 = none;
    # > 0 also means every round must use DP), delta, ledger file and its HMAC key file.
    privacy_budget: float = 0.0
    privacy_delta: float | None = None
    privacy_ledger: Path | None = None
    privacy_ledger_key: Path | None = None
    # Published model versions this hospital holds (federated adaptation finds its base here).
    models_dir: Path | None = None

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        return host.strip("[]"), int(port)


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        raise CoordinatorUnreachable(
            f"coordinator {host}:{port} is unreachable ({e.strerror or type(e).__name__}); "
            "is `fedsight coordinator start` running there and the port open?"
        ) from None


def check_data(data: Path, cache_dir: Path | None) -> tuple[str, str]:
    """Validate the site; (site id, summary line). Raises DataError when it cannot train."""
    from hospital_node.check import EXIT_OK, check_site
    from hospital_node.dataset import read_site_config

    code, text = check_site(data, as_json=False, cache_dir=cache_dir)
    if code != EXIT_OK:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise DataError(f"site data at {str(data)!r} is not usable for training: {last} "
                        f"(run `fedsight node check {data}` for the full report)")
    return read_site_config(data).site_id, text.strip().splitlines()[0]


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def supernode_command(spec: NodeStart, site_id: str, worker_socket: Path | None = None
                      ) -> list[str]:
    cfg = [f"data-dir={_toml_str(str(spec.data.resolve()))}", f"site-id={_toml_str(site_id)}"]
    if spec.cache_dir is not None:
        cfg.append(f"cache-dir={_toml_str(str(spec.cache_dir.resolve()))}")
    if worker_socket is not None:
        cfg.append(f"worker-socket={_toml_str(str(worker_socket))}")
    if spec.models_dir is not None:
        cfg.append(f"models-dir={_toml_str(str(spec.models_dir.resolve()))}")
    if spec.privacy_budget:
        cfg.append(f"privacy-budget={float(spec.privacy_budget)!r}")
    if spec.privacy_delta is not None:
        cfg.append(f"privacy-delta={float(spec.privacy_delta)!r}")
    for key, path in (("privacy-ledger", spec.privacy_ledger),
                      ("privacy-ledger-key", spec.privacy_ledger_key)):
        if path is not None:
            cfg.append(f"{key}={_toml_str(str(path.resolve()))}")
    cmd = [str(BINDIR / "flower-supernode"), "--superlink",
           spec.coordinator, "--node-config", " ".join(cfg), "--port", str(spec.clientapp_port)]
    if spec.max_retries:
        cmd += ["--max-retries", str(spec.max_retries)]
    if spec.auth_key is not None:
        if spec.tls_ca is None:  # flower-supernode would exit with code 303
            raise ConfigError(AUTH_NEEDS_TLS)
        cmd += ["--auth-supernode-private-key", str(spec.auth_key.resolve())]
    if spec.tls_ca is None:
        return cmd + ["--insecure"]
    return cmd + ["--root-certificates", str(spec.tls_ca.resolve())]


def prepare(spec: NodeStart) -> tuple[str, str]:
    """Every check, cheapest first; returns (site id, summary line)."""
    host, port = spec.host_port()
    if spec.tls_ca is not None:
        check_certificate(spec.tls_ca)
    if spec.auth_key is not None:
        if spec.tls_ca is None:
            raise ConfigError(AUTH_NEEDS_TLS)
        check_auth_key(spec.auth_key)
    if not spec.data.is_dir():
        raise DataError(f"site data root {str(spec.data)!r} does not exist or is not a folder")
    ledger = node_ledger(spec)
    ledger.entries()  # a broken ledger is found now, not at the first round
    check_reachable(host, port)
    site_id, summary = check_data(spec.data, spec.cache_dir)
    return spec.site_id or site_id, summary


def node_ledger(spec: NodeStart) -> Any:
    """The hospital's privacy ledger as its SuperNode will see it (settings checked here)."""
    from hospital_node.privacy import Ledger, PrivacySettings

    node_config: dict[str, Any] = {"privacy-budget": spec.privacy_budget}
    if spec.privacy_delta is not None:
        node_config["privacy-delta"] = spec.privacy_delta
    for key, path in (("privacy-ledger", spec.privacy_ledger),
                      ("privacy-ledger-key", spec.privacy_ledger_key)):
        if path is not None:
            node_config[key] = str(path.resolve())
    return Ledger(PrivacySettings.from_node_config(node_config, spec.data.resolve(),
                                                   spec.cache_dir.resolve()
                                                   if spec.cache_dir is not None else None))


@dataclass(frozen=True)
class TaskWorker:
    """The node's task worker process (hospital_node.worker) and its socket."""

    socket: Path
    proc: subprocess.Popen

    def stop(self, grace: float = 5.0) -> None:
        """Stop the worker and remove its socket folder (itself too if the worker died before
        it could)."""
        from hospital_node.worker import remove_socket_dir

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        remove_socket_dir(self.socket)


def start_worker(env: dict[str, str]) -> TaskWorker:
    """Start hospital_node.worker as a child of this agent: the worker watches this pid, exits
    when it is gone (even after a SIGKILL of the agent) and removes its socket folder then."""
    from hospital_node.worker import prepare_socket, remove_socket_dir

    socket = prepare_socket()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "hospital_node.worker", "--socket",
                                 str(socket), "--parent", str(os.getpid())],
                                env=env, stdin=subprocess.DEVNULL)
    except BaseException:
        remove_socket_dir(socket)
        raise
    return TaskWorker(socket, proc)


def _log(line: str) -> None:
    print(f"[node] {line}", flush=True)


def start(spec: NodeStart) -> int:
    """Check everything, then supervise flower-supernode until SIGTERM/SIGINT/SIGHUP; returns
    the exit code for the CLI (0 after a requested stop). The task worker outlives SuperNode
    restarts (it watches this agent's pid) and is started again if it died; it is stopped and
    its socket folder removed however the agent ends. A SuperNode that cannot be started at all
    (missing executable) raises after the worker is stopped."""
    site_id, summary = prepare(spec)
    _log(summary)
    env = process_env()
    workers: list[TaskWorker] = []

    def start_supernode() -> subprocess.Popen:
        if spec.worker and (not workers or workers[-1].proc.poll() is not None):
            if workers:
                _log(f"task worker exited with code {workers[-1].proc.returncode}; "
                     "starting a new one")
                workers[-1].stop()
            workers.append(start_worker(env))
        worker = workers[-1] if workers else None
        cmd = supernode_command(spec, site_id, worker.socket if worker else None)
        _log(f"starting SuperNode {site_id} -> {spec.coordinator}"
             f"{' (task worker ' + str(worker.socket) + ')' if worker else ''}"
             f"{' with node key ' + str(spec.auth_key) if spec.auth_key else ''}")
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def reap() -> None:
        # A SuperNode killed with -9 leaves its flwr-clientapp children retrying its port.
        reaped = reap_clientapps(spec.clientapp_port, grace=2.0)
        if reaped:
            _log(f"stopped {len(reaped)} orphaned flwr-clientapp process(es) of port "
                 f"{spec.clientapp_port}")

    sup = Supervisor(start_supernode, spec.backoff, _log, before_start=reap,
                     name=f"SuperNode {site_id}")
    try:
        with sup.signals():
            code = sup.run()
    finally:
        for w in workers:
            w.stop()
        reap()
    _log(f"SuperNode {site_id} stopped" + (f" (exit code {code})" if code else ""))
    return code

"""`fedsight node start`: check the site, check the coordinator and certificate, then run a real
`flower-supernode` with this hospital's node config. Nothing is kept between calls."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from vocab.errors import ConfigError, DataError, FedsightError
from vocab.offline import OFFLINE_ENV


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

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        return host.strip("[]"), int(port)


def check_certificate(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"TLS CA certificate {str(path)!r} does not exist or is not a file")
    try:
        head = path.read_bytes()[:4096]
    except OSError as e:
        raise ConfigError(f"TLS CA certificate {str(path)!r} is unreadable: {e}") from e
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"TLS CA certificate {str(path)!r} is not a PEM certificate")


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
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink",
           spec.coordinator, "--node-config", " ".join(cfg), "--port", str(spec.clientapp_port)]
    if spec.max_retries:
        cmd += ["--max-retries", str(spec.max_retries)]
    if spec.tls_ca is None:
        return cmd + ["--insecure"]
    return cmd + ["--root-certificates", str(spec.tls_ca.resolve())]


def node_env() -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def prepare(spec: NodeStart) -> tuple[str, str]:
    """Every check, cheapest first; returns (site id, summary line)."""
    host, port = spec.host_port()
    if spec.tls_ca is not None:
        check_certificate(spec.tls_ca)
    if not spec.data.is_dir():
        raise DataError(f"site data root {str(spec.data)!r} does not exist or is not a folder")
    check_reachable(host, port)
    site_id, summary = check_data(spec.data, spec.cache_dir)
    return spec.site_id or site_id, summary


def start_worker(env: dict[str, str]) -> Path:
    """Start hospital_node.worker as a child of this process (which then becomes the SuperNode:
    the worker exits with it); returns its socket path."""
    import subprocess

    from hospital_node.worker import prepare_socket

    socket = prepare_socket()
    subprocess.Popen([sys.executable, "-m", "hospital_node.worker", "--socket", str(socket)],
                     env=env, stdin=subprocess.DEVNULL)
    return socket


def start(spec: NodeStart) -> None:
    """Replace this process by flower-supernode (signals and exit code pass straight through)."""
    site_id, summary = prepare(spec)
    print(f"[node] {summary}", flush=True)
    env = node_env()
    socket = start_worker(env) if spec.worker else None
    cmd = supernode_command(spec, site_id, socket)
    print(f"[node] starting SuperNode -> {spec.coordinator}"
          f"{' (task worker ' + str(socket) + ')' if socket else ''}", flush=True)
    os.execve(cmd[0], cmd, env)

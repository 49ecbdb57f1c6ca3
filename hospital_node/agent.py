"""`fedsight node start`: check the site, check the coordinator, certificate and node key, then
run a real `flower-supernode` with this hospital's node config. Nothing is kept between calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vocab.errors import ConfigError, DataError, FedsightError
from vocab.key_files import read_key_file
from vocab.offline import OFFLINE_ENV

AUTH_NEEDS_TLS = "--auth-key needs --tls: Flower authenticates SuperNodes only over TLS"


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


def check_auth_key(path: Path) -> None:
    """--auth-key as flower-supernode reads it: an unencrypted OpenSSH ECDSA private key.
    Errors name the option, the path and what is wrong, never the key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    what = f"--auth-key {str(path)!r}"
    data = read_key_file(path, what)
    try:
        key = load_ssh_private_key(data, password=None)
    except ValueError:
        raise ConfigError(f"{what} {_not_a_private_key(data)}") from None
    except (TypeError, UnsupportedAlgorithm):  # encrypted: Flower passes no passphrase
        raise ConfigError(f"{what} is passphrase-protected or uses an unsupported cipher; "
                          "flower-supernode needs an unencrypted key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey")
        raise ConfigError(f"{what} is a key of type {kind}; Flower needs ECDSA "
                          "(ssh-keygen -t ecdsa -b 384)")


def _not_a_private_key(data: bytes) -> str:
    """Why data is no OpenSSH private key, for the two usual mix-ups."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        load_ssh_public_key(data)
        is_public = True
    except (ValueError, UnsupportedAlgorithm):
        is_public = b"PUBLIC KEY-----" in data  # PEM
    if is_public:
        return ("is a public key; pass the private key (node-<hospital>, not the .pub "
                "registered at the coordinator)")
    if b"PRIVATE KEY-----" in data:
        return ("is a PEM private key; flower-supernode reads only the OpenSSH format "
                "(ssh-keygen -t ecdsa -b 384)")
    return "is not an OpenSSH private key"


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
    if spec.auth_key is not None:
        if spec.tls_ca is None:  # flower-supernode would exit with code 303
            raise ConfigError(AUTH_NEEDS_TLS)
        cmd += ["--auth-supernode-private-key", str(spec.auth_key.resolve())]
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
    if spec.auth_key is not None:
        if spec.tls_ca is None:
            raise ConfigError(AUTH_NEEDS_TLS)
        check_auth_key(spec.auth_key)
    if not spec.data.is_dir():
        raise DataError(f"site data root {str(spec.data)!r} does not exist or is not a folder")
    check_reachable(host, port)
    site_id, summary = check_data(spec.data, spec.cache_dir)
    return spec.site_id or site_id, summary


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
    """Start hospital_node.worker as a child of this process, which then becomes the SuperNode:
    the worker watches this pid, exits when it is gone and removes its socket folder then."""
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


def start(spec: NodeStart) -> None:
    """Replace this process by flower-supernode (signals and exit code pass straight through).
    However the SuperNode ends, the worker then removes its socket folder; if the SuperNode
    cannot even be started, the worker is stopped and its folder removed here."""
    site_id, summary = prepare(spec)
    print(f"[node] {summary}", flush=True)
    env = node_env()
    worker = start_worker(env) if spec.worker else None
    try:
        cmd = supernode_command(spec, site_id, worker.socket if worker else None)
        print(f"[node] starting SuperNode -> {spec.coordinator}"
              f"{' (task worker ' + str(worker.socket) + ')' if worker else ''}"
              f"{' with node key ' + str(spec.auth_key) if spec.auth_key else ''}", flush=True)
        os.execve(cmd[0], cmd, env)  # returns only by raising
    except BaseException:
        if worker is not None:
            worker.stop()
        raise

"""Deployment runtime, coordinator side: start the SuperLink, submit a run with `flwr run`, wait.

Every process started here gets the offline environment (vocab.offline) explicitly, plus the
folder of this interpreter on PATH (Flower starts its own helpers by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vocab.errors import ConfigError, FedsightError
from vocab.key_files import read_key_file
from vocab.offline import OFFLINE_ENV

CONNECTION = "fedsight"


class RunFailed(FedsightError):
    """The federated run could not be submitted or did not finish successfully."""


class RegistrationFailed(FedsightError):
    """The SuperLink did not register a hospital's SuperNode public key."""


def process_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path | None = None  # SuperLink only
    key: Path | None = None  # SuperLink only

    def check(self, server: bool) -> None:
        need = [("CA certificate", self.ca)]
        if server:
            need += [("certificate", self.cert), ("private key", self.key)]
        for what, p in need:
            if p is None:
                raise ConfigError(f"TLS {what} path is required")
            if not Path(p).is_file():
                raise ConfigError(f"TLS {what} {str(p)!r} does not exist or is not a file")
            if b"-----BEGIN " not in Path(p).read_bytes()[:4096]:
                raise ConfigError(f"TLS {what} {str(p)!r} is not a PEM file")


def superlink_command(host: str, port: int, database: Path | None, tls: TlsFiles | None,
                      node_auth: bool = False) -> list[str]:
    """database None: Flower's in-memory state (nothing survives a restart, but no SQLite file
    lock: on an overloaded machine the file database failed runs with 'database is locked').
    node_auth: only SuperNodes whose public key was registered (register_node) may join."""
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", host,
           "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if node_auth:
        if tls is None:  # flower-superlink refuses it too, but only after starting
            raise ConfigError("--node-auth needs --tls-dir: Flower authenticates SuperNodes "
                              "only over TLS")
        cmd.append("--enable-supernode-auth")
    if tls is None:
        return cmd + ["--insecure"]
    tls.check(server=True)
    return cmd + ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
                  "--ssl-keyfile", str(tls.key)]


def check_node_public_key(path: Path) -> None:
    """A hospital's SuperNode public key as `flwr supernode register` accepts it: OpenSSH
    format, ECDSA on a NIST curve (deploy/gen-certs.sh: node-<hospital>.pub). Errors name the
    path and what is wrong, never the file's contents."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    what = f"SuperNode public key {str(path)!r}"
    data = read_key_file(path, what)
    if b"PRIVATE KEY-----" in data:  # the private key stays at the hospital
        raise ConfigError(f"{what} is a private key; register the hospital's .pub file")
    try:
        key = load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{what} is not an OpenSSH public key (one line 'ecdsa-sha2-nistp384 "
                          "...', e.g. node-<hospital>.pub from deploy/gen-certs.sh)") from None
    nist = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts (and SSH has)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, nist):
        raise ConfigError(f"{what} is a key of type {_key_kind(key)}; Flower needs ECDSA on a "
                          "NIST curve (ssh-keygen -t ecdsa -b 384)")


def _key_kind(key: object) -> str:
    """'RSA', 'Ed25519', 'EC secp256k1', ...: the key's type, for messages."""
    curve = getattr(key, "curve", None)
    return f"EC {curve.name}" if curve is not None else \
        type(key).__name__.removesuffix("PublicKey")


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> None:
    """$FLWR_HOME/config.toml with one connection named CONNECTION (the default)."""
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
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    proc = subprocess.run(cmd, env=process_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, check=False)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise error(f"flwr {name} failed (exit {proc.returncode}): "
                    f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None


def register_node(flwr_home: Path, public_key: Path) -> int:
    """Register a hospital's SuperNode public key with the SuperLink of the connection in
    flwr_home (write_connection) through Flower's own CLI, `flwr supernode register`; returns
    the node id the SuperLink gave it."""
    check_node_public_key(public_key)
    out = flwr_json(flwr_home, ["supernode", "register", str(Path(public_key).resolve()),
                                CONNECTION], 120, RegistrationFailed, "supernode register")
    if not out.get("success") or not out.get("node-id"):
        why = " ".join(str(out.get("error-message", out)).split())  # one line for the CLI
        raise RegistrationFailed(f"the SuperLink did not register {str(public_key)!r}: {why}")
    return int(out["node-id"])


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
        raise RunFailed(f"flwr run refused the run: {out.get('error-message', out)}")
    return int(out["run-id"])


def run_status(flwr_home: Path, run_id: int) -> str:
    runs = flwr_json(flwr_home, ["ls", CONNECTION, "--run-id", str(run_id)], 120, RunFailed,
                     "ls").get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def run_log(flwr_home: Path, run_id: int) -> str:
    """The ServerApp's log of a run (`flwr log RUN --show`): Flower starts the ServerApp in its
    own process, so this is the only place its output (our per-round, per-hospital lines) lands."""
    cmd = [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), CONNECTION, "--show"]
    proc = subprocess.run(cmd, env=process_env(flwr_home), capture_output=True, text=True,
                          timeout=120, check=False)
    return proc.stdout


def wait_run(flwr_home: Path, run_id: int, timeout: float, poll: float = 1.0,
             max_poll: float = 10.0) -> str:
    """Poll until the run is finished; returns its status ('finished:completed' on success).
    Each poll starts a `flwr ls` process (~1 s of CPU), so the interval grows from `poll` to
    `max_poll`: on two cores, polling every 2 s took a visible share from the training."""
    end = time.monotonic() + timeout
    status = ""
    while time.monotonic() < end:
        status = run_status(flwr_home, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(min(poll, max(0.0, end - time.monotonic())))
        poll = min(poll * 1.5, max_poll)
    raise RunFailed(f"run {run_id} still {status or 'unknown'} after {timeout:.0f} s")


def app_dir() -> Path:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]): the source checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"no pyproject.toml next to the installed packages ({root}); pass "
                          "--app with the fedsight source folder")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RunFailed(f"SuperLink exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RunFailed(f"SuperLink not listening on 127.0.0.1:{port} after {timeout:.0f} s")


def pids_talking_to(port: int) -> list[int]:
    """Our processes whose command line names 127.0.0.1:<port> (the SuperLink we started on a
    private port): Flower starts flwr-serverapp/-simulation in their own session, outside the
    SuperLink's process group."""
    needle = f"127.0.0.1:{port}".encode()
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (d / "cmdline").read_bytes() and d.stat().st_uid == os.getuid():
                out.append(int(d.name))
        except OSError:
            continue  # exited meanwhile
    return [p for p in out if p != os.getpid()]


def stop_group(proc: subprocess.Popen, port: int | None = None, grace: float = 10.0) -> None:
    """SIGTERM the process group we started (SuperLink + SuperExec + app processes) and the app
    processes attached to our port, then SIGKILL what is left."""
    stray = pids_talking_to(port) if port else []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    for pid in pids_talking_to(port) if port else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class SimulationResult:
    run_id: int
    status: str
    seconds: float


@contextlib.contextmanager
def simulation_superlink(home: Path) -> Iterator[tuple[Path, int]]:
    """A simulation-runtime SuperLink of our own on a private 127.0.0.1 port (never Flower's
    shared local one), with $FLWR_HOME/config.toml pointing at it; yields (flwr_home, port) and
    stops the SuperLink and everything it started on exit."""
    home.mkdir(parents=True, exist_ok=True)
    flwr_home, port = home / "flwr", free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None)
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]  # in-memory state (see superlink_command)
    with (home / "superlink.log").open("a") as log:
        proc = subprocess.Popen(cmd, env=process_env(flwr_home), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_listening(port, proc)
            yield flwr_home, port
        finally:
            stop_group(proc, port)


def simulate(home: Path, run_config: dict[str, Any], num_nodes: int, cpus_per_node: int = 1,
             timeout: float = 3600.0, app: Path | None = None) -> SimulationResult:
    """Simulation runtime: `flwr run` with num-supernodes virtual hospitals on our own
    SuperLink (simulation_superlink), waited for, then stopped."""
    if isinstance(cpus_per_node, bool) or not isinstance(cpus_per_node, int) \
            or cpus_per_node < 1:
        raise ConfigError(f"cpus_per_node must be a whole number >= 1 (Flower's "
                          f"client-resources-num-cpus), got {cpus_per_node!r}")
    t0 = time.monotonic()
    with simulation_superlink(home) as (flwr_home, _port):
        run_id = submit_run(app or app_dir(), flwr_home, run_config,
                            {"num-supernodes": num_nodes,
                             "client-resources-num-cpus": cpus_per_node})
        status = wait_run(flwr_home, run_id, timeout)
    return SimulationResult(run_id, status, time.monotonic() - t0)


def fedsight_command(*args: str) -> list[str]:
    """The `fedsight` CLI of this interpreter (works from a source checkout too)."""
    return [sys.executable, "-m", "cli.main", *args]


@contextlib.contextmanager
def local_deployment(home: Path, sites: list[Path], cache_root: Path | None = None,
                     timeout: float = 120.0) -> Iterator[tuple[Path, int]]:
    """Deployment runtime on one machine: `fedsight coordinator start` (SuperLink) and one
    `fedsight node start` (site check + SuperNode) per site on 127.0.0.1, insecure (loopback
    only). Yields (flwr_home, port) once every node has joined; logs go to <home>/*.log; every
    process group is stopped on exit."""
    home.mkdir(parents=True, exist_ok=True)
    flwr_home, port = home / "flwr", free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None)
    env = process_env(flwr_home)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p)
    procs: list[subprocess.Popen] = []
    try:
        with (home / "superlink.log").open("a") as log:
            procs.append(subprocess.Popen(
                fedsight_command("coordinator", "start", "--host", "127.0.0.1", "--port",
                                 str(port), "--home", str(home), "--database", "memory"),
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_listening(port, procs[0])
        for site in sites:
            cmd = fedsight_command("node", "start", "--data", str(site), "--coordinator",
                                   f"127.0.0.1:{port}", "--port", str(free_port()))
            if cache_root is not None:
                cmd += ["--cache-dir", str(cache_root / site.name)]
            with (home / f"node-{site.name}.log").open("a") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        wait_nodes(flwr_home, len(sites), procs[1:], timeout)
        yield flwr_home, port
    finally:
        for p in procs[1:]:  # SuperNodes (+ their flwr-clientapp children) first
            stop_group(p)
        if procs:  # SuperLink, SuperExec and the ServerApp process attached to our port
            stop_group(procs[0], port)


def wait_nodes(flwr_home: Path, n: int, nodes: list[subprocess.Popen], timeout: float) -> None:
    """Wait until n SuperNodes are online (`flwr supernode list`)."""
    end = time.monotonic() + timeout
    online = 0
    while time.monotonic() < end:
        dead = [p.args for p in nodes if p.poll() is not None]
        if dead:
            raise RunFailed(f"{len(dead)} node(s) exited before joining (see node-*.log): "
                            f"{dead[0]}")
        proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "list",
                               CONNECTION, "--format", "json"], env=process_env(flwr_home),
                              capture_output=True, text=True, timeout=60, check=False)
        try:
            listed = json.loads(proc.stdout).get("nodes", [])
        except json.JSONDecodeError:
            listed = []
        online = sum("online" in str(x.get("status", "")).lower() for x in listed)
        if online >= n:
            return
        time.sleep(1.0)
    raise RunFailed(f"{online} of {n} nodes online after {timeout:.0f} s (see node-*.log)")

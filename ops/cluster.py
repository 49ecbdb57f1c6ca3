"""SuperLinks and clusters of our own on one machine: a simulation-runtime SuperLink (virtual
hospitals), and a local deployment (SuperLink + one `fedsight node start` per site) for tests and
benchmarks. Every process is stopped on exit, pass or fail."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.flwr_cli import (
    RunFailed,
    app_dir,
    online_count,
    submit_run,
    wait_run,
    write_connection,
)
from ops.processes import (
    fedsight_command,
    free_port,
    source_env,
    stop_group,
    wait_listening,
)
from ops.superlink import SuperLinkConfig, superlink_command
from vocab.errors import ConfigError


@dataclass(frozen=True)
class SimulationResult:
    run_id: int
    status: str
    seconds: float


@contextlib.contextmanager
def simulation_superlink(home: Path, database: Path | None = None
                         ) -> Iterator[tuple[Path, int]]:
    """A simulation-runtime SuperLink of our own on a private 127.0.0.1 port (never Flower's
    shared local one), with $FLWR_HOME/config.toml pointing at it; yields (flwr_home, port) and
    stops the SuperLink and everything it started on exit."""
    home.mkdir(parents=True, exist_ok=True)
    flwr_home, port = home / "flwr", free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None)
    cmd = superlink_command(SuperLinkConfig("127.0.0.1", port, database, simulation=True))
    with (home / "superlink.log").open("a") as log:
        proc = subprocess.Popen(cmd, env=source_env(flwr_home), stdout=log,
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


@dataclass
class Deployment:
    """A running local deployment: its FLWR_HOME, SuperLink port and processes."""

    home: Path
    flwr_home: Path
    port: int
    database: str  # 'memory' or a file path, as `coordinator start --database` takes it
    superlink: subprocess.Popen | None = None
    nodes: list[subprocess.Popen] | None = None
    node_ports: list[int] | None = None

    def __iter__(self) -> Iterator[Any]:
        """`with local_deployment(...) as (flwr_home, port)` keeps working."""
        return iter((self.flwr_home, self.port))

    def start_superlink(self) -> None:
        """(Re)start `fedsight coordinator start` on the same port and database."""
        with (self.home / "superlink.log").open("a") as log:
            self.superlink = subprocess.Popen(
                fedsight_command("coordinator", "start", "--host", "127.0.0.1", "--port",
                                 str(self.port), "--home", str(self.home), "--database",
                                 self.database),
                env=source_env(self.flwr_home), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_listening(self.port, self.superlink)

    def start_nodes(self, sites: list[Path], cache_root: Path | None = None) -> None:
        """One `fedsight node start` (agent + supervised SuperNode) per site."""
        self.nodes, self.node_ports = self.nodes or [], self.node_ports or []
        for site in sites:
            cport = free_port()
            cmd = fedsight_command("node", "start", "--data", str(site), "--coordinator",
                                   f"127.0.0.1:{self.port}", "--port", str(cport))
            if cache_root is not None:
                cmd += ["--cache-dir", str(cache_root / site.name)]
            with (self.home / f"node-{site.name}.log").open("a") as log:
                self.nodes.append(subprocess.Popen(
                    cmd, env=source_env(self.flwr_home), stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
            self.node_ports.append(cport)

    def stop(self) -> None:
        for p, cport in zip(self.nodes or [], self.node_ports or [], strict=False):
            stop_group(p, clientappio_port=cport)  # agents, SuperNodes, workers, ClientApps
        if self.superlink is not None:  # SuperLink, SuperExec, ServerApp on our port
            stop_group(self.superlink, self.port)


@contextlib.contextmanager
def local_deployment(home: Path, sites: list[Path], cache_root: Path | None = None,
                     timeout: float = 120.0, database: str = "memory"
                     ) -> Iterator[Deployment]:
    """Deployment runtime on one machine: `fedsight coordinator start` (SuperLink) and one
    `fedsight node start` (site check + supervised SuperNode) per site on 127.0.0.1, insecure
    (loopback only). Yields the Deployment once every node has joined (unpacks as
    (flwr_home, port) too); logs go to <home>/*.log; every process group is stopped on exit."""
    home.mkdir(parents=True, exist_ok=True)
    flwr_home, port = home / "flwr", free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None)
    dep = Deployment(home, flwr_home, port, database)
    try:
        dep.start_superlink()
        dep.start_nodes(sites, cache_root)
        wait_nodes(flwr_home, len(sites), dep.nodes, timeout)
        yield dep
    finally:
        dep.stop()


def wait_nodes(flwr_home: Path, n: int, nodes: list[subprocess.Popen], timeout: float) -> None:
    """Wait until n SuperNodes are online (`flwr supernode list`)."""
    end = time.monotonic() + timeout
    online = 0
    while time.monotonic() < end:
        dead = [p.args for p in nodes if p.poll() is not None]
        if dead:
            raise RunFailed(f"{len(dead)} node(s) exited before joining (see node-*.log): "
                            f"{dead[0]}")
        online = online_count(flwr_home)
        if online >= n:
            return
        time.sleep(1.0)
    raise RunFailed(f"{online} of {n} nodes online after {timeout:.0f} s (see node-*.log)")

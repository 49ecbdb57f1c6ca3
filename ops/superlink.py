"""How fedsight starts a SuperLink: its command line and where its state lives.

Deployments keep Flower's state in a SQLite file (HOME/superlink.db) so registered nodes and runs
survive a restart; ops.superlink_main starts Flower's SuperLink with that file made reliable under
load (docs/operations.md). 'memory' keeps the state in memory (loopback tests, benchmarks).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ops.keys import TlsFiles
from vocab.errors import ConfigError

MEMORY = "memory"
DEFAULT_DB = "superlink.db"
DEFAULT_BUSY_TIMEOUT_S = 60.0  # Flower's own: 5 s (see ops.superlink_main)


@dataclass(frozen=True)
class SuperLinkConfig:
    host: str
    port: int
    database: Path | None  # None: Flower's in-memory state (nothing survives a restart)
    tls: TlsFiles | None = None  # None: insecure (loopback tests only)
    node_auth: bool = False  # admit only SuperNodes whose public key was registered
    simulation: bool = False  # Flower's simulation runtime (virtual SuperNodes)
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    keep_stale_runs: bool = False  # True: Flower's behaviour (a pending run starts by itself)


def database_path(home: Path, choice: str | None) -> Path | None:
    """--database as the CLI takes it: None -> HOME/superlink.db, 'memory' -> in memory."""
    if choice == MEMORY:
        return None
    return Path(choice) if choice else home / DEFAULT_DB


def superlink_command(cfg: SuperLinkConfig) -> list[str]:
    """`python -m ops.superlink_main ...`: Flower's flower-superlink entry point, started by our
    launcher so its SQLite settings and stale-run cleanup apply."""
    cmd = [sys.executable, "-m", "ops.superlink_main",
           "--busy-timeout", f"{cfg.busy_timeout_s:g}"]
    if cfg.keep_stale_runs:
        cmd.append("--keep-stale-runs")
    cmd += ["--", "--host", cfg.host, "--port", str(cfg.port),
            "--disable-runtime-dependency-installation"]
    if cfg.simulation:
        cmd += ["--simulation", "--isolation", "subprocess"]
    if cfg.database is not None:
        cmd += ["--database", str(Path(cfg.database).resolve())]
    if cfg.node_auth:
        if cfg.tls is None:  # flower-superlink refuses it too, but only after starting
            raise ConfigError("--node-auth needs --tls-dir: Flower authenticates SuperNodes "
                              "only over TLS")
        cmd.append("--enable-supernode-auth")
    if cfg.tls is None:
        return cmd + ["--insecure"]
    cfg.tls.check(server=True)
    return cmd + ["--ssl-ca-certfile", str(cfg.tls.ca), "--ssl-certfile", str(cfg.tls.cert),
                  "--ssl-keyfile", str(cfg.tls.key)]

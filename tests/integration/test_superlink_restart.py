"""A SuperLink restart does not take the hospitals offline (issue 11): a local deployment with
one supervised SuperNode per site; the SuperLink is killed with -9 and started again on the same
port, with its state in a SQLite file (the deployment default: the SuperNodes reconnect as they
are) or in memory (every SuperNode exits, its node unknown: the agents restart them with
backoff). The node agents must still be running, their SuperNodes online again (`flwr supernode
list`), and a new run must complete with both hospitals in it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.tiny import TINY_MODEL, small_federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_federation(tmp_path_factory.mktemp("fed"), n_sites=2, seed=8)


# The file database (the deployment default, where SuperNodes reconnect as they are) is covered
# across network namespaces by test_chaos_netns.py, fault (b); one restart test is enough time.
@pytest.mark.parametrize("database", ["memory"])
def test_supernodes_reconnect_after_a_superlink_kill_9(federation: Path, tmp_path: Path,
                                                       database: str) -> None:
    from coordinator.store import ModelStore
    from ops.cluster import local_deployment
    from ops.flwr_cli import supernodes
    from ops.processes import fedsight_command, source_env

    home = tmp_path / "coord"
    sites = sorted(p for p in federation.iterdir() if p.is_dir() and p.name != "_truth")
    with local_deployment(home, sites, cache_root=tmp_path / "cache",
                          database=str(home / "superlink.db") if database == "file"
                          else "memory") as dep:
        before = {n["node-id"] for n in supernodes(dep.flwr_home)}
        assert dep.superlink is not None
        os.killpg(dep.superlink.pid, signal.SIGKILL)
        dep.superlink.wait()
        t0 = time.monotonic()
        dep.start_superlink()
        online: list = []
        end = time.monotonic() + 240
        while len(online) < len(sites) and time.monotonic() < end:
            assert all(p.poll() is None for p in dep.nodes or []), "a node agent exited"
            time.sleep(2)
            # only nodes heard from since the restart count (the file keeps the old list)
            online = [n for n in supernodes(dep.flwr_home)
                      if "online" in str(n.get("status", "")).lower()]
        t_back = time.monotonic() - t0
        logs = "".join((home / f"node-{s.name}.log").read_text() for s in sites)
        assert len(online) == len(sites), logs[-3000:]
        run = subprocess.run(
            fedsight_command("coordinator", "run", "--coordinator", f"127.0.0.1:{dep.port}",
                             "--home", str(home), "--rounds", "1", "--timeout", "600",
                             "--run-config", "local-epochs=1", "--run-config", "min-hospitals=2",
                             "--run-config", f"model-json='{json.dumps(TINY_MODEL)}'"),
            cwd=REPO, env=source_env(), capture_output=True, text=True, timeout=700,
            check=False)
        assert run.returncode == 0, run.stdout + run.stderr + logs[-3000:]
        assert all(p.poll() is None for p in dep.nodes or [])
    if database == "memory":  # the SuperNodes exited and were restarted by their agents
        assert logs.count("restart 1 in") >= len(sites), logs[-3000:]
    versions = ModelStore(home / "store").list_versions()
    assert set(versions[-1].hospital_metrics()) == {s.name for s in sites}
    print(f"\nnodes before {sorted(before)}, online again after {t_back:.0f} s: "
          f"{sorted(n['node-id'] for n in online)}; restarts logged: {logs.count('restart ')}")

"""Deployment runtime for real: one flower-superlink and three flower-supernode processes on
127.0.0.1 (started through `fedsight coordinator start` / `fedsight node start` by
ops.cluster.local_deployment), two rounds on three small synthetic hospitals via
`fedsight coordinator run`; the store must hold the new versions with per-hospital metrics.
Every process group is stopped on the way out, pass or fail."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.tiny import TINY_MODEL, small_federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_federation(tmp_path_factory.mktemp("fed"), n_sites=3, seed=3)


def test_two_rounds_on_superlink_and_three_supernodes(federation: Path, tmp_path: Path) -> None:
    from coordinator.store import ModelStore
    from ops.cluster import local_deployment
    from ops.processes import fedsight_command, process_env

    home = tmp_path / "coord"
    sites = sorted(p for p in federation.iterdir() if p.is_dir() and p.name != "_truth")
    t0 = time.monotonic()
    with local_deployment(home, sites, cache_root=tmp_path / "cache") as (_, port):
        t_up = time.monotonic() - t0
        run = subprocess.run(
            fedsight_command("coordinator", "run", "--coordinator", f"127.0.0.1:{port}",
                             "--home", str(home), "--rounds", "2", "--timeout", "600",
                             "--run-config", "local-epochs=1", "--run-config", "min-hospitals=3",
                             "--run-config", f"model-json='{json.dumps(TINY_MODEL)}'",
                             "--run-config", "run-name='itest'"),
            cwd=REPO, env={**process_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
            text=True, timeout=700, check=False)
        elapsed = time.monotonic() - t0 - t_up
    assert run.returncode == 0, run.stdout + run.stderr + _tail(home / "superlink.log")
    print(run.stdout, f"\nstart-up {t_up:.0f} s, 2 deployment rounds in {elapsed:.0f} s")

    store = ModelStore(home / "store")
    versions = store.list_versions()
    assert [v.meta["round"] for v in versions] == [1, 2]
    last = versions[-1]
    assert last.meta["parent"] == versions[0].id
    assert set(last.hospital_metrics()) == {"site_a", "site_b", "site_c"}
    for site, metrics in last.hospital_metrics().items():
        assert metrics["n"] >= 1 and metrics["loss"] is not None, site
        assert last.meta["bytes"][site]["up"] > 0.9 * last.meta["model_bytes"]
    assert all(s["accepted"] for s in last.meta["screening"].values())
    store.verify(last)
    # Coordinator logs (SuperLink and the ServerApp's run log): hospitals by site id, never a
    # case id or a file name.
    logs = list((home / "logs").glob("run-*.log"))
    assert len(logs) == 1
    server_log = logs[0].read_text() + (home / "superlink.log").read_text()
    assert "hospital site_a: {" in server_log and "round 2: stored model version" in server_log
    local = [line.split(",")[0] for s in sites
             for line in (s / "labels.csv").read_text().splitlines()[1:]]
    local += [p.name for s in sites for p in s.rglob("*") if p.is_file()]
    assert not [x for x in local if x in server_log]
    # Nothing left running: no process of ours still names the SuperLink's port.
    from ops.processes import pids_talking_to

    assert pids_talking_to(port) == []


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.is_file() else ""

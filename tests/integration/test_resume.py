"""`fedsight coordinator run --resume` for real: a 3-round run on a (simulation-runtime)
SuperLink is killed, with everything the SuperLink started, once round 1 is stored; a new
SuperLink and `coordinator run --resume` finish rounds 2 and 3 of the same run, starting from the
round-1 version (parent chain 1 <- 2 <- 3). Two tiny hospitals; processes always cleaned up."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.store import ModelStore
from ops.cluster import simulation_superlink
from ops.processes import process_env
from tests.integration.tiny import TINY_MODEL_SMALL_GRID as TINY_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=2, seed=4, sizes=(8, 8)), out)
    return out


def coordinator_run(port: int, home: Path, fed: Path, *extra: str) -> list[str]:
    # The simulation runtime's default federation has 2 virtual nodes: one per site here.
    return [sys.executable, "-m", "cli.main", "coordinator", "run", "--coordinator",
            f"127.0.0.1:{port}", "--home", str(home), "--timeout", "600",
            "--run-config", f"federation-dir='{fed}'",
            "--run-config", f"cache-dir='{home.parent / 'cache'}'", *extra]


def serverapp_log(out: str) -> str:
    """The tail of the ServerApp log a failed `coordinator run` names (why the run failed)."""
    m = re.search(r"ServerApp log: (\S+)\)", out)
    if not m or not Path(m.group(1)).is_file():
        return ""
    return "\n--- ServerApp log (tail) ---\n" + Path(m.group(1)).read_text()[-6000:]


def test_killed_run_resumes_from_the_last_stored_round(federation: Path, tmp_path: Path) -> None:
    home = tmp_path / "coord"
    store = ModelStore(home / "store")
    env = {**process_env(), "PYTHONPATH": str(REPO)}
    with simulation_superlink(tmp_path / "link1") as (_, port):
        first = subprocess.Popen(
            coordinator_run(port, home, federation, "--rounds", "3",
                            "--run-config", "local-epochs=1", "--run-config", "run-name='rs'",
                            "--run-config", f"model-json='{json.dumps(TINY_MODEL)}'"),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            end = time.monotonic() + 400
            while not store.list_versions() and time.monotonic() < end:
                assert first.poll() is None, first.communicate()[0]
                time.sleep(0.2)
            assert store.list_versions(), "round 1 was never stored"
        finally:
            first.kill()
            first.wait()
    # simulation_superlink has killed the SuperLink and the ServerApp mid-run.
    runs = store.list_runs()
    assert len(runs) == 1 and runs[0]["status"] == "running"
    done = runs[0]["rounds_completed"]
    assert 1 <= done < 3, f"the run got to round {done} before it was killed"
    before = [v.id for v in store.list_versions()]

    with simulation_superlink(tmp_path / "link2") as (_, port):
        resumed = subprocess.run(coordinator_run(port, home, federation, "--resume"),
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=700,
                                 check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + serverapp_log(resumed.stdout)

    versions = store.list_versions()
    assert [v.meta["round"] for v in versions] == [1, 2, 3]
    assert [v.id for v in versions[:done]] == before  # nothing redone
    for parent, child in zip(versions, versions[1:], strict=False):
        assert child.meta["parent"] == parent.id
        assert child.meta["run_id"] == runs[0]["run_id"]
    run = store.list_runs()
    assert len(run) == 1 and run[0]["status"] == "completed"
    assert run[0]["rounds_completed"] == 3 and len(run[0]["flwr_run_ids"]) == 2
    assert set(versions[-1].hospital_metrics()) == {"site_a", "site_b"}
    assert f"round {done + 1}: version {versions[done].id}" in resumed.stdout

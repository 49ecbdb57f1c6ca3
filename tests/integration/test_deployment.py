"""Deployment runtime for real: one flower-superlink and three flower-supernode processes on
127.0.0.1 (started through `fedsight coordinator start` / `fedsight node start`), two rounds on
three small synthetic hospitals via `fedsight coordinator run`; the store must hold the new
versions with per-hospital metrics. Every process group is killed in `finally`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vocab.offline import OFFLINE_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_experts": 4, "top_k": 2,
              "expert_hidden": 16, "ct_channels": [8], "ehr_hidden": 8,
              "inputs": {"ct_shape": [8, 16, 16], "ct_spacing": [32.0, 20.0, 20.0],
                         "path_size": 32, "ehr_schema": "chest-v1"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = {**os.environ, **OFFLINE_ENV}
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = str(REPO)
    return e


def fedsight(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=3, seed=3, sizes=(8, 8, 8)), out)
    return out


def test_two_rounds_on_superlink_and_three_supernodes(federation: Path, tmp_path: Path) -> None:
    home, port = tmp_path / "coord", free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = (tmp_path / "superlink.log").open("w")
        logs.append(log)
        procs.append(subprocess.Popen(
            fedsight("coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
                     "--home", str(home)),
            cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_port(port, procs[0])
        sites = sorted(p for p in federation.iterdir() if p.is_dir() and p.name != "_truth")
        for site in sites:
            log = (tmp_path / f"{site.name}.log").open("w")
            logs.append(log)
            procs.append(subprocess.Popen(
                fedsight("node", "start", "--data", str(site), "--coordinator",
                         f"127.0.0.1:{port}", "--port", str(free_port()),
                         "--cache-dir", str(tmp_path / "cache" / site.name)),
                cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        t0 = time.monotonic()
        run = subprocess.run(
            fedsight("coordinator", "run", "--coordinator", f"127.0.0.1:{port}", "--home",
                     str(home), "--rounds", "2", "--timeout", "800",
                     "--run-config", "local-epochs=1", "--run-config", "min-hospitals=3",
                     "--run-config", f"model-json='{json.dumps(TINY_MODEL)}'",
                     "--run-config", "run-name='itest'"),
            cwd=REPO, env=env(), capture_output=True, text=True, timeout=900, check=False)
        elapsed = time.monotonic() - t0
        assert run.returncode == 0, run.stdout + run.stderr + _tail(tmp_path / "superlink.log")
        print(run.stdout, f"\n2 deployment rounds in {elapsed:.0f} s")

        from coordinator.store import ModelStore

        store = ModelStore(home / "store")
        versions = store.list_versions()
        assert [v.meta["round"] for v in versions] == [1, 2]
        last = versions[-1]
        assert last.meta["parent"] == versions[0].id
        assert set(last.hospital_metrics()) == {"site_a", "site_b", "site_c"}
        for metrics in last.hospital_metrics().values():
            assert metrics["n"] >= 1 and metrics["loss"] is not None
        assert all(s["accepted"] for s in last.meta["screening"].values())
        store.verify(last)
        # Coordinator log: hospitals by site id, never a case id or a file name.
        server_log = (tmp_path / "superlink.log").read_text()
        case_ids = [line.split(",")[0] for s in ("site_a", "site_b", "site_c")
                    for line in (federation / s / "labels.csv").read_text().splitlines()[1:]]
        assert not [c for c in case_ids if c in server_log]
    finally:
        from coordinator.launch import stop_group

        for p in procs[1:]:  # supernodes (+ their flwr-clientapp children) first
            stop_group(p)
        if procs:  # SuperLink, SuperExec and the flwr-serverapp that talks to our port
            stop_group(procs[0], port)
        for f in logs:
            f.close()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.is_file() else ""

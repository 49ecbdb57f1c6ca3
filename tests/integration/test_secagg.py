"""Secure aggregation (SecAgg+) for real: one flower-superlink and four flower-supernode
processes on 127.0.0.1 (`fedsight coordinator start` / `fedsight node start` through
ops.cluster.local_deployment, insecure loopback), `fedsight coordinator run` with
`secure-aggregation=true`, the tiny model.

(a) round 1 of a SecAgg+ run stores the same model, within the quantisation tolerance, as round
    1 of a plain run with identical seeds (local training is deterministic given seed and round:
    TrainConfig.seed = seed * 1000 + server-round; DP off);
(c) in round 2 of that run two of the four hospitals go silent (SIGSTOP) after they received
    the stage that trains: 2 < threshold 3, the protocol halts, the round is stored as
    "secagg-failed" with every hospital dropped; any later version builds on round 1's (the
    resumed nodes may still fail round 3: see the test; tests/coordinator/test_secure_agg.py
    shows the next round aggregating from the kept model in-process);
(b) in a last run one SuperNode (its node agent's whole process group) is SIGKILLed after it
    received its train message: the round still aggregates the others.
Every process group is stopped on the way out, pass or fail (local_deployment's finally; stopped
groups are continued first)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.tiny import TINY_MODEL, small_federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STAGE_TIMEOUT = 40  # secagg-timeout: seconds a SecAgg+ stage waits for silent hospitals
# Quantisation: clip 1, 2**24 levels -> one step 1.2e-7 on a weighted update value; the mean's
# error is at most contributors x step / (summed weight of the group). With 4 hospitals of ~4
# training cases, example-scale 10 (weights ~0.4) and token-scale 4000, this stays below 1e-4
# for every value that any hospital's expert tokens reach.
TOLERANCE = 1e-4
TRAIN_RECEIVED = "Receiving: train message"  # flower-supernode's log line per train message
COMMON = ["local-epochs=1", "min-hospitals=3", "seed=7", "round-timeout=90.0",
          f"model-json='{json.dumps(TINY_MODEL)}'"]
SECURE = ["secure-aggregation=true", f"secagg-timeout={STAGE_TIMEOUT}.0",
          "secagg-example-scale=10.0", "secagg-token-scale=4000.0"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    from ops.cluster import local_deployment

    root = tmp_path_factory.mktemp("secagg")
    fed = small_federation(root, n_sites=4, seed=5)
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and p.name != "_truth")
    home = root / "coord"
    with local_deployment(home, sites, cache_root=root / "cache") as dep:
        try:
            yield dep, home
        finally:
            for p in dep.nodes or []:  # a SIGSTOPped group would not stop on SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGCONT)


def run_command(port: int, home: Path, name: str, rounds: int, *extra: str) -> list[str]:
    from ops.processes import fedsight_command

    cmd = fedsight_command("coordinator", "run", "--coordinator", f"127.0.0.1:{port}",
                           "--home", str(home), "--rounds", str(rounds), "--timeout", "600",
                           "--run-config", f"run-name='{name}'")
    for kv in (*COMMON, *extra):
        cmd += ["--run-config", kv]
    return cmd


def start_run(dep, home: Path, name: str, rounds: int, *extra: str) -> subprocess.Popen:
    from ops.processes import process_env

    out = (home / f"run-{name}.out").open("w")
    return subprocess.Popen(run_command(dep.port, home, name, rounds, *extra), cwd=REPO,
                            env={**process_env(), "PYTHONPATH": str(REPO)}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, home: Path, name: str, timeout: float = 400) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (home / f"run-{name}.out").read_text()
    assert proc.returncode == 0, out + tail(home / "superlink.log")
    return out


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def node_log(home: Path, dep, i: int) -> Path:
    return home / f"node-{Path(dep.nodes[i].args[dep.nodes[i].args.index('--data') + 1]).name}.log"


def log_sizes(home: Path, dep) -> list[int]:
    return [node_log(home, dep, i).stat().st_size for i in range(len(dep.nodes))]


def wait_train_messages(home: Path, dep, i: int, since: int, count: int,
                        run: subprocess.Popen, timeout: float = 300) -> None:
    """Until node i has logged `count` train messages after byte offset `since`."""
    path = node_log(home, dep, i)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with path.open("rb") as f:
            f.seek(since)
            if f.read().decode(errors="replace").count(TRAIN_RECEIVED) >= count:
                return
        assert run.poll() is None, f"run ended early: {run.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"node {i} never got train message {count}: {tail(path)}")


def run_record(store, name: str) -> dict:
    runs = [r for r in store.list_runs() if r["run_id"].startswith(f"{name}-")]
    assert len(runs) == 1, [r["run_id"] for r in store.list_runs()]
    return runs[0]


def versions_of(store, run_id: str) -> list:
    return [v for v in store.list_versions() if v.meta["run_id"] == run_id]


def max_difference(a, b) -> float:
    import torch

    assert set(a) == set(b)
    worst = 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        worst = max(worst, float((a[k].double() - b[k].double()).abs().max()))
    return worst if worst == worst else float(torch.inf)


def test_secure_rounds_match_plain_and_a_halted_round_keeps_the_model(deployment) -> None:
    from coordinator.runner import read_state
    from coordinator.store import ModelStore

    dep, home = deployment
    store = ModelStore(home / "store")
    t0 = time.monotonic()
    finish(start_run(dep, home, "plain", 1), home, "plain")
    t_plain = time.monotonic() - t0

    # (a) + (c): 3 secure rounds; in round 2 nodes 0 and 1 go silent in the training stage
    t0 = time.monotonic()
    since = log_sizes(home, dep)
    run = start_run(dep, home, "secure", 3, *SECURE)
    stopped: list[int] = []
    try:
        for i in (0, 1):  # round 2's stage 2 is the 7th train message of the run
            wait_train_messages(home, dep, i, since[i], 7, run)
            os.killpg(dep.nodes[i].pid, signal.SIGSTOP)
            stopped.append(i)
        time.sleep(STAGE_TIMEOUT + 3)  # the stage times out: 2 left < threshold 3, halted
    finally:
        for i in stopped:
            os.killpg(dep.nodes[i].pid, signal.SIGCONT)
    out = finish(run, home, "secure")
    t_secure = time.monotonic() - t0

    plain = versions_of(store, run_record(store, "plain")["run_id"])
    rec = run_record(store, "secure")
    secure = versions_of(store, rec["run_id"])
    assert [v.meta["round"] for v in plain] == [1]
    assert [v.meta["round"] for v in secure][:1] == [1]
    diff = max_difference(read_state(secure[0]), read_state(plain[0]))
    print(f"\nplain 1 round {t_plain:.0f} s, secure 3 rounds {t_secure:.0f} s; round 1 "
          f"max |secure - plain| = {diff:.3g} (tolerance {TOLERANCE:g})")
    assert diff <= TOLERANCE
    assert secure[0].meta["secure_aggregation"]["contributors"] == 4
    assert all(s["outcome"] == "accepted" for s in secure[0].meta["screening"].values())
    # the privacy block still names every hospital (no DP: epsilon null = not private)
    assert set(secure[0].meta["privacy"]["hospitals"]) == set(plain[0].meta["screening"])

    # (c) round 2 halted and stored nothing. Round 3 starts from the round-1 version; on quiet
    # cores the two resumed SuperNodes were measured to still fail round 3's setup ("insufficient
    # available nodes": they are busy with round 2's stale stage after SIGCONT), so round 3 may
    # halt too. Whatever it does, no version is built on a halted round's state.
    statuses = [r["status"] for r in rec["rounds"]]
    assert statuses[:2] == ["aggregated", "secagg-failed"] and len(statuses) == 3, statuses
    assert statuses[2] in ("aggregated", "secagg-failed"), statuses
    r2 = rec["rounds"][1]
    assert r2["version"] is None and len(r2["hospitals"]) == 4
    assert {o["outcome"] for o in r2["hospitals"].values()} == {"dropped"}
    assert all("secure aggregation halted" in o["reason"] for o in r2["hospitals"].values())
    assert [v.meta["parent"] for v in secure[1:]] == [secure[0].id] * (len(secure) - 1)
    assert [v.meta["round"] for v in secure[1:]] == ([3] if statuses[2] == "aggregated" else [])
    assert "round 2: secagg-failed (secure aggregation halted" in out, out


def test_supernode_killed_mid_protocol_leaves_the_others_aggregated(deployment) -> None:
    from coordinator.store import ModelStore

    dep, home = deployment
    store = ModelStore(home / "store")
    victim = len(dep.nodes) - 1
    since = log_sizes(home, dep)
    run = start_run(dep, home, "kill", 1, *SECURE)
    try:
        wait_train_messages(home, dep, victim, since[victim], 3, run)  # stage 2: training
        time.sleep(0.5)
        os.killpg(dep.nodes[victim].pid, signal.SIGKILL)  # agent, SuperNode, worker, ClientApp
    finally:
        out = finish(run, home, "kill")
    rec = run_record(store, "kill")
    assert [r["status"] for r in rec["rounds"]] == ["aggregated"], out
    outcomes = {s: o["outcome"] for s, o in rec["rounds"][0]["hospitals"].items()}
    # killed while training: dropped; had its masked vector already gone out, it stays in the
    # sum (its private mask rebuilt from the others' shares) - either way the round aggregates
    assert sorted(outcomes.values()).count("accepted") >= 3, outcomes
    [version] = versions_of(store, rec["run_id"])
    assert version.meta["secure_aggregation"]["contributors"] >= 3

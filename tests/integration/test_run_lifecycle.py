"""`fedsight coordinator run` never waits silently, and the store matches the SuperLink (issue
11), against real SuperLinks on 127.0.0.1:

- a run the SuperLink lost (restarted in memory) is an error naming the run within seconds;
- a timeout stops the run (`flwr stop`): Flower then reports it finished:stopped;
- a run left pending in the file database by a killed SuperLink is stopped when it restarts
  (Flower would start it by itself with nobody waiting);
- `--resume` refuses while the run to resume is still running, and Ctrl-C stops the run and
  records it 'stopped' in the model store.

The first three use a SuperLink without executor (`--isolation process`), so a run stays
pending without any training; the last one trains tiny models on the simulation runtime."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.store import ModelStore
from ops.cluster import simulation_superlink
from ops.flwr_cli import app_dir, run_status, submit_run, write_connection
from ops.processes import free_port, source_env, stop_group, wait_listening
from ops.superlink import SuperLinkConfig, superlink_command
from tests.integration.tiny import TINY_MODEL_SMALL_GRID as TINY_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


class IdleLink:
    """A SuperLink that never starts a ServerApp (no executor): runs stay pending."""

    def __init__(self, home: Path, database: Path | None) -> None:
        self.home, self.database, self.port = home, database, free_port()
        self.flwr_home = home / "flwr"
        write_connection(self.flwr_home, f"127.0.0.1:{self.port}", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = superlink_command(SuperLinkConfig("127.0.0.1", self.port, self.database))
        with (self.home / "superlink.log").open("a") as log:
            self.proc = subprocess.Popen([*cmd, "--isolation", "process"],
                                         env=source_env(self.flwr_home), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(self.port, self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, self.port)


@contextlib.contextmanager
def idle_link(home: Path, database: Path | None = None) -> Iterator[IdleLink]:
    home.mkdir(parents=True, exist_ok=True)
    link = IdleLink(home, database)
    try:
        link.start()
        yield link
    finally:
        link.stop()


def coordinator_run(port: int, home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "coordinator", "run", "--coordinator",
            f"127.0.0.1:{port}", "--home", str(home), *extra]


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.2)


def test_a_run_the_superlink_lost_is_an_error_naming_it(tmp_path: Path) -> None:
    with idle_link(tmp_path / "link") as link:
        out = tmp_path / "run.out"
        with out.open("w") as f:
            run = subprocess.Popen(coordinator_run(link.port, tmp_path / "coord",
                                                   "--timeout", "600"),
                                   cwd=REPO, env=source_env(), stdout=f,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: "submitted" in out.read_text() or run.poll() is not None, 180,
                      "never submitted")
            run_id = re.search(r"run (\d+) submitted", out.read_text()).group(1)
            _wait_for(lambda: f"run {run_id}: pending" in out.read_text(), 60,
                      "no progress line")
            link.kill9()
            link.start()  # in memory: the run is gone
            t0 = time.monotonic()
            code = run.wait(timeout=120)
            waited = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    text = out.read_text()
    assert code == 2, text
    assert f"run {run_id} is unknown to the SuperLink" in text, text
    assert waited < 30, f"noticed after {waited:.0f} s"
    print(f"\nlost run reported {waited:.1f} s after the SuperLink came back")


def test_timeout_stops_the_run(tmp_path: Path) -> None:
    with idle_link(tmp_path / "link") as link:
        t0 = time.monotonic()
        run = subprocess.run(coordinator_run(link.port, tmp_path / "coord", "--timeout", "5"),
                             cwd=REPO, env=source_env(), capture_output=True, text=True,
                             timeout=300, check=False)
        text = run.stdout + run.stderr
        assert run.returncode == 2, text
        run_id = int(re.search(r"run (\d+) submitted", text).group(1))
        assert f"run {run_id} still pending after 5 s; stopped it" in text, text
        assert run_status(link.flwr_home, run_id) == "finished:stopped"
        print(f"\ntimeout path took {time.monotonic() - t0:.0f} s (submit included)")


def test_a_pending_run_does_not_start_by_itself_after_a_restart(tmp_path: Path) -> None:
    with idle_link(tmp_path / "link", tmp_path / "link" / "superlink.db") as link:
        run_id = submit_run(app_dir(), link.flwr_home, {"num-rounds": 1})
        assert run_status(link.flwr_home, run_id) == "pending"
        link.kill9()
        link.start()  # same file database
        assert run_status(link.flwr_home, run_id) == "finished:stopped"
    log = (tmp_path / "link" / "superlink.log").read_text()
    assert f"left unfinished: {run_id}" in log


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=2, seed=5, sizes=(8, 8)), out)
    return out


def test_resume_refuses_while_running_and_ctrl_c_stops_and_records(
        federation: Path, tmp_path: Path) -> None:
    home = tmp_path / "coord"
    store = ModelStore(home / "store")
    cfg = ["--run-config", f"federation-dir='{federation}'",
           "--run-config", f"cache-dir='{tmp_path / 'cache'}'"]
    with simulation_superlink(tmp_path / "link") as (flwr_home, port):
        out = tmp_path / "first.out"
        with out.open("w") as f:
            first = subprocess.Popen(
                # Far more rounds than the test lets it run (a tiny round takes ~1 s on quiet
                # cores): it must still be running when --resume is tried and Ctrl-C comes.
                coordinator_run(port, home, "--rounds", "5000", "--timeout", "900", *cfg,
                                "--run-config", "local-epochs=1",
                                "--run-config", f"model-json='{json.dumps(TINY_MODEL)}'"),
                cwd=REPO, env=source_env(), stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            _wait_for(lambda: store.list_runs() or first.poll() is not None, 400,
                      "the ServerApp never recorded its run")
            assert first.poll() is None, out.read_text()
            flwr_id = store.list_runs()[0]["flwr_run_ids"][-1]
            resumed = subprocess.run(coordinator_run(port, home, "--resume", *cfg),
                                     cwd=REPO, env=source_env(), capture_output=True,
                                     text=True, timeout=300, check=False)
            assert resumed.returncode == 2, resumed.stdout + resumed.stderr
            assert f"still running on the SuperLink as Flower run {flwr_id}" in resumed.stderr
            assert "submitted" not in resumed.stdout
            first.send_signal(signal.SIGINT)  # Ctrl-C
            # within the product's own bounds: `flwr stop` may take up to 120 s on a busy
            # SuperLink (ops.flwr_cli.stop_run), then up to 30 s for the run to settle
            assert first.wait(timeout=200) == 2, out.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        text = out.read_text()
        assert f"run {flwr_id}: stopped (interrupted by the operator)" in text, text
        assert run_status(flwr_home, flwr_id) == "finished:stopped"
    run = store.list_runs()[0]
    assert run["status"] == "stopped" and run["ended_reason"] == "interrupted by the operator"

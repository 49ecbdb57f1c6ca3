"""The node's long-lived task worker: the ClientApp hands it the message's task over the private
socket and gets the same results as running in-process; failures come back by exception type
only; with no worker the ClientApp runs the task itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_client_app import assert_clean, config, global_arrays, message

from vocab import records as K

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=5, sizes=(10,)), out)
    return out / "site_a"


@pytest.fixture(scope="module")
def worker_socket(tmp_path_factory: pytest.TempPathFactory):
    from hospital_node.worker import prepare_socket

    socket = prepare_socket(tmp_path_factory.mktemp("sock"))
    assert oct(socket.parent.stat().st_mode & 0o777) == "0o700"
    assert oct((socket.parent / "worker.sock.key").stat().st_mode & 0o777) == "0o600"
    proc = subprocess.Popen([sys.executable, "-m", "hospital_node.worker", "--socket",
                             str(socket)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 60
    while not socket.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[0]
        time.sleep(0.1)
    yield socket, proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 3, 1


def ctx(node_config: dict) -> Context:
    return Context(run_id=7, node_id=3, state=RecordDict(), run_config={},
                   node_config=node_config)


def test_worker_answers_like_the_in_process_task(site: Path, tmp_path: Path,
                                                 worker_socket) -> None:
    from hospital_node.client_app import app

    socket, proc = worker_socket
    local = {"data-dir": str(site), "cache-dir": str(tmp_path / "cache")}
    remote = {**local, "worker-socket": str(socket)}
    q_local = app(message("query", RecordDict({K.CONFIG: config()})), ctx(local))
    q_remote = app(message("query", RecordDict({K.CONFIG: config()})), ctx(remote))
    assert_clean(q_remote, "query", site)
    assert dict(q_remote.content[K.METRICS]) == dict(q_local.content[K.METRICS])

    arrays = global_arrays()
    c = ctx(remote)
    t = app(message("train", RecordDict({K.ARRAYS: arrays, K.CONFIG: config()})), c)
    assert_clean(t, "train", site)
    assert list(t.content[K.ARRAYS].keys()) == list(arrays.keys())
    assert t.content[K.METRICS][K.NUM_EXAMPLES] == q_local.content[K.METRICS]["cases-train"]
    assert c.state["fedsight-node"]["global-step"] > 0
    trained = t.content[K.ARRAYS]
    changed = [k for k in arrays.keys()
               if not (arrays[k].numpy() == trained[k].numpy()).all()]
    assert changed  # the worker really trained

    e_remote = app(message("evaluate", RecordDict({K.ARRAYS: trained, K.CONFIG: config()})),
                   ctx(remote))
    e_local = app(message("evaluate", RecordDict({K.ARRAYS: trained, K.CONFIG: config()})),
                  ctx(local))
    assert_clean(e_remote, "evaluate", site)
    remote, local_m = dict(e_remote.content[K.METRICS]), dict(e_local.content[K.METRICS])
    assert remote.keys() == local_m.keys()
    for key, value in remote.items():  # calibration sums are lists
        assert value == pytest.approx(local_m[key]), key
    assert proc.poll() is None  # one worker served every message


def test_worker_failure_comes_back_by_type_only(tmp_path: Path, worker_socket) -> None:
    from hospital_node.client_app import NodeTaskError, app

    socket, _ = worker_socket
    secret = tmp_path / "patient_0042_scans"
    with pytest.raises(NodeTaskError) as err:
        app(message("query", RecordDict({K.CONFIG: config()})),
            ctx({"data-dir": str(secret), "worker-socket": str(socket)}))
    assert str(err.value) == "fedsight-node: query failed (DataError)"


def test_without_a_worker_the_client_app_runs_the_task_itself(
        site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hospital_node.client_app import app

    gone = tmp_path / "gone" / "worker.sock"
    gone.parent.mkdir()
    (gone.parent / "worker.sock.key").write_bytes(b"k" * 32)
    q = app(message("query", RecordDict({K.CONFIG: config()})),
            ctx({"data-dir": str(site), "cache-dir": str(tmp_path / "c"),
                 "worker-socket": str(gone)}))
    assert q.content[K.METRICS]["cases-train"] + q.content[K.METRICS]["cases-test"] == 10
    assert "running the query task in this process" in caplog.text



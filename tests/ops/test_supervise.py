"""Supervision (ops.supervise) and reaping (ops.processes): the backoff schedule, restarts of a
real child after any exit (kill -9 included) with the healthy-period reset, and orphaned
flwr-clientapp processes found by their ClientAppIo port and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ops.processes import clientapp_pids, free_port, reap_clientapps
from ops.supervise import Backoff, Supervisor


def test_backoff_doubles_from_2_s_to_a_60_s_cap() -> None:
    b = Backoff()
    assert [b.delay(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert Backoff(first=1, factor=3, cap=10).delay(3) == 9
    with pytest.raises(ValueError, match="got 0"):
        b.delay(0)


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_restarts_after_every_exit_and_gives_up_only_when_bounded() -> None:
    lines: list[str] = []
    starts: list[int] = []

    def start() -> subprocess.Popen:
        p = _child("import sys; sys.exit(7)")
        starts.append(p.pid)
        return p

    sup = Supervisor(start, Backoff(first=0.05, factor=2, cap=0.1, max_restarts=3),
                     lines.append, name="child")
    assert sup.run() == 7
    assert len(starts) == 4  # first start + 3 restarts
    assert [ln.split("; ")[1] for ln in lines[:3]] == ["restart 1 in 0 s", "restart 2 in 0 s",
                                                        "restart 3 in 0 s"]
    assert "giving up after 3 restarts" in lines[-1]
    assert all("exited with code 7" in ln for ln in lines)


def test_a_healthy_run_resets_the_backoff_and_kill_9_is_restarted() -> None:
    lines: list[str] = []
    children: list[subprocess.Popen] = []
    delays: list[float] = []

    def start() -> subprocess.Popen:
        children.append(_child("import time; time.sleep(30)"))
        return children[-1]

    sup = Supervisor(start, Backoff(first=0.05, cap=1.0, healthy_after=0.3, max_restarts=10),
                     lines.append, name="child")
    sup.stopping.wait = lambda t: delays.append(t) or False  # type: ignore[method-assign]

    def killer() -> None:
        for i in range(3):
            while len(children) <= i:
                time.sleep(0.01)
            time.sleep(0.5 if i == 0 else 0.05)  # the first child runs past healthy_after
            children[i].send_signal(signal.SIGKILL)
        while len(children) < 4:
            time.sleep(0.01)
        sup.request_stop(signal.SIGTERM)  # forwarded to the 4th child

    t = threading.Thread(target=killer)
    t.start()
    assert sup.run() == 0
    t.join()
    assert len(children) == 4 and delays == [0.05, 0.1, 0.2]  # reset after the healthy run
    assert children[-1].returncode == -signal.SIGTERM
    assert all(f"exited with code {-signal.SIGKILL}" in ln for ln in lines)


def test_orphaned_clientapps_of_a_port_are_reaped_and_no_other() -> None:
    port = free_port()
    sleeper = "import time; time.sleep(60)"
    gone = subprocess.Popen(["true"])
    gone.wait()  # the SuperNode that was killed with -9

    def clientapp(address: str, parent: int, kind: str = "flwr-clientapp") -> subprocess.Popen:
        # argv as a SuperNode starts it: flwr-clientapp --...-api-address HOST:PORT --token T
        # --insecure --parent-pid SUPERNODE
        return subprocess.Popen([sys.executable, "-c", sleeper, kind, "--runtime-api-address",
                                 address, "--token", "t", "--insecure", "--parent-pid",
                                 str(parent)])

    orphan = clientapp(f"127.0.0.1:{port}", gone.pid)
    keep = [clientapp(f"127.0.0.1:{port}", os.getpid()),  # its SuperNode is alive
            clientapp(f"127.0.0.1:{port}1", gone.pid),  # another port
            clientapp(f"127.0.0.1:{port}", gone.pid, kind="flwr-serverapp")]
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in clientapp_pids(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clientapp_pids(port) == [orphan.pid]
        assert reap_clientapps(port, grace=5) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert all(p.poll() is None for p in keep)
        assert clientapp_pids(port) == []
    finally:
        for p in (orphan, *keep):
            p.kill()
            p.wait()

"""Processes we start: their environment, ports, waiting for a listener, stopping a process
group with everything it left behind (app processes, orphaned ClientApps)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vocab.errors import FedsightError
from vocab.offline import OFFLINE_ENV

BINDIR = Path(sys.executable).parent  # flower-superlink, flwr, ... of this interpreter


class ProcessFailed(FedsightError):
    """A process we started exited early or never listened."""


def process_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The offline environment (vocab.offline) plus this interpreter's folder on PATH: Flower
    starts its own helpers (flwr-serverapp, flwr-clientapp) by name."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = str(BINDIR) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def source_root() -> Path:
    """The folder holding the fedsight packages (a source checkout or site-packages)."""
    return Path(__file__).resolve().parent.parent


def source_env(flwr_home: Path | None = None) -> dict[str, str]:
    """process_env with the fedsight packages importable (`python -m ops.superlink_main`,
    `python -m cli.main`) from a source checkout too."""
    env = process_env(flwr_home)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(source_root()), env.get("PYTHONPATH")) if p)
    return env


def fedsight_command(*args: str) -> list[str]:
    """The `fedsight` CLI of this interpreter (works from a source checkout too)."""
    return [sys.executable, "-m", "cli.main", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0,
                   what: str = "SuperLink") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise ProcessFailed(f"{what} exited with code {proc.returncode} before listening "
                                f"on 127.0.0.1:{port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise ProcessFailed(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f} s")


def pids_naming(*needles: str) -> list[int]:
    """Our processes (same uid, not this one) whose command line contains every needle."""
    want = [n.encode() for n in needles]
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (d / "cmdline").read_bytes()
            if all(n in cmdline for n in want) and d.stat().st_uid == os.getuid():
                out.append(int(d.name))
        except OSError:
            continue  # exited meanwhile
    return [p for p in out if p != os.getpid()]


def pids_talking_to(port: int) -> list[int]:
    """Our processes whose command line names 127.0.0.1:<port> (the SuperLink we started on a
    private port): Flower starts flwr-serverapp/-simulation in their own session, outside the
    SuperLink's process group."""
    return pids_naming(f"127.0.0.1:{port}")


def clientapp_pids(clientappio_port: int) -> list[int]:
    """Orphaned `flwr-clientapp` processes of a SuperNode's ClientAppIo port: a SuperNode
    killed with -9 leaves them retrying its port for minutes. Orphaned means the SuperNode
    named in their --parent-pid is gone; only this network namespace counts (hospitals of a
    test on one machine may each use the same port in their own namespace)."""
    out = []
    for pid in pids_naming("flwr-clientapp", f":{clientappio_port}"):
        args = _cmdline(pid)
        if not any(a.endswith(f":{clientappio_port}") for a in args) or not _same_netns(pid):
            continue
        parent = args[args.index("--parent-pid") + 1] if "--parent-pid" in args[:-1] else ""
        if not parent.isdigit() or not _alive(int(parent)):
            out.append(pid)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _same_netns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def kill_pids(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM each pid, SIGKILL those still there after grace; returns the pids signalled."""
    hit = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            hit.append(pid)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in hit):
        time.sleep(0.1)
    for pid in hit:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return hit


def reap_clientapps(clientappio_port: int, grace: float = 5.0) -> list[int]:
    """Stop the orphaned flwr-clientapp processes of that ClientAppIo port (clientapp_pids)."""
    return kill_pids(clientapp_pids(clientappio_port), grace)


def _alive(pid: int) -> bool:
    """Running (a zombie of ours counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_group(proc: subprocess.Popen, port: int | None = None, grace: float = 10.0,
               clientappio_port: int | None = None) -> None:
    """SIGTERM the process group we started (SuperLink + SuperExec + app processes, or a node
    agent + SuperNode + worker) and the app processes attached to our SuperLink port, then
    SIGKILL what is left; finally reap the ClientApps of a SuperNode's ClientAppIo port."""
    stray = pids_talking_to(port) if port else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids_talking_to(port) if port else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if clientappio_port is not None:
        reap_clientapps(clientappio_port, grace=2.0)

"""A long-lived task worker next to a hospital's SuperNode.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message and has no option to keep
one alive, so each message would pay for importing torch, MONAI and timm (seconds) before any
work. `fedsight node start` therefore starts this worker beside the SuperNode; the ClientApp
(client_app.py) only unpacks the message and hands the task (hospital_node.task.TaskRequest) to
the worker over a Unix socket named in the node config (`worker-socket`), then packs the reply.
If no worker answers, the ClientApp runs the task itself.

The socket lives in a folder only this user can open (0700) and connections must prove the key in
`<socket>.key` (0600); everything stays on this machine. One request at a time, in order. The
worker exits when its parent (the SuperNode) is gone, on SIGTERM/SIGINT/SIGHUP and when serving
fails, and removes the socket folder every time (a SIGKILL is the one exit it cannot see).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from hospital_node import task
from vocab.errors import ConfigError, public_reason

log = logging.getLogger("fedsight.node.worker")
PROTOCOL = 1
SOCKET_DIR_PREFIX = "fedsight-node-"


class WorkerUnavailable(RuntimeError):
    """No worker answers on the socket (not started, exited, or the key does not match)."""


class WorkerTaskFailed(RuntimeError):
    """The worker ran the task and it failed; the message is the exception type only."""


def key_path(socket: Path) -> Path:
    return socket.with_name(socket.name + ".key")


def call(socket: Path, req: task.TaskRequest, timeout: float = 5.0) -> task.TaskResult:
    """Send one request to the worker and wait for its result (no timeout on the work)."""
    try:
        key = key_path(socket).read_bytes()
        conn = _connect(socket, key, timeout)
    except (OSError, EOFError) as e:
        raise WorkerUnavailable(f"no worker at {socket} ({type(e).__name__})") from None
    with conn:
        try:
            conn.send((PROTOCOL, req))
            status, payload = conn.recv()
        except (OSError, EOFError) as e:
            raise WorkerUnavailable(f"worker at {socket} went away ({type(e).__name__})") from None
    if status == "ok":
        return payload
    raise WorkerTaskFailed(str(payload))


def _connect(socket: Path, key: bytes, timeout: float) -> Connection:
    end = time.monotonic() + timeout
    while True:
        try:
            return Client(str(socket), family="AF_UNIX", authkey=key)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _handle(conn: Connection) -> None:
    try:
        version, req = conn.recv()
    except (OSError, EOFError):
        return
    if version != PROTOCOL or not isinstance(req, task.TaskRequest):
        conn.send(("error", f"protocol mismatch (got {version!r})"))
        return
    try:
        result = task.run_task(req)
    except Exception as e:  # reported to the ClientApp by type only; details stay in this log
        log.exception("%s failed at this hospital", req.kind)
        conn.send(("error", public_reason(e)))  # type, or a public error's message
        return
    conn.send(("ok", result))


def _exit_with_parent(parent: int, socket: Path, every: float = 1.0) -> None:
    """Checked against the pid we were given, not the parent at start-up: a SuperNode that died
    before this thread ran would otherwise leave a worker (and its folder) behind for good."""
    while True:
        if os.getppid() != parent:
            log.info("parent %d is gone; worker exits", parent)
            remove_socket_dir(socket)
            os._exit(0)
        time.sleep(every)


def _exit_on_signals(socket: Path) -> None:
    """A stop of the node's process group (SIGTERM), Ctrl-C (SIGINT) or a closed terminal
    (SIGHUP): remove the folder and exit now, mid-task or not (the round is lost either way)."""
    def handler(signum: int, _frame: object) -> None:
        remove_socket_dir(socket)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


# Longest Unix socket path Linux binds (sun_path is 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107


def prepare_socket(folder: Path | None = None) -> Path:
    """A fresh private folder with the socket path and its key file; returns the socket path.
    Without `folder`, a $TMPDIR too deep for a Unix socket path falls back to /tmp (the folder
    is private either way); a given `folder` that is too deep is refused, naming the length."""
    import tempfile

    if folder is None:
        probe = Path(tempfile.gettempdir()) / f"{SOCKET_DIR_PREFIX}xxxxxxxx" / "worker.sock"
        if len(os.fsencode(str(probe))) > MAX_SOCKET_PATH:
            folder = Path("/tmp")
    base = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX, dir=folder))  # mode 0700
    socket = base / "worker.sock"
    if len(os.fsencode(str(socket))) > MAX_SOCKET_PATH:
        base.rmdir()
        raise ConfigError(f"worker socket path {str(socket)!r} is {len(os.fsencode(str(socket)))}"
                          f" bytes; Unix sockets allow {MAX_SOCKET_PATH}: choose a shorter "
                          "folder")
    fd = os.open(key_path(socket), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return socket


def remove_socket_dir(socket: Path) -> None:
    """Remove what prepare_socket made: the socket, its key and their folder, and nothing else
    (a --socket in a shared folder loses only those two files). Missing parts are fine."""
    for p in (socket, key_path(socket)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if socket.parent.name.startswith(SOCKET_DIR_PREFIX):
        with contextlib.suppress(OSError):  # already gone, or holds files that are not ours
            socket.parent.rmdir()


def serve(socket: Path, warm: bool = True, parent: int | None = None) -> None:
    """Answer requests until the process ends; with parent, exit once that process is gone."""
    key = key_path(socket).read_bytes()
    with Listener(str(socket), family="AF_UNIX", authkey=key) as listener:
        os.chmod(socket, 0o600)
        if parent is not None:  # only now: its clean-up must not race the bind that makes the file
            threading.Thread(target=_exit_with_parent, args=(parent, socket), daemon=True).start()
        log.info("worker ready on %s", socket)
        if warm:  # import the heavy modules now, not when the first round arrives
            for module in ("multimodal.train", "multimodal.evaluate", "hospital_node.dataset"):
                importlib.import_module(module)
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as e:  # a client that failed the key check, etc.
                log.warning("rejected a connection (%s)", type(e).__name__)
                continue
            with conn:
                _handle(conn)


def main(argv: list[str] | None = None) -> int:
    from vocab.offline import enforce_offline

    enforce_offline()
    ap = argparse.ArgumentParser(description="fedsight node task worker (started by node start)")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--parent", type=int, default=None,
                    help="exit when this process is gone (default: the parent at start-up)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    _exit_on_signals(args.socket)
    try:
        serve(args.socket, parent=args.parent or os.getppid())
    finally:  # serving failed (e.g. a warm-up import); the exits above clean up themselves
        remove_socket_dir(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fedsight node start` (ops.node_agent) without a SuperLink: the SuperNode command and the
node key check for SuperNode authentication, the supervision of the SuperNode (restarts with
backoff, one task worker across restarts, signals passed on), and the task worker's socket
folder, which must be gone after every way a node stops (the worker's own exits included)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cli.main import main as fedsight_main
from ops.node_agent import (
    AUTH_NEEDS_TLS,
    NodeStart,
    check_auth_key,
    prepare,
    supernode_command,
)
from ops.processes import free_port
from tests.key_errors import assert_key_errors
from vocab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SOCKET_DIRS = "fedsight-node-*"


def write_key(folder: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
              fmt: ser.PrivateFormat = ser.PrivateFormat.OpenSSH) -> tuple[Path, Path]:
    """(private, public) key files as ssh-keygen writes them (OpenSSH private, .pub line)."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "node-key", folder / "node-key.pub"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                                     ser.PublicFormat.OpenSSH))
    return private, public


@pytest.fixture
def node_key(tmp_path: Path) -> tuple[Path, Path]:
    return write_key(tmp_path / "keys", ec.generate_private_key(ec.SECP384R1()))


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"  # the node only checks the PEM header; the SuperLink verifies
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return path


# ---- SuperNode authentication ----------------------------------------------------------------

def test_supernode_command_passes_the_auth_key_with_tls(tmp_path: Path, ca: Path,
                                                        node_key: tuple[Path, Path]) -> None:
    private, _ = node_key
    cmd = supernode_command(NodeStart(tmp_path, "coord:9092", tls_ca=ca, auth_key=private),
                            "site_a")
    i = cmd.index("--auth-supernode-private-key")
    assert cmd[i + 1] == str(private.resolve())
    assert "--root-certificates" in cmd and "--insecure" not in cmd
    plain = supernode_command(NodeStart(tmp_path, "coord:9092", tls_ca=ca), "site_a")
    assert "--auth-supernode-private-key" not in plain


def test_auth_key_without_tls_is_refused_before_any_other_check(
        tmp_path: Path, node_key: tuple[Path, Path]) -> None:
    spec = NodeStart(tmp_path / "no-such-site", "127.0.0.1:9", auth_key=node_key[0])
    with pytest.raises(ConfigError, match="--auth-key needs --tls"):
        supernode_command(spec, "site_a")
    with pytest.raises(ConfigError) as err:  # not the missing data folder, not the port
        prepare(spec)
    assert str(err.value) == AUTH_NEEDS_TLS


def test_a_good_openssh_ecdsa_key_passes(node_key: tuple[Path, Path]) -> None:
    check_auth_key(node_key[0])


def test_bad_auth_key_paths_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "node-key"
    with pytest.raises(ConfigError, match="does not exist or is not a file") as err:
        check_auth_key(missing)
    assert str(err.value).startswith(f"--auth-key {str(missing)!r}")
    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        check_auth_key(tmp_path)  # a folder


def test_an_unreadable_auth_key_is_named(node_key: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # chmod 0 does not stop root
    with pytest.raises(ConfigError, match=r"is unreadable \(Permission denied\)") as err:
        check_auth_key(node_key[0])
    assert str(err.value).startswith(f"--auth-key {str(node_key[0])!r}")


def test_wrong_auth_key_files_say_what_is_wrong_and_never_show_the_key(
        tmp_path: Path, node_key: tuple[Path, Path]) -> None:
    private, public = node_key
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("patient_0042 scan list\n")
    pem, _ = write_key(tmp_path / "pem", ec.generate_private_key(ec.SECP384R1()),
                       ser.PrivateFormat.PKCS8)
    ed, _ = write_key(tmp_path / "ed", ed25519.Ed25519PrivateKey.generate())
    cases = [(not_a_key, "is not an OpenSSH private key"),
             (public, "is a public key; pass the private key"),
             (pem, "is a PEM private key; flower-supernode reads only the OpenSSH format"),
             (ed, "is a key of type Ed25519; Flower needs ECDSA")]
    assert assert_key_errors(check_auth_key, cases, "--auth-key") == len(cases)


def test_node_start_cli_reports_a_public_key_given_as_auth_key(
        tmp_path: Path, ca: Path, node_key: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, public = node_key
    code = fedsight_main(["node", "start", "--data", str(tmp_path), "--coordinator",
                          "127.0.0.1:9", "--tls", str(ca), "--auth-key", str(public)])
    err = capsys.readouterr().err
    assert code == 2 and f"--auth-key {str(public)!r} is a public key" in err, err


# ---- the task worker's socket folder ---------------------------------------------------------

def _pids_naming(needle: str) -> list[int]:
    """Our processes whose command line contains needle."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if needle.encode() in (d / "cmdline").read_bytes() and int(d.name) != os.getpid():
                out.append(int(d.name))
    return out


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A $TMPDIR short enough for the worker's Unix socket path (pytest's own tmp_path under
    xdist is not: prepare_socket would fall back to /tmp, outside what the test watches)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fsn-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_deep_tmpdir_falls_back_to_tmp_and_a_deep_folder_is_refused(tmp_path: Path) -> None:
    from hospital_node.worker import MAX_SOCKET_PATH, prepare_socket, remove_socket_dir

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"bytes; Unix sockets allow {MAX_SOCKET_PATH}"):
        prepare_socket(deep)
    assert list(deep.iterdir()) == []  # nothing left behind
    old = os.environ.get("TMPDIR")
    import tempfile

    os.environ["TMPDIR"] = str(deep)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        socket = prepare_socket()
    finally:
        if old is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None
    try:
        assert socket.parent.parent == Path("/tmp") and len(str(socket)) <= MAX_SOCKET_PATH
    finally:
        remove_socket_dir(socket)


def _wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.1)


def _start_worker(socket: Path, parent: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hospital_node.worker", "--socket",
                             str(socket), "--parent", str(parent)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_removes_its_socket_folder_when_signalled(tmp_path: Path, sig: int) -> None:
    from hospital_node.worker import prepare_socket

    socket = prepare_socket(tmp_path)
    proc = _start_worker(socket, os.getpid())
    try:
        _wait_until(socket.exists, 60, "worker never listened")
        proc.send_signal(sig)  # mid warm-up (torch import): the handler runs anyway
        assert proc.wait(timeout=30) == 128 + sig
        assert not socket.parent.exists()
    finally:
        proc.kill()
        proc.wait()


def test_worker_whose_parent_is_already_gone_cleans_up_and_exits(tmp_path: Path) -> None:
    from hospital_node.worker import prepare_socket

    socket = prepare_socket(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a SuperNode that died before its worker even started
    proc = _start_worker(socket, gone.pid)
    try:
        assert proc.wait(timeout=60) == 0
        assert not socket.parent.exists()
    finally:
        proc.kill()
        proc.wait()


def test_remove_socket_dir_only_removes_what_prepare_socket_made(tmp_path: Path) -> None:
    from hospital_node.worker import key_path, remove_socket_dir

    shared = tmp_path / "shared"  # a --socket pointed into someone else's folder
    shared.mkdir()
    socket = shared / "worker.sock"
    key_path(socket).write_bytes(b"k" * 32)
    remove_socket_dir(socket)
    assert shared.is_dir() and not key_path(socket).exists()


# `fedsight node start` with the site check and the SuperNode replaced: the real worker start and
# the real supervision, with a stand-in SuperNode (argv[1] is its Python code).
DRIVER = """
import sys
from pathlib import Path
from ops import node_agent as agent
from ops.processes import free_port
from ops.supervise import Backoff
agent.prepare = lambda spec: ("site_a", "site usable (test)")
agent.supernode_command = lambda spec, site_id, socket: [sys.executable, "-c", sys.argv[1]]
backoff = Backoff(first=0.2, cap=0.4, max_restarts=2)
sys.exit(agent.start(agent.NodeStart(Path("."), "127.0.0.1:9", clientapp_port=free_port(),
                                     backoff=backoff)))
"""
SLEEPING_SUPERNODE = "import time; time.sleep(120)"
FAILING_SUPERNODE = "import sys; sys.exit(3)"


@pytest.mark.parametrize("how", ["sigterm-agent", "sigint-group", "supernode-fails"])
def test_node_start_leaves_no_socket_folder(tmp_path: Path, how: str,
                                            short_tmp: Path) -> None:
    tmp, log = short_tmp, tmp_path / "node.log"
    supernode = FAILING_SUPERNODE if how == "supernode-fails" else SLEEPING_SUPERNODE
    with log.open("w") as out:
        node = subprocess.Popen([sys.executable, "-c", DRIVER, supernode], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: "task worker" in log.read_text(), 60, log.read_text())
        folders = list(tmp.glob(SOCKET_DIRS))
        assert len(folders) == 1, log.read_text()
        if how == "supernode-fails":
            # restarted twice with the same worker, then the exit code passes through
            assert node.wait(timeout=60) == 3, log.read_text()
            text = log.read_text()
            assert "SuperNode site_a exited with code 3" in text
            assert "restart 1 in 0 s" in text and "restart 2 in 0 s" in text, text
            assert text.count("starting SuperNode site_a") == 3
            assert text.count(f"(task worker {folders[0]}") == 3  # one worker, every start
        else:
            _wait_until(lambda: "worker ready on" in log.read_text(), 60, log.read_text())
            if how == "sigterm-agent":  # `kill PID` / systemd: the agent only
                node.send_signal(signal.SIGTERM)
            else:  # Ctrl-C in a terminal: the whole foreground group
                os.killpg(node.pid, signal.SIGINT)
            assert node.wait(timeout=30) == 0, log.read_text()  # a requested stop is clean
            assert "SuperNode site_a stopped" in log.read_text()
            assert "restart" not in log.read_text()
        _wait_until(lambda: not folders[0].exists(), 15, f"{folders[0]} left behind")
        _wait_until(lambda: not _pids_naming(str(folders[0])), 15, "worker still running")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def test_node_start_stops_the_worker_when_the_supernode_cannot_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from ops import node_agent as agent

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(agent, "prepare", lambda spec: ("site_a", "ok"))
    monkeypatch.setattr(agent, "supernode_command",
                        lambda spec, site_id, socket: [str(tmp_path / "no-flower-supernode")])
    with pytest.raises(FileNotFoundError):
        agent.start(NodeStart(tmp_path, "127.0.0.1:9", clientapp_port=free_port()))
    assert not list(tmp_path.glob(SOCKET_DIRS))
    assert not _pids_naming(str(tmp_path))


def test_models_dir_reaches_the_node_config_the_task_reads(tmp_path: Path) -> None:
    from hospital_node.task import NodeSettings

    models = tmp_path / "published"
    cmd = supernode_command(NodeStart(tmp_path, "127.0.0.1:9092", models_dir=models), "site_a")
    node_cfg = cmd[cmd.index("--node-config") + 1]
    assert f'models-dir="{models.resolve()}"' in node_cfg
    pairs = dict(kv.split("=", 1) for kv in node_cfg.split(" "))
    parsed = {k: v.strip('"') for k, v in pairs.items()}
    assert NodeSettings.from_configs(parsed, {}).models_dir == models.resolve()
    plain = supernode_command(NodeStart(tmp_path, "127.0.0.1:9092"), "site_a")
    assert "models-dir" not in plain[plain.index("--node-config") + 1]

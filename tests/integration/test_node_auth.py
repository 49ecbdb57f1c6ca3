"""SuperNode authentication: `fedsight coordinator start --node-auth` (flower-superlink
--enable-supernode-auth), `fedsight coordinator register-node PUBKEY` (Flower's own
`flwr supernode register`) and `fedsight node start --auth-key`. Command and key-file checks
without processes; then a real TLS SuperLink that admits a registered SuperNode and refuses one
whose key it never saw. Keys and certificates are made here with `cryptography`. No training."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cli.main import main as fedsight_main
from ops.keys import TlsFiles, check_node_public_key
from ops.processes import free_port, pids_talking_to, process_env, stop_group, wait_listening
from ops.superlink import SuperLinkConfig, superlink_command
from tests.key_errors import assert_key_errors
from vocab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write_node_key(folder: Path, name: str, key=None) -> tuple[Path, Path]:
    """node-<name> (OpenSSH private key) and node-<name>.pub, as deploy/gen-certs.sh writes."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"node-{name}", folder / f"node-{name}.pub"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                          ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                                     ser.PublicFormat.OpenSSH))
    return private, public


def write_tls(out: Path) -> Path:
    """ca.crt, server.pem, server.key (the --tls-dir layout) for 127.0.0.1/localhost. EC keys:
    milliseconds, where gen-certs.sh's RSA-4096 takes seconds."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsight-test-ca")])

    def cert(subject: x509.Name, public_key, extensions: list) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(ca_key, hashes.SHA256())

    ca = cert(ca_name, ca_key.public_key(),
              [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                  key.public_key(),
                  [(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(
                      ipaddress.ip_address("127.0.0.1"))]), False)])
    (out / "ca.crt").write_bytes(ca.public_bytes(ser.Encoding.PEM))
    (out / "server.pem").write_bytes(server.public_bytes(ser.Encoding.PEM))
    (out / "server.key").write_bytes(key.private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return out


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tls(tmp_path_factory.mktemp("tls"))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = fedsight_main(list(args))
    return code, capsys.readouterr().err


# ---- commands and key files, no processes ----------------------------------------------------

def test_superlink_command_enables_node_auth_only_with_tls(tls: Path) -> None:
    files = TlsFiles.in_dir(tls)
    cmd = superlink_command(SuperLinkConfig("127.0.0.1", 9092, None, files, node_auth=True))
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--enable-supernode-auth" not in superlink_command(
        SuperLinkConfig("127.0.0.1", 9092, None, files))
    with pytest.raises(ConfigError, match="--node-auth needs --tls-dir"):
        superlink_command(SuperLinkConfig("127.0.0.1", 9092, None, None, node_auth=True))


def test_coordinator_start_node_auth_without_tls_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "coordinator", "start", "--node-auth", "--home",
                        str(tmp_path / "home"))
    assert code == 2 and "--node-auth needs --tls-dir" in err, err


def test_a_registrable_public_key_passes(tmp_path: Path) -> None:
    for curve in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()):
        _, public = write_node_key(tmp_path / curve.name, "h", ec.generate_private_key(curve))
        check_node_public_key(public)


def test_bad_public_key_files_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    private, _ = write_node_key(tmp_path / "k", "hosp1")
    notes = tmp_path / "notes.txt"
    notes.write_text("patient_0042 scan list\n")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
    big = tmp_path / "big.pub"
    big.write_bytes(b"x" * 20000)
    cases = [(tmp_path / "missing.pub", "does not exist or is not a file"),
             (tmp_path, "does not exist or is not a file"),
             (notes, "is not an OpenSSH public key"),
             (private, "is a private key; register the hospital's .pub file"),
             (rsa_pub, "is a key of type RSA; Flower needs ECDSA on a NIST curve"),
             (big, "is larger than 16384 bytes")]
    # the three small files (notes, private key, RSA key) also quote nothing of their contents
    assert assert_key_errors(check_node_public_key, cases, "SuperNode public key") == 3


def test_an_unreadable_public_key_is_named(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _, public = write_node_key(tmp_path / "k", "hosp1")

    def denied(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # chmod 0 does not stop root
    with pytest.raises(ConfigError, match=r"is unreadable \(Permission denied\)"):
        check_node_public_key(public)


def test_register_node_cli_refuses_a_private_key_before_contacting_anyone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private, _ = write_node_key(tmp_path / "k", "hosp1")
    home = tmp_path / "home"
    code, err = run_cli(capsys, "coordinator", "register-node", str(private), "--home",
                        str(home), "--coordinator", f"127.0.0.1:{free_port()}")
    assert code == 2 and f"SuperNode public key {str(private)!r} is a private key" in err, err
    assert not home.exists()


def test_register_node_names_an_unreachable_superlink(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, public = write_node_key(tmp_path / "k", "hosp1")
    port = free_port()  # nothing listens there
    code, err = run_cli(capsys, "coordinator", "register-node", str(public), "--home",
                        str(tmp_path / "home"), "--coordinator", f"127.0.0.1:{port}")
    assert code == 2 and f"the SuperLink did not register {str(public)!r}" in err, err
    assert f"127.0.0.1:{port}" in err and "\n" not in err.strip(), err


# ---- a real SuperLink with node authentication -----------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=7, sizes=(6,)), out)
    return out / "site_a"


@pytest.mark.integration
@pytest.mark.slow
def test_registered_node_joins_and_unregistered_node_is_refused(tls: Path, site: Path,
                                                               tmp_path: Path) -> None:
    port, home, keys = free_port(), tmp_path / "home", tmp_path / "keys"
    good_key, good_pub = write_node_key(keys, "hosp1")
    stranger_key, _ = write_node_key(keys, "stranger")  # never registered
    worker_tmp = tmp_path / "tmp"  # where the stranger's task worker puts its socket folder
    worker_tmp.mkdir()
    env = {**process_env(), "PYTHONPATH": str(REPO)}
    fedsight = [sys.executable, "-m", "cli.main"]
    logs = {name: tmp_path / f"{name}.log" for name in ("link", "hosp1", "stranger")}
    procs: list[subprocess.Popen] = []
    files = contextlib.ExitStack()
    t0 = time.monotonic()

    def start(cmd: list[str], log: str, **env_extra: str) -> subprocess.Popen:
        procs.append(subprocess.Popen(
            cmd, cwd=REPO, env={**env, **env_extra}, stdout=files.enter_context(
                logs[log].open("w")), stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    def node(name: str, key: Path, *extra: str) -> subprocess.Popen:
        return start([*fedsight, "node", "start", "--data", str(site), "--coordinator",
                      f"127.0.0.1:{port}", "--tls", str(tls / "ca.crt"), "--auth-key",
                      str(key), "--port", str(free_port()), "--cache-dir",
                      str(tmp_path / f"cache-{name}"), *extra], name, TMPDIR=str(worker_tmp))

    try:
        start([*fedsight, "coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
               "--home", str(home), "--database", "memory", "--tls-dir", str(tls),
               "--node-auth"], "link")
        wait_listening(port, procs[0])
        reg = subprocess.run(
            [*fedsight, "coordinator", "register-node", str(good_pub), "--coordinator",
             f"127.0.0.1:{port}", "--home", str(home), "--tls", str(tls / "ca.crt")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_id = re.search(r"as SuperNode (\d+)", reg.stdout).group(1)
        again = subprocess.run(reg.args, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120, check=False)
        assert again.returncode == 2 and "did not register" in again.stderr, again.stderr

        node("hosp1", good_key, "--no-worker")
        node("stranger", stranger_key)
        # Refused: flower-supernode logs Flower's exit code 305 and exits with status 1 (its
        # flwr_exit maps every error code to 1); the agent restarts it with backoff (305 is
        # also what an unreachable SuperLink gives), and it stays refused.
        end = time.monotonic() + 120
        while "restart 1 in" not in logs["stranger"].read_text() and time.monotonic() < end:
            assert procs[2].poll() is None, logs["stranger"].read_text()[-2000:]
            time.sleep(0.5)
        assert "SuperNode site_a exited with code 1" in logs["stranger"].read_text(), \
            logs["stranger"].read_text()[-2000:]
        assert "Exit Code: 305" in logs["stranger"].read_text(), logs["stranger"].read_text()
        online: list = []
        end = time.monotonic() + 120
        while time.monotonic() < end and not online:
            assert procs[1].poll() is None, logs["hosp1"].read_text()[-2000:]
            online = _online_nodes(home / "flwr")
            time.sleep(1)
        assert [n["node-id"] for n in online] == [node_id], logs["hosp1"].read_text()[-2000:]
        # Stopping the refused node's agent stops its task worker, which removes its folder.
        procs[2].send_signal(signal.SIGTERM)
        assert procs[2].wait(timeout=30) == 0, logs["stranger"].read_text()[-2000:]
        end = time.monotonic() + 15
        while list(worker_tmp.glob("fedsight-node-*")) and time.monotonic() < end:
            time.sleep(0.2)
        assert not list(worker_tmp.glob("fedsight-node-*"))
        print(f"\nregistered node online, stranger refused after {time.monotonic() - t0:.0f} s")
    finally:
        for p in reversed(procs):
            stop_group(p, port if p is procs[0] else None)
            with contextlib.suppress(ProcessLookupError):  # anything left in its group
                os.killpg(p.pid, signal.SIGKILL)
        files.close()
    assert pids_talking_to(port) == []


def _online_nodes(flwr_home: Path) -> list:
    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "list",
                          "fedsight", "--format", "json"], env=process_env(flwr_home),
                         capture_output=True, text=True, timeout=60, check=False)
    try:
        nodes = json.loads(out.stdout).get("nodes", [])
    except json.JSONDecodeError:
        return []
    return [n for n in nodes if "online" in str(n.get("status", "")).lower()]

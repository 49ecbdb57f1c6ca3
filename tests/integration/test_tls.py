"""TLS in deployment: certificates from deploy/gen-certs.sh, clear errors for bad certificate
paths (node and coordinator), and a real TLS SuperLink that a `fedsight node start --tls` SuperNode
joins while an insecure client is refused. No training: the node only connects."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main as fedsight_main
from ops.flwr_cli import write_connection
from ops.processes import free_port, process_env, stop_group, wait_listening

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen are needed by deploy/gen-certs.sh")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "deploy" / "gen-certs.sh"), str(out), "localhost",
                    "hosp1"], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synth.config import SynthConfig
    from synth.federation import generate

    out = tmp_path_factory.mktemp("fed") / "federation"
    generate(SynthConfig.default(n_sites=1, seed=6, sizes=(6,)), out)
    return out / "site_a"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = fedsight_main(list(args))
    return code, capsys.readouterr().err


def test_gen_certs_writes_a_ca_a_server_pair_and_node_keys(certs: Path) -> None:
    for name in ("ca.crt", "server.pem", "server.key", "node-hosp1", "node-hosp1.pub"):
        assert (certs / name).is_file(), name
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout",
                           "-text"], capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                             str(certs / "server.pem")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_node_start_names_a_missing_or_non_pem_certificate(site: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    missing = tmp_path / "nope" / "ca.crt"
    code, err = run_cli(capsys, "node", "start", "--data", str(site), "--coordinator",
                        "127.0.0.1:9", "--tls", str(missing))
    assert code == 2 and f"TLS CA certificate {str(missing)!r} does not exist" in err
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello")
    code, err = run_cli(capsys, "node", "start", "--data", str(site), "--coordinator",
                        "127.0.0.1:9", "--tls", str(not_pem))
    assert code == 2 and "is not a PEM certificate" in err


def test_node_start_with_a_good_certificate_reports_an_unreachable_coordinator(
        certs: Path, site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    code, err = run_cli(capsys, "node", "start", "--data", str(site), "--coordinator",
                        f"127.0.0.1:{port}", "--tls", str(certs / "ca.crt"))
    assert code == 2 and f"coordinator 127.0.0.1:{port} is unreachable" in err


def test_coordinator_start_names_the_missing_key(certs: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "tls"
    partial.mkdir()
    for name in ("ca.crt", "server.pem"):
        shutil.copy(certs / name, partial / name)
    code, err = run_cli(capsys, "coordinator", "start", "--tls-dir", str(partial), "--home",
                        str(tmp_path / "home"))
    assert code == 2 and "TLS private key" in err and "server.key" in err


@pytest.mark.integration
@pytest.mark.slow
def test_tls_superlink_accepts_a_tls_node_and_refuses_insecure_clients(
        certs: Path, site: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**process_env(), "PYTHONPATH": str(REPO)}
    fedsight = [sys.executable, "-m", "cli.main"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [*fedsight, "coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
             "--home", str(tmp_path / "home"), "--tls-dir", str(certs)],
            cwd=REPO, env=env, stdout=(tmp_path / "link.log").open("w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        wait_listening(port, procs[0])
        procs.append(subprocess.Popen(
            [*fedsight, "node", "start", "--data", str(site), "--coordinator",
             f"localhost:{port}", "--tls", str(certs / "ca.crt"), "--port", str(free_port()),
             "--cache-dir", str(tmp_path / "cache")],
            cwd=REPO, env=env, stdout=(tmp_path / "node.log").open("w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        secure, insecure = tmp_path / "flwr-tls", tmp_path / "flwr-insecure"
        write_connection(secure, f"localhost:{port}", certs / "ca.crt")
        write_connection(insecure, f"127.0.0.1:{port}", None)
        nodes: list = []
        end = time.monotonic() + 120
        while time.monotonic() < end and not nodes:
            assert procs[1].poll() is None, (tmp_path / "node.log").read_text()[-2000:]
            nodes = _online_nodes(secure)
            time.sleep(1)
        assert len(nodes) == 1, (tmp_path / "node.log").read_text()[-2000:]
        refused = _flwr(insecure, "ls", "fedsight", "--format", "json")
        assert refused.returncode != 0 or not json.loads(refused.stdout).get("success", False)
    finally:
        for p in reversed(procs):
            stop_group(p, port if p is procs[0] else None)


def _flwr(flwr_home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args],
                          env=process_env(flwr_home), capture_output=True, text=True,
                          timeout=60, check=False)


def _online_nodes(flwr_home: Path) -> list:
    out = _flwr(flwr_home, "supernode", "list", "fedsight", "--format", "json")
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        return []
    return [n for n in data.get("nodes", []) if "online" in str(n.get("status", "")).lower()]

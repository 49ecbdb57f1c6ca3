"""`fedsight node pull` for real: C-GET from a private Orthanc (Debian package) on loopback,
loaded with the real GE head series; the retrieved study must land as one de-identified case
equal to the originals in pixels and geometry. Orthanc is stopped on every exit path."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dicom_peers import (
    HEAD,
    REPO,
    assert_case_equals_originals,
    env,
    fedsight,
    free_port,
    head_files,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data absent ({HEAD})"),
    pytest.mark.skipif(shutil.which("Orthanc") is None,
                       reason="Orthanc not on PATH (apt-get install orthanc)"),
]
OUR_AE = "FEDSIGHT"


@pytest.fixture
def orthanc(tmp_path: Path):
    """A private Orthanc: own storage, loopback-only HTTP, our AE declared for C-GET."""
    http, dicom = free_port(), free_port()
    home = tmp_path / "orthanc"
    home.mkdir()
    config = {
        "Name": "fedsight-test", "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"), "HttpPort": http, "DicomPort": dicom,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        # Port 1: C-GET answers on the same association, Orthanc never connects to us.
        "DicomModalities": {"fedsight": [OUR_AE, "127.0.0.1", 1]},
        "DicomCheckCalledAet": True, "Plugins": [], "StableAge": 1,
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = (home / "orthanc.log").open("w")
    proc = subprocess.Popen(["Orthanc", str(home / "orthanc.json")], cwd=home, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/system", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("Orthanc did not start:\n"
                                         + (home / "orthanc.log").read_text()) from None
                time.sleep(0.2)
        yield base, dicom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _upload(base: str, files: list[Path]) -> None:
    for f in files:
        req = urllib.request.Request(f"{base}/instances", data=f.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["Status"] in ("Success", "AlreadyStored")


def _pull(tmp_path: Path, dicom_port: int, *query: str) -> tuple[subprocess.CompletedProcess,
                                                                   Path]:
    root = tmp_path / "site"
    cmd = fedsight("node", "pull", "--data", str(root), "--pacs",
                   f"ORTHANC@127.0.0.1:{dicom_port}", "--ae-title", OUR_AE,
                   "--secret-file", str(tmp_path / "keys" / "secret"),
                   "--lookup", str(tmp_path / "keys" / "lookup.sqlite"), *query)
    run = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True,
                         timeout=300, check=False)
    return run, root


def test_pull_study_by_c_get_lands_one_deidentified_case(orthanc, tmp_path: Path) -> None:
    base, dicom_port = orthanc
    _upload(base, head_files())
    orig = pydicom.dcmread(head_files()[0])
    t0 = time.monotonic()
    run, root = _pull(tmp_path, dicom_port, "--study", orig.StudyInstanceUID)
    elapsed = time.monotonic() - t0
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout)
    assert summary["sub_operations"] == {"completed": 28, "failed": 0, "warning": 0}
    assert summary["instances"] == {"stored": 28} and summary["held"] == 0
    (case,) = sorted((root / "ct").iterdir())
    assert summary["cases_published"] == [case.name]
    assert_case_equals_originals(case, head_files())
    with sqlite3.connect(tmp_path / "keys" / "lookup.sqlite") as db:
        assert db.execute("SELECT study_uid FROM cases").fetchall() == [
            (orig.StudyInstanceUID,)]
    for value in (orig.PatientID, orig.StudyInstanceUID, orig.SOPInstanceUID):
        assert value not in run.stderr
    print(f"pulled 28 instances in {elapsed:.1f} s (process start included)")
    # The same study by patient: every instance is a duplicate, the case is unchanged.
    again, _ = _pull(tmp_path, dicom_port, "--patient", orig.PatientID)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["instances"] == {"duplicate": 28}
    assert sorted((root / "ct").iterdir()) == [case] and len(list(case.iterdir())) == 28


def test_pull_of_unknown_study_files_nothing(orthanc, tmp_path: Path) -> None:
    _, dicom_port = orthanc
    run, root = _pull(tmp_path, dicom_port, "--study", "1.2.3.4.5.6.7")
    assert run.returncode == 1  # Orthanc answers "cannot locate" (0xC000)
    assert json.loads(run.stdout)["queries_ok"] == 0
    assert not any((root / "ct").iterdir())

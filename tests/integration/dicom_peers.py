"""Test helpers for the DICOM network entry: free ports, the receiver as a real subprocess,
dcmtk's storescu, and checks that a filed case equals its original series."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
HEAD = DATA / "ct-head-ge"
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
            "Rows", "Columns", "RescaleSlope", "RescaleIntercept", "GantryDetectorTilt")
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID",
               "InstitutionName", "ReferringPhysicianName", "StudyDescription")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedsight(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def env(home: Path) -> dict[str, str]:
    # HOME in the test's tmp: the defaults under ~/.config are never the user's.
    return {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config")}


class Receiver:
    """`fedsight node receive` as a subprocess with its own secret and lookup table."""

    def __init__(self, tmp: Path, *extra: str, quiet_s: float = 1.0) -> None:
        self.tmp = tmp
        self.root = tmp / "site"
        self.secret, self.lookup = tmp / "keys" / "secret", tmp / "keys" / "lookup.sqlite"
        self.staging = tmp / "staging"
        self.port = free_port()
        self.extra, self.quiet_s = extra, quiet_s
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "receive.log"
        self._starts = 0

    def start(self) -> Receiver:
        self._starts += 1
        log = self.tmp / f"receive-{self._starts}.log"
        self.log = log
        cmd = fedsight("node", "receive", "--data", str(self.root), "--port", str(self.port),
                       "--secret-file", str(self.secret), "--lookup", str(self.lookup),
                       "--staging", str(self.staging), "--quiet-seconds", str(self.quiet_s),
                       *self.extra)
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(self.tmp), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"receiver did not start:\n{log.read_text()}")
            time.sleep(0.1)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always leaves no receiver running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("receive-*.log")))

    def cases(self) -> list[Path]:
        ct = self.root / "ct"
        return sorted(p for p in ct.iterdir() if p.is_dir()) if ct.is_dir() else []

    def staged(self) -> int:
        return len(list((self.staging / "studies").glob("*/instances/*.dcm")))


def storescu(port: int, files: list[Path], aet: str = "STORESCU", *, wait: bool = True,
             **kw):
    cmd = ["storescu", "-aet", aet, "-aec", "FEDSIGHT", "127.0.0.1", str(port),
           *map(str, files)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def wait_for_cases(root: Path, n: int = 1, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ct = root / "ct"
        cases = sorted(p for p in ct.iterdir() if p.is_dir()) if ct.is_dir() else []
        if len(cases) >= n:
            return cases
        time.sleep(0.1)
    raise AssertionError(f"no {n} case(s) under {root / 'ct'} after {timeout} s")


def head_files() -> list[Path]:
    return sorted(HEAD.glob("*.dcm"))


def assert_case_equals_originals(case: Path, originals: list[Path]) -> None:
    """Same pixels and geometry per instance (matched by ImagePositionPatient); identifying
    values and every original UID gone; no private tags."""
    got = {}
    for f in case.iterdir():
        ds = pydicom.dcmread(f)
        assert f.name == f"{ds.SOPInstanceUID}.dcm"
        got[tuple(float(v) for v in ds.ImagePositionPatient)] = ds
    assert len(got) == len(originals) == len(list(case.iterdir()))
    for path in originals:
        orig = pydicom.dcmread(path)
        ds = got[tuple(float(v) for v in orig.ImagePositionPatient)]
        assert ds.PixelData == orig.PixelData
        for kw in GEOMETRY:
            assert ds.get(kw) == orig.get(kw), kw
        for kw in IDENTIFYING:
            assert not ds.get(kw), kw
        assert ds.PatientIdentityRemoved == "YES"
        assert not [e for e in ds.iterall() if e.tag.is_private]
        values = " ".join(str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                   "FrameOfReferenceUID", "PatientID"):
            assert str(orig[kw].value) not in values, kw

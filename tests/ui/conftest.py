"""A one-site synthetic federation, a tiny checkpoint and a service over them (module-scoped:
the synthetic site and its preprocessing are the slow part)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from explain.config import ExplainConfig
from multimodal.checkpoint import save_checkpoint
from synth.config import SynthConfig
from synth.federation import generate
from tests.explain.fixtures import tiny_model
from ui.service import DiagnosisService

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed")
    generate(SynthConfig.default(n_sites=1, seed=0, sizes=(6,)), out)
    return out


@pytest.fixture(scope="session")
def site_root(federation: Path) -> Path:
    return federation / "site_a"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tiny_model(), tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="session")
def service(site_root: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> DiagnosisService:
    return DiagnosisService.from_paths(site_root, checkpoint,
                                       tmp_path_factory.mktemp("cache"), ExplainConfig())


def ct_case_with_ct(site_root: Path) -> str:
    return sorted(p.name for p in (site_root / "ct").iterdir())[0]


def zip_series(folder: Path, dest: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"series/{f.name}")
    dest.write_bytes(buf.getvalue())
    return dest

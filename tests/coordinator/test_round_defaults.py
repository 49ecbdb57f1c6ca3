"""Round-config defaults live in one place (vocab.records): the coordinator's RunSettings, the
hospital's RoundConfig and pyproject's [tool.flwr.app.config] (what `flwr run` reads) agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

from coordinator.settings import RunSettings
from hospital_node.task import RoundConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_app_config_is_run_settings_defaults() -> None:
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert app == RunSettings().to_run_config()


def test_hospital_round_defaults_match_the_coordinator() -> None:
    run, rnd = RunSettings(), RoundConfig()
    assert (rnd.local_epochs, rnd.lr, rnd.batch_size) == (run.local_epochs, run.lr,
                                                          run.batch_size)

"""Flower ServerApp: parse the run config once, then run the federation (coordinator.runner)."""

from __future__ import annotations

from vocab.offline import enforce_offline

enforce_offline()  # before flwr reads its telemetry / update-check variables

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from coordinator.runner import run_federated  # noqa: E402
from coordinator.settings import RunSettings  # noqa: E402

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_federated(grid, settings, flwr_run_id=context.run_id)

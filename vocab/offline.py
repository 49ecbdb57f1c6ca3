"""Switch off every outbound call the stack makes by default (DESIGN.md invariant 5).

Called at every entry point (CLI, ClientApp, ServerApp, UI factory) before gradio, flwr or
huggingface_hub are imported: several of them read these variables once, at import time.
"""

from __future__ import annotations

import os
from typing import Final

OFFLINE_ENV: Final[dict[str, str]] = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # gradio: no analytics to api.gradio.app
    "HF_HUB_OFFLINE": "1",  # huggingface_hub (timm, gradio_client): no hub requests
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",  # flwr: no usage events
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Without this the SuperLink runs `uv sync` of the app for every run (downloads, minutes).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # ray (Flower simulation backend): no usage stats
}


def enforce_offline() -> None:
    """Force the offline settings into this process (and every child it starts)."""
    os.environ.update(OFFLINE_ENV)

"""The reliability diagram of a version's federated calibration (meta["calibration"], written
by coordinator.runner from multimodal.calibration.FederatedFit) as PNG bytes (matplotlib, Agg).

Pooled over the hospitals' held-out cases: observed frequency of malignancy against the mean
predicted probability per bin, before temperature scaling (T = 1) and after (cross-fitted T),
with each bin's case count; bins without cases are not drawn.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np


def _points(bins: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.asarray(bins, float).reshape(-1, 3)
    keep = b[:, 0] > 0
    n = b[keep, 0]
    return b[keep, 1] / n, b[keep, 2] / n, n


def reliability_png(calibration: Mapping[str, Any] | None, version: str) -> bytes | None:
    """PNG of the diagram, or None for a version without a federated calibration."""
    if not isinstance(calibration, Mapping) or "reliability" not in calibration:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit in a server
    from matplotlib.figure import Figure

    rel = calibration["reliability"]
    pooled = calibration.get("pooled") or {}
    fig = Figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--", label="perfect calibration")
    for key, colour, label in (("before", "#e6281e", "T = 1"),
                               ("after", "#285ae6",
                                f"T = {float(calibration.get('temperature', 1)):.2f}")):
        conf, freq, n = _points(rel.get(key, []))
        ece = pooled.get(f"ece_{key}")
        ece_txt = f", ECE {ece:.3f}" if isinstance(ece, int | float) else ""
        ax.plot(conf, freq, marker="o", color=colour, label=f"{label}{ece_txt}")
        for x, y, k in zip(conf, freq, n, strict=True):
            ax.annotate(f"{int(k)}", (x, y), fontsize=6, color=colour,
                        xytext=(3, -8), textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability of malignancy")
    ax.set_ylabel("observed frequency (held-out cases)")
    ax.set_title(f"{version}: {int(calibration.get('n', 0))} held-out cases, all hospitals",
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

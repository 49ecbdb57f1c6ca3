"""What `fedsight evaluate` calls: a checkpoint + already-loaded cases -> report files.

Site loading stays with the caller (cli/ via hospital_node.dataset.load_site), so multimodal keeps
importing no hospital_node.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from multimodal.checkpoint import load_checkpoint
from multimodal.data import PreparedCase
from multimodal.evaluate import EvalReport, evaluate


def run_evaluate(
    cases_by_site: dict[str, Sequence[PreparedCase]],
    checkpoint: str | Path,
    out_json: str | Path | None = None,
    threshold: float = 0.5,
    task: str | None = None,
) -> EvalReport:
    """Evaluate the checkpoint (its head for `task`, default its first task) on every site's
    labelled cases; write JSON (+ .md beside it)."""
    model = load_checkpoint(checkpoint, task=task)
    report = evaluate(model, cases_by_site, threshold=threshold)
    if out_json is not None:
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n")
        out.with_suffix(".md").write_text(report.to_markdown() + "\n")
    return report

"""`fedsight evaluate`: score a checkpoint on the held-out split of one or more site data roots."""

from __future__ import annotations

import argparse
from pathlib import Path

from vocab.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="AUC, accuracy, sensitivity/specificity, ECE per site and modality combination",
        description="Evaluate a model checkpoint (model.pt, or a model-store version folder) on "
        "each site's fixed held-out split (hospital_node.splits); write JSON + Markdown.",
    )
    p.add_argument("--model", type=Path, required=True,
                   help="checkpoint file (model.pt) or a model-store version folder holding one")
    p.add_argument("--site", type=Path, action="append", required=True,
                   help="site data root (repeat for several hospitals)")
    p.add_argument("--split", choices=("test", "train", "all"), default="test")
    p.add_argument("--seed", type=int, default=0, help="split seed (the nodes' seed)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold")
    p.add_argument("--task", default=None,
                   help="task to evaluate (its head and the sites' labels for it; default: the "
                   "model's first task)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="report JSON path (.md written beside)")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.checkpoint import read_checkpoint
    from multimodal.cli_eval import run_evaluate
    from multimodal.config import ModelConfig

    ckpt = args.model / "model.pt" if args.model.is_dir() else args.model
    cfg = ModelConfig.from_dict(read_checkpoint(ckpt)["model_config"])
    task = args.task or cfg.task
    if task not in cfg.tasks:
        raise DataError(f"model {ckpt} has no head for task {task!r}; its tasks: "
                        f"{list(cfg.tasks)}")
    cases_by_site = {}
    for root in args.site:
        site = load_site(root, cfg.inputs, args.cache_dir, task=task)
        cases = [c for c in site.cases if c.label is not None
                 and (args.split == "all" or split_of(c.case_id, args.seed) == args.split)]
        if not cases:
            raise DataError(f"site {site.site_id!r} has no labelled cases in split {args.split!r}")
        cases_by_site[site.site_id] = cases
    report = run_evaluate(cases_by_site, ckpt, args.out, threshold=args.threshold, task=task)
    print(report.to_markdown())
    return 0

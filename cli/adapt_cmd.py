"""`fedsight adapt`: train a version for a new task from a hospital's labelled cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from multimodal.adapt import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a stored model to a new task (LoRA, head, full fine-tuning or scratch)",
        description="Train a new version for TASK from the labelled training cases (the nodes' "
        "train split) of one or more site data roots, starting from the base model; the base is "
        "only read. Writes the version into --store with the task, the base and the method.",
    )
    p.add_argument("--base", type=Path, required=True,
                   help="base checkpoint (model.pt) or a model-store version folder")
    p.add_argument("--task", required=True,
                   help="task id (vocab/tasks/<id>.toml) or a task file path")
    p.add_argument("--site", type=Path, action="append", required=True,
                   help="site data root holding labels/<task>.csv (repeat for several)")
    p.add_argument("--store", type=Path, required=True, help="model store to add the version to")
    p.add_argument("--cases", type=int, default=0,
                   help="use a seeded sample of N labelled training cases (default: all)")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--epochs", type=int, default=None, help="epochs (head/lora)")
    p.add_argument("--full-epochs", type=int, default=None, help="epochs (full/scratch)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="the nodes' train/test split seed")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    from multimodal.adapt import AdaptConfig
    from ops.adapt import AdaptRequest, run_adapt

    kw = {"method": args.method, "seed": args.seed}
    for key, value in (("epochs", args.epochs), ("full_epochs", args.full_epochs),
                       ("lora_rank", args.rank)):
        if value is not None:
            kw[key] = value
    req = AdaptRequest(args.base, args.task, tuple(args.site), args.store, args.cases,
                       AdaptConfig.from_dict(kw), args.split_seed, args.cache_dir)
    rep = run_adapt(req)
    print(json.dumps({"version": rep.version_id, "task": rep.task, "method": rep.method,
                      "n_train": rep.n_train, "test_auc": rep.test_auc,
                      "seconds": round(rep.seconds, 1)}, indent=2))
    return 0

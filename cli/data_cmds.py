"""Subcommands about data: `synth` (make a synthetic federation) and `node check`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic federation of hospitals (real DICOM/PNG/CSV) to a folder",
        description="Write one site data root per synthetic hospital, plus _truth/ beside them.",
    )
    p.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument(
        "--tasks", default="nodule",
        help="comma-separated diseases: nodule (always first; labels.csv) and optionally "
        "fibrosis (labels/fibrosis.csv), e.g. --tasks nodule,fibrosis",
    )
    p.add_argument(
        "--sizes", default=None,
        help="comma-separated patients per site, one per --sites (default: the built-in table)",
    )
    p.add_argument(
        "--labelled-fraction", type=float, default=1.0,
        help="share of each site's patients whose labels are written (default 1.0); the others "
        "are unlabelled cases with images and EHR (for self-supervised pretraining)",
    )
    p.set_defaults(func=_synth)

    node = sub.add_parser("node", help="hospital node agent: check data, start a SuperNode")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="NODE_COMMAND")
    c = node_sub.add_parser(
        "check",
        help="validate a site data root and print a report (files are never modified)",
        description="Exit code: 0 usable, 1 no usable labelled case, 2 root missing/unreadable.",
    )
    c.add_argument("data", type=Path, help="site data root (ct/, pathology/, ehr.csv, labels.csv)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument(
        "--cache-dir", type=Path, default=None,
        help="preprocessed cache folder (default: per-user cache, never inside the data root)",
    )
    c.set_defaults(func=_node_check)

    from cli.fhir_cmd import register_import_fhir
    from cli.fl_cmds import register_node_start
    from cli.node_net_cmds import register_node_net
    from cli.privacy_cmd import register_node_privacy

    register_node_start(node_sub)
    register_node_net(node_sub)
    register_import_fhir(node_sub)
    register_node_privacy(node_sub)


def _synth(args: argparse.Namespace) -> int:
    from synth.config import SynthConfig
    from synth.federation import generate
    from vocab.errors import ConfigError

    tasks = tuple(t.strip() for t in args.tasks.split(","))
    try:
        sizes = None if args.sizes is None else tuple(int(x) for x in args.sizes.split(","))
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    cfg = SynthConfig.default(n_sites=args.sites, seed=args.seed, sizes=sizes, tasks=tasks,
                              labelled_fraction=args.labelled_fraction)
    summary = generate(cfg, args.out)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _node_check(args: argparse.Namespace) -> int:
    from hospital_node.check import check_site

    code, text = check_site(args.data, as_json=args.json, cache_dir=args.cache_dir)
    print(text)
    return code

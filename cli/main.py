"""`fedsight` command line: parses arguments at the edge, then calls one package function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vocab.errors import FedsightError
from vocab.offline import enforce_offline


def build_parser() -> argparse.ArgumentParser:
    from cli import adapt_cmd, audit_cmd, data_cmds, demo_cmd, eval_cmd, fl_cmds, ui_cmd

    parser = argparse.ArgumentParser(
        prog="fedsight",
        description="Federated multimodal diagnosis: hospitals train one model, data stays home.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adapt_cmd.register(sub)
    audit_cmd.register(sub)
    data_cmds.register(sub)
    demo_cmd.register(sub)
    eval_cmd.register(sub)
    fl_cmds.register(sub)
    ui_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    enforce_offline()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedsightError as err:
        # Expected failures (bad config, unusable data): one clear line, no traceback.
        print(f"fedsight {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`fedsight node privacy`: print this hospital's privacy ledger and what is left of its budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_node_privacy(node_sub: argparse._SubParsersAction) -> None:
    from cli.fl_cmds import add_privacy_args

    p = node_sub.add_parser("privacy", help="this hospital's privacy ledger: every DP round, "
                            "cumulative epsilon, budget left")
    p.add_argument("--data", type=Path, required=True, help="site data root")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_privacy_args(p)
    p.set_defaults(func=_node_privacy)


def _node_privacy(args: argparse.Namespace) -> int:
    from ops.node_agent import NodeStart, node_ledger
    from vocab.audit import verify
    from vocab.errors import PrivacyRefusal

    ledger = node_ledger(NodeStart(args.data, "unused:1", cache_dir=args.cache_dir,
                                   privacy_budget=args.privacy_budget,
                                   privacy_delta=args.privacy_delta,
                                   privacy_ledger=args.privacy_ledger,
                                   privacy_ledger_key=args.privacy_ledger_key))
    s = ledger.settings
    try:
        entries = ledger.entries()
    except PrivacyRefusal:  # here, at the hospital, the detail may be shown
        try:
            detail = str(verify(s.ledger, ledger._log().key))
        except OSError as e:
            detail = f"{s.ledger}: unreadable ({e.strerror or type(e).__name__})"
        print(f"privacy ledger {s.ledger}: REFUSED - training stops until an operator "
              f"resolves it\n  {detail}")
        return 1
    spent = ledger.spent()
    left = s.budget - spent if s.budget > 0 else None
    if args.json:
        print(json.dumps({"ledger": str(s.ledger), "delta": s.delta, "budget": s.budget or None,
                          "epsilon": spent, "left": left,
                          "rounds": [e.__dict__ for e in entries]}, indent=1))
        return 0
    print(f"privacy ledger {s.ledger} ({len(entries)} DP rounds, delta {s.delta:g})")
    if entries:
        print(f"  {'time (UTC)':<27} {'run':>20} {'round':>5} {'noise':>7} {'q':>7} "
              f"{'steps':>6} {'epsilon':>8}")
        for e in entries:
            print(f"  {e.time[:26]:<27} {e.run:>20} {e.round:>5} {e.noise_multiplier:>7.3f} "
                  f"{e.sample_rate:>7.4f} {e.steps:>6} {e.epsilon:>8.3f}")
    print(f"cumulative epsilon {spent:.3f} at delta {s.delta:g}; "
          + (f"budget {s.budget:g}, left {left:.3f}" if left is not None
             else "no budget set (DP optional at this hospital)"))
    return 0

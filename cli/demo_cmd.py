"""`fedsight demo`: the main job on the embedded default.

Synthesize a federation and check every site; later stages (federated rounds, the clinician app)
are added here as they land, so that one command always shows the whole system.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic federation end to end (the README's main command)")
    p.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="work folder (default demo-out)"
    )
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from hospital_node.check import check_site
    from synth.config import SynthConfig
    from synth.federation import generate

    fed = args.out / "federation"
    if (fed / "federation.json").exists():
        print(f"[demo] reusing synthetic federation in {fed}")
    else:
        print(f"[demo] writing a synthetic federation of {args.sites} hospitals to {fed}")
        generate(SynthConfig.default(n_sites=args.sites, seed=args.seed), fed)
    worst = 0
    for site in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        code, text = check_site(site, as_json=False, cache_dir=args.out / "cache" / site.name)
        print(text)
        worst = max(worst, code)
    return worst

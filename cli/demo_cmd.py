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
    # 150 per site: with the generator's smaller default sizes (90/70/50/40) the federated
    # model stayed near chance (held-out AUC 0.57 after 5 rounds, 0.60 after 12); at 4 x 150 the
    # federated benchmark reaches 0.74 in 6 rounds (docs/benchmarks.md).
    p.add_argument("--patients-per-site", type=int, default=150,
                   help="synthetic patients per hospital (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ui-port", type=int, default=7860,
                   help="clinician app port on 127.0.0.1 (default 7860)")
    p.add_argument("--no-ui", action="store_true", help="do not open the clinician app")
    p.add_argument("--rounds", type=int, default=6,
                   help="federated rounds (Flower simulation runtime; 0 skips them)")
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
        sizes = (args.patients_per_site,) * args.sites
        generate(SynthConfig.default(n_sites=args.sites, seed=args.seed, sizes=sizes), fed)
    worst = 0
    for site in sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_")):
        code, text = check_site(site, as_json=False, cache_dir=args.out / "cache" / site.name)
        print(text)
        worst = max(worst, code)
    if args.rounds > 0 and worst == 0:
        from cli.fl_cmds import demo_rounds

        demo_rounds(args.out, fed, args.rounds, n_sites=args.sites)
    if not args.no_ui:
        _open_clinician_app(args, fed)
    return worst


def _open_clinician_app(args: argparse.Namespace, fed: Path) -> None:
    """Serve the clinician app for the first site on 127.0.0.1 (blocks until Ctrl-C).

    Serves the model store's clinical version when the federated rounds produced one
    (<out>/store), else a quickly trained local model (<out>/local-model.pt, labelled as such).
    """
    from cli.ui_cmd import launch_app

    site = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))[0]
    store = args.out / "store"
    model = store if (store / "clinical.json").is_file() else _local_model(args, site)
    print(f"[demo] clinician app for {site.name}: http://127.0.0.1:{args.ui_port} (Ctrl-C ends)")
    launch_app(site, model, port=args.ui_port, cache_dir=args.out / "cache" / site.name,
               audit_log=args.out / "audit" / f"{site.name}.jsonl")


def _local_model(args: argparse.Namespace, site: Path) -> Path:
    """A model trained on one site only (used until a federated model is in the store)."""
    path = args.out / "local-model.pt"
    if path.exists():
        return path
    from hospital_node.dataset import load_site
    from hospital_node.splits import split_of
    from multimodal.checkpoint import save_checkpoint
    from multimodal.config import ModelConfig, TrainConfig
    from multimodal.evaluate import fit_model_temperature
    from multimodal.model import build_model
    from multimodal.train import train_local

    print(f"[demo] no federated model in {args.out / 'store'} yet: training a local model on "
          f"{site.name} for the app")
    cfg = ModelConfig()
    cases = load_site(site, cfg.inputs, args.out / "cache" / site.name).cases
    model = build_model(cfg, seed=args.seed)
    train_local(model, [c for c in cases if split_of(c.case_id, args.seed) == "train"],
                TrainConfig(epochs=8, stage1_epochs=2, seed=args.seed))
    model.eval()
    fit_model_temperature(model, [c for c in cases if split_of(c.case_id, args.seed) == "test"])
    return save_checkpoint(model, path, meta={"note": "local, single-site demo model"})

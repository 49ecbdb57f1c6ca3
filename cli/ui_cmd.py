"""`fedsight ui`: serve the clinician app for one hospital site (127.0.0.1 by default)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the clinician web app for one site")
    p.add_argument("--site", type=Path, required=True, help="the site's data root")
    p.add_argument("--model", type=Path, required=True,
                   help="model store root (serves the clinical version), a version folder, "
                        "or a checkpoint file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--users", type=Path, default=None,
                   help="users file (name:secret per line); default: $FEDSIGHT_UI_USERS")
    p.add_argument("--cache", type=Path, default=None, help="preprocessing cache folder")
    p.add_argument("--audit-log", type=Path, default=None,
                   help="hospital-local audit log (default $XDG_STATE_HOME/fedsight/<site "
                        "hash>/audit.jsonl; never inside the site root)")
    p.add_argument("--audit-key", type=Path, default=None, metavar="KEY_FILE",
                   help="HMAC key file for the audit log (0600, outside the log's folder; "
                        "default $FEDSIGHT_AUDIT_KEY_FILE)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=_ui)


def _ui(args: argparse.Namespace) -> int:
    launch_app(args.site, args.model, host=args.host, port=args.port, users_file=args.users,
               cache_dir=args.cache, threshold=args.threshold, threads=args.threads,
               audit_log=args.audit_log, audit_key=args.audit_key)
    return 0


def launch_app(site: Path, model: Path, *, host: str = "127.0.0.1", port: int = 7860,
               users_file: Path | None = None, cache_dir: Path | None = None,
               threshold: float = 0.5, threads: int = 2, block: bool = True,
               audit_log: Path | None = None, audit_key: Path | None = None) -> object:
    """Build the service and the app and serve it; returns the app when block=False."""
    import logging

    import torch

    from explain.config import ExplainConfig
    from ui.app import build_app, serve  # enforces offline mode before importing gradio
    from ui.config import UiConfig, audit_log_path
    from ui.service import DiagnosisService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    cfg = UiConfig(host=host, port=port, users=UiConfig.load_users(users_file),
                   audit_log=audit_log_path(site, audit_log), audit_key_file=audit_key)
    audit = cfg.open_audit()
    if audit is not None:
        audit.check()  # a broken log stops the app at start, not at a clinician's first click
    service = DiagnosisService.from_paths(site, model, cache_dir, ExplainConfig(
        threshold=threshold), audit=audit)
    app = build_app(service, cfg)
    print(f"[ui] serving site {service.site_id} with model {service.served.version} on "
          f"http://{host}:{port}" + ("" if cfg.users else " (no login: loopback only)")
          + f"; audit log {cfg.audit_log}", flush=True)
    serve(app, cfg, block=block)
    return app

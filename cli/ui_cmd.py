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
    p.add_argument("--login-failures", type=int, default=5, metavar="N",
                   help="failed sign-ins per user name before it is refused for a back-off")
    p.add_argument("--login-address-failures", type=int, default=20, metavar="N",
                   help="failed sign-ins per client address before it is refused (higher: a "
                        "hospital NAT puts many clinicians behind one address)")
    p.add_argument("--login-backoff", type=float, default=30.0, metavar="SECONDS",
                   help="first back-off; doubles per further failure up to --login-backoff-cap")
    p.add_argument("--login-backoff-cap", type=float, default=900.0, metavar="SECONDS")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold for every served task (default: each task's own "
                        "policy, docs/adaptation.md: a fixed value, or fitted on this site's "
                        "held-out labelled cases; the card says which)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="the nodes' train/test split seed (run config seed): its held-out "
                        "cases fit a task's threshold policy")
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="a task of the version to serve (repeatable; default: every task it "
                        "has, one tab each); a task the version has no head for is refused at "
                        "start")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--triage-cache", type=Path, default=None,
                   help="precomputed worklist cache (default $XDG_STATE_HOME/fedsight/<site "
                        "hash>/triage; never inside the site root)")
    p.add_argument("--no-triage", action="store_true",
                   help="do not precompute the worklist in the background")
    p.add_argument("--rescan", type=float, default=60.0, metavar="SECONDS",
                   help="how often the site is rescanned for new or changed cases")
    p.add_argument("--batch-size", type=int, default=8,
                   help="most cases in one interactive micro-batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="longest wait for a micro-batch to fill after its first request")
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests the server runs at once per event")
    p.set_defaults(func=_ui)


def _ui(args: argparse.Namespace) -> int:
    launch_app(args.site, args.model, host=args.host, port=args.port, users_file=args.users,
               cache_dir=args.cache, threshold=args.threshold, threads=args.threads,
               audit_log=args.audit_log, audit_key=args.audit_key,
               login_limits=_login_limits(args), triage=_triage(args),
               concurrency=args.concurrency, tasks=args.task, split_seed=args.split_seed)
    return 0


def _triage(args: argparse.Namespace) -> object:
    from ui.config import TriageConfig, triage_cache_path

    return TriageConfig(cache_dir=triage_cache_path(args.site, args.triage_cache),
                        background=not args.no_triage, rescan_s=args.rescan,
                        max_batch=args.batch_size, max_wait_ms=args.batch_wait_ms)


def _login_limits(args: argparse.Namespace) -> object:
    from ui.login_limit import LoginLimits  # light module (no gradio): errors before any work

    return LoginLimits(user_failures=args.login_failures,
                       address_failures=args.login_address_failures,
                       backoff_s=args.login_backoff, backoff_cap_s=args.login_backoff_cap)


def launch_app(site: Path, model: Path, *, host: str = "127.0.0.1", port: int = 7860,
               users_file: Path | None = None, cache_dir: Path | None = None,
               threshold: float | None = None, threads: int = 2, block: bool = True,
               audit_log: Path | None = None, audit_key: Path | None = None,
               login_limits: object | None = None, triage: object | None = None,
               concurrency: int = 16, tasks: list[str] | None = None,
               split_seed: int = 0) -> object:
    """Build a service per served task and the app, and serve it; returns the app when
    block=False. tasks: None = every task of the version (its first task first)."""
    import logging

    import torch

    from explain.config import ExplainConfig
    from ui.app import build_app, serve  # enforces offline mode before importing gradio
    from ui.config import TriageConfig, UiConfig, audit_log_path, triage_cache_path
    from ui.login_limit import LoginLimits
    from ui.service import DiagnosisService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    cfg = UiConfig(host=host, port=port, users=UiConfig.load_users(users_file),
                   audit_log=audit_log_path(site, audit_log), audit_key_file=audit_key,
                   login_limits=login_limits if isinstance(login_limits, LoginLimits)
                   else LoginLimits(), concurrency=concurrency)
    audit = cfg.open_audit()
    if audit is not None:
        audit.check()  # a broken log stops the app at start, not at a clinician's first click
    if not isinstance(triage, TriageConfig):  # the default: precomputed, cache by the log
        triage = TriageConfig(cache_dir=triage_cache_path(site))
    def service(task: str | None) -> DiagnosisService:
        return DiagnosisService.from_paths(site, model, cache_dir, ExplainConfig(), audit=audit,
                                           triage=triage, task=task, threshold=threshold,
                                           split_seed=split_seed)

    first = service(tasks[0] if tasks else None)  # refuses a task the version lacks
    rest = tasks[1:] if tasks else [t for t in first.served.tasks if t != first.served.task]
    services = [first, *(service(t) for t in dict.fromkeys(rest) if t != first.served.task)]
    app = build_app(services, cfg)
    print(f"[ui] serving site {first.site_id} with model {first.served.version} (task"
          f"{'s' if len(services) > 1 else ''} "
          f"{', '.join(s.served.task for s in services)}) on "
          f"http://{host}:{port}" + ("" if cfg.users else " (no login: loopback only)")
          + f"; audit log {cfg.audit_log}", flush=True)
    serve(app, cfg, block=block)
    return app

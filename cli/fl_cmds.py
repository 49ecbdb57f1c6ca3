"""Federated-learning subcommands: `coordinator start|register-node|run|schedule`, `models
list|show|promote|rollback`, and the `node start` handler (registered under `node` in
data_cmds)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cli.round_summary import fmt_metrics, print_round, print_run_rounds

DEFAULT_HOME = Path(".fedsight")  # coordinator state: SuperLink db, FLWR_HOME, schedule


def register(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("coordinator", help="coordinator: SuperLink, federated runs, schedule")
    co_sub = co.add_subparsers(dest="coordinator_command", required=True, metavar="SUBCOMMAND")

    s = co_sub.add_parser("start", help="run the SuperLink (foreground) that hospitals join")
    s.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=9092, help="Fleet/Control port (default 9092)")
    s.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state folder (SuperLink db)")
    s.add_argument("--database", default=None, metavar="PATH|memory",
                   help="SuperLink state database (default HOME/superlink.db); 'memory' keeps "
                   "it in memory (loopback tests, benchmarks)")
    _tls_args(s, server=True)
    s.add_argument("--node-auth", action="store_true",
                   help="admit only SuperNodes whose public key was registered "
                   "(`coordinator register-node`); needs --tls-dir")
    s.set_defaults(func=_coordinator_start)

    g = co_sub.add_parser("register-node",
                          help="register a hospital's SuperNode public key (for --node-auth)")
    g.add_argument("public_key", type=Path, metavar="PUBKEY",
                   help="the hospital's OpenSSH ECDSA public key (node-<hospital>.pub)")
    g.add_argument("--coordinator", default="127.0.0.1:9092", help="SuperLink HOST:PORT")
    g.add_argument("--home", type=Path, default=DEFAULT_HOME)
    g.add_argument("--tls", type=Path, default=None, metavar="CA", help="CA certificate (PEM)")
    g.set_defaults(func=_coordinator_register_node)

    r = co_sub.add_parser("run", help="submit one federated run to the SuperLink and wait")
    r.add_argument("--coordinator", default="127.0.0.1:9092", help="SuperLink HOST:PORT")
    r.add_argument("--home", type=Path, default=DEFAULT_HOME)
    r.add_argument("--store", type=Path, default=None,
                   help="model store (default HOME/store); must be reachable by the SuperLink")
    r.add_argument("--rounds", type=int, default=None, help="number of rounds (run config)")
    r.add_argument("--resume", action="store_true",
                   help="continue the latest unfinished run from its last completed round")
    r.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run-config values (TOML scalars), repeatable")
    r.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the run")
    r.add_argument("--app", type=Path, default=None, help="fedsight source folder (Flower app)")
    r.add_argument("--tls", type=Path, default=None, metavar="CA", help="CA certificate (PEM)")
    r.set_defaults(func=_coordinator_run)

    sc = co_sub.add_parser("schedule", help="start runs on a cron-like rule (never two at once)")
    sc.add_argument("--rule", default=None, help='cron rule (default "0 2 1 * *": 02:00 on the '
                    "1st of each month)")
    sc.add_argument("--home", type=Path, default=DEFAULT_HOME)
    sc.add_argument("--once", action="store_true", help="run now if due, then exit")
    sc.add_argument("--history", action="store_true", help="print the run history and exit")
    sc.add_argument("run_args", nargs=argparse.REMAINDER,
                    help="after --: arguments for `fedsight coordinator run`")
    sc.set_defaults(func=_coordinator_schedule)

    m = sub.add_parser("models", help="model store: list, show, promote, rollback")
    m_sub = m.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    for name, help_ in [("list", "every stored version with pooled metrics"),
                        ("show", "one version's metadata (per-hospital metrics)"),
                        ("promote", "make a version the clinical one (checked per hospital)"),
                        ("rollback", "return clinicians to the previous clinical version")]:
        p = m_sub.add_parser(name, help=help_)
        p.add_argument("--store", type=Path, default=DEFAULT_HOME / "store")
        if name in ("show", "promote"):
            p.add_argument("version", help="version id (or a unique prefix / hash prefix)")
        if name == "promote":
            p.add_argument("--metric", default="auc", help="metric compared per hospital")
            p.add_argument("--margin", type=float, default=0.02,
                           help="allowed drop at any hospital (default 0.02)")
            p.add_argument("--max-ece", type=float, default=None,
                           help="also require a federated calibration with pooled ECE <= this")
            p.add_argument("--force", action="store_true", help="promote despite the check")
        if name == "show":
            p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                           help="write the version's reliability diagram (PNG) to FILE")
        p.set_defaults(func=globals()[f"_models_{name}"])


def register_node_start(node_sub: argparse._SubParsersAction) -> None:
    n = node_sub.add_parser("start", help="check the site, then run this hospital's SuperNode")
    n.add_argument("--data", type=Path, required=True, help="site data root")
    n.add_argument("--coordinator", required=True, help="SuperLink HOST:PORT")
    n.add_argument("--tls", type=Path, default=None, metavar="CA",
                   help="CA certificate (PEM) of the coordinator; without it: insecure")
    n.add_argument("--site-id", default="", help="hospital name (default: site.json/folder)")
    n.add_argument("--cache-dir", type=Path, default=None)
    n.add_argument("--port", type=int, default=9094, help="local ClientAppIo port")
    n.add_argument("--no-worker", action="store_true",
                   help="run each task in Flower's per-message process (slower start-up) "
                   "instead of a long-lived local worker")
    n.add_argument("--auth-key", type=Path, default=None, metavar="PRIVATE_KEY",
                   help="this hospital's SuperNode private key (OpenSSH ECDSA, node-<hospital> "
                   "from deploy/gen-certs.sh) when the coordinator uses --node-auth; its .pub "
                   "must be registered there; needs --tls")
    n.add_argument("--models-dir", type=Path, default=None,
                   help="folder of the published model versions this hospital holds (a "
                   "federated adaptation round finds its base version here by content hash)")
    add_privacy_args(n)
    n.set_defaults(func=_node_start)


def add_privacy_args(p: argparse.ArgumentParser) -> None:
    """This hospital's privacy settings (hospital_node.privacy; docs/privacy.md)."""
    p.add_argument("--privacy-budget", type=float, default=0.0, metavar="EPSILON",
                   help="lifetime epsilon budget of this hospital's patients; > 0 also means "
                   "the node trains only with DP-SGD and refuses a round past the budget")
    p.add_argument("--privacy-delta", type=float, default=None, metavar="DELTA",
                   help="delta of the reported epsilon (default 1e-5; must be <= 1/n)")
    p.add_argument("--privacy-ledger", type=Path, default=None, metavar="FILE",
                   help="privacy ledger file, outside the site root (default: in --cache-dir, "
                   "else under $XDG_STATE_HOME/fedsight/privacy)")
    p.add_argument("--privacy-ledger-key", type=Path, default=None, metavar="KEY_FILE",
                   help="HMAC key file (0600) for the ledger's hash chain")


def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="folder with ca.crt, server.pem, server.key (deploy/gen-certs.sh); "
                   "without it the SuperLink runs insecure (loopback tests only)")


def _node_start(args: argparse.Namespace) -> int:
    from ops.node_agent import NodeStart, start

    return start(NodeStart(args.data, args.coordinator, args.tls, args.site_id, args.cache_dir,
                           args.port, worker=not args.no_worker, auth_key=args.auth_key,
                           privacy_budget=args.privacy_budget, privacy_delta=args.privacy_delta,
                           privacy_ledger=args.privacy_ledger,
                           privacy_ledger_key=args.privacy_ledger_key,
                           models_dir=args.models_dir))


def _coordinator_start(args: argparse.Namespace) -> int:
    from ops.keys import TlsFiles
    from ops.processes import source_env
    from ops.superlink import SuperLinkConfig, database_path, superlink_command

    tls = TlsFiles.in_dir(args.tls_dir) if args.tls_dir is not None else None
    args.home.mkdir(parents=True, exist_ok=True)
    database = database_path(args.home, args.database)
    cmd = superlink_command(SuperLinkConfig(args.host, args.port, database, tls,
                                            node_auth=args.node_auth))
    print(f"[coordinator] SuperLink on {args.host}:{args.port} "
          f"({'TLS' if tls else 'INSECURE'}{', registered nodes only' if args.node_auth else ''})"
          f", state {database or 'in memory'}", flush=True)
    os.execve(cmd[0], cmd, source_env())
    return 0


def _coordinator_register_node(args: argparse.Namespace) -> int:
    from ops.flwr_cli import register_node, write_connection
    from ops.keys import check_node_public_key

    check_node_public_key(args.public_key)  # before touching HOME
    flwr_home = args.home.resolve() / "flwr"
    write_connection(flwr_home, args.coordinator, args.tls)
    node_id = register_node(flwr_home, args.public_key)
    print(f"[coordinator] registered {args.public_key} as SuperNode {node_id}; that hospital "
          "starts with `fedsight node start --auth-key <its private key> --tls <CA>`")
    return 0


def _parse_kv(items: list[str]) -> dict[str, Any]:
    import tomllib

    from vocab.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        try:
            out.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--run-config {item!r} is not KEY=VALUE in TOML ({e})") from None
    return out


def _coordinator_run(args: argparse.Namespace) -> int:
    from coordinator.settings import RunSettings
    from coordinator.store import ModelStore
    from ops.flwr_cli import app_dir, run_log, write_connection
    from ops.runs import RunRequest, run_and_wait

    home = args.home.resolve()
    store = (args.store or home / "store").resolve()
    overrides = {"store-dir": str(store), **_parse_kv(args.run_config)}
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    if args.resume:
        overrides["resume"] = True
    RunSettings.from_run_config(overrides)  # fail here, not inside the SuperLink
    flwr_home = home / "flwr"
    write_connection(flwr_home, args.coordinator, args.tls)
    before = {v.id for v in ModelStore(store).list_versions()}
    resumed = ModelStore(store).latest_unfinished_run() if args.resume else None
    done_before = int(resumed["rounds_completed"]) if resumed else 0
    run_id, status = run_and_wait(
        RunRequest(args.app or app_dir(), flwr_home, store, overrides, args.timeout,
                   resume=args.resume),
        say=lambda line: print(f"[coordinator] {line}", flush=True))
    log_file = home / "logs" / f"run-{run_id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(run_log(flwr_home, run_id))
    # Every round this Flower run did, with every selected hospital named and its outcome
    # (also rounds that stored no version).
    metas = {v.id: v.meta for v in ModelStore(store).list_versions() if v.id not in before}
    stored = ModelStore(store).run_with_flwr_id(run_id)
    if stored is not None:
        print_run_rounds(stored, metas, "[coordinator]", after_round=done_before)
    print(f"[coordinator] run {run_id}: {status} (ServerApp log: {log_file})")
    return 0 if status == "finished:completed" else 1


def _coordinator_schedule(args: argparse.Namespace) -> int:
    import subprocess

    from ops.processes import process_env
    from ops.schedule import DEFAULT_RULE, CronRule, Scheduler

    rule = CronRule.parse(args.rule or DEFAULT_RULE)
    run_args = [a for a in args.run_args if a != "--"]
    cmd = [sys.executable, "-m", "cli.main", "coordinator", "run", "--home", str(args.home),
           *run_args]

    def job() -> int:
        return subprocess.run(cmd, env=process_env(), check=False).returncode

    sched = Scheduler(rule, args.home / "schedule", job)
    if args.history:
        print(json.dumps(sched.history(), indent=2))
        return 0
    print(f"[schedule] rule {rule.text!r}; next run {sched.next_due().isoformat()}", flush=True)
    if args.once:
        entry = sched.tick()
        print(json.dumps(entry) if entry else "[schedule] not due")
        return 0
    sched.run_forever()
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from coordinator.store import ModelStore

    store = ModelStore(args.store)
    clinical = store.clinical().get("version")
    versions = store.list_versions()
    if not versions:
        print(f"no versions in {args.store}")
        return 0
    for v in versions:
        mark = "*" if v.id == clinical else " "
        m = v.meta
        print(f"{mark} {v.id}  run {m.get('run_id')}  round {m.get('round')}  "
              f"{m.get('strategy')}/{m.get('aggregation')}  "
              f"{fmt_metrics(m.get('metrics', {}).get('pooled', {}))}")
    print("(* = clinical)")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from coordinator.store import ModelStore

    v = ModelStore(args.store).get(args.version)
    print(json.dumps({"path": str(v.path), **v.meta}, indent=2, sort_keys=True))
    if args.plot is not None:
        from ui.reliability import reliability_png

        png = reliability_png(v.meta.get("calibration"), v.id)
        if png is None:
            print(f"version {v.id} has no federated calibration: no reliability diagram",
                  file=sys.stderr)
            return 1
        args.plot.write_bytes(png)
        print(f"reliability diagram written to {args.plot}", file=sys.stderr)
    return 0


def _models_promote(args: argparse.Namespace) -> int:
    from coordinator.store import ModelStore

    v = ModelStore(args.store).promote(args.version, args.metric, args.margin, args.force,
                                       max_ece=args.max_ece)
    print(f"version {v.id} is now clinical")
    return 0


def _models_rollback(args: argparse.Namespace) -> int:
    from coordinator.store import ModelStore

    v = ModelStore(args.store).rollback()
    print(f"rolled back: version {v.id} is clinical again")
    return 0


def demo_rounds(out: Path, fed: Path, rounds: int, n_sites: int) -> None:
    """Federated rounds of the demo on Flower's simulation runtime (one virtual SuperNode per
    synthetic hospital), every round stored in <out>/store, the best final version promoted."""
    from coordinator.store import ModelStore, StoreError
    from ops.cluster import simulate

    store_dir = (out / "store").resolve()
    run_config = {"num-rounds": rounds, "federation-dir": str(fed.resolve()),
                  "cache-dir": str((out / "cache").resolve()), "store-dir": str(store_dir),
                  "run-name": "demo"}
    sites = [p for p in fed.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    print(f"[demo] {rounds} federated rounds over {len(sites)} hospitals (Flower simulation)")
    res = simulate(out / "coordinator", run_config, num_nodes=len(sites), cpus_per_node=1)
    store = ModelStore(store_dir)
    versions = [v for v in store.list_versions()
                if v.meta.get("run_id", "").endswith(f"-{res.run_id}")]
    for v in versions:
        print_round(v.meta)
    print(f"[demo] run {res.run_id}: {res.status} in {res.seconds:.0f} s")
    if res.status != "finished:completed" or not versions:
        print(f"[demo] federated run failed; see {out / 'coordinator' / 'superlink.log'}")
        return
    try:
        v = store.promote(versions[-1].id)
        print(f"[demo] version {v.id} promoted for clinical use")
    except StoreError as e:
        print(f"[demo] kept the clinical version: {e}")

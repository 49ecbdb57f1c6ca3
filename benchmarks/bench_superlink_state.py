"""SuperLink state under load (issue 11): a real deployment on 127.0.0.1 (SuperLink with its
state in a SQLite file, one supervised SuperNode per synthetic hospital) runs federated runs
while CPU hogs keep every core busy; counts failed runs and "database is locked" errors.

    python benchmarks/bench_superlink_state.py --mode stock --out /tmp/bsl [--runs 2]
        [--rounds 3] [--sites 3] [--hogs 4]
    python benchmarks/bench_superlink_state.py --mode fedsight --out /tmp/bsl ...

--mode stock: Flower's own `flower-superlink --database FILE` (5 s busy timeout, deferred
transactions); --mode fedsight: `fedsight coordinator start` (ops.superlink_main: 60 s busy
timeout, BEGIN IMMEDIATE, stale runs stopped). Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ops.cluster import Deployment, wait_nodes  # noqa: E402
from ops.flwr_cli import (  # noqa: E402
    RunFailed,
    stop_run,
    submit_run,
    wait_run,
    write_connection,
)
from ops.processes import (  # noqa: E402
    BINDIR,
    free_port,
    pids_naming,
    source_env,
    wait_listening,
)

TINY_MODEL = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_experts": 4, "top_k": 2,
              "expert_hidden": 16, "ct_channels": [8], "ehr_hidden": 8}
LOCKED = "database is locked"


class StockDeployment(Deployment):
    """Flower's flower-superlink started directly, as before issue 11."""

    def start_superlink(self) -> None:
        cmd = [str(BINDIR / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
               str(self.port), "--disable-runtime-dependency-installation", "--database",
               str(Path(self.database).resolve())]
        with (self.home / "superlink.log").open("a") as log:
            self.superlink = subprocess.Popen(cmd, env=source_env(self.flwr_home), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(self.port, self.superlink)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["stock", "fedsight"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=4, help="busy-loop processes (CPU load)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    from synth.config import SynthConfig
    from synth.federation import generate

    fed = args.out / f"fed-{args.sites}"
    if not fed.is_dir():
        generate(SynthConfig.default(n_sites=args.sites, seed=11, sizes=(8,) * args.sites), fed)
    sites = sorted(p for p in fed.iterdir() if p.is_dir() and not p.name.startswith("_"))
    home = args.out / f"{args.mode}-{time.strftime('%H%M%S')}"
    home.mkdir(parents=True)
    flwr_home, port = home / "flwr", free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}", None)
    cls = StockDeployment if args.mode == "stock" else Deployment
    dep = cls(home, flwr_home, port, str(home / "superlink.db"))
    hogs: list[subprocess.Popen] = []
    results: list[dict[str, Any]] = []
    try:
        dep.start_superlink()
        dep.start_nodes(sites, args.out / "cache")
        wait_nodes(flwr_home, len(sites), dep.nodes or [], 300)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.hogs)]
        for i in range(args.runs):
            cfg = {"num-rounds": args.rounds, "local-epochs": 1, "min-hospitals": len(sites),
                   "model-json": json.dumps(TINY_MODEL), "run-name": f"bsl{i}",
                   "store-dir": str(home / "store"), "round-timeout": 600.0}
            t0 = time.monotonic()
            run_id = 0
            try:
                run_id = submit_run(REPO, flwr_home, cfg)
                status = wait_run(flwr_home, run_id, args.timeout)
            except RunFailed as e:
                status = f"error: {e}"
                if run_id:  # never two runs at once: the next one would share the nodes
                    stop_run(flwr_home, run_id)
            log = (home / "superlink.log").read_text(errors="replace")
            res = {"mode": args.mode, "run": i, "status": status,
                   "seconds": round(time.monotonic() - t0, 1),
                   "locked_errors_so_far": log.count(LOCKED),
                   "superexec_alive": bool(pids_naming("flower-superexec",
                                                       f"127.0.0.1:{port}"))}
            res["rounds_stored_total"] = len(list((home / "store" / "versions").glob("0*")))
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        dep.stop()
    ok = sum(r["status"] == "finished:completed" for r in results)
    summary = {"mode": args.mode, "runs": len(results), "completed": ok,
               "failed": len(results) - ok,
               "locked_errors": (home / "superlink.log").read_text(errors="replace")
               .count(LOCKED), "rounds": args.rounds, "sites": args.sites, "hogs": args.hogs,
               "home": str(home)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

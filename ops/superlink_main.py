"""`python -m ops.superlink_main [--busy-timeout S] [--keep-stale-runs] -- FLOWER-ARGS`:
Flower's own `flower-superlink` entry point, with two fixes for a persistent (file) database.

Pinned to flwr 1.42.0 (docs/operations.md says why each is needed):
1. SQLite connections wait up to --busy-timeout seconds for a lock instead of Flower's 5 s
   (`flwr.supercore.constant.SQLITE_PRAGMAS`, applied by `flwr.supercore.sql_mixin` on every
   connect), and every transaction takes the write lock when it begins (BEGIN IMMEDIATE): a
   deferred transaction that read first and then writes cannot wait for the lock in WAL mode and
   fails at once with "database is locked" when another connection wrote in between.
2. Runs left pending/starting/running in the database by the previous SuperLink are stopped
   before it serves: Flower would start a pending run by itself, with nobody waiting for it.
   `fedsight coordinator run --resume` continues such a run from the model store instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("fedsight.superlink")
ACTIVE = ("pending", "starting", "running")


def tune_sqlite(busy_timeout_s: float, immediate: bool = True) -> None:
    """Patch Flower's SQL layer (before any engine exists) for file databases."""
    from flwr.supercore import sql_mixin
    from sqlalchemy import event

    ms = str(int(busy_timeout_s * 1000))
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (k, ms if k == "busy_timeout" else v) for k, v in sql_mixin.SQLITE_PRAGMAS)
    if not immediate:
        return
    flower_create_engine = sql_mixin.create_engine

    def create_engine(url: Any, **kwargs: Any) -> Any:
        engine = flower_create_engine(url, **kwargs)
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            # SQLAlchemy's recipe for pysqlite: the driver must not open transactions itself
            # (it would BEGIN DEFERRED before the first write only), we begin them.
            event.listen(engine, "connect", _driver_autocommit)
            event.listen(engine, "begin", _begin_immediate)
        return engine

    sql_mixin.create_engine = create_engine


def _driver_autocommit(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None


def _begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def stop_stale_runs(database: str) -> list[int]:
    """Stop every unfinished run in the database through Flower's own LinkState; returns their
    Flower run ids."""
    from flwr.superlink.config_loader import (
        get_federation_manager,
        get_objectstore_linkstate_factories,
    )

    _, factory = get_objectstore_linkstate_factories(
        database, get_federation_manager(is_simulation=False))
    state = factory.state()
    stale = [int(r.run_id) for r in state.get_run_info(statuses=list(ACTIVE))]
    return [run_id for run_id in stale if state.stop_run(run_id)]


def _flower_arg(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ops.superlink_main")
    p.add_argument("--busy-timeout", type=float, default=60.0,
                   help="seconds a SQLite connection waits for a lock (Flower: 5)")
    p.add_argument("--keep-stale-runs", action="store_true",
                   help="leave unfinished runs of the previous SuperLink as they are")
    p.add_argument("--no-immediate", action="store_true",
                   help="keep Flower's deferred transactions (for benchmarks only)")
    p.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    flower_args = args.flower_args
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    database = _flower_arg(flower_args, "--database")
    if database and database != ":memory:":
        tune_sqlite(args.busy_timeout, immediate=not args.no_immediate)
        if not args.keep_stale_runs:
            stopped = stop_stale_runs(database)
            if stopped:
                log.info("stopped %d run(s) the previous SuperLink left unfinished: %s "
                         "(continue with `fedsight coordinator run --resume`)",
                         len(stopped), ", ".join(map(str, stopped)))
    sys.argv = ["flower-superlink", *flower_args]
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()

"""The SuperLink launcher (ops.superlink_main) on Flower's real SQL state, in a fresh process
(its patches are process-wide): 60 s busy timeout on every connection, transactions that take
the write lock when they begin, and the command line `coordinator start` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.keys import TlsFiles
from ops.processes import source_env
from ops.superlink import SuperLinkConfig, database_path, superlink_command

PROBE = """
import json, sqlite3, sys
from ops.superlink_main import stop_stale_runs, tune_sqlite
tune_sqlite(float(sys.argv[2]), immediate=sys.argv[3] == "1")
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
_, f = get_objectstore_linkstate_factories(sys.argv[1], get_federation_manager(is_simulation=False))
state = f.state()
with state.session() as s:
    busy = s.connection().exec_driver_sql("PRAGMA busy_timeout").scalar()
    mode = s.connection().exec_driver_sql("PRAGMA journal_mode").scalar()
    other = sqlite3.connect(sys.argv[1], timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # a second writer while our transaction is open
        locked = False
    except sqlite3.OperationalError:
        locked = True
    other.close()
print(json.dumps({"busy": busy, "mode": mode, "write_lock_at_begin": locked,
                  "stale": stop_stale_runs(sys.argv[1])}))
"""


def _probe(db: Path, busy: float, immediate: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(db), str(busy),
                          "1" if immediate else "0"], env=source_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes run Flower's schema migrations (~10-30 s each)
def test_file_database_waits_60_s_and_locks_at_begin(tmp_path: Path) -> None:
    fixed = _probe(tmp_path / "a.db", 60, immediate=True)
    assert fixed == {"busy": 60000, "mode": "wal", "write_lock_at_begin": True, "stale": []}
    # Flower's own settings, for contrast: 5 s and deferred transactions.
    stock = _probe(tmp_path / "b.db", 5, immediate=False)
    assert stock["busy"] == 5000 and stock["write_lock_at_begin"] is False


def test_superlink_command_runs_flower_through_the_launcher(tmp_path: Path) -> None:
    assert database_path(tmp_path, None) == tmp_path / "superlink.db"
    assert database_path(tmp_path, "memory") is None
    cmd = superlink_command(SuperLinkConfig("0.0.0.0", 9092, tmp_path / "s.db"))
    assert cmd[1:3] == ["-m", "ops.superlink_main"]
    flower = cmd[cmd.index("--") + 1:]
    assert flower[:4] == ["--host", "0.0.0.0", "--port", "9092"]
    assert ["--database", str((tmp_path / "s.db").resolve())] == \
        flower[flower.index("--database"):flower.index("--database") + 2]
    assert flower[-1] == "--insecure"
    assert "--database" not in superlink_command(SuperLinkConfig("127.0.0.1", 1, None))
    tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "server.pem", tmp_path / "server.key")
    for p in (tls.ca, tls.cert, tls.key):
        p.write_text("-----BEGIN X-----\n")
    cmd = superlink_command(SuperLinkConfig("127.0.0.1", 1, None, tls, node_auth=True))
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd

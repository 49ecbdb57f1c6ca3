"""`fedsight coordinator schedule`: --once starts `coordinator run` when a slot is due, records
it (with the run's exit code), never runs a slot twice, and skips while another run holds the
lock. The started run fails fast here (an unknown run-config key) - the schedule is under test."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cli.main import main as fedsight_main
from ops.schedule import RunLock


def schedule(home: Path, *extra: str, rule: str = "* * * * *") -> list[str]:
    return ["coordinator", "schedule", "--home", str(home), "--rule", rule, *extra]


def test_schedule_once_runs_a_due_slot_once_and_records_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # `python -m cli.main` for the job
    home = tmp_path / "coord"
    # An hourly slot 30 minutes ago: the next one is 30 minutes away, however long the
    # started job takes on a loaded machine (a per-minute rule made the next slot due during it).
    slot = datetime.now() - timedelta(minutes=30)
    rule = f"{slot.minute} * * * *"
    assert fedsight_main(schedule(home, "--once", rule=rule)) == 0
    assert "not due" in capsys.readouterr().out  # first call: counting starts now
    since = json.loads((home / "schedule" / "since.json").read_text())["since"]
    earlier = datetime.fromisoformat(since) - timedelta(minutes=45)
    (home / "schedule" / "since.json").write_text(json.dumps({"since": earlier.isoformat()}))

    assert fedsight_main(schedule(home, "--once", "--", "--run-config", "no-such-key=1",
                                  rule=rule)) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry["status"] == "failed" and entry["exit_code"] == 2
    assert entry["due"] == slot.replace(second=0, microsecond=0).isoformat()
    assert fedsight_main(schedule(home, "--once", rule=rule)) == 0
    assert "not due" in capsys.readouterr().out  # that slot ran already

    assert fedsight_main(schedule(home, "--history")) == 0
    history = json.loads(capsys.readouterr().out)
    assert [h["status"] for h in history] == ["failed"]
    assert not (home / "schedule" / "run.lock").exists()


def test_schedule_once_skips_while_a_run_holds_the_lock(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "coord"
    (home / "schedule").mkdir(parents=True)
    earlier = datetime.now() - timedelta(minutes=3)
    (home / "schedule" / "since.json").write_text(json.dumps({"since": earlier.isoformat()}))
    with RunLock(home / "schedule" / "run.lock"):
        assert fedsight_main(schedule(home, "--once")) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry["status"] == "skipped-busy" and f"pid {os.getpid()}" in entry["reason"]

"""The monthly schedule (ops/schedule.py): croniter rules with cron's semantics, the history
(a slot runs once, missed slots catch up once) and the overlap lock."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ops.schedule import CronRule, RunLock, ScheduleBusy, Scheduler
from vocab.errors import ConfigError


def test_cron_rule_monthly_default() -> None:
    rule = CronRule.parse("0 2 1 * *")
    assert rule.next_after(datetime(2026, 1, 15, 9, 0)) == datetime(2026, 2, 1, 2, 0)
    assert rule.next_after(datetime(2026, 12, 1, 2, 0)) == datetime(2027, 1, 1, 2, 0)
    assert CronRule.parse("*/15 * * * 1-5").next_after(datetime(2026, 3, 7, 10, 1)) == \
        datetime(2026, 3, 9, 0, 0)  # Saturday -> Monday 00:00
    # cron's rule for two restricted day fields: either matches (the 13th or any Friday)
    assert CronRule.parse("0 0 13 * 5").next_after(datetime(2026, 3, 1)) == \
        datetime(2026, 3, 6, 0, 0)
    for bad in ("0 2 1 *", "0 25 * * *", "x 2 1 * *", "0 0 0 2 1 * *", "0 2 31 2 *"):
        with pytest.raises(ConfigError):
            CronRule.parse(bad)


class FakeClock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def test_scheduler_runs_when_due_once_and_records_history(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 1, 20, 12, 0))
    runs: list[datetime] = []

    def job() -> int:
        runs.append(clock.t)
        clock.t += timedelta(hours=1)  # a run takes an hour
        return 0

    sched = Scheduler(CronRule.parse("0 2 1 * *"), tmp_path, job, clock=clock)
    assert sched.tick() is None  # not due before Feb 1st 02:00
    clock.t = datetime(2026, 2, 1, 2, 0)
    entry = sched.tick()
    assert entry is not None and entry["status"] == "completed"
    assert sched.tick() is None  # same slot never runs twice
    clock.t = datetime(2026, 5, 3, 0, 0)  # scheduler was down for March and April
    assert sched.tick()["due"] == "2026-05-01T02:00:00"  # catches up once, with the latest
    assert sched.tick() is None
    assert [h["status"] for h in sched.history()] == ["completed", "completed"]
    assert len(runs) == 2


def test_scheduler_never_starts_two_runs(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 2, 1, 2, 0))
    sched = Scheduler(CronRule.parse("0 2 1 * *"), tmp_path, lambda: 0, clock=clock,
                      since=datetime(2026, 1, 1))
    lock = RunLock(tmp_path / "run.lock")
    lock.acquire()  # another run (this very process) is in progress
    try:
        entry = sched.tick()
        assert entry["status"] == "skipped-busy" and str(os.getpid()) in entry["reason"]
    finally:
        lock.release()
    with pytest.raises(ScheduleBusy), RunLock(tmp_path / "x.lock"):
        RunLock(tmp_path / "x.lock").acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "run.lock").write_text("999999999")
    with RunLock(tmp_path / "run.lock"):
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())

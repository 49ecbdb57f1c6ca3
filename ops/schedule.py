"""Monthly rounds: a cron rule (croniter), a run history, and a lock so two runs never overlap.

Operators use the systemd timer (deploy/systemd/fedsight-schedule.timer) which calls
`fedsight coordinator schedule --once`; `run_forever` is for hosts without systemd.
`Scheduler.tick()` starts the job when the rule has come due since the last recorded start and
returns what it did. Clock, sleep and job are injected, so tests drive months in milliseconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from croniter import croniter
from croniter.croniter import CroniterError

from vocab.errors import ConfigError, FedsightError

DEFAULT_RULE = "0 2 1 * *"  # 02:00 on the 1st of every month


class ScheduleBusy(FedsightError):
    """Another run holds the lock."""


@dataclass(frozen=True)
class CronRule:
    """A 5-field cron rule (minute hour day-of-month month day-of-week) with cron's semantics,
    as croniter implements them (when both day fields are restricted a time matches either)."""

    text: str

    @classmethod
    def parse(cls, text: str) -> CronRule:
        if len(text.split()) != 5:  # croniter also takes 6-7 fields (seconds, years)
            raise ConfigError(f"cron rule needs 5 fields (minute hour day month weekday), "
                              f"got {text!r}")
        try:
            croniter(text, datetime(2000, 1, 1)).get_next(datetime)
        except (CroniterError, ValueError, KeyError) as e:
            raise ConfigError(f"cron rule {text!r} is not valid: {e}") from None
        return cls(text)

    def next_after(self, t: datetime) -> datetime:
        """First matching minute strictly after t."""
        return croniter(self.text, t.replace(second=0, microsecond=0)).get_next(datetime)


class RunLock:
    """A lock file created with O_EXCL holding the owner's pid; a lock whose pid is gone is
    stale and taken over."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise ScheduleBusy(f"a run is in progress (pid {owner}, lock "
                                       f"{self.path})") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise ScheduleBusy(f"could not take lock {self.path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Scheduler:
    rule: CronRule
    state_dir: Path  # holds history.json and run.lock
    job: Callable[[], int]  # starts one federated run; returns its exit code
    clock: Callable[[], datetime] = datetime.now
    sleep: Callable[[float], None] = time.sleep
    # No history yet: the first due time is the first after `since`. Default: when this state
    # folder was first scheduled (remembered in since.json, so `--once` from a system timer
    # becomes due one slot after its first call instead of never).
    since: datetime | None = None

    def __post_init__(self) -> None:
        if self.since is None:
            self.since = self._first_start()

    def _first_start(self) -> datetime:
        path = self.state_dir / "since.json"
        if path.is_file():
            try:
                return datetime.fromisoformat(json.loads(path.read_text())["since"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"schedule state {path} is corrupt ({e!r}); delete it to "
                                  "start counting from now") from None
        now = self.clock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"since": now.isoformat()}) + "\n")
        return now

    @property
    def history_path(self) -> Path:
        return self.state_dir / "history.json"

    def history(self) -> list[dict[str, Any]]:
        if not self.history_path.is_file():
            return []
        return json.loads(self.history_path.read_text())

    def _append(self, entry: dict[str, Any]) -> None:
        hist = self.history() + [entry]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.history_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(hist, indent=2))
        os.replace(tmp, self.history_path)

    def next_due(self) -> datetime:
        """Next due time after the last recorded one (or after `since` if there is none).
        A due time missed while the scheduler was down runs once, not once per missed slot."""
        hist = self.history()
        last = datetime.fromisoformat(hist[-1]["due"]) if hist else (self.since or self.clock())
        due = self.rule.next_after(last)
        now = self.clock()
        while (later := self.rule.next_after(due)) <= now:
            due = later  # several slots missed: catch up with the latest only
        return due

    def tick(self) -> dict[str, Any] | None:
        """Run the job if it is due; returns the history entry it wrote (None if not due)."""
        due = self.next_due()
        now = self.clock()
        if now < due:
            return None
        entry: dict[str, Any] = {"due": due.isoformat(), "started": now.isoformat()}
        try:
            with RunLock(self.state_dir / "run.lock"):
                code = self.job()
                entry.update(status="completed" if code == 0 else "failed", exit_code=code)
        except ScheduleBusy as e:
            entry.update(status="skipped-busy", reason=str(e))
        entry["finished"] = self.clock().isoformat()
        self._append(entry)
        return entry

    def run_forever(self, max_sleep: float = 3600.0, stop: Callable[[], bool] = lambda: False
                    ) -> None:
        while not stop():
            self.tick()
            wait = (self.next_due() - self.clock()).total_seconds()
            self.sleep(min(max(wait, 1.0), max_sleep))

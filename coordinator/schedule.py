"""Monthly rounds: a cron-like rule, a run history, and a lock so two runs never overlap.

`Scheduler.tick()` starts the job when the rule has come due since the last recorded start and
returns what it did; `run_forever` ticks and sleeps. Clock, sleep and job are injected, so tests
drive months of schedule in milliseconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from vocab.errors import ConfigError, FedsightError

DEFAULT_RULE = "0 2 1 * *"  # 02:00 on the 1st of every month
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12),
           ("weekday", 0, 6))


class ScheduleBusy(FedsightError):
    """Another run holds the lock."""


@dataclass(frozen=True)
class CronRule:
    """minute hour day-of-month month day-of-week; each field `*`, `N`, `A-B`, `*/S`, `A-B/S`
    or a comma list of those. Day-of-week 0 = Sunday. As in cron, when both day fields are
    restricted a time matches either."""

    text: str
    sets: tuple[frozenset[int], ...]
    day_any: bool
    weekday_any: bool

    @classmethod
    def parse(cls, text: str) -> CronRule:
        parts = text.split()
        if len(parts) != 5:
            raise ConfigError(f"cron rule needs 5 fields (minute hour day month weekday), "
                              f"got {text!r}")
        sets = tuple(_parse_field(p, name, lo, hi)
                     for p, (name, lo, hi) in zip(parts, _FIELDS, strict=True))
        return cls(text, sets, parts[2] == "*", parts[4] == "*")

    def matches(self, t: datetime) -> bool:
        minute, hour, day, month, weekday = self.sets
        if t.minute not in minute or t.hour not in hour or t.month not in month:
            return False
        dom, dow = t.day in day, (t.isoweekday() % 7) in weekday
        if self.day_any or self.weekday_any:
            return dom and dow
        return dom or dow

    def next_after(self, t: datetime) -> datetime:
        """First matching minute strictly after t (searches up to 5 years)."""
        cand = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = cand + timedelta(days=366 * 5)
        while cand < end:
            if cand.month not in self.sets[3]:
                cand = (cand.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_ok(cand):
                cand = cand.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if cand.hour not in self.sets[1]:
                cand = cand.replace(minute=0) + timedelta(hours=1)
                continue
            if cand.minute in self.sets[0]:
                return cand
            cand += timedelta(minutes=1)
        raise ConfigError(f"cron rule {self.text!r} never matches")

    def _day_ok(self, t: datetime) -> bool:
        dom, dow = t.day in self.sets[2], (t.isoweekday() % 7) in self.sets[4]
        return dom and dow if (self.day_any or self.weekday_any) else dom or dow


def _parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        rng, _, step_s = item.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if rng == "*":
                a, b = lo, hi
            elif "-" in rng:
                a_s, b_s = rng.split("-", 1)
                a, b = int(a_s), int(b_s)
            else:
                a = b = int(rng)
        except ValueError:
            raise ConfigError(f"cron {name} field {text!r}: {item!r} is not a number, range "
                              "or step") from None
        if not (lo <= a <= b <= hi) or step < 1:
            raise ConfigError(f"cron {name} field {text!r}: {item!r} outside {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


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

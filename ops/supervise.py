"""Keep one child process running: restart it on any exit with capped exponential backoff, pass
SIGTERM/SIGINT on to it and stop. The node agent supervises flower-supernode with it, so a
SuperLink restart (after which every SuperNode exits) never takes a hospital offline for good."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (1-based): first * factor**(n-1), at most cap. A child that ran
    for healthy_after seconds was healthy: the next failure starts from `first` again."""

    first: float = 2.0
    cap: float = 60.0
    factor: float = 2.0
    healthy_after: float = 120.0
    max_restarts: int = 0  # 0 = forever (a deployment); tests bound it

    def delay(self, n: int) -> float:
        if n < 1:
            raise ValueError(f"restart number must be >= 1, got {n}")
        return min(self.cap, self.first * self.factor ** (n - 1))


@dataclass(frozen=True)
class Exit:
    code: int
    seconds: float


class Supervisor:
    """Runs `start()` (which returns the child) again after every exit until stopped.

    before_start runs before every start (e.g. reap the previous child's orphans); log gets one
    line per restart. Signals are forwarded to the child; the loop ends after it has exited."""

    def __init__(self, start: Callable[[], subprocess.Popen], backoff: Backoff,
                 log: Callable[[str], None], before_start: Callable[[], None] = lambda: None,
                 name: str = "child") -> None:
        self.start, self.backoff, self.log = start, backoff, log
        self.before_start, self.name = before_start, name
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.stop_signal: int | None = None

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        self.stop_signal = signum
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    @contextlib.contextmanager
    def signals(self):  # type: ignore[no-untyped-def]
        """Install the forwarding handlers for SIGTERM, SIGINT and SIGHUP (main thread only)."""
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old = {s: signal.signal(s, self.request_stop) for s in sigs}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Supervise until stopped; returns the last child's exit code (0 after a requested
        stop, so that systemd records a clean stop)."""
        restarts, code = 0, 0
        while not self.stopping.is_set():
            self.before_start()
            t0 = time.monotonic()
            self.child = self.start()
            if self.stopping.is_set():  # the signal came while we were starting it
                self.request_stop(self.stop_signal or signal.SIGTERM)
            code = self._wait(self.child)
            ran = time.monotonic() - t0
            if self.stopping.is_set():
                return 0
            restarts = 1 if ran >= self.backoff.healthy_after else restarts + 1
            if self.backoff.max_restarts and restarts > self.backoff.max_restarts:
                self.log(f"{self.name} exited with code {code} after {ran:.0f} s; "
                         f"giving up after {self.backoff.max_restarts} restarts")
                return code
            delay = self.backoff.delay(restarts)
            self.log(f"{self.name} exited with code {code} after {ran:.0f} s; "
                     f"restart {restarts} in {delay:.0f} s")
            self.stopping.wait(delay)
        return 0 if self.stop_signal is not None else code

    @staticmethod
    def _wait(child: subprocess.Popen) -> int:
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue

"""Suite-wide ordering for parallel runs (`./run.sh test` runs pytest-xdist, one worker per
file, see run.sh): the files that mostly wait on real processes (Flower heartbeats, restarts)
start first on their own workers, each followed by a quick file, then the rest longest first,
so that the suite's wall time is close to its longest file rather than the sum of them all.
Seconds are measured durations (`--durations`), only used for ordering.

CPU priority: the integration files drive real processes against deadlines (heartbeats, round and
SecAgg+ stage timeouts), while most other files are CPU-bound model code. On two cores the latter
starved the former (a SecAgg+ stage or a chaos round missed its deadline only under the full
suite). So every test outside the integration files runs at nice 10 and the integration tests at
nice 0 (their real processes inherit it): the CPU-bound tests take the cycles the integration
tests leave. Lowering niceness again needs root (CI runs as root); elsewhere a worker that was
niced stays niced, which only makes the priorities equal again."""

from __future__ import annotations

import os

import pytest

# file (relative to tests/) -> measured seconds on 2 cores; unknown files count as short
LONG = {
    "integration/test_chaos_netns.py": 890,
    "integration/test_secagg.py": 490,
    "integration/test_deployment.py": 200,
    "integration/test_federated_adapt.py": 190,
    "integration/test_federated_pretrain.py": 110,
    "integration/test_superlink_restart.py": 170,
    "integration/test_run_lifecycle.py": 145,
    "integration/test_resume.py": 100,
}
QUICK = ("vocab/", "synth/", "ops/")  # seconds each: they fill the slots behind the first three


def _rel(item: pytest.Item) -> str:
    path = str(item.path).replace("\\", "/")
    return path.split("/tests/", 1)[-1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(_rel(item), []).append(item)
    longest = sorted((f for f in files if f in LONG), key=lambda f: -LONG[f])
    quick = [f for f in files if f.startswith(QUICK) and f not in LONG][:3]
    rest = [f for f in files if f not in LONG and f not in quick]
    order = longest[:3] + quick + longest[3:] + rest
    items[:] = [item for f in order for item in files[f]]


BACKGROUND_NICE = 10


def _set_nice(value: int) -> None:
    """Every thread of this worker (Linux keeps niceness per thread; torch's pool threads too)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != value:
                os.setpriority(os.PRIO_PROCESS, tid, value)
        except OSError:  # not root (cannot lower it again) or the thread has ended
            pass


def _timing_sensitive(item: pytest.Item) -> bool:
    return item.get_closest_marker("integration") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _set_nice(0 if _timing_sensitive(item) else BACKGROUND_NICE)

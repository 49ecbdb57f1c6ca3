"""Dynamic micro-batching of interactive diagnoses, and the model lock they share with the
background triage worker.

`ModelLock`: one model, one computation at a time. Interactive requests take precedence: the
background worker acquires only while no interactive request is waiting, and holds the lock for
one case at a time, so an interactive request waits at most for one background case already
running (a forward cannot be pre-empted). While the background holds it, torch runs on one
thread (`torch.set_num_threads` is process-wide, so it is switched under the lock, where no
other model computation runs).

`MicroBatcher`: concurrent `submit(item)` calls are gathered by one dispatcher thread into a
batch of at most `max_batch` items, waiting at most `max_wait_ms` after the first for more,
and run through `fn(items) -> results` under the lock. A failing batch is retried item by item,
so one bad upload fails only its own request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class ModelLock:
    """A mutex with two classes of holder: interactive (first) and background (last)."""

    def __init__(self, threads: int | None = None) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._waiting = 0  # interactive requests waiting for the lock
        self.threads = threads or torch.get_num_threads()

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._held:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._held = True
        try:
            yield
        finally:
            self._release()

    def interactive_waiting(self) -> bool:
        return self._waiting > 0

    @contextlib.contextmanager
    def background(self, stop: threading.Event | None = None) -> Iterator[bool]:
        """Yields True once held (no interactive request waiting), False if `stop` was set
        while waiting."""
        got = False
        with self._cond:
            while not (stop is not None and stop.is_set()):
                if not self._held and not self._waiting:
                    self._held = got = True
                    break
                self._cond.wait(timeout=0.1)
        if not got:
            yield False
            return
        torch.set_num_threads(1)  # one core at most for background work
        try:
            yield True
        finally:
            torch.set_num_threads(self.threads)
            self._release()

    def _release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], lock: ModelLock, max_batch: int,
                 max_wait_ms: float, name: str = "batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.fn, self.lock = fn, lock
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        self._q: queue.Queue[tuple[T, Future[R]]] = queue.Queue()
        self.batch_sizes: list[int] = []  # for benchmarks and tests (bounded below)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> R:
        """Run `item` in the next batch; returns its result or raises its exception."""
        fut: Future[R] = Future()
        self._q.put((item, fut))
        return fut.result()

    def _run(self) -> None:
        torch.set_num_threads(self.lock.threads)
        while True:
            first = self._q.get()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
                except queue.Empty:
                    break
            self._execute(batch)

    def _execute(self, batch: list[tuple[T, Future[R]]]) -> None:
        items = [i for i, _ in batch]
        try:
            with self.lock.interactive():
                results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(items)} items")
        except Exception as e:  # noqa: BLE001 - isolate the failing item, below
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            log.info("batch of %d failed (%s); running its items one by one", len(batch),
                     type(e).__name__)
            for one in batch:
                self._execute([one])
            return
        self.batch_sizes.append(len(items))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        for (_, fut), r in zip(batch, results, strict=True):
            fut.set_result(r)

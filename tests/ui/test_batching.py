"""Micro-batching of interactive requests, the model lock's priorities, and feedback under
concurrent load."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explain.config import ExplainConfig
from explain.explanation import explain_case
from ui.batching import MicroBatcher, ModelLock
from ui.config import TriageConfig
from ui.service import DiagnosisService
from vocab.feedback_store import FeedbackStore


def test_background_waits_while_an_interactive_request_waits():
    lock = ModelLock(threads=torch.get_num_threads())
    order: list[str] = []
    started = threading.Event()

    def background():
        with lock.background() as got:
            assert got
            order.append("background")

    def interactive():
        with lock.interactive():
            order.append("interactive")

    with lock.interactive():  # held: both queue up behind it
        bg = threading.Thread(target=background)
        bg.start()
        time.sleep(0.05)
        it = threading.Thread(target=lambda: (started.set(), interactive()))
        it.start()
        started.wait()
        time.sleep(0.05)
    bg.join(5)
    it.join(5)
    assert order == ["interactive", "background"]  # although the background asked first


def test_background_lock_gives_up_when_stopped_and_restores_threads():
    lock = ModelLock(threads=torch.get_num_threads())
    stop = threading.Event()
    stop.set()
    with lock.interactive():
        with lock.background(stop) as got:
            assert got is False
    with lock.background() as got:
        assert got and torch.get_num_threads() == 1  # one core for background work
    assert torch.get_num_threads() == lock.threads


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=30), st.integers(1, 8))
def test_batcher_results_are_each_items_own(items: list[int], max_batch: int):
    seen: list[int] = []

    def square(xs: list[int]) -> list[int]:
        seen.append(len(xs))
        return [x * x for x in xs]

    b = MicroBatcher(square, ModelLock(), max_batch=max_batch, max_wait_ms=20)
    with ThreadPoolExecutor(len(items)) as ex:
        got = list(ex.map(b.submit, items))
    assert got == [x * x for x in items]
    assert max(seen) <= max_batch and sum(seen) == len(items)


def test_batcher_gathers_concurrent_requests_and_isolates_a_failing_item():
    def fn(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise ValueError("bad item 13")
        return [x + 1 for x in xs]

    b = MicroBatcher(fn, ModelLock(), max_batch=4, max_wait_ms=200)
    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(b.submit, x) for x in (1, 2, 13, 4, 5, 6, 7, 8)]
        results = []
        for f in futs:
            try:
                results.append(f.result(30))
            except ValueError as e:
                results.append(str(e))
    assert results == [2, 3, "bad item 13", 5, 6, 7, 8, 9]
    assert max(b.batch_sizes) > 1  # concurrent requests did share a batch
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, ModelLock(), max_batch=0, max_wait_ms=1)


@pytest.fixture(scope="module")
def batched_service(site_root: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> DiagnosisService:
    root = tmp_path_factory.mktemp("bsite") / "site"
    shutil.copytree(site_root, root, ignore=shutil.ignore_patterns("feedback.db"))
    tmp = tmp_path_factory.mktemp("bcache")
    s = DiagnosisService.from_paths(root, checkpoint, tmp / "prep", ExplainConfig(),
                                    triage=TriageConfig(background=False, max_batch=8,
                                                        max_wait_ms=100, cache_dir=tmp / "t"))
    yield s
    s.close()


def test_concurrent_uncached_diagnoses_are_batched_and_equal_single_ones(
        batched_service: DiagnosisService):
    s = batched_service
    ids = [cid for _, cid in s.worklist()]
    with ThreadPoolExecutor(len(ids)) as ex:
        got = list(ex.map(s.diagnose_case, ids))
    assert max(s._batcher.batch_sizes) > 1
    for cid, d in zip(ids, got, strict=True):
        if d.explanation is None:  # refused by the scope check: nothing to compare
            continue
        ref = explain_case(s.served.model, s._cases[cid], s.cfg, s.served.version)
        assert d.explanation.probability == pytest.approx(ref.probability, abs=1e-5)
        assert d.explanation.modality_contrib == pytest.approx(ref.modality_contrib, abs=1e-4)


def test_feedback_under_concurrent_load_is_never_lost(batched_service: DiagnosisService):
    s = batched_service
    ids = [cid for _, cid in s.worklist()]
    handles = [d.handle for d in map(s.diagnose_case, ids) if d.handle]
    store = FeedbackStore(s.feedback_store.path)
    before = len(store.all())
    n_threads, per_thread = 8, 6

    def clinician(k: int) -> list[int]:
        rows = []
        for j in range(per_thread):
            h = handles[(k + j) % len(handles)]
            if j % 2:  # diagnoses run between the feedback writes
                s.diagnose_case(ids[(k + j) % len(ids)])
            rows.append(s.send_feedback(h, "disagree", 1, f"t{k}-{j}", f"user{k}"))
        return rows

    with ThreadPoolExecutor(n_threads) as ex:
        rows = [r for rs in ex.map(clinician, range(n_threads)) for r in rs]
    after = store.all()
    assert len(after) - before == n_threads * per_thread
    assert len(set(rows)) == n_threads * per_thread
    comments = {f.comment for f in after}
    assert all(f"t{k}-{j}" in comments for k in range(n_threads) for j in range(per_thread))


def test_background_thread_nice_is_per_thread():
    import os

    from ui.triage import set_thread_nice

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    level = 19 if before < 19 else 18  # 18 from 19 needs CAP_SYS_NICE
    got: list[object] = []

    def worker() -> None:
        got.append(set_thread_nice(level))
        got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if got[0] is False:
        pytest.skip("cannot change this thread's priority here (no CAP_SYS_NICE)")
    assert got[1] == level != before
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before

"""The batcher alone, with a stand-in decoder: batch sizes, waiting, the bounded queue, cancels, drain."""

import threading
import time

import numpy as np
import pytest

from serinus.decoding import Hypothesis
from serinus.serve.batcher import Batcher, Job, QueueFull


class Recorder:
    """A decoder that records its batches and can be held, to let the queue fill."""

    def __init__(self):
        self.batches = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, jobs):
        self.started.set()
        self.release.wait(10)
        self.batches.append([job.name for job in jobs])
        return [Hypothesis(text=job.name) for job in jobs]


def job(name):
    return Job(np.zeros(16000, dtype=np.float32), {"source_lang": "en", "target_lang": "en"}, name=name)


@pytest.fixture
def recorder():
    return Recorder()


def test_waiting_requests_share_a_batch(recorder):
    batcher = Batcher(recorder, max_batch=4, max_wait_ms=500, queue_size=16)
    batcher.start()
    try:
        with batcher.arrival():  # more requests on their way in: the first batch waits for them
            futures = [batcher.submit(job(f"r{k}")) for k in range(6)]
        assert [f.result(5).text for f in futures] == [f"r{k}" for k in range(6)]
    finally:
        batcher.stop()
    assert recorder.batches == [["r0", "r1", "r2", "r3"], ["r4", "r5"]]
    assert batcher.stats.served == 6 and batcher.stats.largest_batch == 4


def test_a_batch_waits_for_arrivals_at_most_max_wait_and_a_lone_request_not_at_all(recorder):
    batcher = Batcher(recorder, max_batch=8, max_wait_ms=300, queue_size=4)
    batcher.start()
    try:
        start = time.monotonic()
        assert batcher.submit(job("alone")).result(5).text == "alone"
        assert time.monotonic() - start < 0.25  # nobody else on the way: no wait
        with batcher.arrival():  # one on its way that never comes: the batch leaves after max_wait
            start = time.monotonic()
            assert batcher.submit(job("waited")).result(5).text == "waited"
            assert 0.25 < time.monotonic() - start < 3
    finally:
        batcher.stop()
    assert recorder.batches == [["alone"], ["waited"]]


def test_full_queue_refuses_with_retry_after_and_cancelled_jobs_are_not_decoded(recorder):
    recorder.release.clear()  # the model is busy
    batcher = Batcher(recorder, max_batch=1, max_wait_ms=0, queue_size=2)
    batcher.start()
    try:
        busy = batcher.submit(job("busy"))
        assert recorder.started.wait(5)
        queued = [batcher.submit(job("q1")), batcher.submit(job("q2"))]
        with pytest.raises(QueueFull) as refused:
            batcher.submit(job("q3"))
        assert refused.value.retry_after >= 1
        assert queued[0].cancel()  # its client went away: it leaves the queue
        assert len(batcher.queue) == 1
        batcher.submit(job("q4"))  # so there is room again
        recorder.release.set()
        assert busy.result(5).text == "busy"
        assert queued[1].result(5).text == "q2"
    finally:
        batcher.stop()
    assert recorder.batches == [["busy"], ["q2"], ["q4"]]
    assert batcher.stats.rejected == 1 and batcher.stats.cancelled == 1


def test_stop_finishes_what_is_queued(recorder):
    recorder.release.clear()
    batcher = Batcher(recorder, max_batch=2, max_wait_ms=0, queue_size=8)
    batcher.start()
    futures = [batcher.submit(job(f"r{k}")) for k in range(5)]
    assert recorder.started.wait(5)
    threading.Timer(0.2, recorder.release.set).start()
    batcher.stop(timeout=10)
    assert [f.result(0).text for f in futures] == [f"r{k}" for k in range(5)]
    with pytest.raises(QueueFull):
        batcher.submit(job("late"))


def test_a_failing_batch_fails_its_requests_only(recorder):
    calls = []

    def decode(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [Hypothesis(text="ok") for _ in jobs]

    batcher = Batcher(decode, max_batch=1, max_wait_ms=0, queue_size=4)
    batcher.start()
    try:
        first = batcher.submit(job("a"))
        with pytest.raises(RuntimeError, match="out of memory"):
            first.result(5)
        assert batcher.submit(job("b")).result(5).text == "ok"
    finally:
        batcher.stop()

"""Adaptive batching: validated requests from many concurrent callers -> one forward pass per batch.

The engine is BentoML's own adaptive batching dispatcher (``CorkDispatcher``, the one behind
``@bentoml.api(batchable=True)``): it learns the cost of a batch from recent passes, corks requests
while a pass is running or while waiting pays off, and cuts batches at ``max_batch_size`` inputs
(splitting a larger request across passes). noisewise drives it directly instead of through a
batchable API method because, in BentoML 1.4, the only way for a validating endpoint to reach a
batchable method of the same service is an HTTP round trip through the service's own proxy: that
doubles the per-request parsing and serialization, and its client closes its session every 100
calls while other calls are in flight (``ServerDisconnectedError`` -> 500s under concurrency,
bentoml/BentoML#5540). Here the validated float32 array goes straight into the queue.

A pass has two stages, each on a dedicated thread: ``forward`` (the network) on the model thread, so the network
sees one batch at a time (as with BentoML's single-threaded batchable APIs), then ``finish`` (the uncertainty and
the answers) on a second thread, while the model thread already runs the next batch's network. The event loop stays
free for parsing the next requests. At most one finished forward waits for its ``finish``: the dispatcher starts
no new batch before the ``finish`` of the one before last is done, so a slow ``finish`` slows the intake instead
of queueing batches without bound. Overlapping the stages raised the throughput of a ResNet-18 with a
50,000-row OOD bank on 2 CPU cores by 2-3% (docs/serving.md): while ``finish`` ran on the model thread, the
next batch waited for it although the server had CPU to spare.

Decoding request images runs in a :class:`WorkQueue` of its own: a few threads and a bounded queue, so that
images that are cheap to send and costly to decode never hold the threads that ``/feedback``, ``/suspects`` and
``/reload`` run on (asyncio's default pool), and the work of a request that gave up is never started or stops
between two images.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Counter, Histogram

FORWARD_PASSES = Counter("noisewise_forward_passes_total", "Forward passes of the served network.")
BATCH_SIZE = Histogram(
    "noisewise_batch_inputs", "Inputs per forward pass (requests merged by adaptive batching).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


T = TypeVar("T")
#: Seconds a client is asked to wait before it retries a request shed for overload (``Retry-After``).
RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    """A request waited in the batching queue longer than ``max_latency_ms``, or found the decoding queue
    full."""


def _overloaded():
    raise Overloaded("the batching queue is over its latency budget (NOISEWISE_BATCH_MAX_LATENCY_MS); retry later")


class Batcher:
    """``await batcher(x)`` with ``x`` ``[n, ...]`` returns ``finish(forward(x))`` (a list of ``n`` items),
    computed in a pass shared with concurrent callers when ``enabled``, or in its own pass otherwise.

    ``forward`` runs on the model thread and returns anything (a handle on the batch's network outputs);
    ``finish`` turns that into one item per input, on the finishing thread, overlapping the next ``forward``.
    """

    def __init__(self, forward: Callable[[np.ndarray], Any], finish: Callable[[Any], list], enabled: bool = True,
                 max_batch_size: int = 256, max_latency_ms: int = 10_000):
        self._forward = forward
        self._finish = finish
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noisewise-model")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noisewise-finish")
        self._finishing: asyncio.Future | None = None  # the last batch's finish, while the dispatcher waits on it
        self.forward_passes = 0
        self._dispatcher = None
        self._dispatch = None
        if enabled:
            from bentoml._internal.marshal.dispatcher import CorkDispatcher

            self._dispatcher = CorkDispatcher(
                max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size, fallback=_overloaded,
                get_batch_size=len, batch_dim=(0, 0),
            )
            self._dispatch = self._dispatcher(self._run_jobs)

    async def __call__(self, x: np.ndarray) -> list:
        if self._dispatch is None:
            return await (await self._start(x))
        items = []
        for outputs, start, stop in await self._dispatch(x):  # one part per pass the request was split across
            # shielded: the batch's other callers wait on the same finish, a caller that gives up must not cancel it
            items += (await asyncio.shield(outputs))[start:stop]
        return items

    async def _run_jobs(self, jobs: Sequence[np.ndarray]) -> list[list[tuple[asyncio.Future, int, int]]]:
        """The network's pass over the queued requests (the dispatcher's callback): concatenate, forward, then
        hand the batch to the finishing thread. Each job gets a list of one part: the batch's future outputs and
        its slice of them (a list, because the dispatcher concatenates the results of a job it split)."""
        previous = self._finishing
        outputs = await self._start(np.concatenate(jobs) if len(jobs) > 1 else jobs[0], previous)
        self._finishing = outputs
        bounds = [0, *itertools.accumulate(len(job) for job in jobs)]
        return [[(outputs, a, b)] for a, b in itertools.pairwise(bounds)]

    async def _start(self, x: np.ndarray, previous: asyncio.Future | None = None) -> asyncio.Future:
        """Run ``forward(x)`` on the model thread; once ``previous`` (a finish) is done, start ``finish`` on the
        finishing thread and return its future."""
        loop = asyncio.get_running_loop()
        handle = await loop.run_in_executor(self._executor, self._forward, x)
        self.forward_passes += 1
        FORWARD_PASSES.inc()
        BATCH_SIZE.observe(len(x))
        if previous is not None:
            await asyncio.wait({previous})
        outputs = loop.run_in_executor(self._finisher, self._finish, handle)
        outputs.add_done_callback(_retrieve)  # its callers may all have given up
        return outputs

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._finisher.shutdown(wait=False, cancel_futures=True)


class WorkQueue:
    """Blocking request work (decoding images) on ``threads`` threads of its own, at most ``max_pending`` jobs
    queued or running.

    ``await queue.run(work, timeout)`` calls ``work(stop)`` on one of the threads and returns its result.
    ``stop`` is a :class:`threading.Event` set once nobody waits for the result any more (``timeout`` seconds
    passed, or the request was cancelled): a job still queued then never starts, a running one should look
    at ``stop`` between its steps and give up. Raises :class:`Overloaded` at once when the queue is full
    and :class:`TimeoutError` past ``timeout``.
    """

    def __init__(self, threads: int = 2, max_pending: int = 64, name: str = "noisewise-decode"):
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs queued or running now."""
        return self._pending

    async def run(self, work: Callable[[threading.Event], T], timeout: float | None = None) -> T:
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"the image decoding queue is full ({self.max_pending} requests); retry later")
            self._pending += 1
        stop = threading.Event()
        try:
            job: Future = self._executor.submit(_unless_stopped, work, stop)
        except RuntimeError:  # shut down
            self._finished(None)
            raise
        job.add_done_callback(self._finished)  # also when cancelled before it started
        waiter = asyncio.wrap_future(job)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if not waiter.done():  # timed out, or the request was cancelled: drop the work
                stop.set()
                job.cancel()
                waiter.add_done_callback(_retrieve)
        if not done:
            raise TimeoutError
        return waiter.result()

    def _finished(self, _job) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _unless_stopped(work: Callable[[threading.Event], T], stop: threading.Event) -> T | None:
    """``work(stop)``, unless the request gave up while the job was queued."""
    if stop.is_set():
        return None
    return work(stop)


def _retrieve(future: asyncio.Future) -> None:
    """Retrieve an abandoned job's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()

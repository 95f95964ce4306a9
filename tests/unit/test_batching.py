"""The two-stage batcher (services/batching.py): every caller gets ``finish(forward(x))`` for its own inputs, one
batch's ``finish`` overlaps the next batch's ``forward``, at most one finished forward waits for its ``finish``,
and a caller that gives up or a stage that fails touches no other caller."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from noisewise.services.batching import Batcher


class Timeline:
    """``forward`` and ``finish`` stand-ins that take ``seconds`` each and record (stage, batch, start, end)."""

    def __init__(self, forward_s: float = 0.0, finish_s: float = 0.0, fail_finish_on: float | None = None,
                 fail_forward_on: float | None = None):
        self.forward_s, self.finish_s = forward_s, finish_s
        self.fail_finish_on, self.fail_forward_on = fail_finish_on, fail_forward_on
        self.events: list[tuple[str, int, float, float]] = []
        self.threads: dict[str, set[str]] = {"forward": set(), "finish": set()}
        self.sizes: list[int] = []  # inputs per forward
        self.failed_inputs: set[float] = set()  # the inputs of the batches whose finish failed
        self._lock = threading.Lock()
        self._batches = 0

    def forward(self, x: np.ndarray):
        start = time.perf_counter()
        self.threads["forward"].add(threading.current_thread().name)
        with self._lock:
            batch = self._batches
            self._batches += 1
        time.sleep(self.forward_s)
        if self.fail_forward_on is not None and self.fail_forward_on in x:
            raise RuntimeError("forward failed")
        self.events.append(("forward", batch, start, time.perf_counter()))
        self.sizes.append(len(x))
        return batch, x * 2

    def finish(self, handle) -> list:
        batch, doubled = handle
        start = time.perf_counter()
        self.threads["finish"].add(threading.current_thread().name)
        time.sleep(self.finish_s)
        if self.fail_finish_on is not None and 2 * self.fail_finish_on in doubled:
            self.failed_inputs.update(float(v) / 2 for v in doubled)
            raise ValueError("finish failed")
        self.events.append(("finish", batch, start, time.perf_counter()))
        return [float(v) + 1 for v in doubled]

    def spans(self, stage: str) -> dict[int, tuple[float, float]]:
        return {batch: (a, b) for name, batch, a, b in self.events if name == stage}


async def callers(batcher: Batcher, values, gap_s: float = 0.0) -> list:
    async def one(v, i):
        await asyncio.sleep(i * gap_s)
        return await batcher(np.array([v, v + 0.5]))

    return await asyncio.gather(*(one(v, i) for i, v in enumerate(values)), return_exceptions=True)


@pytest.mark.parametrize("enabled", [True, False])
def test_each_caller_gets_finish_of_forward_of_its_own_inputs(enabled):
    stages = Timeline()

    async def main():
        batcher = Batcher(stages.forward, stages.finish, enabled=enabled, max_batch_size=8)
        try:
            return await callers(batcher, range(20)), batcher.forward_passes
        finally:
            batcher.close()

    results, passes = asyncio.run(main())
    assert results == [[2.0 * v + 1, 2.0 * v + 2] for v in range(20)]
    assert stages.threads == {"forward": {"noisewise-model_0"}, "finish": {"noisewise-finish_0"}}
    assert passes == len(stages.spans("forward")) == len(stages.spans("finish"))
    if not enabled:
        assert passes == 20


def test_finish_overlaps_the_next_forward_and_at_most_one_finish_waits():
    # finish slower than forward: without a bound, forwards would run ahead and finished batches pile up
    stages = Timeline(forward_s=0.02, finish_s=0.05)

    async def main():
        batcher = Batcher(stages.forward, stages.finish, max_batch_size=2)
        try:
            # requests keep arriving, so the dispatcher always has a next batch to start
            return await callers(batcher, range(24), gap_s=0.01)
        finally:
            batcher.close()

    results = asyncio.run(main())
    assert results == [[2.0 * v + 1, 2.0 * v + 2] for v in range(24)]
    forwards, finishes = stages.spans("forward"), stages.spans("finish")
    assert len(forwards) >= 6
    overlapped = [n for n in finishes if n + 1 in forwards and forwards[n + 1][0] < finishes[n][1]
                  and finishes[n][0] < forwards[n + 1][1]]
    assert overlapped, "no finish overlapped the next forward"
    for n, (start, _) in forwards.items():
        if n >= 2:  # forward n starts only after finish n - 2 ended: at most one batch waits for its finish
            assert start >= finishes[n - 2][1] - 1e-3, (n, start, finishes[n - 2])


def test_a_failing_finish_fails_its_batch_only():
    stages = Timeline(forward_s=0.01, fail_finish_on=3.0)

    async def main():
        batcher = Batcher(stages.forward, stages.finish, max_batch_size=64)
        try:
            first = await callers(batcher, [0.0, 1.0, 3.0, 4.0])
            later = await batcher(np.array([7.0]))
            return first, later
        finally:
            batcher.close()

    first, later = asyncio.run(main())
    assert 3.0 in stages.failed_inputs
    for v, result in zip([0.0, 1.0, 3.0, 4.0], first):
        if v in stages.failed_inputs:  # shared the failing batch
            assert isinstance(result, ValueError) and str(result) == "finish failed", (v, result)
        else:
            assert result == [2.0 * v + 1, 2.0 * v + 2], (v, result)
    assert later == [15.0]  # the batcher goes on serving


def test_a_failing_forward_reaches_its_callers():
    stages = Timeline(fail_forward_on=5.0)

    async def main():
        batcher = Batcher(stages.forward, stages.finish)
        try:
            failed = await callers(batcher, [5.0])
            return failed, await batcher(np.array([1.0]))
        finally:
            batcher.close()

    failed, later = asyncio.run(main())
    assert isinstance(failed[0], RuntimeError) and str(failed[0]) == "forward failed"
    assert later == [3.0]


def test_a_caller_that_gives_up_does_not_cancel_the_batch_it_shares():
    stages = Timeline(forward_s=0.01, finish_s=0.1)

    async def main():
        batcher = Batcher(stages.forward, stages.finish, max_batch_size=64)
        try:
            # warm the dispatcher up: its first passes take one request each
            await callers(batcher, range(8))
            stages.events.clear()
            tasks = [asyncio.ensure_future(batcher(np.array([float(v)]))) for v in (10, 11, 12, 13)]
            await asyncio.sleep(0.05)  # all four are in one batch, its finish is running
            tasks[0].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results
        finally:
            batcher.close()

    results = asyncio.run(main())
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [[23.0], [25.0], [27.0]]


def test_a_request_larger_than_a_batch_is_split_across_passes_and_reassembled():
    stages = Timeline()

    async def main():
        batcher = Batcher(stages.forward, stages.finish, max_batch_size=4)
        try:
            return await batcher(np.arange(10, dtype=float))
        finally:
            batcher.close()

    assert asyncio.run(main()) == [2.0 * v + 1 for v in range(10)]
    assert sum(stages.sizes) == 10 and max(stages.sizes) <= 4 and len(stages.spans("finish")) == len(stages.sizes)

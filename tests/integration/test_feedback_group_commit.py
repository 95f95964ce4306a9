"""Group-committed feedback: concurrent requests share one transaction, each is answered only after it, and
the outcomes stay exactly-once (one row per prediction and annotator, every other copy a duplicate or a
conflict). The crash test with many concurrent single-item clients (a real ``bentoml serve`` SIGKILLed
mid-stream) is ``tests/e2e/test_reliability.py``'s SIGKILL test, run with 32 single-item clients."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import Counter

import numpy as np
import pytest
import sqlalchemy as sa

from noisewise.monitoring.store import PredictionRow, Store
from noisewise.services.feedback_api import FeedbackWriter, ingest, ingest_async, writer_for

pytestmark = pytest.mark.timeout(300)

K = 4
NAMES = ["cat", "dog", "fox", "owl"]
THRESHOLDS = np.full(K, 0.5, dtype=np.float32)
REQUESTS = 32


@pytest.fixture
def store(tmp_path):
    opened = Store(f"sqlite:///{tmp_path / 'store.db'}")
    opened.add_predictions([
        PredictionRow(id=f"p{i}", model_name="mlp", model_version="1", weights="ab" * 32, predicted=i % K,
                      confidence=0.7, prediction_set=[i % K], is_ood=False, ood_score=0.1, ood_p_value=0.5,
                      decision="accept", reason=None, probs=np.eye(K, dtype=np.float32)[i % K] * 0.6 + 0.1)
        for i in range(REQUESTS)])
    yield opened
    opened.close()


def request_items(r: int) -> list[dict]:
    """Request r's one item: 24 distinct keys; requests 24-29 repeat keys 0-5 with the same label (duplicates);
    30 and 31 repeat keys 6 and 7 with another label (conflicts)."""
    if r < 24:
        return [{"prediction_id": f"p{r}", "label": r % K, "annotator": "group"}]
    if r < 30:
        return [{"prediction_id": f"p{r - 24}", "label": (r - 24) % K, "annotator": "group"}]
    return [{"prediction_id": f"p{r - 24}", "label": (r - 23) % K, "annotator": "group"}]


class WriteLock:
    """Holds SQLite's write lock from another connection, so that the writer's first commit waits on it."""

    def __init__(self, path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def wait_queued(writer: FeedbackWriter, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while writer._queue.qsize() != n:
        assert time.monotonic() < deadline, f"{writer._queue.qsize()} requests queued, not {n}"
        time.sleep(0.005)


def wait_taken(writer: FeedbackWriter, n: int = 1, timeout: float = 20) -> None:
    """Until ``n`` requests were submitted and the writer has taken all of them (``unfinished_tasks`` counts
    every put: the queue's consumer never marks tasks done)."""
    deadline = time.monotonic() + timeout
    while writer._queue.unfinished_tasks < n or writer._queue.qsize():
        assert time.monotonic() < deadline, "the writer did not take the first request"
        time.sleep(0.005)


def start(threads: list[threading.Thread], writer: FeedbackWriter) -> None:
    """The first thread's request alone in the writer's (blocked) first commit, then the others queued behind
    it: the writer takes a group only when it has nothing queued, so the first group is exactly one request."""
    threads[0].start()
    wait_taken(writer)
    for t in threads[1:]:
        t.start()
    wait_queued(writer, len(threads) - 1)


def check_outcomes(store: Store, statuses: list[int], commits: list) -> None:
    counts = Counter(statuses)
    # one 201 per distinct key (24), a 200 per same-label copy (6 plus, for a conflicting key, maybe none),
    # and exactly one of each conflicting pair is rejected: 24 stored, 32 - 24 answered 200 or 409
    assert counts[201] == 24 and counts[409] == 2 and counts[200] == 6, counts
    assert len(commits) == 2, f"{len(commits)} commits for {REQUESTS} requests"
    frame = store.feedback_frame()
    assert len(frame) == 24 and frame.groupby(["prediction_id", "annotator"]).size().max() == 1


def test_threads_share_one_commit_and_each_waits_for_it(store, tmp_path):
    commits: list = []
    sa.event.listen(store._writer, "commit", lambda conn: commits.append(time.monotonic()))
    lock = WriteLock(tmp_path / "store.db")
    answered: dict[int, tuple] = {}

    def send(r: int) -> None:
        response, _ = ingest(request_items(r), store, NAMES, THRESHOLDS)
        answered[r] = (time.monotonic(), response.items[0].status)

    threads = [threading.Thread(target=send, args=(r,)) for r in range(REQUESTS)]
    start(threads, writer_for(store))
    time.sleep(0.2)
    assert not answered, "a request was answered before its commit"
    lock.release()
    for t in threads:
        t.join(timeout=60)
    assert len(answered) == REQUESTS
    assert all(at >= commits[0] for at, _ in answered.values())
    check_outcomes(store, [status for _, status in answered.values()], commits)


def test_event_loop_requests_share_one_commit(store, tmp_path):
    commits: list = []
    sa.event.listen(store._writer, "commit", lambda conn: commits.append(time.monotonic()))
    lock = WriteLock(tmp_path / "store.db")

    wakeups: list[str] = []

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        threadsafe = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):  # the writer thread waking this loop up
            wakeups.append(threading.current_thread().name)
            return threadsafe(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted
        writer = writer_for(store)
        tasks = [asyncio.ensure_future(ingest_async(request_items(0), store, NAMES, THRESHOLDS))]
        # the first request is queued, then taken alone into the blocked first commit
        while writer._queue.unfinished_tasks < 1 or writer._queue.qsize():
            await asyncio.sleep(0.005)
        tasks += [asyncio.ensure_future(ingest_async(request_items(r), store, NAMES, THRESHOLDS))
                  for r in range(1, REQUESTS)]
        deadline = time.monotonic() + 20
        while writer._queue.qsize() != REQUESTS - 1:
            assert time.monotonic() < deadline, f"{writer._queue.qsize()} requests queued"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks), "a request was answered before its commit"
        lock.release()
        return [(await t)[0].items[0].status for t in tasks]

    statuses = asyncio.run(main())
    check_outcomes(store, statuses, commits)
    # the answers of a group reach the loop in one wake-up, not one per request: one per commit here
    assert wakeups.count("noisewise-feedback-writer") == len(commits) == 2, wakeups


def test_a_request_cancelled_while_it_waits_leaves_the_others_answered(store, tmp_path):
    """A request that times out while it waits for its commit (BentoML cancels it) gets no answer; the others
    are answered, and its item, submitted before the cancel, is stored once: a retry is answered 200
    duplicate."""
    lock = WriteLock(tmp_path / "store.db")

    async def main() -> tuple[list[int], int]:
        writer = writer_for(store)
        tasks = [asyncio.ensure_future(ingest_async(request_items(r), store, NAMES, THRESHOLDS)) for r in range(8)]
        while writer._queue.unfinished_tasks < 8:  # all submitted (taken into the blocked commit or queued)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        tasks[3].cancel()
        lock.release()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        retry, _ = await ingest_async(request_items(3), store, NAMES, THRESHOLDS)
        return [d if isinstance(d, asyncio.CancelledError) else d[0].items[0].status for d in done], \
            retry.items[0].status

    statuses, retried = asyncio.run(main())
    assert isinstance(statuses.pop(3), asyncio.CancelledError)
    assert statuses == [201] * 7 and retried == 200
    assert store.count("feedback") == 8


def test_a_failing_request_does_not_fail_the_others_in_its_group(store, tmp_path):
    """The database refuses one request's row (a trigger): the shared commit fails, each request is then
    committed alone, and only that request gets the error."""
    with sqlite3.connect(tmp_path / "store.db") as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON feedback WHEN NEW.annotator = 'doomed' "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END")
    lock = WriteLock(tmp_path / "store.db")
    results: dict[str, object] = {}

    def send(name: str, items: list[dict]) -> None:
        try:
            results[name] = ingest(items, store, NAMES, THRESHOLDS)[0].stored
        except Exception as err:
            results[name] = str(err)

    threads = [threading.Thread(target=send, args=(f"ok{r}", request_items(r))) for r in range(8)]
    threads.insert(4, threading.Thread(target=send, args=(
        "doomed", [{"prediction_id": "p31", "label": 0, "annotator": "doomed"}])))
    start(threads, writer_for(store))
    lock.release()
    for t in threads:
        t.join(timeout=60)
    assert "refused by the test trigger" in results.pop("doomed")
    assert results == {f"ok{r}": 1 for r in range(8)}
    assert store.count("feedback") == 8

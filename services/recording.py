"""Stores served predictions off the event loop, with group commits.

Each request awaits the commit of its predictions before its response goes out, so a client can send
feedback for a prediction id as soon as it has one. Writes go through one thread that takes everything
queued since its last commit into one transaction: under concurrent load the cost of a durable commit is
shared by all the requests waiting for it, instead of serializing one commit per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence

from prometheus_client import Counter

log = logging.getLogger("bentoml.noisewise")

STORE_ERRORS = Counter("noisewise_store_errors", "Failed writes of served predictions to the store.")

_STOP = object()


class Recorder:
    """``await recorder.record(rows)`` returns once ``rows`` (:class:`noisewise.monitoring.store.PredictionRow`) are
    committed; raises the store's error if the commit failed."""

    def __init__(self, store, max_rows_per_commit: int = 4096):
        self.store = store
        self.max_rows = max_rows_per_commit
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="noisewise-recorder", daemon=True)
        self._thread.start()

    async def record(self, rows: Sequence) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.put((rows, done, loop))
        await done

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, size = [first], len(first[0])
            while size < self.max_rows:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    self._queue.put(_STOP)  # finish this commit, then stop
                    break
                jobs.append(job)
                size += len(job[0])
            try:
                self.store.add_predictions([row for rows, _, _ in jobs for row in rows])
                error = None
            except Exception as err:  # reported to every waiting request; the service keeps serving
                STORE_ERRORS.inc()
                log.error("noisewise: storing %d predictions failed: %s: %s", size, type(err).__name__, err)
                error = err
            for _, done, loop in jobs:
                loop.call_soon_threadsafe(_settle, done, error)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)


def stored_row(prediction, served, out):
    """The store's row (:class:`noisewise.monitoring.store.PredictionRow`) for a served ``prediction``
    (:class:`noisewise.services.schemas.Prediction`) of ``served`` (the model that made it), with the model's
    full-precision output ``out`` (``models.predictor.Prediction``: its probabilities and set as class indices).

    The store's ``confidence`` column keeps its name: it holds the response's ``score``.
    """
    from noisewise.monitoring.store import PredictionRow

    return PredictionRow(
        id=prediction.id, model_name=served.name, model_version=served.version, weights=served.weights,
        predicted=prediction.label, confidence=prediction.score, prediction_set=out.set_indices,
        is_ood=prediction.ood.is_ood, ood_score=prediction.ood.score, ood_p_value=prediction.ood.p_value,
        decision=prediction.decision, reason=prediction.reason, probs=out.probs)


def _settle(done: asyncio.Future, error: BaseException | None) -> None:
    if done.done():  # the request was cancelled meanwhile
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)

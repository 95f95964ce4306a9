"""``POST /feedback`` and ``POST /suspects``: request models and the per-item ingestion.

A feedback batch is validated item by item: a malformed item, an unknown label or an unknown prediction id
is rejected with its own status and message, and the other items are still stored. Each item's ``status``
is HTTP-like: 201 stored, 200 duplicate (already stored: not counted twice), 400 malformed, 404 unknown
prediction id, 409 conflict (this annotator already gave another label for this prediction), 422 unknown
label. The response status is 200 when every item was stored or was a duplicate, 207 when some were
rejected and some not, and the items' common 4xx (or 400) when all were rejected.

Text the store cannot hold (a NUL character, an unpaired surrogate) is a malformed item (400), on SQLite and
PostgreSQL alike: it never reaches the database, where it would fail the whole batch.

Storing is group-committed (:class:`FeedbackWriter`): concurrent requests share one prediction lookup, one
transaction and one fsync, and each is answered only after the commit that holds its items.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from noisewise.monitoring import metrics
from noisewise.monitoring.store import FeedbackRow, StoreUnavailable, TimestampOutOfRange, text_problem, to_utc
from noisewise.services.schemas import error_response, error_status, location
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

log = logging.getLogger("bentoml.noisewise")

MAX_LABEL_CHARS = 256
MAX_ANNOTATOR_CHARS = 128


def _storable(value: str | None) -> str | None:
    """Refuse text the store cannot hold (see :func:`noisewise.monitoring.store.text_problem`)."""
    # ASCII without NUL is always storable: the common case costs two C scans, not a call
    if isinstance(value, str) and ("\x00" in value or not value.isascii()):
        problem = text_problem(value)
        if problem is not None:
            raise PydanticCustomError("unstorable_text", problem)
    return value


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64, description="the `id` of a served prediction")
    label: StrictInt | str = Field(description="the true label: a class name or a class index")
    annotator: str | None = Field(None, max_length=MAX_ANNOTATOR_CHARS,
                                  description="who labelled it; several annotators per prediction are kept")
    audited: StrictBool = Field(False, description="a trusted (audited) label: used for the noise-rate estimate "
                                "and the audit-rectified recalibration")

    @field_validator("label", mode="before")
    @classmethod
    def check_label_length(cls, value: Any) -> Any:
        """A class name is short: a longer string is refused as too long, not looked up as an unknown label."""
        if isinstance(value, str) and len(value) > MAX_LABEL_CHARS:
            raise PydanticCustomError("string_too_long", "a label of {got} characters, at most {limit} are accepted",
                                      {"got": len(value), "limit": MAX_LABEL_CHARS})
        return value

    @field_validator("prediction_id", "annotator", "label")
    @classmethod
    def check_storable(cls, value: Any) -> Any:
        return _storable(value)


class FeedbackRequest(BaseModel):
    """``{"items": [{"prediction_id": ..., "label": ..., "annotator"?: ..., "audited"?: ...}, ...]}``"""

    items: list[FeedbackItem] = Field(min_length=1, description="feedback items (at most NOISEWISE_MAX_FEEDBACK_ITEMS)")


class FeedbackItemResult(BaseModel):
    index: int = Field(description="position of the item in the request")
    prediction_id: str | None = None
    status: int = Field(description="201 stored, 200 duplicate, 400 malformed, 404 unknown prediction, "
                        "409 conflict, 422 unknown label")
    outcome: Literal["stored", "duplicate", "rejected"]
    error: str | None = Field(None, description="why the item was rejected")
    label: str | None = Field(None, description="the label, as a class name")
    suspect: bool | None = Field(None, description="the label looks like an annotation error (confident learning)")
    quality: float | None = Field(None, description="label quality: the model's probability of the label")
    proposed: str | None = Field(None, description="the model's proposed label")
    is_ood: bool | None = Field(None, description="the input was flagged OOD: the model cannot judge its label")


class FeedbackResponse(BaseModel):
    stored: int
    duplicates: int
    rejected: int
    items: list[FeedbackItemResult]


class SuspectsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime | None = Field(None, description="only feedback received at or after this time (ISO 8601; "
                                   "without a zone, UTC)")
    class_name: str | None = Field(None, max_length=MAX_LABEL_CHARS, description="only labels of this class")
    limit: int = Field(100, ge=1, le=10_000, description="most suspects (and most OOD items) on one page")
    cursor: str | None = Field(None, max_length=1024, description="`next_cursor` of the previous page: the next "
                               "page of both lists (same filters)")

    @field_validator("cursor")
    @classmethod
    def check_cursor(cls, value: str | None) -> str | None:
        """Refuse a cursor this service did not hand out here, naming the field, not in the store."""
        from noisewise.monitoring.feedback import CursorError, decode_cursor

        if value is not None:
            try:
                decode_cursor(value)
            except CursorError as err:
                raise PydanticCustomError("invalid_cursor", str(err)) from None
        return value

    @field_validator("since")
    @classmethod
    def check_since_in_range(cls, value: datetime | None) -> datetime | None:
        """A time valid in its own zone can fall past year 9999 (or before year 1) in UTC, where the store
        compares times: refuse it here, naming the field, rather than fail in the store."""
        if value is None:
            return None
        try:
            return to_utc(value)
        except TimestampOutOfRange as err:
            raise PydanticCustomError("datetime_out_of_range", str(err)) from None


def resolve_label(label: int | str, class_names: Sequence[str]) -> int | None:
    """Class index of ``label`` (a class name, or an index), or None."""
    if isinstance(label, int):
        return label if 0 <= label < len(class_names) else None
    try:
        return list(class_names).index(label)
    except ValueError:
        return None


def _label_error(label: Any, class_names: Sequence[str]) -> str:
    names = ", ".join(repr(n) for n in class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    shown = repr(label) if not isinstance(label, str) or len(label) <= 40 else repr(label[:40] + "...")
    return f"unknown label {shown}: expected a class name ({names}) or an index in [0, {len(class_names)})"


#: Requests with at most this many items are validated on the event loop (a few microseconds an item); larger
#: ones in a worker thread, so that one big request never stalls the others.
INLINE_VALIDATION_ITEMS = 100


@dataclass
class _Job:
    """One feedback request between validation and its answer."""

    results: list[FeedbackItemResult | None]
    valid: list[tuple[int, FeedbackItem, int]]
    class_names: Sequence[str]
    thresholds: np.ndarray
    #: the answer: a concurrent Future (a blocking caller) or an asyncio Future (a request on an event loop)
    done: Future | asyncio.Future | None = None
    scorable: list[tuple[int, FeedbackItem, int, Any]] = field(default_factory=list)
    rows: list = field(default_factory=list)
    quality: np.ndarray | None = None
    suspect: np.ndarray | None = None
    proposed: np.ndarray | None = None


def ingest(raw_items: list, store, class_names: Sequence[str], thresholds: np.ndarray) -> tuple[FeedbackResponse, list[dict]]:
    """Validate, score and store a feedback batch (blocking: call it from a worker thread).

    Returns the response and, for the metrics, one dict per newly stored item (label, predicted, suspect,
    is_ood), once the items are committed. Concurrent calls share commits (:class:`FeedbackWriter`)."""
    job = _validate(raw_items, class_names, thresholds)
    if job.valid:
        job.done = Future()
        return writer_for(store).submit(job).result()
    return _answer(job, [])


async def ingest_async(raw_items: list, store, class_names: Sequence[str],
                       thresholds: np.ndarray) -> tuple[FeedbackResponse, list[dict]]:
    """:func:`ingest` for the event loop. The request waits for its group commit without holding a thread,
    so a commit is shared by every request in flight, not only by as many as the thread pool has threads."""
    if len(raw_items) <= INLINE_VALIDATION_ITEMS:
        job = _validate(raw_items, class_names, thresholds)
    else:
        job = await asyncio.to_thread(_validate, raw_items, class_names, thresholds)
    if job.valid:
        # an asyncio Future, settled from the writer thread with one wake-up of this loop per group commit
        job.done = asyncio.get_running_loop().create_future()
        return await writer_for(store).submit(job)
    return _answer(job, [])


#: Media type of every /feedback answer.
JSON = "application/json"


def _json(content: Any) -> bytes:
    """``content`` serialized exactly as Starlette's ``JSONResponse`` does (both routes answer the same bytes)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, _json({"error": message, "detail": []})


async def answer_feedback(body: Mapping[str, Any] | ValidationError, store, calibration,
                          max_items: int) -> tuple[int, bytes]:
    """The whole of ``POST /feedback`` from its parsed body to its answer: the HTTP status and the JSON body.

    The BentoML route and the feedback lane (:mod:`noisewise.services.feedback_lane`) both answer with it, so
    that the two cannot drift apart.

    Parameters
    ----------
    body : Mapping or pydantic.ValidationError
        The body's top-level fields, or why it is not a JSON object.
    store : noisewise.monitoring.store.Store or None
        Where feedback goes; None when the service runs without a store (503).
    calibration
        The served model's calibration: its ``class_names`` and ``cl_thresholds``.
    max_items : int
        Most items in one request (413 beyond).

    Returns
    -------
    tuple of (int, bytes)
        The status (200, 207, a 4xx, 503) and the JSON body.
    """
    if isinstance(body, ValidationError):
        return error_status(body), _json(error_response(body).model_dump())
    if store is None:
        return _error(503, "feedback is off: this service runs with NOISEWISE_STORE=0")
    items = body.get("items")
    extra = body.keys() - {"items"}
    if extra:
        return _error(400, f"{sorted(extra)[0]}: unknown field: a feedback request has only 'items'")
    if not isinstance(items, list) or not items:
        return _error(400, "items: expected a non-empty array of {prediction_id, label, annotator?, audited?}")
    if len(items) > max_items:
        return _error(413, f"items: {len(items)} items is over the limit of {max_items} "
                           "per request (NOISEWISE_MAX_FEEDBACK_ITEMS)")
    class_names = calibration.class_names
    try:
        # waits for its group commit without holding a thread, so one commit serves every request in flight
        response, stored = await ingest_async(items, store, class_names, calibration.cl_thresholds)
    except StoreUnavailable as err:  # the file is gone or replaced: a retry cannot help until a restart
        log.error("noisewise: storing feedback failed: %s", err)
        return _error(503, f"{err}; nothing was stored")
    except Exception as err:  # the store is down: nothing was acknowledged, the client retries
        log.error("noisewise: storing feedback failed: %s: %s", type(err).__name__, err)
        return _error(503, f"the store is unavailable ({type(err).__name__}); nothing was stored, retry")
    metrics.observe_feedback({"stored": response.stored, "duplicate": response.duplicates,
                              "rejected": response.rejected}, stored, class_names)
    # pydantic's own serializer: compact UTF-8 like _json, a few times faster (floats in shortest form)
    return response_status(response), response.model_dump_json().encode()


def _validate(raw_items: list, class_names: Sequence[str], thresholds: np.ndarray) -> _Job:
    """Per-item validation that needs no database: the shape of each item and its label."""
    results: list[FeedbackItemResult | None] = [None] * len(raw_items)
    valid: list[tuple[int, FeedbackItem, int]] = []
    for i, raw in enumerate(raw_items):
        try:
            item = FeedbackItem.model_validate(raw)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            echoed = raw.get("prediction_id") if isinstance(raw, dict) else None
            results[i] = FeedbackItemResult(
                # echo the id only when it is one the response can carry (short, valid UTF-8)
                index=i, prediction_id=echoed if isinstance(echoed, str) and len(echoed) <= 64
                and text_problem(echoed) is None else None,
                status=400, outcome="rejected",
                error=f"{location(('items', i, *first['loc']))}: {_friendly(first)}")
            continue
        label = resolve_label(item.label, class_names)
        if label is None:
            results[i] = FeedbackItemResult(index=i, prediction_id=item.prediction_id, status=422, outcome="rejected",
                                            error=f"items[{i}].label: {_label_error(item.label, class_names)}")
            continue
        valid.append((i, item, label))
    return _Job(results=results, valid=valid, class_names=class_names,
                thresholds=np.asarray(thresholds, dtype=np.float32))


class FeedbackWriter:
    """Looks up, scores and commits feedback requests in groups, in one thread.

    Each :meth:`submit` queues a validated request and returns a future of its answer. The thread takes
    every request queued since its last commit and handles them together: one query for their predictions,
    one scoring pass, one transaction (one fsync) for all their items. Every request is answered only after
    that commit, so an acknowledged item is on disk (the answers of a group reach an event loop in one
    wake-up, not one per request); the outcomes are those of storing the requests one
    after the other in arrival order (an item sent twice at once is stored once, then a duplicate). When the
    shared commit fails, each request is committed alone, so one request's failure is never another's.

    After a commit whose group had several requests, the thread waits up to ``linger_s`` for as many to
    queue again before the next commit: clients answered together send their next requests together, and
    without the wait they would be split over two commits (two fsyncs). A lone client never waits. Stored
    predictions never change, so the last ``cached_predictions`` the feedback named are kept in memory and
    not read again (unknown ids are always looked up).

    Parameters
    ----------
    store : noisewise.monitoring.store.Store
        Where feedback goes; the writer stops (after its queued commits) when the store closes.
    max_items : int
        Most items in one transaction.
    linger_s : float
        Longest wait for the requests of the last group before committing.
    cached_predictions : int
        Stored predictions kept in memory for the lookups.
    """

    def __init__(self, store, max_items: int = 8192, linger_s: float = 0.002, cached_predictions: int = 10_000):
        self.store = store
        self.max_items = max_items
        self.linger_s = linger_s
        self._last_group = 1  # requests in the last group: as many are expected back
        self._predictions: collections.OrderedDict = collections.OrderedDict()
        self._cached_predictions = cached_predictions
        self._queue: queue.Queue = queue.Queue()
        self._answers: list[tuple] = []  # (future, result, error) made but not yet delivered
        self._thread = threading.Thread(target=self._run, name="noisewise-feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Future | asyncio.Future:
        """Queue ``job``; returns ``job.done``, which the caller made (a concurrent Future when it blocks, an
        asyncio Future of its running loop when it awaits)."""
        if self._thread.is_alive():
            self._queue.put(job)
        else:
            job.done.set_exception(RuntimeError("the feedback writer is stopped: the store was closed"))
        return job.done

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, size, stop = [first], len(first.valid), False
            # the requests of the last group are on their way back (their clients send the next one once
            # answered): wait a little for as many, so that they share this commit rather than the next one
            deadline = time.monotonic() + self.linger_s
            while size < self.max_items:
                try:
                    if len(jobs) < self._last_group:
                        job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                    else:
                        job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True  # finish this group, then stop
                    break
                jobs.append(job)
                size += len(job.valid)
            self._last_group = len(jobs)
            try:
                self._handle(jobs)
            except Exception as err:  # the store is down (the lookup failed): every request gets the error
                for job in jobs:
                    self._answer(job, error=err)
            self._deliver()
            if stop:
                return

    def _lookup(self, ids: list[str]) -> dict:
        """The stored predictions among ``ids``: from the cache, the others in one query."""
        cache, found, missing = self._predictions, {}, []
        for pid in ids:
            stored = cache.get(pid)
            if stored is None:
                missing.append(pid)
            else:
                found[pid] = stored
                cache.move_to_end(pid)
        if missing:
            fetched = self.store.get_predictions(missing)
            found.update(fetched)
            cache.update(fetched)
            while len(cache) > self._cached_predictions:
                cache.popitem(last=False)
        return found

    def _handle(self, jobs: list[_Job]) -> None:
        found = self._lookup([item.prediction_id for job in jobs for _, item, _ in job.valid])
        for job in jobs:
            _check_predictions(job, found)
        _score(jobs)
        committing = [job for job in jobs if job.rows]
        for job in jobs:
            if not job.rows:
                self._answer(job, result=_answer(job, []))
        self._deliver()  # nothing to commit for these: answered before the commit
        if committing:
            self._commit(committing)

    def _commit(self, jobs: list[_Job]) -> None:
        try:
            outcomes = self.store.add_feedback([row for job in jobs for row in job.rows])
        except Exception as err:
            if len(jobs) == 1:
                self._answer(jobs[0], error=err)
                return
            log.warning("noisewise: a group commit of %d feedback requests failed (%s); committing each alone",
                        len(jobs), type(err).__name__)
            for job in jobs:
                self._commit([job])
            return
        start = 0
        for job in jobs:
            self._answer(job, result=_answer(job, outcomes[start:start + len(job.rows)]))
            start += len(job.rows)

    def _answer(self, job: _Job, result=None, error: BaseException | None = None) -> None:
        self._answers.append((job.done, result, error))

    def _deliver(self) -> None:
        """Settle the answers made since the last delivery: blocking callers' futures at once, and each event
        loop's futures in one callback (one wake-up of the loop for the whole group, not one per request)."""
        answers, self._answers = self._answers, []
        loops: dict[asyncio.AbstractEventLoop, list] = {}
        for done, result, error in answers:
            if isinstance(done, asyncio.Future):
                loops.setdefault(done.get_loop(), []).append((done, result, error))
            else:
                _settle(done, result, error)
        for loop, settled in loops.items():
            try:
                loop.call_soon_threadsafe(_settle_on_loop, settled)
            except RuntimeError:  # the loop is closed: no request waits for these answers any more
                pass


_STOP = object()
_WRITERS_LOCK = threading.Lock()


def writer_for(store) -> FeedbackWriter:
    """The store's feedback writer, started on first use and stopped when the store closes."""
    writer = getattr(store, "_feedback_writer", None)
    if writer is None:
        with _WRITERS_LOCK:
            writer = getattr(store, "_feedback_writer", None)
            if writer is None:
                writer = store._feedback_writer = FeedbackWriter(store)
                store.on_close(writer.close)
    return writer


def _settle(done: Future | asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Answer ``done`` (from the writer thread for a concurrent Future, on its loop for an asyncio one), unless
    it is answered already (a group that failed after some answers were made) or cancelled."""
    if done.done() or (isinstance(done, Future) and not done.set_running_or_notify_cancel()):
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


def _settle_on_loop(answers: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for answer in answers:
        _settle(*answer)


def _check_predictions(job: _Job, found: dict) -> None:
    """Reject the items whose prediction is unknown or was made with another number of classes."""
    k = len(job.class_names)
    for i, item, label in job.valid:
        stored = found.get(item.prediction_id)
        if stored is None:
            job.results[i] = FeedbackItemResult(
                index=i, prediction_id=item.prediction_id, status=404, outcome="rejected",
                error=f"items[{i}].prediction_id: no stored prediction has id {item.prediction_id!r}")
        elif len(stored.probs) != k:
            job.results[i] = FeedbackItemResult(
                index=i, prediction_id=item.prediction_id, status=422, outcome="rejected",
                error=f"items[{i}].prediction_id: made by {stored.model_name}/{stored.model_version} with "
                      f"{len(stored.probs)} classes; the served model has {k}")
        else:
            job.scorable.append((i, item, label, stored))


def _score(jobs: list[_Job]) -> None:
    """Label quality for every scorable item: one pass per (classes, thresholds) among the jobs (one served
    model: one pass), then each job's rows."""
    from noisewise.monitoring.feedback import score_feedback

    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        if job.scorable:
            groups.setdefault((tuple(job.class_names), job.thresholds.tobytes()), []).append(job)
    for members in groups.values():
        probs = np.stack([s.probs for job in members for *_, s in job.scorable]).astype(np.float32)
        labels = np.array([label for job in members for _, _, label, _ in job.scorable], dtype=np.int64)
        scores = score_feedback(probs, labels, members[0].thresholds)
        start = 0
        for job in members:
            end = start + len(job.scorable)
            job.quality, job.suspect, job.proposed = (scores.quality[start:end], scores.suspect[start:end],
                                                      scores.proposed[start:end])
            start = end
            job.rows = [
                FeedbackRow(prediction_id=item.prediction_id, label=label, annotator=item.annotator or "",
                            audited=item.audited, quality=float(job.quality[j]), suspect=bool(job.suspect[j]),
                            proposed=int(job.proposed[j]), in_set=label in stored.prediction_set,
                            model_name=stored.model_name, is_ood=bool(stored.is_ood))
                for j, (_, item, label, stored) in enumerate(job.scorable)
            ]


def _answer(job: _Job, outcomes: list[str]) -> tuple[FeedbackResponse, list[dict]]:
    """The response (and the newly stored items, for the metrics) once the job's rows are committed."""
    results, class_names = job.results, job.class_names
    new_items: list[dict] = []
    # every value below is already of its field's type: the models are built without validating them again
    for j, ((i, item, label, stored), outcome) in enumerate(zip(job.scorable, outcomes)):
        is_ood = bool(stored.is_ood)
        common = dict(index=i, prediction_id=item.prediction_id, label=class_names[label],
                      suspect=bool(job.suspect[j]) and not is_ood, quality=float(job.quality[j]),
                      proposed=class_names[int(job.proposed[j])], is_ood=is_ood)
        if outcome == "conflict":
            results[i] = FeedbackItemResult.model_construct(
                **common, status=409, outcome="rejected",
                error=f"items[{i}]: annotator {item.annotator or ''!r} already labelled this prediction "
                      "differently; the first label stands (send a second opinion under another annotator)")
        else:
            results[i] = FeedbackItemResult.model_construct(**common, status=201 if outcome == "stored" else 200,
                                                            outcome=outcome)
            if outcome == "stored":
                new_items.append({"label": label, "predicted": stored.predicted,
                                  "suspect": bool(job.suspect[j]), "is_ood": is_ood})
    items = [r for r in results if r is not None]
    response = FeedbackResponse.model_construct(
        stored=sum(r.outcome == "stored" for r in items), duplicates=sum(r.outcome == "duplicate" for r in items),
        rejected=sum(r.outcome == "rejected" for r in items), items=items)
    return response, new_items


def response_status(response: FeedbackResponse) -> int:
    if not response.rejected:
        return 200
    if response.rejected < len(response.items):
        return 207
    statuses = {r.status for r in response.items}
    return statuses.pop() if len(statuses) == 1 else 400


def _friendly(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field: an item has prediction_id, label, annotator and audited"
    if error["type"] == "missing":
        return "required"
    return error["msg"]

"""Predictions and feedback labels, durable, in SQL.

SQLite under ``NOISEWISE_HOME`` (``store.db``, WAL journal, ``synchronous=FULL``) by default; any SQLAlchemy
URL in ``NOISEWISE_STORE_URL`` otherwise, PostgreSQL in production (``postgresql+psycopg://user@host/db``).
The schema is versioned with Alembic (``monitoring/migrations``): :class:`Store` upgrades a database to the
current revision when it opens it, so an old store keeps its data across noisewise upgrades.

Each prediction is stored with what label-quality scoring and recalibration need later: the full probability
vector (float32 bytes), the served set (class indices), the OOD score and p-value, the decision, the model
version and a digest of its weights (versions with equal weights give equal probabilities).

Feedback is idempotent: a label is keyed by ``(prediction_id, annotator)``. Sending the same label again is
a ``duplicate`` (acknowledged, not counted twice); a different label from the same annotator for the same
prediction is a ``conflict`` (rejected: the first answer stands; use another annotator name for a second
opinion). Several annotators per prediction are kept. A call returns only after its transaction has
committed, so every acknowledged item is on disk. Rows of many callers can share one call (the service's
group commit, ``services/feedback_api.py``): outcomes are those of storing the rows one after the other.

Nothing is acknowledged that is not in the store the next process will open: every write checks
:meth:`Store.health` before and after its commit, and fails with :class:`StoreUnavailable` when the SQLite
file was deleted or replaced since it was opened (a commit would land in an unlinked file), or when the
PostgreSQL server does not answer. Text the database cannot hold (NUL characters, which PostgreSQL refuses,
and unpaired surrogates, which are not UTF-8) is found per value by :func:`text_problem`, so callers can
refuse one item instead of failing a whole transaction.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

STORE_URL_ENV = "NOISEWISE_STORE_URL"
MIGRATIONS = Path(__file__).with_name("migrations")

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("weights", sa.String(64), nullable=False),
    sa.Column("predicted", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("prediction_set", sa.JSON, nullable=False),
    sa.Column("set_size", sa.Integer, nullable=False),
    sa.Column("is_ood", sa.Boolean, nullable=False),
    sa.Column("ood_score", sa.Float, nullable=False),
    sa.Column("ood_p_value", sa.Float, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=True),
    sa.Column("probs", sa.LargeBinary, nullable=False),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # looked up through the unique index below, whose first column it is (no index of its own to update)
    sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False),
    sa.Column("annotator", sa.String(128), nullable=False),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("audited", sa.Boolean, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("quality", sa.Float, nullable=False),
    sa.Column("suspect", sa.Boolean, nullable=False),
    sa.Column("proposed", sa.Integer, nullable=False),
    sa.Column("in_set", sa.Boolean, nullable=False),
    # copies of the prediction's model and OOD flag: suspects and windows are then one index range, no join
    sa.Column("model_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("is_ood", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("prediction_id", "annotator", name="uq_feedback_prediction_annotator"),
    sa.Index("ix_feedback_suspect_rank", "model_name", "suspect", "is_ood", "quality", "received_at", "id"),
    sa.Index("ix_feedback_ood_recent", "model_name", "is_ood", "received_at", "id"),
    sa.Index("ix_feedback_model_received", "model_name", "received_at", "id", "label", "is_ood", "suspect"),
)
sa.Index("ix_predictions_model_created", predictions.c.model_name, predictions.c.created_at)

reports = sa.Table(
    "reports", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
)

PREDICTION_COLUMNS = ["prediction_id", "created_at", "predicted", "confidence", "set_size", "is_ood", "ood_score",
                      "ood_p_value", "decision", "reason", "model_name", "model_version", "weights"]
FEEDBACK_COLUMNS = ["feedback_id", "prediction_id", "annotator", "label", "audited", "received_at", "predicted",
                    "probs", "in_set", "set_size", "is_ood", "ood_score", "ood_p_value", "confidence", "decision",
                    "reason", "model_name", "model_version", "weights", "quality", "suspect", "proposed"]


class StoreError(RuntimeError):
    """The store cannot be opened or migrated (one line, ready to show)."""


class StoreUnavailable(StoreError):
    """A write cannot be made durable: the SQLite file is gone or was replaced, or the server is down."""


class TimestampOutOfRange(ValueError):
    """A time that has no UTC equivalent in Python's range (years 1 to 9999)."""


def text_problem(value: str) -> str | None:
    """Why the store cannot hold ``value`` as text, or None when it can.

    PostgreSQL refuses NUL characters in text; neither backend can encode an unpaired surrogate (JSON
    ``"\\ud800"`` decodes to one) as UTF-8. Both would fail the whole transaction, so callers check each
    value first."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which the store cannot hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"contains an unpaired surrogate (\\u{ord(value[err.start]):04x}) at position {err.start}: not valid UTF-8"
    return None


def default_url() -> str:
    from noisewise.models.registry import home_dir

    return f"sqlite:///{home_dir() / 'store.db'}"


def store_url() -> str:
    """``NOISEWISE_STORE_URL``, else SQLite under ``NOISEWISE_HOME``."""
    return os.environ.get(STORE_URL_ENV, "").strip() or default_url()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime) -> datetime:
    """Aware UTC. Naive values are taken as UTC (SQLite returns what was stored, UTC, without its zone); aware
    values in another zone are converted, because SQLite would store their wall time and drop the offset.
    Raises :class:`TimestampOutOfRange` for a time whose UTC form is past year 9999 or before year 1."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise TimestampOutOfRange(f"{value.isoformat()} is out of range: in UTC it falls outside years 1 to "
                                  "9999") from None


def to_utc(value: datetime) -> datetime:
    """Public form of the store's time normalisation (see :func:`_utc`): validators use it to refuse a time
    the store could not compare."""
    return _utc(value)


@dataclass(frozen=True)
class PredictionRow:
    """Stored form of one prediction."""

    id: str
    model_name: str
    model_version: str
    weights: str
    predicted: int
    confidence: float
    prediction_set: list[int]
    is_ood: bool
    ood_score: float
    ood_p_value: float
    decision: str
    reason: str | None
    probs: np.ndarray  # float32 [K]
    created_at: datetime | None = None

    def to_row(self) -> dict:
        return {
            "id": self.id, "created_at": _utc(self.created_at) if self.created_at else _now(), "model_name": self.model_name,
            "model_version": str(self.model_version), "weights": self.weights, "predicted": int(self.predicted),
            "confidence": float(self.confidence), "prediction_set": [int(j) for j in self.prediction_set],
            "set_size": len(self.prediction_set), "is_ood": bool(self.is_ood), "ood_score": float(self.ood_score),
            "ood_p_value": float(self.ood_p_value), "decision": self.decision, "reason": self.reason,
            "probs": np.asarray(self.probs, dtype="<f4").tobytes(),
        }


@dataclass(frozen=True)
class FeedbackRow:
    """One validated, scored feedback label, ready to store."""

    prediction_id: str
    label: int
    annotator: str
    audited: bool
    quality: float
    suspect: bool
    proposed: int
    in_set: bool
    #: the prediction's model and OOD flag; looked up in the store when not given
    model_name: str | None = None
    is_ood: bool | None = None


@dataclass(frozen=True)
class StoredPrediction:
    """What feedback scoring needs of a stored prediction."""

    id: str
    predicted: int
    prediction_set: list[int]
    is_ood: bool
    probs: np.ndarray
    model_name: str
    model_version: str


class Store:
    """A predictions + feedback database (see the module docstring).

    Parameters
    ----------
    url : str, optional
        SQLAlchemy URL; default :func:`store_url`.
    """

    def __init__(self, url: str | None = None):
        self.url = url or store_url()
        try:
            self.engine = _engine(self.url)
            # SQLite: writes take the write lock when they begin (BEGIN IMMEDIATE), so two writers queue on
            # the busy timeout instead of failing when a read-then-write transaction cannot upgrade its lock
            self._writer = _engine(self.url, begin="BEGIN IMMEDIATE") if self.engine.dialect.name == "sqlite" \
                else self.engine
            upgrade(self.engine)
            self._file = _sqlite_file(self.engine)
            # the file this store writes to: a write is refused once the path no longer leads to it
            self._identity = _identity(self._file) if self._file is not None else None
        except StoreError:
            raise
        except Exception as err:
            raise StoreError(f"cannot open the store {_safe(self.url)}: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
        self._upsert = _insert_ignore(self.engine.dialect.name)
        self._on_close: list = []

    def on_close(self, callback) -> None:
        """Call ``callback()`` first thing in :meth:`close` (a writer thread finishing its queued commits)."""
        self._on_close.append(callback)

    def close(self) -> None:
        while self._on_close:
            self._on_close.pop()()
        self.engine.dispose()
        self._writer.dispose()

    # --- health --------------------------------------------------------------------------------------------
    def health(self) -> str | None:
        """None when writes can be made durable, else why not (one line, ready to show).

        SQLite: the file opened is still the one at its path (deleted, or replaced by another file with the
        same name, and the server would write to a file no later process sees). PostgreSQL: the server
        answers ``SELECT 1``. Cheap enough for a readiness probe (a ``stat``, or one round trip)."""
        if self._file is not None:
            try:
                now = _identity(self._file)
            except FileNotFoundError:
                return f"the store file {self._file} was deleted while the service had it open; restart the service"
            except OSError as err:
                return f"the store file {self._file} cannot be checked: {err.strerror or err}"
            if now != self._identity:
                return (f"the store file {self._file} was replaced by another file while the service had it open; "
                        "restart the service")
            return None
        if self.engine.dialect.name == "sqlite":  # in memory
            return None
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as err:
            return f"the store {_safe(self.url)} does not answer: {type(err).__name__}: {_first_line(err)}"
        return None

    def _require_durable(self) -> None:
        """Raise :class:`StoreUnavailable` unless the SQLite file is the one opened (a no-op stat on SQLite; the
        server's own errors already fail PostgreSQL writes)."""
        if self._file is not None:
            problem = self.health()
            if problem is not None:
                raise StoreUnavailable(problem)

    # --- predictions ---------------------------------------------------------------------------------------
    def add_predictions(self, rows: Sequence[PredictionRow]) -> None:
        """Store served predictions (one transaction)."""
        if rows:
            self._require_durable()
            with self._writer.begin() as conn:
                conn.execute(predictions.insert(), [r.to_row() for r in rows])
            self._require_durable()  # deleted during the commit: it went to an unlinked file

    def get_predictions(self, ids: Iterable[str]) -> dict[str, StoredPrediction]:
        """The stored predictions among ``ids``, by id (unknown ids are absent)."""
        ids = list(dict.fromkeys(ids))
        found: dict[str, StoredPrediction] = {}
        cols = [predictions.c[c] for c in ("id", "predicted", "prediction_set", "is_ood", "probs", "model_name",
                                          "model_version")]
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):  # bound the IN list
                chunk = ids[start:start + 500]
                for row in conn.execute(sa.select(*cols).where(predictions.c.id.in_(chunk))):
                    found[row.id] = StoredPrediction(row.id, row.predicted, list(row.prediction_set), row.is_ood,
                                                     np.frombuffer(row.probs, dtype="<f4"), row.model_name,
                                                     row.model_version)
        return found

    def count(self, table: str = "feedback") -> int:
        target = {"feedback": feedback, "predictions": predictions, "reports": reports}[table]
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(target)).scalar_one())

    # --- feedback ------------------------------------------------------------------------------------------
    def add_feedback(self, rows: Sequence[FeedbackRow]) -> list[str]:
        """Store feedback labels in one transaction; returns one outcome per row: ``stored``, ``duplicate``
        (the same label from the same annotator is already stored) or ``conflict`` (a different label from
        the same annotator is stored; it stands). Rows must reference stored predictions."""
        if not rows:
            return []
        now = _now()
        keys = [(r.prediction_id, r.annotator) for r in rows]
        new: dict[tuple[str, str], dict] = {}
        for r, key in zip(rows, keys):
            new.setdefault(key, {"prediction_id": r.prediction_id, "annotator": r.annotator, "label": int(r.label),
                                 "audited": bool(r.audited), "received_at": now, "quality": float(r.quality),
                                 "suspect": bool(r.suspect), "proposed": int(r.proposed), "in_set": bool(r.in_set),
                                 "model_name": r.model_name, "is_ood": r.is_ood})
        self._require_durable()
        with self._writer.begin() as conn:
            _fill_prediction_fields(conn, list(new.values()))
            # insert-or-ignore with RETURNING: the rows returned are exactly the ones this call inserted, also
            # when a concurrent caller sends the same items; everything else is read back to classify it
            inserted = {(row.prediction_id, row.annotator) for row in conn.execute(
                self._upsert.returning(feedback.c.prediction_id, feedback.c.annotator), list(new.values()))}
            # an inserted key holds the label just written: only the others are read back
            stored = {key: new[key]["label"] for key in inserted}
            stored.update(self._labels_for(conn, [key for key in new if key not in inserted]))
        self._require_durable()  # deleted during the commit: it went to an unlinked file
        outcomes, claimed = [], set()
        for r, key in zip(rows, keys):
            if key in inserted and key not in claimed and new[key]["label"] == r.label:
                outcomes.append("stored")
                claimed.add(key)
            else:
                outcomes.append("duplicate" if stored.get(key) == r.label else "conflict")
        return outcomes

    @staticmethod
    def _labels_for(conn, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Stored labels of exactly ``keys`` (not of every annotator of their predictions)."""
        found: dict[tuple[str, str], int] = {}
        wanted = set(keys)
        keys = sorted(wanted)
        for start in range(0, len(keys), 250):
            chunk = keys[start:start + 250]
            query = sa.select(feedback.c.prediction_id, feedback.c.annotator, feedback.c.label).where(
                feedback.c.prediction_id.in_(sorted({k[0] for k in chunk})),
                feedback.c.annotator.in_(sorted({k[1] for k in chunk})))
            for row in conn.execute(query):
                if (row.prediction_id, row.annotator) in wanted:
                    found[(row.prediction_id, row.annotator)] = row.label
        return found

    # --- frames for monitoring -----------------------------------------------------------------------------
    def feedback_frame(self, since: datetime | None = None, window: int | None = None,
                       model_name: str | None = None) -> pd.DataFrame:
        """Feedback joined with its predictions (columns :data:`FEEDBACK_COLUMNS`), oldest first; ``window``
        keeps the most recent items (see :func:`feedback_frame_query`)."""
        query = feedback_frame_query(since, window, model_name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        frame = pd.DataFrame([r._asdict() for r in reversed(rows)], columns=FEEDBACK_COLUMNS)
        frame["probs"] = [np.frombuffer(b, dtype="<f4") for b in frame["probs"]]
        return _typed(frame, "received_at")

    def prediction_frame(self, since: datetime | None = None, limit: int | None = None,
                         model_name: str | None = None) -> pd.DataFrame:
        """Served predictions (columns :data:`PREDICTION_COLUMNS`), oldest first; ``limit`` keeps the most
        recent."""
        p = predictions
        query = sa.select(p.c.id.label("prediction_id"), *(p.c[c] for c in PREDICTION_COLUMNS[1:]))
        if since is not None:
            query = query.where(p.c.created_at >= _utc(since))
        if model_name is not None:
            query = query.where(p.c.model_name == model_name)
        query = query.order_by(p.c.created_at.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return _typed(pd.DataFrame([r._asdict() for r in reversed(rows)], columns=PREDICTION_COLUMNS), "created_at")

    # --- ranked suspects and whole-table totals -------------------------------------------------------------
    def suspect_page(self, model_name: str, *, since: datetime | None = None, label: int | None = None,
                     limit: int = 100, after: SuspectKey | None = None, ood_after: OodKey | None = None,
                     skip_suspects: bool = False, skip_ood: bool = False) -> SuspectPage:
        """One page of each suspects list of ``model_name``, ranked in SQL (see :func:`suspect_queries`).

        ``after`` / ``ood_after`` continue each list after the given row (keyset pagination); ``skip_*``
        leaves a list out (a previous page ended it). The counts are over every row matching the filters."""
        queries = suspect_queries(model_name, since=since, label=label, limit=limit + 1, after=after,
                                  ood_after=ood_after)
        with self.engine.connect() as conn:
            flagged = [] if skip_suspects else [r._asdict() for r in conn.execute(queries["suspects"])]
            ood = [] if skip_ood else [r._asdict() for r in conn.execute(queries["ood"])]
            counts = conn.execute(queries["counts"]).one()
        return SuspectPage(suspects=flagged[:limit], ood=ood[:limit], more_suspects=len(flagged) > limit,
                           more_ood=len(ood) > limit, n_feedback=int(counts.n_feedback or 0),
                           n_suspects=int(counts.n_suspects or 0), n_ood=int(counts.n_ood or 0))

    def suspects(self, model_name: str, class_names: Sequence[str], *, since: datetime | None = None,
                 class_name: str | None = None, limit: int = 100, cursor: str | None = None) -> dict:
        """The ``/suspects`` answer: ``noisewise.monitoring.feedback.suspects`` computed in SQL, one page at a
        time (same lists, order and counts), plus ``next_cursor`` for the next page (None after the last).

        Raises
        ------
        ValueError
            For a ``class_name`` that is not one of ``class_names``, or a ``cursor`` not handed out here
            (``noisewise.monitoring.feedback.CursorError``)."""
        from noisewise.monitoring.feedback import decode_cursor, suspects_page

        names = list(class_names)
        if class_name is not None and class_name not in names:
            raise ValueError(f"`class_name` {class_name!r} is not a class of this model; valid names: {names}.")
        started = decode_cursor(cursor) if cursor is not None else None
        page = self.suspect_page(
            model_name, since=since, label=None if class_name is None else names.index(class_name), limit=limit,
            after=started and started["after"], ood_after=started and started["ood_after"],
            skip_suspects=bool(started and started["suspects_done"]), skip_ood=bool(started and started["ood_done"]))
        return suspects_page(page, names, started=started)

    def feedback_totals(self, model_name: str) -> dict[str, int]:
        """Whole-table counts for ``model_name`` from SQL aggregates (no row is loaded): ``predictions``,
        ``feedback``, ``feedback_ood``, ``suspects`` (in-distribution rows flagged at ingestion)."""
        counts = suspect_queries(model_name)["counts"]
        n_predictions = sa.select(sa.func.count()).select_from(predictions).where(
            predictions.c.model_name == model_name)
        with self.engine.connect() as conn:
            row = conn.execute(counts).one()
            total_predictions = int(conn.execute(n_predictions).scalar_one())
        return {"predictions": total_predictions, "feedback": int(row.n_feedback or 0),
                "feedback_ood": int(row.n_ood or 0), "suspects": int(row.n_suspects or 0)}

    # --- monitor reports -----------------------------------------------------------------------------------
    def add_report(self, kind: str, payload: Mapping) -> None:
        self._require_durable()
        with self._writer.begin() as conn:
            conn.execute(reports.insert(), {"created_at": _now(), "kind": kind, "payload": dict(payload)})
        self._require_durable()

    def latest_report(self, kind: str) -> dict | None:
        query = sa.select(reports.c.payload, reports.c.created_at).where(reports.c.kind == kind).order_by(
            reports.c.id.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else {**row.payload, "created_at": _utc(row.created_at).isoformat()}


#: Position of a row in the suspects list: (quality, received_at, feedback id), the ranking's sort key.
SuspectKey = tuple[float, datetime, int]
#: Position of a row in the OOD list: (received_at, feedback id), newest first.
OodKey = tuple[datetime, int]

SUSPECT_COLUMNS = (feedback.c.id.label("feedback_id"), feedback.c.prediction_id, feedback.c.annotator,
                   feedback.c.label, feedback.c.proposed, feedback.c.quality, feedback.c.received_at,
                   feedback.c.audited)


@dataclass(frozen=True)
class SuspectPage:
    """Rows of one suspects page (dicts of the selected columns) and the counts over every matching row."""

    suspects: list[dict]
    ood: list[dict]
    more_suspects: bool
    more_ood: bool
    n_feedback: int
    n_suspects: int
    n_ood: int


def suspect_queries(model_name: str, *, since: datetime | None = None, label: int | None = None,
                    limit: int | None = None, after: SuspectKey | None = None,
                    ood_after: OodKey | None = None) -> dict[str, sa.Select]:
    """The three queries behind a suspects page, on one model's feedback received at or after ``since`` whose
    given label is ``label`` (each filter when not None).

    * ``suspects``: in-distribution rows flagged at ingestion, most suspicious first: ``ORDER BY quality,
      received_at, id`` (ties: earliest first), after the row ``after``; index ``ix_feedback_suspect_rank``.
    * ``ood``: rows on OOD inputs whatever their flag, newest first (``received_at DESC, id DESC``), after
      ``ood_after``; index ``ix_feedback_ood_recent``.
    * ``counts``: ``n_feedback``, ``n_suspects``, ``n_ood`` over every matching row, one pass over the
      covering index ``ix_feedback_model_received``.

    Every feedback row counts (several annotators of one prediction are several rows), as in
    ``noisewise.monitoring.feedback.suspects``."""
    f = feedback
    where = [f.c.model_name == model_name]
    if since is not None:
        where.append(f.c.received_at >= _utc(since))
    if label is not None:
        where.append(f.c.label == int(label))
    flagged = sa.select(*SUSPECT_COLUMNS).where(
        *where, f.c.suspect == sa.true(), f.c.is_ood == sa.false())
    if after is not None:
        quality, received_at, feedback_id = after
        flagged = flagged.where(sa.tuple_(f.c.quality, f.c.received_at, f.c.id) >
                                sa.tuple_(float(quality), _utc(received_at), int(feedback_id)))
    flagged = flagged.order_by(f.c.quality, f.c.received_at, f.c.id)
    # the prediction's columns are joined for the listed rows only (primary-key lookups)
    ood = sa.select(*SUSPECT_COLUMNS, predictions.c.predicted, predictions.c.ood_score, predictions.c.ood_p_value
                    ).join(predictions, predictions.c.id == f.c.prediction_id).where(*where, f.c.is_ood == sa.true())
    if ood_after is not None:
        received_at, feedback_id = ood_after
        ood = ood.where(sa.tuple_(f.c.received_at, f.c.id) < sa.tuple_(_utc(received_at), int(feedback_id)))
    ood = ood.order_by(f.c.received_at.desc(), f.c.id.desc())
    if limit is not None:
        flagged, ood = flagged.limit(limit), ood.limit(limit)
    counts = sa.select(
        sa.func.count().label("n_feedback"),
        sa.func.sum(sa.case((sa.and_(f.c.suspect == sa.true(), f.c.is_ood == sa.false()), 1), else_=0)
                    ).label("n_suspects"),
        sa.func.sum(sa.case((f.c.is_ood == sa.true(), 1), else_=0)).label("n_ood"),
    ).where(*where)
    return {"suspects": flagged, "ood": ood, "counts": counts}


def feedback_frame_query(since: datetime | None = None, window: int | None = None,
                         model_name: str | None = None) -> sa.Select:
    """Feedback joined with its predictions, newest first (``received_at``, then id), the newest ``window``
    rows when given: with ``model_name`` an index range of ``ix_feedback_model_received``, so a window reads
    only its own rows and their predictions."""
    p, f = predictions, feedback
    query = sa.select(
        f.c.id.label("feedback_id"), f.c.prediction_id, f.c.annotator, f.c.label, f.c.audited, f.c.received_at,
        p.c.predicted, p.c.probs, f.c.in_set, p.c.set_size, p.c.is_ood, p.c.ood_score, p.c.ood_p_value,
        p.c.confidence, p.c.decision, p.c.reason, p.c.model_name, p.c.model_version, p.c.weights, f.c.quality,
        f.c.suspect, f.c.proposed,
    ).join(p, p.c.id == f.c.prediction_id)
    if since is not None:
        query = query.where(f.c.received_at >= _utc(since))
    if model_name is not None:
        query = query.where(f.c.model_name == model_name)  # the feedback row's copy: an index range
    query = query.order_by(f.c.received_at.desc(), f.c.id.desc())
    return query if window is None else query.limit(window)


def _fill_prediction_fields(conn, rows: list[dict]) -> None:
    """Give each feedback row its prediction's model name and OOD flag where the caller did not: one
    primary-key lookup per 500 predictions. An unknown prediction keeps the defaults; the foreign key then
    refuses the row."""
    missing = sorted({r["prediction_id"] for r in rows if r["model_name"] is None or r["is_ood"] is None})
    found: dict[str, tuple[str, bool]] = {}
    for start in range(0, len(missing), 500):
        chunk = missing[start:start + 500]
        query = sa.select(predictions.c.id, predictions.c.model_name, predictions.c.is_ood).where(
            predictions.c.id.in_(chunk))
        found.update({row.id: (row.model_name, bool(row.is_ood)) for row in conn.execute(query)})
    for r in rows:
        model_name, is_ood = found.get(r["prediction_id"], ("", False))
        if r["model_name"] is None:
            r["model_name"] = model_name
        if r["is_ood"] is None:
            r["is_ood"] = is_ood
        r["is_ood"] = bool(r["is_ood"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _sqlite_file(engine: sa.Engine) -> Path | None:
    """The absolute path of a file-backed SQLite store, else None."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(os.path.abspath(database))


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of ``path``: a deleted-and-recreated or moved-over file has another."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _typed(frame: pd.DataFrame, time_column: str) -> pd.DataFrame:
    frame[time_column] = pd.to_datetime([_utc(t) for t in frame[time_column]], utc=True)
    for column, dtype in (("predicted", "int64"), ("label", "int64"), ("proposed", "int64"), ("set_size", "int64"),
                          ("feedback_id", "int64"), ("audited", bool), ("is_ood", bool), ("in_set", bool),
                          ("suspect", bool)):
        if column in frame:
            frame[column] = frame[column].astype(dtype)
    return frame


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


def _engine(url: str, begin: str = "BEGIN") -> sa.Engine:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        try:
            import psycopg  # noqa: F401  (the driver is an optional extra)
        except ImportError:
            raise StoreError("a PostgreSQL store needs its driver: pip install 'noisewise[postgres]'") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.query.get("mode") == "memory":
            raise StoreError(f"the store {url} is an in-memory SQLite database: nothing stored there "
                             "survives the process (and each connection would see its own); use a file, "
                             "e.g. sqlite:////var/lib/noisewise/store.db")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            # pysqlite's own transaction handling commits before DDL; take control of BEGIN so that a
            # migration is one transaction (SQLAlchemy's documented recipe)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # WAL: readers (monitor, CLI) never block the service's writes; FULL: a committed feedback item
            # survives a crash of the process and of the machine
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql(begin)

        return engine
    # connect_timeout: a server that is down fails a request (and the health check) in seconds, not minutes
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" and \
        "connect_timeout" not in parsed.query else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _switch_to_wal(cursor, timeout_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried: on a brand-new file SQLite refuses the switch at once ("database
    is locked", no busy wait) while another connection opens the same file."""
    deadline = time.monotonic() + timeout_s
    while cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _insert_ignore(dialect: str):
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise StoreError(f"unsupported store backend {dialect!r}: use SQLite or PostgreSQL")
    return insert(feedback).on_conflict_do_nothing(index_elements=["prediction_id", "annotator"])


_MIGRATION_LOCK = threading.Lock()  # alembic's `context` proxy is process-global: one migration at a time
_PG_MIGRATION_LOCK_ID = 0x6E6F6973  # pg_advisory_xact_lock key ("nois")


def upgrade(engine: sa.Engine) -> str:
    """Migrate the database to the newest schema revision (Alembic); returns the revision.

    Safe when several processes open a new store at once (the service and a CLI): the revision check and the
    migration run in one transaction that holds a database-wide lock (``BEGIN EXCLUSIVE`` on SQLite, an
    advisory lock on PostgreSQL), so the second process waits and then finds the schema at head."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return head
    sqlite = engine.dialect.name == "sqlite"
    migrator = _engine(engine.url.render_as_string(hide_password=False), begin="BEGIN EXCLUSIVE") if sqlite else engine
    try:
        with _MIGRATION_LOCK, migrator.begin() as conn:
            if not sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_ID})
            if MigrationContext.configure(conn).get_current_revision() != head:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
    finally:
        if migrator is not engine:
            migrator.dispose()
    return head

"""The SQL store (monitoring/store.py) on SQLite and on a real PostgreSQL server that the test run starts
(tests/postgres_server.py: initdb/pg_ctl as a non-root user on a free loopback port, stopped at the end).

Every test runs on both backends; each gets a fresh SQLite file or a fresh PostgreSQL database. The server
runs in a non-UTC time zone so that a timestamp read back in UTC is the code's doing, not the server's.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from noisewise.monitoring.store import (
    FEEDBACK_COLUMNS,
    MIGRATIONS,
    PREDICTION_COLUMNS,
    FeedbackRow,
    PredictionRow,
    Store,
    StoreError,
    metadata,
    upgrade,
)
from tests.postgres_server import free_port, postgres_server_fixture, store_url_fixture  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
K = 5  # classes
OUTCOMES = {"stored", "duplicate", "conflict"}
TABLES = {"predictions", "feedback", "reports", "alembic_version"}

pytestmark = pytest.mark.timeout(120)

def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def store(url):
    opened = Store(url)
    yield opened
    opened.close()


def prediction(i: int, *, probs=None, created_at=None, model_name="mlp", prediction_set=(0,), is_ood=False,
               ood_score=0.25, ood_p_value=0.5, decision="accept", reason=None) -> PredictionRow:
    if probs is None:
        probs = np.full(K, 1.0 / K, dtype=np.float32)
    return PredictionRow(id=f"p{i:06d}", model_name=model_name, model_version="3", weights="ab" * 32,
                         predicted=int(np.argmax(probs)), confidence=float(np.max(probs)),
                         prediction_set=list(prediction_set), is_ood=is_ood, ood_score=ood_score,
                         ood_p_value=ood_p_value, decision=decision, reason=reason, probs=probs,
                         created_at=created_at)


def label(i: int, value: int = 0, annotator: str = "", audited: bool = False) -> FeedbackRow:
    return FeedbackRow(prediction_id=f"p{i:06d}", label=value, annotator=annotator, audited=audited,
                       quality=0.125 * value, suspect=value % 2 == 1, proposed=(value + 1) % K, in_set=value == 0)


def feedback_rows(url: str) -> list[tuple]:
    """Every stored (prediction_id, annotator, label), read with a separate engine."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(
                "SELECT prediction_id, annotator, label FROM feedback ORDER BY prediction_id, annotator")]
    finally:
        engine.dispose()


# A worker process: opens its own Store (before or, with open_late, after the go file appears), waits for
# the go file, sends the same feedback batch from several threads at once, prints one JSON line of outcomes
# per call (or the error); optionally dies by SIGKILL right after the last acknowledged call (a crash: no
# close, no atexit, no checkpoint).
WORKER = r"""
import json, os, signal, sys, threading, time
from pathlib import Path
from noisewise.monitoring.store import FeedbackRow, Store
args = json.loads(sys.argv[1])
if not args.get("open_late"):
    store = Store(args["url"])
rows = [FeedbackRow(prediction_id=p, label=l, annotator=a, audited=False, quality=0.5, suspect=False,
                    proposed=0, in_set=True) for p, l, a in args["items"]]
Path(args["ready"]).touch()
while args["go"] and not os.path.exists(args["go"]):
    time.sleep(0.001)
if args.get("open_late"):
    store = Store(args["url"])
results = []
def send():
    try:
        results.append(store.add_feedback(rows))
    except Exception as err:
        results.append(f"{type(err).__name__}: {err}")
threads = [threading.Thread(target=send) for _ in range(args["threads"])]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(results), flush=True)
if args.get("kill"):
    os.kill(os.getpid(), signal.SIGKILL)
store.close()
"""


def start_worker(tmp_path: Path, name: str, **args) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps({**args, "ready": str(ready)})], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def wait_ready(procs: list[tuple[subprocess.Popen, Path]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(ready.exists() for _, ready in procs):
        for proc, _ in procs:
            if proc.poll() is not None:
                pytest.fail(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "workers did not open the store in time"
        time.sleep(0.01)


def worker_results(proc: subprocess.Popen) -> list:
    out, err = proc.communicate(timeout=60)
    assert out.strip(), f"worker printed nothing (rc {proc.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


# --- schema and migrations ---------------------------------------------------------------------------------
def test_open_creates_schema_at_head(url):
    store = Store(url)
    try:
        names = set(sa.inspect(store.engine).get_table_names())
        assert TABLES <= names
        with store.engine.connect() as conn:
            versions = [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]
            # the migration builds exactly the schema the module declares (columns, types, indexes, constraints)
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert versions == [head_revision()]
        assert diff == []
        assert {u["name"] for u in sa.inspect(store.engine).get_unique_constraints("feedback")} == {
            "uq_feedback_prediction_annotator"}
    finally:
        store.close()


def test_reopen_is_a_noop_and_keeps_data(url):
    store = Store(url)
    store.add_predictions([prediction(1)])
    assert store.add_feedback([label(1, 2)]) == ["stored"]
    store.close()

    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        again = Store(url)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    try:
        # an up-to-date store is only read on open: no DDL, no version bump
        writes = [s for s in statements if s.lstrip().split()[0].upper() in {"CREATE", "ALTER", "DROP", "INSERT",
                                                                              "UPDATE", "DELETE"}]
        assert writes == []
        assert again.count("predictions") == 1 and again.count("feedback") == 1
        with again.engine.connect() as conn:
            assert [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")] == [head_revision()]
    finally:
        again.close()


def test_upgrade_on_an_empty_database_creates_every_table(url):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is None
        assert sa.inspect(engine).get_table_names() == []
        assert upgrade(engine) == head_revision()
        engine.dispose()  # fresh inspector: table names are cached per connection on some dialects
        assert set(sa.inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head_revision()
        assert upgrade(engine) == head_revision()  # already at head: nothing to do, no error
    finally:
        engine.dispose()


def _open_concurrently_in_threads(url: str, n: int) -> list[str]:
    errors: list[str] = []
    barrier = threading.Barrier(n)

    def open_store():
        barrier.wait()
        try:
            Store(url).close()
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=open_store, daemon=True) for _ in range(n)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    # a deadlocked migration must fail the test, not hang it (the database's drop ends the stuck sessions)
    return errors + [f"{sum(t.is_alive() for t in threads)} of {n} threads still opening after 10 s"] * any(
        t.is_alive() for t in threads)


# Known bug, monitoring/store.py _engine(): `PRAGMA journal_mode=WAL` on a brand-new file fails at once with
# "database is locked" (SQLite does not busy-wait there) when another connection opens the same new file;
# hit in about 1 run in 10 below. Fix: retry the switch until the file reports wal (see the change that added
# this file). Remove this mark with the fix: the test is then its regression guard.

@pytest.mark.parametrize("url", ["sqlite", "postgresql"], indirect=True)
def test_concurrent_first_open_in_threads(url, tmp_path):
    # SQLite: several new files, since a lost race on one file is a matter of timing
    urls = [url] + ([f"sqlite:///{tmp_path / f'store{i}.db'}" for i in range(5)] if url.startswith("sqlite") else [])
    for each in urls:
        assert _open_concurrently_in_threads(each, 4) == [], each
    store = Store(url)
    try:
        assert TABLES <= set(sa.inspect(store.engine).get_table_names())
    finally:
        store.close()


def test_concurrent_first_open_in_processes(url, tmp_path):
    go = tmp_path / "go"
    procs = [start_worker(tmp_path, f"w{i}", url=url, items=[], go=str(go), threads=0, open_late=True)
             for i in range(4)]
    wait_ready(procs)
    go.touch()  # all four open (and migrate) the empty database within a millisecond or two
    for proc, _ in procs:
        proc.wait(timeout=60)
    errors = [proc.stderr.read()[-500:] for proc, _ in procs if proc.returncode != 0]
    assert errors == []
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")] == [head_revision()]
    finally:
        store.close()


# --- predictions -------------------------------------------------------------------------------------------
def test_predictions_round_trip(store):
    rng = np.random.default_rng(0)
    raw = rng.dirichlet(np.ones(K), size=3).astype(np.float32)
    raw[2] = [np.float32(1e-45), np.nextafter(np.float32(0.5), np.float32(1)), 0.25, 0.125, np.float32(1) / 3]
    rows = [prediction(0, probs=raw[0], prediction_set=[1, 3], is_ood=True, ood_score=0.1 + 0.2,
                       ood_p_value=1 / 3, decision="abstain", reason="ood"),
            prediction(1, probs=raw[1].astype(np.float64), prediction_set=[]),  # float64 in, float32 stored
            prediction(2, probs=raw[2], prediction_set=[0, 1, 2, 3, 4])]
    store.add_predictions(rows)
    got = store.get_predictions(["p000002", "nope", "p000000", "p000001", "p000000"])
    assert set(got) == {"p000000", "p000001", "p000002"}
    for i, row in enumerate(rows):
        stored = got[row.id]
        assert stored.probs.dtype == np.float32 and stored.probs.shape == (K,)
        assert stored.probs.tobytes() == raw[i].tobytes()  # bit-exact, denormals included
        assert stored.prediction_set == list(row.prediction_set)
        assert stored.is_ood is row.is_ood and stored.predicted == row.predicted
        assert (stored.model_name, stored.model_version) == ("mlp", "3")
    frame = store.prediction_frame().set_index("prediction_id")
    assert frame.loc["p000000", "ood_score"] == 0.1 + 0.2 and frame.loc["p000000", "ood_p_value"] == 1 / 3
    assert frame.loc["p000000", "reason"] == "ood" and frame.loc["p000000", "decision"] == "abstain"
    assert frame.loc["p000001", "reason"] is None
    assert frame["set_size"].tolist() == [2, 0, 5]
    assert frame["is_ood"].tolist() == [True, False, False]
    assert store.get_predictions([]) == {} and store.get_predictions(["unknown"]) == {}


def test_get_predictions_beyond_one_chunk(store):
    n = 1234  # > 2 chunks of 500
    probs = np.random.default_rng(1).dirichlet(np.ones(K), size=n).astype(np.float32)
    store.add_predictions([prediction(i, probs=probs[i]) for i in range(n)])
    assert store.count("predictions") == n
    ids = [f"p{i:06d}" for i in range(n)] + [f"x{i}" for i in range(7)]
    got = store.get_predictions(ids[::-1])
    assert len(got) == n and all(got[f"p{i:06d}"].probs.tobytes() == probs[i].tobytes() for i in range(n))
    # feedback reads existing labels in chunks too: a second send of all n is n duplicates, no new rows
    assert store.add_feedback([label(i, i % K) for i in range(n)]) == ["stored"] * n
    assert store.add_feedback([label(i, i % K) for i in range(n)]) == ["duplicate"] * n
    assert store.count("feedback") == n


# --- feedback ----------------------------------------------------------------------------------------------
def test_feedback_outcomes_and_exact_counts(store, url):
    store.add_predictions([prediction(i) for i in range(4)])
    assert store.add_feedback([label(0, 1), label(1, 2, "ann")]) == ["stored", "stored"]
    assert store.count("feedback") == 2
    # a retry of the same items: acknowledged, not counted again
    assert store.add_feedback([label(0, 1), label(1, 2, "ann")]) == ["duplicate", "duplicate"]
    assert store.count("feedback") == 2
    # a different label from the same annotator: refused, the first label stands
    assert store.add_feedback([label(0, 3)]) == ["conflict"]
    # second and third opinions under other annotators are kept
    assert store.add_feedback([label(0, 3, "bob"), label(0, 4, "carol")]) == ["stored", "stored"]
    # the same key twice within one batch: first stored, then duplicate / conflict
    assert store.add_feedback([label(2, 1), label(2, 1), label(2, 0)]) == ["stored", "duplicate", "conflict"]
    assert store.add_feedback([]) == []
    assert store.count("feedback") == 5
    assert feedback_rows(url) == [("p000000", "", 1), ("p000000", "bob", 3), ("p000000", "carol", 4),
                                  ("p000001", "ann", 2), ("p000002", "", 1)]
    frame = store.feedback_frame().set_index(["prediction_id", "annotator"])
    assert frame.loc[("p000002", ""), "label"] == 1  # the first label of the batch, not the conflicting one


def test_unknown_prediction_is_refused_by_the_database(store, url):
    store.add_predictions([prediction(0)])
    # the foreign key rejects the whole batch, on SQLite (PRAGMA foreign_keys=ON) as on PostgreSQL
    with pytest.raises(sa.exc.IntegrityError):
        store.add_feedback([label(0, 1), label(99, 1)])
    assert store.count("feedback") == 0  # atomic: the valid item of the failed batch is not stored either
    assert store.add_feedback([label(0, 1)]) == ["stored"]
    with store.engine.connect() as conn:
        # and below the store's API: a raw insert with an unknown prediction id fails too
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO feedback (prediction_id, annotator, label, audited, received_at, "
                                 "quality, suspect, proposed, in_set) VALUES ('p999999', 'x', 0, false, "
                                 ":t, 0.5, false, 0, true)"), {"t": datetime.now(timezone.utc)})
    assert feedback_rows(url) == [("p000000", "", 1)]


def _send_from_threads(store: Store, rows: list[FeedbackRow], n_threads: int) -> list:
    results: list = []
    barrier = threading.Barrier(n_threads)

    def send():
        barrier.wait()
        try:
            results.append(store.add_feedback(rows))
        except Exception as err:
            results.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=send) for _ in range(n_threads)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_concurrent_feedback_from_threads_one_row_per_key(store, url):
    n_keys, n_threads = 40, 6
    store.add_predictions([prediction(i) for i in range(n_keys)])
    rows = [label(i, i % K, "a" if i % 2 else "") for i in range(n_keys)]
    results = _send_from_threads(store, rows, n_threads)
    assert [r for r in results if not isinstance(r, list)] == []  # no exception in any call
    assert len(results) == n_threads and all(len(r) == n_keys and set(r) <= {"stored", "duplicate"} for r in results)
    assert store.count("feedback") == n_keys
    assert feedback_rows(url) == sorted((r.prediction_id, r.annotator, r.label) for r in rows)


def test_concurrent_feedback_reports_stored_once(store):
    n_keys, n_threads = 40, 6
    store.add_predictions([prediction(i) for i in range(n_keys)])
    results = _send_from_threads(store, [label(i, 1) for i in range(n_keys)], n_threads)
    assert all(isinstance(r, list) for r in results)
    # the service counts `stored` outcomes in its metrics: each key must be reported stored exactly once
    stored_per_key = np.sum([[o == "stored" for o in r] for r in results], axis=0)
    assert stored_per_key.tolist() == [1] * n_keys


def test_concurrent_feedback_from_processes(url, tmp_path):
    n_keys = 30
    store = Store(url)
    store.add_predictions([prediction(i) for i in range(n_keys)])
    store.close()
    items = [[f"p{i:06d}", i % K, "ann"] for i in range(n_keys)]
    go = tmp_path / "go"
    procs = [start_worker(tmp_path, f"w{i}", url=url, items=items, go=str(go), threads=3) for i in range(2)]
    wait_ready(procs)
    go.touch()
    results = [call for proc, _ in procs for call in worker_results(proc)]
    assert [r for r in results if not isinstance(r, list)] == []
    assert len(results) == 6 and all(len(r) == n_keys and set(r) <= {"stored", "duplicate"} for r in results)
    assert feedback_rows(url) == [(p, a, lab) for p, lab, a in items]
    stored_per_key = np.sum([[o == "stored" for o in r] for r in results], axis=0)
    # the service counts `stored` outcomes in its metrics: once per key, whichever process stored it
    assert stored_per_key.tolist() == [1] * n_keys


# --- frames ------------------------------------------------------------------------------------------------
def test_empty_frames_have_the_columns(store):
    feedback = store.feedback_frame()
    predictions = store.prediction_frame()
    assert list(feedback.columns) == FEEDBACK_COLUMNS and len(feedback) == 0
    assert list(predictions.columns) == PREDICTION_COLUMNS and len(predictions) == 0
    assert str(feedback["received_at"].dtype) == "datetime64[ns, UTC]"
    assert str(predictions["created_at"].dtype) == "datetime64[ns, UTC]"


def test_feedback_frame_columns_types_order_and_filters(store):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(K), size=12).astype(np.float32)
    store.add_predictions([prediction(i, probs=probs[i], model_name="mlp" if i < 8 else "resnet",
                                      prediction_set=[0, 1] if i % 3 else [2], is_ood=i == 5) for i in range(12)])
    before = datetime.now(timezone.utc)
    assert store.add_feedback([label(i, i % K, audited=i == 1) for i in range(6)]) == ["stored"] * 6
    time.sleep(0.02)
    middle = datetime.now(timezone.utc)
    time.sleep(0.02)
    assert store.add_feedback([label(i, (i + 1) % K, "bob") for i in range(4, 12)]) == ["stored"] * 8
    after = datetime.now(timezone.utc)

    frame = store.feedback_frame()
    assert list(frame.columns) == FEEDBACK_COLUMNS and len(frame) == 14
    for column in ("audited", "in_set", "is_ood", "suspect"):
        assert frame[column].dtype == bool, column
    for column in ("feedback_id", "label", "predicted", "set_size", "proposed"):
        assert frame[column].dtype == np.int64, column
    for column in ("ood_score", "ood_p_value", "confidence", "quality"):
        assert frame[column].dtype == np.float64, column
    assert str(frame["received_at"].dtype) == "datetime64[ns, UTC]"
    assert frame["received_at"].min() >= before and frame["received_at"].max() <= after
    # oldest first
    assert frame["feedback_id"].is_monotonic_increasing and frame["received_at"].is_monotonic_increasing
    assert frame["prediction_id"].tolist() == [f"p{i:06d}" for i in [*range(6), *range(4, 12)]]
    assert frame["annotator"].tolist() == [""] * 6 + ["bob"] * 8
    assert frame.loc[frame.prediction_id == "p000001", "audited"].tolist() == [True]
    # prediction fields joined from the right prediction
    for row in frame.itertuples():
        i = int(row.prediction_id[1:])
        assert row.probs.dtype == np.float32 and row.probs.tobytes() == probs[i].tobytes()
        assert row.predicted == int(np.argmax(probs[i])) and row.confidence == float(np.max(probs[i]))
        assert row.set_size == (2 if i % 3 else 1) and row.is_ood == (i == 5)
        assert row.model_name == ("mlp" if i < 8 else "resnet")
        assert row.suspect == (row.label % 2 == 1) and row.proposed == (row.label + 1) % K
        assert row.quality == 0.125 * row.label and row.in_set == (row.label == 0)

    # window: the most recent N items, still oldest first
    window = store.feedback_frame(window=5)
    assert window["feedback_id"].tolist() == frame["feedback_id"].tolist()[-5:]
    assert store.feedback_frame(window=100)["feedback_id"].tolist() == frame["feedback_id"].tolist()
    # since: only items received at or after it (aware UTC, and the same instant in another zone)
    late = store.feedback_frame(since=middle)
    assert late["annotator"].tolist() == ["bob"] * 8
    assert store.feedback_frame(since=after + timedelta(seconds=1)).empty
    # model_name filters on the prediction's model; combines with window
    resnet = store.feedback_frame(model_name="resnet")
    assert sorted(resnet["prediction_id"]) == [f"p{i:06d}" for i in range(8, 12)]
    assert store.feedback_frame(model_name="resnet", window=2)["feedback_id"].tolist() == \
        resnet["feedback_id"].tolist()[-2:]
    assert store.feedback_frame(model_name="nope").empty
    assert list(store.feedback_frame(model_name="nope").columns) == FEEDBACK_COLUMNS


def test_prediction_frame_columns_types_order_and_filters(store):
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    rows = [prediction(i, created_at=t0 + timedelta(minutes=i), model_name="mlp" if i % 2 else "resnet")
            for i in range(10)]
    store.add_predictions(rows[::-1])  # inserted newest first: the frame orders by time, not by insertion
    frame = store.prediction_frame()
    assert list(frame.columns) == PREDICTION_COLUMNS
    assert str(frame["created_at"].dtype) == "datetime64[ns, UTC]"
    assert frame["created_at"].tolist() == [pd.Timestamp(r.created_at) for r in rows]
    assert frame["prediction_id"].tolist() == [r.id for r in rows]
    for column in ("predicted", "set_size"):
        assert frame[column].dtype == np.int64
    assert frame["is_ood"].dtype == bool
    assert frame["weights"].tolist() == ["ab" * 32] * 10 and frame["model_version"].tolist() == ["3"] * 10
    assert store.prediction_frame(limit=3)["prediction_id"].tolist() == [r.id for r in rows[-3:]]
    assert store.prediction_frame(since=t0 + timedelta(minutes=7))["prediction_id"].tolist() == \
        [r.id for r in rows[7:]]
    assert store.prediction_frame(model_name="mlp")["prediction_id"].tolist() == [r.id for r in rows[1::2]]
    assert store.prediction_frame(model_name="mlp", limit=2)["prediction_id"].tolist() == [r.id for r in rows[7::2]]


def test_timestamps_in_another_zone_are_the_same_instant(store):
    zone = timezone(timedelta(hours=-3))
    t0 = datetime(2026, 3, 1, 9, 0, tzinfo=zone)  # 12:00 UTC
    store.add_predictions([prediction(i, created_at=t0 + timedelta(minutes=i)) for i in range(4)])
    frame = store.prediction_frame()
    assert frame["created_at"].tolist() == [pd.Timestamp(2026, 3, 1, 12, i, tz="UTC") for i in range(4)]
    since = datetime(2026, 3, 1, 14, 2, tzinfo=timezone(timedelta(hours=2)))  # 12:02 UTC
    assert store.prediction_frame(since=since)["prediction_id"].tolist() == ["p000002", "p000003"]


# --- reports -----------------------------------------------------------------------------------------------
def test_reports(store):
    assert store.latest_report("monitor") is None
    before = datetime.now(timezone.utc)
    store.add_report("monitor", {"drift": {"label": 0.125, "classes": [1, 2, 3]}, "note": None, "n": 7})
    store.add_report("monitor", {"drift": {"label": 0.5}, "n": 8})
    store.add_report("recalibrate", {"q": 0.875})
    after = datetime.now(timezone.utc)
    latest = store.latest_report("monitor")
    created = datetime.fromisoformat(latest.pop("created_at"))
    assert latest == {"drift": {"label": 0.5}, "n": 8}
    assert created.utcoffset() == timedelta(0) and before <= created <= after
    assert {k: v for k, v in store.latest_report("recalibrate").items() if k != "created_at"} == {"q": 0.875}
    assert store.latest_report("other") is None
    assert store.count("reports") == 3


# --- durability (SQLite) -----------------------------------------------------------------------------------
def test_sqlite_wal_full_sync_and_acknowledged_feedback_survives_a_crash(tmp_path):
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        store.add_predictions([prediction(i) for i in range(10)])
        assert store.add_feedback([label(i, 1) for i in range(5)]) == ["stored"] * 5
        # still open, nothing checkpointed: a new process reading the file sees the acknowledged rows
        code = ("import sqlite3, sys, json; c = sqlite3.connect(sys.argv[1]); print(json.dumps("
                "[c.execute('PRAGMA journal_mode').fetchone()[0], c.execute('SELECT count(*) FROM feedback')"
                ".fetchone()[0]]))")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == ["wal", 5]
    finally:
        store.close()

    # a writer process killed (SIGKILL) right after its add_feedback returned: its rows are on disk
    items = [[f"p{i:06d}", 2, "crash"] for i in range(10)]
    proc, _ = start_worker(tmp_path, "crash", url=url, items=items, go="", threads=1, kill=True)
    results = worker_results(proc)
    assert proc.returncode == -9 and results == [["stored"] * 10]
    assert Path(f"{path}-wal").exists()  # the crash left the write-ahead log un-checkpointed
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM feedback WHERE annotator = 'crash'").fetchone()[0] == 10
    reopened = Store(url)
    try:
        assert reopened.count("feedback") == 15
    finally:
        reopened.close()


# --- errors ------------------------------------------------------------------------------------------------
def test_store_error_is_one_line_without_the_password(tmp_path):
    port = free_port()  # nothing listens there
    cases = [f"postgresql+psycopg://noisewise:s3cret-Pa55@127.0.0.1:{port}/noisewise",
             "not a url at all", f"sqlite:///{tmp_path / 'file'}/store.db"]
    (tmp_path / "file").write_text("a file where the store's directory should be")
    for bad in cases:
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            Store(bad)
        message = str(info.value)
        assert time.monotonic() - started < 10
        assert "\n" not in message and message.startswith("cannot open the store"), message
        assert "s3cret-Pa55" not in message and "s3cret-Pa55" not in repr(info.value)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:store?mode=memory&uri=true"])
def test_an_in_memory_sqlite_store_is_refused_at_once(url):
    """Nothing in memory survives the process, so nothing could be acknowledged as stored: refused in one
    line, promptly (it used to wait forever for a WAL switch an in-memory database never makes)."""
    started = time.monotonic()
    with pytest.raises(StoreError, match="in-memory SQLite database") as info:
        Store(url)
    assert time.monotonic() - started < 5 and "\n" not in str(info.value)

"""Suspects and the monitor's window read in SQL: the same answers as the whole-table pandas path, and query
plans that use the indexes, on SQLite and on a private PostgreSQL (tests/postgres_server.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from noisewise.monitoring.feedback import CursorError, decode_cursor, suspects
from noisewise.monitoring.store import (
    MIGRATIONS,
    FeedbackRow,
    PredictionRow,
    Store,
    feedback_frame_query,
    suspect_queries,
)

from tests.benchmark_loader import load_benchmark
from tests.postgres_server import postgres_server_fixture, store_url_fixture  # noqa: F401 (fixtures)

K = 4
NAMES = ["cat", "dog", "fox", "owl"]
MODEL = "mlp"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def store(url):
    opened = Store(url)
    yield opened
    opened.close()


def random_store(store: Store, seed: int, n_predictions: int = 150, n_batches: int = 8) -> None:
    """Predictions of two models (20% OOD) and feedback sent in batches (each batch shares one received_at, so
    times tie), from three annotators, audited or not, with qualities drawn from a few values (ties again)."""
    rng = np.random.default_rng(seed)
    store.add_predictions([
        PredictionRow(id=f"p{i:04d}", model_name=MODEL if rng.random() < 0.8 else "other", model_version="1",
                      weights="w", predicted=int(rng.integers(K)), confidence=0.5, prediction_set=[0],
                      is_ood=bool(rng.random() < 0.2), ood_score=float(rng.random()), ood_p_value=float(rng.random()),
                      decision="accept", reason=None, probs=np.full(K, 1 / K, np.float32))
        for i in range(n_predictions)])
    for _ in range(n_batches):
        store.add_feedback([
            FeedbackRow(prediction_id=f"p{int(rng.integers(n_predictions)):04d}", label=int(rng.integers(K)),
                        annotator=str(rng.choice(["", "ann", "bob"])), audited=bool(rng.random() < 0.1),
                        quality=float(rng.choice([0.05, 0.1, 0.25, 0.5, 0.9])), suspect=bool(rng.random() < 0.5),
                        proposed=int(rng.integers(K)), in_set=True)
            for _ in range(int(rng.integers(20, 60)))])


def walk_pages(store: Store, limit: int, **filters) -> tuple[list, list, int]:
    """Every page of /suspects after the first, following next_cursor; (suspects, ood, pages)."""
    listed, ood, cursor, pages = [], [], None, 0
    while True:
        page = store.suspects(MODEL, NAMES, limit=limit, cursor=cursor, **filters)
        listed += page["suspects"]
        ood += page["ood"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return listed, ood, pages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sql_path_equals_the_pandas_path(store, seed):
    random_store(store, seed)
    frame = store.feedback_frame(model_name=MODEL)
    times = sorted(frame["received_at"].unique())
    for filters in ({}, {"class_name": "dog"}, {"since": times[3].to_pydatetime()},
                    {"since": times[2].to_pydatetime(), "class_name": "owl"}):
        for limit in (1, 7, 1000):
            old = suspects(frame, NAMES, limit=limit, **filters)
            new = store.suspects(MODEL, NAMES, limit=limit, **filters)
            assert new.pop("next_cursor") is None or limit < max(old["n_suspects"], old["n_ood"])
            assert new == old, (filters, limit)
        everything = suspects(frame, NAMES, limit=100_000, **filters)
        assert everything["n_suspects"] > 2 and everything["n_ood"] > 2  # several pages to walk
        listed, ood, pages = walk_pages(store, limit=2, **filters)
        assert listed == everything["suspects"] and ood == everything["ood"]
        assert pages == -(-max(everything["n_suspects"], everything["n_ood"]) // 2)


def test_ranking_ties_and_counts_by_hand(store):
    """Equal qualities: earliest first, then feedback id; OOD rows apart whatever their flag, newest first."""
    store.add_predictions([
        PredictionRow(id=f"q{i}", model_name=MODEL, model_version="1", weights="w", predicted=0, confidence=0.5,
                      prediction_set=[0], is_ood=i >= 3, ood_score=0.5, ood_p_value=0.01, decision="accept",
                      reason=None, probs=np.full(K, 1 / K, np.float32)) for i in range(5)])
    row = dict(audited=False, proposed=2, in_set=False)
    store.add_feedback([FeedbackRow(prediction_id="q0", label=1, annotator="a", quality=0.3, suspect=True, **row),
                        FeedbackRow(prediction_id="q1", label=1, annotator="a", quality=0.2, suspect=True, **row)])
    store.add_feedback([FeedbackRow(prediction_id="q2", label=1, annotator="a", quality=0.2, suspect=True, **row),
                        FeedbackRow(prediction_id="q0", label=3, annotator="b", quality=0.1, suspect=False, **row),
                        FeedbackRow(prediction_id="q3", label=1, annotator="a", quality=0.0, suspect=True, **row),
                        FeedbackRow(prediction_id="q4", label=1, annotator="a", quality=0.9, suspect=False, **row)])
    page = store.suspects(MODEL, NAMES, limit=2)
    assert [(s["prediction_id"], s["quality"]) for s in page["suspects"]] == [("q1", 0.2), ("q2", 0.2)]
    assert [s["prediction_id"] for s in page["ood"]] == ["q4", "q3"]
    assert (page["n_feedback"], page["n_suspects"], page["n_ood"]) == (6, 3, 2)
    rest = store.suspects(MODEL, NAMES, limit=2, cursor=page["next_cursor"])
    assert [s["prediction_id"] for s in rest["suspects"]] == ["q0"] and rest["ood"] == []
    assert rest["next_cursor"] is None
    assert store.feedback_totals(MODEL) == {"predictions": 5, "feedback": 6, "feedback_ood": 2, "suspects": 3}


def test_bad_cursor_is_refused_with_its_reason(store):
    for cursor in ("", "not-a-cursor", "eyJzIjpbMV19", "eyJzIjpbIm5hbiIsIjIwMjYtMDEtMDEiLDFdLCJvIjpudWxsfQ"):
        with pytest.raises(CursorError, match="not a cursor returned by /suspects"):
            decode_cursor(cursor)
        with pytest.raises(ValueError, match="not a cursor"):
            store.suspects(MODEL, NAMES, cursor=cursor)


def test_suspects_request_refuses_a_bad_cursor_naming_the_field():
    from noisewise.services.feedback_api import SuspectsRequest
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        SuspectsRequest.model_validate({"cursor": "garbage"})
    assert caught.value.errors()[0]["loc"] == ("cursor",)
    assert SuspectsRequest.model_validate({"limit": 5}).cursor is None


def test_window_is_the_newest_rows(store):
    random_store(store, seed=5)
    everything = store.feedback_frame(model_name=MODEL)
    window = store.feedback_frame(window=25, model_name=MODEL)
    newest = everything.sort_values(["received_at", "feedback_id"]).tail(25)
    assert window["feedback_id"].tolist() == newest["feedback_id"].tolist()
    assert store.feedback_totals(MODEL)["feedback"] == len(everything)
    assert store.feedback_totals(MODEL)["suspects"] == int((everything["suspect"] & ~everything["is_ood"]).sum())


def test_migration_fills_model_and_ood_of_existing_feedback(tmp_path):
    """A store at the first schema revision keeps its feedback, which takes its prediction's model and OOD flag."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        at = datetime(2026, 1, 1, tzinfo=timezone.utc)
        for i, (model, ood) in enumerate([(MODEL, False), (MODEL, True), ("other", False)]):
            conn.execute(sa.text(
                "INSERT INTO predictions (id, created_at, model_name, model_version, weights, predicted, confidence, "
                "prediction_set, set_size, is_ood, ood_score, ood_p_value, decision, probs) VALUES "
                "(:id, :at, :model, '1', 'w', 0, 0.5, '[0]', 1, :ood, 0.1, 0.5, 'accept', :probs)"),
                {"id": f"p{i}", "at": at, "model": model, "ood": ood, "probs": np.zeros(K, "<f4").tobytes()})
            conn.execute(sa.text(
                "INSERT INTO feedback (prediction_id, annotator, label, audited, received_at, quality, suspect, "
                "proposed, in_set) VALUES (:id, '', 1, 0, :at, 0.1, 1, 0, 0)"),
                {"id": f"p{i}", "at": at + timedelta(seconds=i)})
    engine.dispose()
    store = Store(url)
    try:
        page = store.suspects(MODEL, NAMES)
        assert [s["prediction_id"] for s in page["suspects"]] == ["p0"]
        assert [s["prediction_id"] for s in page["ood"]] == ["p1"]
        assert store.feedback_totals("other") == {"predictions": 1, "feedback": 1, "feedback_ood": 0, "suspects": 1}
    finally:
        store.close()


def _plan(store: Store, query) -> str:
    sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if store.engine.dialect.name == "sqlite" else "EXPLAIN "
    with store.engine.connect() as conn:
        return "\n".join(str(row[-1] if store.engine.dialect.name == "sqlite" else row[0])
                         for row in conn.exec_driver_sql(prefix + sql))


def test_query_plans_use_the_indexes_at_200k_rows(store):
    """200k feedback rows: every query of a suspects page and of the monitor's window reads an index range
    (no full scan, no sort of the table), whatever the filters and the page."""
    bench = load_benchmark("suspects")
    bench.bulk_load(store, 0, 200_000, K, MODEL)
    assert store.count("feedback") == 200_000
    at = datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc)
    sqlite = store.engine.dialect.name == "sqlite"
    for queries in (suspect_queries(MODEL, limit=101),
                    suspect_queries(MODEL, since=at, label=2, limit=101, after=(0.1, at, 5000),
                                    ood_after=(at + timedelta(minutes=2), 9000))):
        ranked, ood = _plan(store, queries["suspects"]), _plan(store, queries["ood"])
        assert "ix_feedback_suspect_rank" in ranked, ranked
        assert "ix_feedback_ood_recent" in ood, ood
        for plan in (ranked, ood):
            assert ("TEMP B-TREE" not in plan and "SCAN feedback" not in plan) if sqlite else \
                ("Sort" not in plan and "Seq Scan on feedback" not in plan), plan
        if sqlite:  # PostgreSQL may count with a sequential scan when every row matches: its choice
            assert "COVERING INDEX ix_feedback_model_received" in _plan(store, queries["counts"])
    newest = feedback_frame_query(window=10_000, model_name=MODEL)
    plan = _plan(store, newest)
    assert "ix_feedback_model_received" in plan and ("TEMP B-TREE" not in plan if sqlite else "Sort" not in plan), plan
    page = store.suspects(MODEL, NAMES, limit=50)
    assert len(page["suspects"]) == 50 and page["n_feedback"] == 200_000
    qualities = [s["quality"] for s in page["suspects"]]
    assert qualities == sorted(qualities)

"""What the store refuses before it touches a database: text it cannot hold, times with no UTC form, and
writes to a SQLite file that is no longer the one it opened."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from noisewise.monitoring.store import (
    FeedbackRow,
    PredictionRow,
    Store,
    StoreUnavailable,
    TimestampOutOfRange,
    text_problem,
    to_utc,
)


def prediction(i: int) -> PredictionRow:
    return PredictionRow(id=f"p{i}", model_name="mlp", model_version="1", weights="ab" * 32, predicted=0,
                         confidence=0.5, prediction_set=[0], is_ood=False, ood_score=0.1, ood_p_value=0.5,
                         decision="accept", reason=None, probs=np.full(3, 1 / 3, dtype=np.float32))


def label(i: int, annotator: str = "a") -> FeedbackRow:
    return FeedbackRow(prediction_id=f"p{i}", label=1, annotator=annotator, audited=False, quality=0.3,
                       suspect=False, proposed=0, in_set=False)


@pytest.mark.parametrize("value", ["", "p-0001", "Zoë", "标签", "emoji \U0001f600", "x" * 1000])
def test_text_the_store_can_hold(value):
    assert text_problem(value) is None


@pytest.mark.parametrize(("value", "needle"), [
    ("a\x00b", "NUL character"),
    ("\x00", "NUL character"),
    ("ab\ud800", "unpaired surrogate (\\ud800) at position 2"),
    ("\udfff", "unpaired surrogate (\\udfff) at position 0"),
])
def test_text_the_store_cannot_hold(value, needle):
    assert needle in text_problem(value)


def test_times_are_normalised_to_utc():
    assert to_utc(datetime(2024, 5, 1, 12)) == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    shifted = to_utc(datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-3))))
    assert shifted.utcoffset() == timedelta(0) and shifted.hour == 15
    # the last instant that still has a UTC form
    assert to_utc(datetime(9999, 12, 31, 23, 59, tzinfo=timezone.utc)).year == 9999


@pytest.mark.parametrize(("value", "needle"), [
    (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-12))), "9999-12-31T23:59:59-12:00"),
    (datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=14))), "0001-01-01T00:00:00+14:00"),
])
def test_times_without_a_utc_form_are_a_clear_error(value, needle):
    with pytest.raises(TimestampOutOfRange) as err:
        to_utc(value)
    assert needle in str(err.value) and "years 1 to 9999" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.fixture
def sqlite_store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.add_predictions([prediction(i) for i in range(4)])
    yield store
    store.close()


def test_health_of_an_open_sqlite_file(sqlite_store):
    assert sqlite_store.health() is None
    assert sqlite_store.add_feedback([label(0)]) == ["stored"]


def test_deleted_sqlite_file_refuses_every_write(sqlite_store, tmp_path):
    path = tmp_path / "store.db"
    os.remove(path)
    problem = sqlite_store.health()
    assert "was deleted" in problem and str(path) in problem
    with pytest.raises(StoreUnavailable, match="was deleted"):
        sqlite_store.add_feedback([label(1)])
    with pytest.raises(StoreUnavailable, match="was deleted"):
        sqlite_store.add_predictions([prediction(9)])
    with pytest.raises(StoreUnavailable, match="was deleted"):
        sqlite_store.add_report("monitor", {"n": 1})
    assert not path.exists()  # the refused writes did not create a new file either


def test_replaced_sqlite_file_refuses_writes_and_loses_nothing_acknowledged(sqlite_store, tmp_path):
    path = tmp_path / "store.db"
    assert sqlite_store.add_feedback([label(0)]) == ["stored"]
    with sqlite_store.engine.connect() as conn:  # move the WAL into the file so that the copy has the row
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(path, tmp_path / "restored.db")
    os.replace(tmp_path / "restored.db", path)  # a restore from backup under the running service
    problem = sqlite_store.health()
    assert "was replaced" in problem
    with pytest.raises(StoreUnavailable, match="was replaced"):
        sqlite_store.add_feedback([label(1)])
    reopened = Store(f"sqlite:///{path}")
    try:
        assert reopened.health() is None
        frame = reopened.feedback_frame()
        assert sorted(frame["prediction_id"]) == ["p0"]  # the acknowledged row, and not the refused one
    finally:
        reopened.close()


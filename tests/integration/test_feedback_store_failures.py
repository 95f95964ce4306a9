"""Feedback when the store cannot take an item or cannot take anything, on SQLite and on a real PostgreSQL:

- text the database cannot hold (NUL, unpaired surrogates) is that item's 400; the batch's other items are
  stored, on both backends alike;
- a ``since`` with no UTC form is a 400 naming ``since``, not a store failure;
- a SQLite file deleted under a running service, or a PostgreSQL database that went away: nothing more is
  acknowledged, and the health check says why.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydantic import ValidationError

from noisewise.monitoring.store import PredictionRow, Store, StoreUnavailable
from noisewise.services.feedback_api import SuspectsRequest, ingest
from tests.integration.serving_model import digits, ensure_model, serve
from tests.postgres_server import postgres_server_fixture, store_url_fixture  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

K = 4
NAMES = ["cat", "dog", "fox", "owl"]
THRESHOLDS = np.full(K, 0.5, dtype=np.float32)


@pytest.fixture
def store(url):
    opened = Store(url)
    opened.add_predictions([
        PredictionRow(id=f"p{i}", model_name="mlp", model_version="1", weights="ab" * 32, predicted=i % K,
                      confidence=0.7, prediction_set=[i % K], is_ood=False, ood_score=0.1, ood_p_value=0.5,
                      decision="accept", reason=None, probs=np.eye(K, dtype=np.float32)[i % K] * 0.6 + 0.1)
        for i in range(8)])
    yield opened
    opened.close()


def test_unstorable_text_rejects_only_its_item(store):
    items = [
        {"prediction_id": "p0", "label": "cat", "annotator": "ok-1"},
        {"prediction_id": "p1", "label": "dog", "annotator": "nul\x00inside"},
        {"prediction_id": "p\x002", "label": "fox"},
        {"prediction_id": "p3", "label": "owl\x00"},
        {"prediction_id": "p4", "label": 1, "annotator": "half \ud83d pair"},
        {"prediction_id": "p5\udc00", "label": 2},
        {"prediction_id": "p6", "label": 3, "annotator": "ok-2"},
    ]
    response, new = ingest(items, store, NAMES, THRESHOLDS)
    statuses = [r.status for r in response.items]
    assert statuses == [201, 400, 400, 400, 400, 400, 201]
    assert (response.stored, response.rejected) == (2, 5) and len(new) == 2
    errors = {r.index: r.error for r in response.items if r.error}
    assert errors[1].startswith("items[1].annotator: ") and "NUL character" in errors[1]
    assert errors[2].startswith("items[2].prediction_id: ") and "NUL character" in errors[2]
    assert errors[3].startswith("items[3].label: ") and "NUL character" in errors[3]
    # an unpaired surrogate is refused as text that is not a valid unicode string
    assert errors[4].startswith("items[4].annotator: ") and "unicode string" in errors[4]
    assert errors[5].startswith("items[5].prediction_id: ") and "unicode string" in errors[5]
    # an id the response could not carry is not echoed; a storable one is
    assert response.items[5].prediction_id is None and response.items[1].prediction_id == "p1"
    response.model_dump_json()  # the whole answer serialises (no surrogate reaches it)
    frame = store.feedback_frame()
    assert sorted(zip(frame["prediction_id"], frame["annotator"])) == [("p0", "ok-1"), ("p6", "ok-2")]

    # the same batch again: the good items are duplicates, the bad ones still 400, nothing else changes
    again, _ = ingest(items, store, NAMES, THRESHOLDS)
    assert [r.status for r in again.items] == [200, 400, 400, 400, 400, 400, 200]
    assert store.count("feedback") == 2


def test_since_without_a_utc_form_is_refused_naming_since():
    for value in ("9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(ValidationError) as err:
            SuspectsRequest.model_validate({"since": value})
        (error,) = err.value.errors()
        assert error["loc"] == ("since",) and "years 1 to 9999" in error["msg"]
    assert SuspectsRequest.model_validate({"since": "9999-12-31T23:59:59+00:00"}).since.year == 9999
    parsed = SuspectsRequest.model_validate({"since": "2024-05-01T09:00:00-03:00"}).since
    assert parsed.utcoffset().total_seconds() == 0 and parsed.hour == 12


def test_store_that_went_away_acknowledges_nothing(store, url, request):
    assert store.health() is None
    ok, _ = ingest([{"prediction_id": "p0", "label": 0, "annotator": "before"}], store, NAMES, THRESHOLDS)
    assert ok.stored == 1
    if url.startswith("sqlite"):
        os.remove(url.removeprefix("sqlite:///"))
        expected = "was deleted"
    else:
        server = request.getfixturevalue("postgres_server")
        server.drop_database(url.rsplit("/", 1)[1])  # WITH (FORCE): the open connections are closed too
        expected = "does not answer"
    assert expected in store.health()
    with pytest.raises(Exception) as err:
        ingest([{"prediction_id": "p1", "label": 1, "annotator": "after"}], store, NAMES, THRESHOLDS)
    if url.startswith("sqlite"):
        assert isinstance(err.value, StoreUnavailable) and expected in str(err.value)


# --- through the service (in process, real model, SQLite) ------------------------------------------------
@pytest.fixture
def client_and_path(tmp_path):
    path = tmp_path / "served.db"
    env = {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE_URL": f"sqlite:///{path}",
           "NOISEWISE_RELOAD_INTERVAL_S": "0", "NOISEWISE_MONITOR_INTERVAL_S": "0"}
    with serve(env) as client:
        yield client, path


def test_service_answers_400s_for_bad_text_and_far_since_and_503_once_the_file_is_gone(client_and_path):
    client, path = client_and_path
    x, y = digits(3, start=300)
    ids = [p["id"] for p in client.post("/predict", json={"inputs": x.reshape(3, -1).tolist()}).json()["predictions"]]
    body = {"items": [{"prediction_id": ids[0], "label": int(y[0]), "annotator": "a"},
                      {"prediction_id": ids[1], "label": int(y[1]), "annotator": "bad\x00name"}]}
    response = client.post("/feedback", json=body)
    assert response.status_code == 207, response.text
    assert [i["status"] for i in response.json()["items"]] == [201, 400]
    assert "items[1].annotator" in response.json()["items"][1]["error"]

    far = client.post("/suspects", json={"since": "9999-12-31T23:59:59-12:00"})
    assert far.status_code == 400, far.text
    assert "since" in far.text and "years 1 to 9999" in far.text

    os.remove(path)
    gone = client.post("/feedback", json={"items": [{"prediction_id": ids[2], "label": int(y[2]), "annotator": "a"}]})
    assert gone.status_code == 503 and "nothing was stored" in gone.text
    assert not path.exists()

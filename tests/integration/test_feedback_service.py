"""The feedback side of the service in-process (real model, real SQLite store): /feedback per-item statuses,
idempotency, several annotators, limits, /suspects, hot reload after a recalibration, and the metrics."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from noisewise.monitoring.store import Store
from tests.integration.serving_model import serve, digits, ensure_model

pytestmark = pytest.mark.slow

MAX_ITEMS = 50


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"


@pytest.fixture(scope="module")
def client(store_url):
    env = {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE_URL": store_url,
           "NOISEWISE_MAX_FEEDBACK_ITEMS": str(MAX_ITEMS), "NOISEWISE_RELOAD_INTERVAL_S": "0",
           "NOISEWISE_MONITOR_INTERVAL_S": "0"}
    with serve(env) as c:
        yield c


@pytest.fixture(scope="module")
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def predict(client, n: int, start: int = 0) -> tuple[list[dict], np.ndarray]:
    x, y = digits(n, start)
    response = client.post("/predict", json={"inputs": x.reshape(n, -1).tolist()})
    assert response.status_code == 200, response.text
    return response.json()["predictions"], y


def metric(client, name: str, labels: str = "") -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_predictions_are_stored_with_probabilities(client, store):
    predictions, _ = predict(client, 5, start=100)
    stored = store.get_predictions([p["id"] for p in predictions])
    assert set(stored) == {p["id"] for p in predictions}
    for p in predictions:
        s = stored[p["id"]]
        assert s.predicted == p["label"]
        assert len(s.probs) == 10 and abs(float(s.probs.sum()) - 1) < 1e-5
        assert int(np.argmax(s.probs)) == p["label"]
        assert [str(j) for j in s.prediction_set] == p["prediction_set"]  # digits: class j is named "j"
        assert s.is_ood == p["ood"]["is_ood"]


def test_mixed_batch_stores_the_good_items_and_names_each_problem(client, store):
    predictions, y = predict(client, 6, start=200)
    before = store.count("feedback")
    items = [
        {"prediction_id": predictions[0]["id"], "label": int(y[0])},                       # index label
        {"prediction_id": predictions[1]["id"], "label": str(y[1]), "annotator": "ann"},   # class-name label
        {"prediction_id": predictions[0]["id"], "label": int(y[0])},                       # retried in the batch
        {"prediction_id": "no-such-id", "label": 1},
        {"prediction_id": predictions[2]["id"], "label": "cat"},
        {"prediction_id": predictions[3]["id"], "label": 1, "colour": "red"},
        {"prediction_id": predictions[4]["id"]},
        {"prediction_id": predictions[5]["id"], "label": 12},
        {"prediction_id": predictions[5]["id"], "label": True},
        "not an object",
    ]
    response = client.post("/feedback", json={"items": items})
    assert response.status_code == 207
    body = response.json()
    statuses = [item["status"] for item in body["items"]]
    assert statuses == [201, 201, 200, 404, 422, 400, 400, 422, 400, 400]
    assert [item["index"] for item in body["items"]] == list(range(len(items)))
    assert (body["stored"], body["duplicates"], body["rejected"]) == (2, 1, 7)
    errors = {item["index"]: item["error"] for item in body["items"] if item["error"]}
    assert "items[3].prediction_id" in errors[3] and "no-such-id" in errors[3]
    assert "items[4].label" in errors[4] and "'cat'" in errors[4] and "index in [0, 10)" in errors[4]
    assert "items[5].colour" in errors[5] and "unknown field" in errors[5]
    assert "items[6].label" in errors[6] and "required" in errors[6]
    assert "items[7].label" in errors[7] and "12" in errors[7]
    assert "items[8].label" in errors[8]
    assert "items[9]" in errors[9]
    assert store.count("feedback") == before + 2

    # the client retries the whole batch: nothing is counted twice
    again = client.post("/feedback", json={"items": items}).json()
    assert (again["stored"], again["duplicates"]) == (0, 3)
    assert store.count("feedback") == before + 2


def test_several_annotators_are_kept_and_a_changed_answer_conflicts(client, store):
    predictions, y = predict(client, 1, start=300)
    pid = predictions[0]["id"]
    other = (int(y[0]) + 1) % 10
    first = client.post("/feedback", json={"items": [
        {"prediction_id": pid, "label": int(y[0]), "annotator": "a"},
        {"prediction_id": pid, "label": other, "annotator": "b"},
        {"prediction_id": pid, "label": int(y[0]), "annotator": "auditor", "audited": True}]})
    assert first.status_code == 200 and first.json()["stored"] == 3
    conflict = client.post("/feedback", json={"items": [{"prediction_id": pid, "label": other, "annotator": "a"}]})
    assert conflict.status_code == 409
    assert "first label stands" in conflict.json()["items"][0]["error"]
    frame = store.feedback_frame()
    rows = frame[frame["prediction_id"] == pid].sort_values("annotator")
    assert list(rows["annotator"]) == ["a", "auditor", "b"]
    assert list(rows["label"]) == [int(y[0]), int(y[0]), other]
    assert list(rows["audited"]) == [False, True, False]


@pytest.mark.parametrize("body, status, needle", [
    ("not json", 400, "body"),
    ([1, 2], 400, "body"),
    ({}, 400, "items"),
    ({"items": []}, 400, "items"),
    ({"items": {"prediction_id": "x"}}, 400, "items"),
    ({"items": [], "extra": 1}, 400, "extra"),
    ({"items": [{"prediction_id": "x", "label": 1}] * (MAX_ITEMS + 1)}, 413, "NOISEWISE_MAX_FEEDBACK_ITEMS"),
])
def test_malformed_feedback_bodies(client, body, status, needle):
    if isinstance(body, str):
        response = client.post("/feedback", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/feedback", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


def test_all_items_rejected_for_one_reason_gets_that_status(client):
    response = client.post("/feedback", json={"items": [{"prediction_id": "x", "label": 1},
                                                        {"prediction_id": "y", "label": 2}]})
    assert response.status_code == 404
    assert response.json()["stored"] == 0


def test_suspects_rank_flag_and_filter(client):
    n = 120
    predictions, y = predict(client, n, start=400)
    rng = np.random.default_rng(3)
    wrong = rng.random(n) < 0.3
    labels = np.where(wrong, (y + rng.integers(1, 10, n)) % 10, y)
    items = [{"prediction_id": p["id"], "label": int(lb), "annotator": "suspects-test"}
             for p, lb in zip(predictions, labels)]
    body = client.post("/feedback", json={"items": items[:MAX_ITEMS]}).json()
    body2 = client.post("/feedback", json={"items": items[MAX_ITEMS:2 * MAX_ITEMS]}).json()
    body3 = client.post("/feedback", json={"items": items[2 * MAX_ITEMS:]}).json()
    results = body["items"] + body2["items"] + body3["items"]
    flagged = np.array([bool(r["suspect"]) for r in results])
    # flags fall mostly on the wrong labels: with a weak model (~70% accurate) still far above the 30% base rate
    precision = wrong[flagged].mean()
    assert flagged.sum() >= 10 and precision > 0.5, (flagged.sum(), precision)

    listed = client.post("/suspects", json={"limit": 10_000}).json()
    mine = [s for s in listed["suspects"] if s["annotator"] == "suspects-test"]
    assert len(mine) == sum(r["suspect"] and not r["is_ood"] for r in results)
    qualities = [s["quality"] for s in listed["suspects"]]
    assert qualities == sorted(qualities)  # most suspicious first
    assert all(s["proposed"] != s["label"] for s in mine)

    top = client.post("/suspects", json={"limit": 3}).json()
    assert [s["feedback_id"] for s in top["suspects"]] == [s["feedback_id"] for s in listed["suspects"][:3]]
    cls = mine[0]["label"]
    only = client.post("/suspects", json={"class_name": cls, "limit": 10_000}).json()
    assert only["suspects"] and all(s["label"] == cls for s in only["suspects"])
    future = client.post("/suspects", json={"since": "2999-01-01T00:00:00Z"}).json()
    assert future["suspects"] == []

    assert client.post("/suspects", json={"class_name": "cat"}).status_code == 422
    bad = client.post("/suspects", json={"limit": 0})
    assert bad.status_code == 400 and "limit" in bad.json()["error"]
    assert client.post("/suspects", json={"since": "yesterday"}).status_code == 400


def test_feedback_metrics_count_what_was_stored(client):
    before = {o: metric(client, "noisewise_feedback_items_total", f'{{outcome="{o}"}}')
              for o in ("stored", "duplicate", "rejected")}
    predictions, y = predict(client, 4, start=600)
    items = [{"prediction_id": p["id"], "label": int(lb)} for p, lb in zip(predictions, y)]
    client.post("/feedback", json={"items": items + items[:1] + [{"prediction_id": "x", "label": 0}]})
    after = {o: metric(client, "noisewise_feedback_items_total", f'{{outcome="{o}"}}')
             for o in ("stored", "duplicate", "rejected")}
    assert {o: after[o] - before[o] for o in after} == {"stored": 4, "duplicate": 1, "rejected": 1}


def test_hot_reload_switches_version_without_failing_requests(client, store):
    """A new version behind the alias (here: a recalibration of the served one) is picked up by /reload while
    requests keep flowing; none fails, and each answer names the version that computed it."""
    from noisewise.models import registry
    from noisewise.services.cli import main

    ref = ensure_model()
    name = ref.split("@")[0]
    x, _ = digits(8, 700)
    failures, versions, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            r = client.post("/predict", json={"inputs": x.reshape(8, -1).tolist()})
            if r.status_code != 200:
                failures.append(r.status_code)
            else:
                versions.append(r.json()["predictions"][0]["model"]["version"])

    _, old_version, _ = registry.resolve_version(ref)
    out = contextlib.redirect_stdout(open("/dev/null", "w"))
    with out:
        assert main(["calibrate", "--model", ref, "--risk", "0.25", "--alpha", "0.2", "--json"]) == 0
    new_version = str(max(int(v.version) for v in registry._mlflow().MlflowClient().search_model_versions(
        f"name='{name}'")))
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        registry.set_alias(name, new_version, "champion")
        response = client.post("/reload")
        assert response.status_code == 200
        assert response.json() == {"reloaded": True, "name": name, "version": new_version,
                                   "previous_version": old_version}
        info = client.post("/model").json()
        assert info["version"] == new_version
        assert info["calibration"]["prediction_set"]["alpha"] == pytest.approx(0.2)
        n_before, deadline = len(versions), time.monotonic() + 60
        while len(versions) < n_before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        registry.set_alias(name, old_version, "champion")
        client.post("/reload")
    assert failures == []
    assert versions[-1] == new_version and old_version in versions
    assert metric(client, "noisewise_model_reloads_total", '{outcome="ok"}') >= 2
    info_line = f'noisewise_model_info{{alias="champion",name="{name}",version="{old_version}"}} 1.0'
    assert info_line in client.get("/metrics").text

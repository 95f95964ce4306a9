"""The feedback lane (services/feedback_lane.py) against real ``bentoml serve`` processes: the same status and
body as BentoML's route (``NOISEWISE_FEEDBACK_LANE=0``) for a table of good and bad requests, keys on and a
small body limit; BentoML's request metrics for ``/feedback`` count every request exactly once; every item
acknowledged is in the store, from 8 concurrent clients too; other routes are untouched."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter

import httpx
import pytest
from noisewise.monitoring.store import Store

from tests.e2e.test_server import bentoml_serve, server_env
from tests.integration.serving_model import digits, ensure_model

pytestmark = pytest.mark.slow

KEY = "lane-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
MAX_ITEMS = 5
UNAUTHORIZED = b'{"error":"authentication required","detail":[]}'


@pytest.fixture(scope="module")
def model():
    return ensure_model()


def start(model: str, tmp_path_factory, lane: bool, **extra: str):
    home = tmp_path_factory.mktemp(f"lane-{int(lane)}")
    # its own BENTOML_HOME: a second `bentoml serve` on the same one clears the first's metrics directory
    env = server_env(BENTOML_HOME=str(home / "bentoml"), NOISEWISE_MODEL=model, NOISEWISE_FEEDBACK_LANE=str(int(lane)), NOISEWISE_API_KEYS=KEY,
                     NOISEWISE_MAX_BODY_BYTES=str(MAX_BODY), NOISEWISE_MAX_FEEDBACK_ITEMS=str(MAX_ITEMS),
                     NOISEWISE_STORE_URL=f"sqlite:///{home / 'store.db'}", NOISEWISE_RELOAD_INTERVAL_S="0",
                     NOISEWISE_MONITOR_INTERVAL_S="0", **extra)
    return bentoml_serve("noisewise.services.service:Noisewise", env, home / "serve.log"), env["NOISEWISE_STORE_URL"], \
        home / "serve.log"


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    """Both servers, lane on and off, up together for the whole module (so that the parity test needs no
    particular test order)."""
    with contextlib.ExitStack() as stack:
        running = {}
        for lane in (True, False):
            serving, store_url, log = start(model, tmp_path_factory, lane=lane)
            running[lane] = {"url": stack.enter_context(serving), "lane": lane, "store_url": store_url, "log": log}
        yield running


@pytest.fixture(params=[True, False], ids=["lane", "bentoml"])
def server(request, servers):
    return servers[request.param]


def predict(url: str, n: int, start: int = 0) -> list[str]:
    """Ids of ``n`` served predictions, five inputs a request (the body limit is small)."""
    x, _ = digits(n, start)
    ids = []
    for i in range(0, n, 5):
        rows = x[i:i + 5].reshape(len(x[i:i + 5]), -1).round(3).tolist()
        response = httpx.post(f"{url}/predict", json={"inputs": rows}, timeout=60)
        assert response.status_code == 200, response.text
        ids += [p["id"] for p in response.json()["predictions"]]
    return ids


def feedback_requests_total(url: str) -> Counter:
    """BentoML's request counter for endpoint="/feedback", by status code (every series of that name)."""
    counts: Counter = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if re.match(r"^bentoml_\w+_request_total\{", line) and 'endpoint="/feedback"' in line:
            code = re.search(r'http_response_code="(\d+)"', line).group(1)
            counts[int(code)] += float(line.rsplit(" ", 1)[1])
    return counts


def metric_sum(url: str, pattern: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
               if re.match(pattern, line) and 'endpoint="/feedback"' in line)


def chunks(body: bytes, size: int = 1024):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def table(pids: list[str]) -> list[tuple[str, dict]]:
    """(case, httpx.request keyword arguments): answered the same with the lane on and off, in this order."""
    def item(i, label, annotator="a", **more):
        return {"prediction_id": pids[i], "label": label, "annotator": annotator, **more}

    big = b'{"items": [' + b" " * MAX_BODY + b"]}"
    return [
        ("valid", {"json": {"items": [item(0, 3)]}}),
        ("duplicate", {"json": {"items": [item(0, 3)]}}),
        ("conflict", {"json": {"items": [item(0, 4)]}}),
        ("valid by class index and name, audited", {"json": {"items": [item(1, "2", "b", audited=True),
                                                                        item(2, 7, "b")]}}),
        ("unknown id", {"json": {"items": [{"prediction_id": "no-such-id", "label": 1}]}}),
        ("unknown label", {"json": {"items": [item(3, "cat")]}}),
        ("mixed: 207", {"json": {"items": [item(4, 1), {"prediction_id": "no-such-id", "label": 1}]}}),
        ("malformed item", {"json": {"items": [{"label": 1}, {"prediction_id": pids[5], "label": 1, "x": 2}]}}),
        ("malformed JSON", {"content": b'{"items": [', "headers": {"Content-Type": "application/json"}}),
        ("not UTF-8", {"content": b'{"items": "\xff"}'}),
        ("non-object body", {"json": [1, 2]}),
        ("extra top-level field", {"json": {"items": [item(6, 1)], "extra": 1}}),
        ("empty items", {"json": {"items": []}}),
        ("items not a list", {"json": {"items": {"prediction_id": pids[6]}}}),
        ("empty body", {"content": b""}),
        ("too many items", {"json": {"items": [item(6, 1, f"m{i}") for i in range(MAX_ITEMS + 1)]}}),
        ("missing key", {"json": {"items": [item(6, 1)]}, "auth": None}),
        ("wrong key", {"json": {"items": [item(6, 1)]}, "auth": {"Authorization": "Bearer " + "w" * 30}}),
        ("over the limit by Content-Length", {"content": big}),
        ("over the limit, chunked", {"content": chunks(big)}),
        ("valid, chunked", {"content": chunks(b'{"items": [{"prediction_id": "%s", "label": 5, "annotator": "c"}]}'
                                               % pids[7].encode(), size=7)}),
    ]


def send(url: str, pids: list[str], case: str, kwargs: dict) -> tuple[int, dict, httpx.Headers]:
    kwargs = dict(kwargs)
    headers = {**(kwargs.pop("auth", AUTH) or {}), **kwargs.pop("headers", {})}
    response = httpx.post(f"{url}/feedback", headers=headers, timeout=60, **kwargs)
    text = response.text
    for i, pid in enumerate(pids):
        text = text.replace(pid, f"PID{i}")  # each server has its own prediction ids
    assert "Traceback" not in text, case
    import json

    return response.status_code, json.loads(text), response.headers


@pytest.fixture(scope="module")
def answers_by_lane(servers):
    """Each server's answers to the table (sent once per server)."""
    answered = {}
    for lane, running in servers.items():
        url = running["url"]
        pids = predict(url, 10)
        before = feedback_requests_total(url)
        results = {case: send(url, pids, case, kwargs) for case, kwargs in table(pids)}
        after = feedback_requests_total(url)
        answered[lane] = {"results": results, "before": before, "after": after, "pids": pids}
    return answered


@pytest.fixture
def answers(server, answers_by_lane):
    return answers_by_lane[server["lane"]]


EXPECTED_STATUS = {
    "valid": 200, "duplicate": 200, "conflict": 409, "valid by class index and name, audited": 200,
    "unknown id": 404, "unknown label": 422, "mixed: 207": 207, "malformed item": 400, "malformed JSON": 400,
    "not UTF-8": 400, "non-object body": 400, "extra top-level field": 400, "empty items": 400,
    "items not a list": 400, "empty body": 400, "too many items": 413, "missing key": 401, "wrong key": 401,
    "over the limit by Content-Length": 413, "over the limit, chunked": 413, "valid, chunked": 200,
}

def test_statuses_and_bodies(server, answers):
    """Each case has its documented status."""
    results = answers["results"]
    assert {case: status for case, (status, _, _) in results.items()} == EXPECTED_STATUS
    assert results["valid"][1]["stored"] == 1 and results["duplicate"][1]["duplicates"] == 1
    assert results["valid, chunked"][1]["stored"] == 1
    assert "items[0].label" in results["unknown label"][1]["items"][0]["error"]
    assert results["extra top-level field"][1]["error"].startswith("extra: unknown field")
    assert results["too many items"][1]["error"].startswith(f"items: {MAX_ITEMS + 1} items is over the limit")
    assert f"over the limit of {MAX_BODY} bytes" in results["over the limit, chunked"][1]["error"]
    for case in ("missing key", "wrong key"):
        assert results[case][1] == {"error": "authentication required", "detail": []}
        assert results[case][2]["www-authenticate"] == 'Bearer realm="noisewise"'
    for status, body, headers in results.values():
        assert headers["content-type"] == "application/json"


def test_lane_answers_exactly_as_the_bentoml_route(answers_by_lane):
    lane, route = (answers_by_lane[on]["results"] for on in (True, False))
    assert list(lane) == list(route)
    for case in route:
        assert lane[case][:2] == route[case][:2], case


def test_bentoml_request_metrics_count_each_feedback_request_once(server, answers):
    sent = Counter(status for status, _, _ in answers["results"].values())
    grew = answers["after"] - answers["before"]
    assert grew == sent
    url = server["url"]
    assert metric_sum(url, r"^bentoml_\w+_request_in_progress\{") == 0
    duration_count = metric_sum(url, r"^bentoml_\w+_request_duration_seconds_count\{")
    assert duration_count == sum(answers["after"].values())


def test_the_lane_skips_only_bentomls_access_log_line(server, answers):
    posts = server["log"].read_text().count("method=POST,path=/feedback,")
    assert posts == (0 if server["lane"] else len(answers["results"]))


def test_everything_acknowledged_is_stored_also_from_8_concurrent_clients(server, answers):
    url = server["url"]
    pids = predict(url, 20, start=100)

    async def client(c: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
            return [await http.post("/feedback", json={"items": [{"prediction_id": pids[i], "label": i % 10,
                                                                  "annotator": f"c{c}"}]}) for i in range(20)]

    async def all_clients():
        return await asyncio.gather(*[client(c) for c in range(8)])

    responses = [r for rs in asyncio.run(all_clients()) for r in rs]
    assert [r.status_code for r in responses] == [200] * 160
    acknowledged = sum(r.json()["stored"] for r in responses)
    table_stored = sum(body.get("stored", 0) for _, body, _ in answers["results"].values())
    store = Store(server["store_url"])
    try:
        frame = store.feedback_frame()
    finally:
        store.close()
    assert acknowledged == 160
    assert len(frame) == acknowledged + table_stored
    assert set(zip(frame["prediction_id"], frame["annotator"])) >= {(pids[i], f"c{c}") for i in range(20)
                                                                    for c in range(8)}


def test_other_routes_and_methods_are_untouched(server):
    url = server["url"]
    assert httpx.get(f"{url}/feedback", headers=AUTH, timeout=10).status_code == 405
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    assert httpx.post(f"{url}/suspects", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{url}/suspects", json={"limit": 5}, headers=AUTH, timeout=30).status_code == 200
    assert "/feedback" in httpx.get(f"{url}/docs.json", timeout=10).json()["paths"]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "bentoml"])
def test_store_off_is_503_either_way(model, tmp_path_factory, lane):
    serving, _, _ = start(model, tmp_path_factory, lane=lane, NOISEWISE_STORE="0")
    with serving as url:
        response = httpx.post(f"{url}/feedback", headers=AUTH, json={"items": [{"prediction_id": "x", "label": 1}]},
                              timeout=30)
        assert response.status_code == 503
        assert response.json() == {"error": "feedback is off: this service runs with NOISEWISE_STORE=0",
                                   "detail": []}
        assert feedback_requests_total(url) == Counter({503: 1})

"""A real ``bentoml serve`` with API keys on, under input that is cheap to send and costly to serve:

- requests to made-up paths (with a key, and refused without one) leave ``/metrics`` the size it was: request
  metrics are labelled by route, every unknown path shares the label ``unmatched``;
- a binary file in a multipart text field is a 400 naming the field on every route, with no traceback in the
  server log;
- images that are small to send and large to decode are decoded on threads of their own: ``/feedback`` and
  ``/suspects`` stay fast meanwhile, and once the clients stop the server is idle at once.
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time
import uuid
import zlib

import httpx
import numpy as np
import pytest

from tests.e2e.test_server import bentoml_serve, server_env
from tests.integration.serving_model import digits, ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "hardening-test-key-" + "k" * 16
AUTH = {"Authorization": f"Bearer {KEY}"}
POST_ROUTES = ["/feedback", "/model", "/predict", "/predict_image", "/reload", "/suspects"]
REQUEST_TIMEOUT_S = 10


def png(width: int, height: int, depth: int = 16, channels: int = 4) -> bytes:
    """A PNG of zeros, written by hand (PIL cannot write 16-bit RGBA): a few hundred KB at most for any size,
    ``width x height x channels x depth / 8`` bytes once decoded."""
    color = {1: 0, 3: 2, 4: 6}[channels]
    raw = (b"\x00" + bytes(width * channels * depth // 8)) * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("hardening")
    log = work / "bentoml-serve.log"
    env = server_env(NOISEWISE_MODEL=ensure_model(), NOISEWISE_STORE_URL=f"sqlite:///{work / 'store.db'}",
                     NOISEWISE_API_KEYS=KEY, NOISEWISE_RELOAD_INTERVAL_S="0", NOISEWISE_MONITOR_INTERVAL_S="0",
                     NOISEWISE_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S))
    with bentoml_serve("noisewise.services.service:Noisewise", env, log) as url:
        yield url, log


def tracebacks(log) -> int:
    return log.read_text(errors="replace").count("Traceback")


async def send_all(url: str, requests: list[tuple[str, str, dict]], connections: int = 32) -> list[int]:
    """``(method, path, headers)`` requests over ``connections`` keep-alive connections; their statuses."""
    statuses: list[int] = []
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker():
            while queue:
                method, path, headers = queue.pop()
                statuses.append((await client.request(method, path, headers=headers)).status_code)

        await asyncio.gather(*[worker() for _ in range(connections)])
    return statuses


def test_made_up_paths_leave_metrics_the_size_they_were(served):
    url, _ = served
    x, _ = digits(1, start=700)
    # every route once, with and without a key, so that each of their series exists before the measure
    assert httpx.post(f"{url}/predict", json={"inputs": [x[0].ravel().tolist()]}, timeout=30).status_code == 200
    for route in ("/feedback", "/suspects", "/reload"):
        assert httpx.post(f"{url}{route}", timeout=30).status_code == 401
    asyncio.run(send_all(url, [("GET", f"/warm-up-{i}", AUTH) for i in range(50)]
                         + [("GET", f"/warm-up-{i}", {}) for i in range(50)]))
    before = httpx.get(f"{url}/metrics", timeout=30).text

    token = uuid.uuid4().hex[:12]
    with_key = [("GET" if i % 2 else "POST", f"/{token}-{i}/x?q={i}", AUTH) for i in range(10_000)]
    refused = [("POST", f"/{token}-refused-{i}", {}) for i in range(900)]
    refused += [("POST", "/feedback", {"Authorization": f"Bearer wrong-{i}"}) for i in range(100)]
    started = time.monotonic()
    statuses = asyncio.run(send_all(url, with_key + refused))
    elapsed = time.monotonic() - started
    assert statuses.count(404) + statuses.count(405) == 10_000 and statuses.count(401) == 1_000, \
        sorted(set(statuses))

    after = httpx.get(f"{url}/metrics", timeout=30).text
    assert token not in after
    assert abs(len(after) - len(before)) <= 0.10 * len(before), (len(before), len(after), elapsed)
    labels = set(re.findall(r'endpoint="([^"]*)"', after))
    assert "unmatched" in labels and labels <= {"unmatched", "/static_content", "/assets", *POST_ROUTES,
                                                "/", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz",
                                                "/metrics"}, labels
    # the 11,000 requests are counted, under one label per route and status
    counted = sum(float(v) for v in re.findall(
        r'^bentoml_service_request_total\{[^}]*endpoint="unmatched"[^}]*\} (\S+)$', after, re.MULTILINE))
    assert counted >= 10_900


@pytest.mark.parametrize("route", POST_ROUTES)
def test_binary_file_in_a_text_field_is_a_400_naming_the_field(served, route):
    url, log = served
    before = tracebacks(log)
    binary = bytes(range(256)) * 4  # not UTF-8
    response = httpx.post(f"{url}{route}", files={"items": ("true", binary, "application/octet-stream")},
                          headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("items: ") and "UTF-8" in response.json()["error"]
    time.sleep(0.2)  # the log line of the request is written after the answer
    assert tracebacks(log) == before


def test_bad_multipart_is_answered_without_a_traceback(served):
    url, log = served
    before = tracebacks(log)
    cases = [
        ({"files": {"images": ("a.png", png(8, 8, depth=8, channels=1), "image/png")}, "data": {"explain": "maybe"}},
         "explain: "),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xx"}}, "multipart"),
        ({"data": {"images": "http://127.0.0.1:1/x.png"}}, "URLs are not fetched"),
    ]
    for kwargs, expected in cases:
        response = httpx.post(f"{url}/predict_image", timeout=30, **kwargs)
        assert response.status_code == 400 and expected in response.json()["error"], response.text
    time.sleep(0.2)
    assert tracebacks(log) == before


def test_costly_images_do_not_slow_feedback(served):
    url, log = served
    before = tracebacks(log)
    x, y = digits(1, start=710)
    predicted = httpx.post(f"{url}/predict", json={"inputs": [x[0].ravel().tolist()]}, timeout=30)
    prediction_id = predicted.json()["predictions"][0]["id"]
    # 2896 x 2896 RGBA at 16 bits: 64 MB decoded (just under the default NOISEWISE_MAX_IMAGE_BYTES), 0.3 MB sent
    heavy = {"images": [base64.b64encode(png(2896, 2896)).decode()] * 16}
    small = ("d.png", png(8, 8, depth=8, channels=1), "image/png")
    load_s, clients = 12.0, 6

    async def run() -> tuple[list[int], dict[str, list[float]], float]:
        heavy_statuses: list[int] = []
        latency: dict[str, list[float]] = {"/feedback": [], "/suspects": [], "/readyz": []}
        stop = time.monotonic() + load_s
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def sender():
                while time.monotonic() < stop:
                    heavy_statuses.append((await client.post("/predict", json=heavy)).status_code)

            async def prober():
                await asyncio.sleep(1.0)  # the decoding threads are busy by now
                i = 0
                while time.monotonic() < stop:
                    i += 1
                    for path, kwargs in (
                        ("/feedback", {"json": {"items": [{"prediction_id": prediction_id, "label": int(y[0]),
                                                           "annotator": f"probe-{i}"}]}}),
                        ("/suspects", {"json": {}}),
                        ("/readyz", None),
                    ):
                        started = time.monotonic()
                        if kwargs is None:
                            response = await client.get(path)
                        else:
                            response = await client.post(path, headers=AUTH, **kwargs)
                        latency[path].append(time.monotonic() - started)
                        assert response.status_code in (200, 201), (path, response.status_code, response.text)
                    await asyncio.sleep(0.1)

            senders = [asyncio.create_task(sender()) for _ in range(clients)]
            await prober()
            await asyncio.gather(*senders)
            started = time.monotonic()  # every client has its answer: nothing decodes for them any more
            response = await client.post("/predict_image", files=[("images", small)])
            assert response.status_code == 200, response.text
            return heavy_statuses, latency, time.monotonic() - started

    heavy_statuses, latency, after_s = asyncio.run(run())
    assert heavy_statuses and set(heavy_statuses) <= {200, 408, 503}, heavy_statuses
    assert len(latency["/feedback"]) >= 20
    p99 = {path: float(np.quantile(values, 0.99)) for path, values in latency.items()}
    assert p99["/feedback"] < 1.0 and p99["/suspects"] < 1.0 and p99["/readyz"] < 1.0, p99
    assert after_s < 3.0, after_s  # the work of requests that gave up was dropped, not finished
    assert tracebacks(log) == before


def test_an_image_over_the_decoded_bytes_limit_is_a_413_from_its_header(served):
    url, _ = served
    # 4096 x 4096 RGBA at 16 bits: within NOISEWISE_MAX_IMAGE_PIXELS, 128 MiB decoded, 130 KB sent
    body = {"images": [base64.b64encode(png(4096, 4096)).decode()] * 16}
    started = time.monotonic()
    response = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert response.status_code == 413, response.text
    assert "134217728 bytes" in response.json()["error"] and "NOISEWISE_MAX_IMAGE_BYTES" in response.json()["error"]
    assert time.monotonic() - started < 3.0  # refused from the header: nothing was decoded

"""Request limits, each with its own 4xx: body size (413, declared or chunked), inputs per request (413),
image pixels and decompression bombs (413, refused from the header, never decoded), label length (400 naming
the field), and the per-request time of a prediction (408). The decoding checks run without a server; the
rest against the real service in-process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError
from pydantic_core import PydanticCustomError
from starlette.testclient import TestClient

from noisewise.services.schemas import (
    InputSpec,
    PredictRequest,
    decode_image,
    error_status,
    images_batch,
)
from noisewise.services.settings import Settings

SPEC = InputSpec(shape=(1, 8, 8), max_batch=4, max_image_pixels=100_000)


def png_header_only(width: int, height: int) -> bytes:
    """A ~100-byte PNG that declares ``width x height`` 8-bit grayscale pixels; its IDAT holds a few hundred
    zero bytes, far too few: decoding it would fail with a decode error (or, for real, take gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 500))
            + chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is rewritten to declare ``width x height``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, 128, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image is decoded (PIL decodes pixel data in ImageFile.load)."""
    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real(self))
    yield calls
    assert calls == [], f"decoded images of sizes {calls}"


# --- images: dimensions and decompression bombs, without a server -----------------------------------
@pytest.mark.parametrize("make, size", [
    (png_header_only, (100_000, 100_000)),   # over PIL's own bomb limit (2 x 89M pixels): refused in Image.open
    (png_header_only, (10_000, 10_000)),     # over PIL's warning limit (89M)
    (png_header_only, (1_000, 1_000)),       # over NOISEWISE_MAX_IMAGE_PIXELS only
    (jpeg_declaring, (60_000, 60_000)),
    (jpeg_declaring, (400, 400)),
])
def test_oversized_image_is_refused_from_its_header_without_decoding(no_decoding, make, size):
    data = make(*size)
    assert len(data) < 2_000
    start = time.perf_counter()
    with pytest.raises(PydanticCustomError) as err:
        decode_image(data, SPEC)
    elapsed = time.perf_counter() - start
    assert err.value.type == "image_too_large"
    message = err.value.message()
    assert f"image has {size[0] * size[1]} pixels" in message
    assert "at most 100000 are accepted (NOISEWISE_MAX_IMAGE_PIXELS)" in message
    assert elapsed < 0.5  # a decode of even the smallest case (1M pixels of garbage) would not be refused at all


def test_image_at_the_limit_is_decoded():
    side = int(SPEC.max_image_pixels ** 0.5)  # 316 x 316 = 99856 pixels
    assert decode_image(png_bytes((side, side)), SPEC).shape == (1, 8, 8)
    with pytest.raises(PydanticCustomError, match="99856 pixels"):
        decode_image(png_bytes((side, side)), InputSpec(shape=(1, 8, 8), max_image_pixels=side * side - 1))


def validation_error(raw: dict) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        PredictRequest.model_validate(raw, context={"input": SPEC})
    return err.value


ROW = [0.5] * 64


@pytest.mark.parametrize("raw, status, types", [
    ({"inputs": [ROW] * 5}, 413, {"batch_too_large"}),
    ({"images": [base64.b64encode(png_bytes((8, 8))).decode()] * 5}, 413, {"batch_too_large"}),
    ({"images": [base64.b64encode(png_header_only(1000, 1000)).decode()]}, 413, {"image_too_large"}),
    ({"images": [base64.b64encode(png_header_only(1000, 1000)).decode(), "not base64!"]}, 400,
     {"image_too_large", "image_base64"}),  # a bad request first: every problem still listed with its type
    ({"inputs": [ROW] * 3 + [[0.5] * 3]}, 400, {"shape"}),
])
def test_size_limits_are_413_and_other_problems_400(raw, status, types):
    err = validation_error(raw)
    assert {e["type"] for e in err.errors()} == types
    assert error_status(err) == status


def test_uploads_over_the_batch_limit_are_413_before_decoding(no_decoding):
    with pytest.raises(ValidationError) as err:
        images_batch([png_bytes((8, 8))] * 5, SPEC)
    assert error_status(err.value) == 413 and "NOISEWISE_MAX_BATCH" in str(err.value)


def test_request_timeout_setting():
    assert Settings.from_env({}).request_timeout_s == 30.0
    assert Settings.from_env({"NOISEWISE_REQUEST_TIMEOUT_S": "0"}).request_timeout_s == 0.0  # off
    assert Settings.from_env({"NOISEWISE_REQUEST_TIMEOUT_S": "2.5"}).request_timeout_s == 2.5


# --- the real service ----------------------------------------------------------------------------
MAX_BODY, MAX_PIXELS, MAX_BATCH, TIMEOUT_S = 200_000, 100_000, 4, 0.5


@contextlib.contextmanager
def serve(env: dict, slow_passes: threading.Event | None = None, delay_s: float = 0.0):
    """The service in-process; while ``slow_passes`` is set, every forward pass takes ``delay_s`` longer."""
    import noisewise.services.service as service_module
    from tests.integration.serving_model import asgi_app, ensure_model

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_RELOAD_INTERVAL_S": "0",
                            "NOISEWISE_MONITOR_INTERVAL_S": "0", **env}.items():
            mp.setenv(name, value)
        if slow_passes is not None:
            load = service_module.load_served

            def slow_load(settings):
                served = load(settings)
                forward = served.forward

                def slow(x):
                    if slow_passes.is_set():
                        time.sleep(delay_s)
                    return forward(x)

                served.forward = slow
                return served

            mp.setattr(service_module, "load_served", slow_load)
        with TestClient(asgi_app()) as client:
            yield client


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('limits') / 'store.db'}"


SLOW_PASSES = threading.Event()  # set: every forward pass takes 3 x TIMEOUT_S longer


@pytest.fixture(scope="module")
def client(store_url):
    """One service for the module (the ASGI app is shared: one running service at a time)."""
    env = {"NOISEWISE_STORE_URL": store_url, "NOISEWISE_MAX_BODY_BYTES": str(MAX_BODY),
           "NOISEWISE_MAX_IMAGE_PIXELS": str(MAX_PIXELS), "NOISEWISE_MAX_BATCH": str(MAX_BATCH),
           "NOISEWISE_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    with serve(env, slow_passes=SLOW_PASSES, delay_s=3 * TIMEOUT_S) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_refused(response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    for needle in needles:
        assert needle in body["error"], body["error"]


@pytest.mark.slow
def test_service_batch_over_the_limit_is_413_naming_it(client):
    assert client.post("/predict", json={"inputs": [ROW] * MAX_BATCH}).status_code == 200
    assert_refused(client.post("/predict", json={"inputs": [ROW] * (MAX_BATCH + 1)}), 413,
                   f"inputs: {MAX_BATCH + 1} items, at most {MAX_BATCH}", "NOISEWISE_MAX_BATCH")
    assert_refused(client.post("/predict", json={"images": [b64(png_bytes((8, 8)))] * (MAX_BATCH + 1)}), 413,
                   "images:", "NOISEWISE_MAX_BATCH")
    files = [("images", (f"{i}.png", png_bytes((8, 8)), "image/png")) for i in range(MAX_BATCH + 1)]
    assert_refused(client.post("/predict_image", files=files), 413, "NOISEWISE_MAX_BATCH")


@pytest.mark.slow
@pytest.mark.parametrize("data", [png_header_only(100_000, 100_000), png_header_only(400, 400),
                                  jpeg_declaring(60_000, 60_000), png_bytes((400, 400))],
                         ids=["png bomb 10G pixels", "png header 160k pixels", "jpeg bomb", "real png 160k pixels"])
def test_service_oversized_image_is_413_naming_the_limit(client, data):
    start = time.perf_counter()
    assert_refused(client.post("/predict", json={"images": [b64(png_bytes((8, 8))), b64(data)]}), 413,
                   "images[1]: image has", f"at most {MAX_PIXELS}", "NOISEWISE_MAX_IMAGE_PIXELS")
    assert_refused(client.post("/predict_image", files=[("images", ("big", data, "image/png"))]), 413,
                   "images[0]: image has", "NOISEWISE_MAX_IMAGE_PIXELS")
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_service_body_over_the_limit_is_413_declared_or_chunked(client):
    big = b'{"inputs": [' + b" " * MAX_BODY + b"]}"
    assert_refused(client.post("/predict", content=big, headers={"content-type": "application/json"}), 413,
                   f"request body of {len(big)} bytes is over the limit of {MAX_BODY} bytes",
                   "NOISEWISE_MAX_BODY_BYTES")

    def chunks(body: bytes, size: int = 16_384):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    # no Content-Length: counted as it arrives
    chunked = client.post("/predict", content=chunks(big), headers={"content-type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert_refused(chunked, 413, f"request body is over the limit of {MAX_BODY} bytes", "NOISEWISE_MAX_BODY_BYTES")
    small = ('{"inputs": [' + ", ".join([str(ROW)] * 2) + "]}").encode()
    ok = client.post("/predict", content=chunks(small, 100), headers={"content-type": "application/json"})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2


@pytest.mark.slow
def test_service_overlong_label_is_a_400_naming_the_field_and_the_limit(client):
    from noisewise.services.feedback_api import MAX_LABEL_CHARS

    prediction = client.post("/predict", json={"inputs": [ROW]}).json()["predictions"][0]["id"]
    items = [{"prediction_id": prediction, "label": "x" * (MAX_LABEL_CHARS + 1)},
             {"prediction_id": prediction, "label": "y" * 100_000, "annotator": "b"}]
    response = client.post("/feedback", json={"items": items})
    assert response.status_code == 400, response.text
    results = response.json()["items"]
    assert [r["status"] for r in results] == [400, 400]
    assert results[0]["error"] == (f"items[0].label: a label of {MAX_LABEL_CHARS + 1} characters, at most "
                                   f"{MAX_LABEL_CHARS} are accepted")
    assert results[1]["error"].startswith("items[1].label: a label of 100000 characters")
    long_annotator = client.post("/feedback", json={"items": [
        {"prediction_id": prediction, "label": 0, "annotator": "a" * 1000}]})
    assert long_annotator.status_code == 400 and "items[0].annotator" in long_annotator.json()["items"][0]["error"]


@pytest.mark.slow
def test_service_prediction_past_the_timeout_is_408_and_feedback_is_never_cut_off(client, store_url, monkeypatch):
    from noisewise.monitoring.store import Store

    prediction = client.post("/predict", json={"inputs": [ROW]})
    assert prediction.status_code == 200
    SLOW_PASSES.set()
    try:
        start = time.perf_counter()
        late = client.post("/predict", json={"inputs": [ROW]})
        elapsed = time.perf_counter() - start
    finally:
        SLOW_PASSES.clear()
    assert_refused(late, 408, f"no prediction within {TIMEOUT_S:g} s", "NOISEWISE_REQUEST_TIMEOUT_S")
    assert TIMEOUT_S <= elapsed < 3 * TIMEOUT_S  # answered at the deadline, not when the pass ended
    time.sleep(3 * TIMEOUT_S)  # the slow pass finishes in the background
    assert client.post("/predict", json={"inputs": [ROW]}).status_code == 200  # still serving

    # /feedback has no deadline: a commit slower than the timeout is finished and acknowledged
    from noisewise.services import feedback_api

    ingest = feedback_api.ingest_async

    async def slow_ingest(*args):
        await asyncio.sleep(3 * TIMEOUT_S)
        return await ingest(*args)

    monkeypatch.setattr(feedback_api, "ingest_async", slow_ingest)
    pid = prediction.json()["predictions"][0]["id"]
    response = client.post("/feedback", json={"items": [{"prediction_id": pid, "label": 3, "annotator": "slow"}]})
    assert response.status_code == 200 and response.json()["stored"] == 1
    store = Store(store_url)
    try:
        frame = store.feedback_frame()
        assert ((frame["prediction_id"] == pid) & (frame["annotator"] == "slow")).sum() == 1
    finally:
        store.close()

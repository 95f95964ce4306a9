"""The service when its store, its registry or its inputs turn against it (in process, real model, real
SQLite store, real MLflow registry):

- a prediction the store cannot take is not served: 503 with ``Retry-After``, nothing answered 200 whose id
  feedback could not name later;
- ``POST /reload`` with the alias deleted, or naming a version whose artifacts are gone, is a 409 with the
  reason and counts as a failed reload;
- the start-up check opens the store and refuses tampered artifacts: one line and exit status 3;
- images are bounded by their decoded bytes, and decoded on a bounded queue of their own whose work stops
  once nobody waits for it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import threading
import time

import pytest
from PIL import Image
from pydantic import ValidationError

from noisewise.services.batching import Overloaded, WorkQueue
from noisewise.services.bentoml_patches import UNMATCHED, endpoint_label
from noisewise.services.schemas import Cancelled, InputSpec, images_batch
from noisewise.services.service import EXIT_MODEL, check_model_here
from noisewise.services.settings import Settings, SettingsError
from tests.e2e.test_hardening_serving import png
from tests.integration.serving_model import digits, ensure_model, run_in_process, serve, stored_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def metric(client, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --- predictions the store cannot take -----------------------------------------------------------------
def test_a_prediction_the_store_cannot_take_is_a_503_with_retry_after(tmp_path):
    path = tmp_path / "served.db"
    env = {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE_URL": f"sqlite:///{path}",
           "NOISEWISE_RELOAD_INTERVAL_S": "0", "NOISEWISE_MONITOR_INTERVAL_S": "0"}
    x, _ = digits(2, start=900)
    with serve(env) as client:
        ok = client.post("/predict", json={"inputs": x.reshape(2, -1).tolist()})
        assert ok.status_code == 200
        errors_before = metric(client, "noisewise_store_errors_total")
        os.remove(path)  # every later write fails: the file the service opened is gone
        refused = client.post("/predict", json={"inputs": x.reshape(2, -1).tolist()})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert "store cannot take the predictions" in refused.json()["error"]
        assert "predictions" not in refused.json()
        upload = client.post("/predict_image", files=[("images", ("d.png", png(8, 8, depth=8, channels=1),
                                                                  "image/png"))])
        assert upload.status_code == 503 and upload.headers["retry-after"] == "5"
        assert metric(client, "noisewise_store_errors_total") - errors_before == 2


# --- reload -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reload_model():
    return ensure_model("hardening-reload")


def test_reload_of_a_deleted_or_broken_alias_is_a_409_counted_as_failed(reload_model, tmp_path):
    from noisewise.models import registry

    name = reload_model.split("@")[0]
    client_ml = registry._mlflow().MlflowClient()
    served = client_ml.get_model_version_by_alias(name, "champion")
    version = str(served.version)
    env = {"NOISEWISE_MODEL": reload_model, "NOISEWISE_STORE": "0", "NOISEWISE_RELOAD_INTERVAL_S": "0"}
    with serve(env) as client:
        failed = metric(client, "noisewise_model_reloads_total", '{outcome="failed"}')
        try:
            client_ml.delete_registered_model_alias(name, "champion")
            deleted = client.post("/reload")
            assert deleted.status_code == 409, deleted.text
            assert deleted.json()["error"].startswith(f"cannot reload, still serving {name}/{version}: ")
            assert "names no version" in deleted.json()["error"] and "champion" in deleted.json()["error"]
            assert metric(client, "noisewise_model_reloads_total", '{outcome="failed"}') == failed + 1

            # a version whose artifacts are gone
            broken = client_ml.create_model_version(name, str(tmp_path / "gone"), served.run_id)
            client_ml.set_registered_model_alias(name, "champion", broken.version)
            missing = client.post("/reload")
            assert missing.status_code == 409, missing.text
            assert f"{name}/{version}" in missing.json()["error"]
            assert metric(client, "noisewise_model_reloads_total", '{outcome="failed"}') == failed + 2

            # meanwhile the served version keeps answering
            x, _ = digits(1, start=910)
            answer = client.post("/predict", json={"inputs": [x[0].ravel().tolist()]})
            assert answer.status_code == 200 and answer.json()["predictions"][0]["model"]["version"] == version
        finally:
            client_ml.set_registered_model_alias(name, "champion", version)
        back = client.post("/reload")
        assert back.status_code == 200 and back.json()["reloaded"] is False


# --- the start-up check --------------------------------------------------------------------------------
def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_start_up_check_opens_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOISEWISE_MODEL", ensure_model())
    capsys.readouterr()  # training the session's model (when this test runs first) logs MLflow's own lines
    monkeypatch.setenv("NOISEWISE_STORE_URL", f"sqlite:///{tmp_path}")  # a directory: SQLite cannot open it
    assert check_model_here() == EXIT_MODEL
    line = one_line(capsys.readouterr().err)
    assert line.startswith("noisewise: error: cannot open the store sqlite:///") and "NOISEWISE_STORE_URL" in line

    monkeypatch.setenv("NOISEWISE_STORE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    assert check_model_here() == 0
    assert (tmp_path / "store.db").exists()
    monkeypatch.setenv("NOISEWISE_STORE_URL", f"sqlite:///{tmp_path}")
    monkeypatch.setenv("NOISEWISE_STORE", "0")  # no store wanted: none opened
    assert check_model_here() == 0


def test_start_up_check_refuses_tampered_artifacts_with_status_3(monkeypatch, capsys):
    from noisewise.models import registry

    name = "hardening-tampered"
    if not registry.has_alias(name):  # its own weights (another seed): tampering leaves the other models alone
        status, _, err = run_in_process("train", "--dataset", "digits", "--recipe", "ce", "--epochs", "2",
                                          "--risk", "0.25", "--seed", "7", "--register", name, "--quiet")
        assert status == 0, err
        registry.set_alias(name, "1")  # whether or not it certifies: the check refuses it before that matters
    _, _, run_id = registry.resolve_version(f"{name}@champion")
    expected = registry._mlflow().MlflowClient().get_run(run_id).data.tags[f"{registry.DIGEST_TAG}weights.safetensors"]
    stored = [p for p in stored_artifacts(f"{name}@champion", "weights.safetensors") if registry._sha256(p) == expected]
    assert stored
    for path in stored:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    monkeypatch.setenv("NOISEWISE_MODEL", f"{name}@champion")
    monkeypatch.setenv("NOISEWISE_STORE", "0")
    capsys.readouterr()
    assert check_model_here() == EXIT_MODEL == 3
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"noisewise: error: cannot serve model '{name}@champion': ") and "sha256" in line


# --- images: decoded bytes, a bounded queue of their own --------------------------------------------------
def image(size: tuple[int, int], mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_are_bounded_by_their_decoded_bytes():
    spec = InputSpec(shape=(1, 8, 8), max_image_bytes=100_000)
    # 200 x 200: 40,000 bytes in grayscale, 80,000 at 16 bits, 120,000 in RGB, 160,000 in RGBA
    assert images_batch([image((200, 200), "L"), png(200, 200, depth=16, channels=1)], spec).shape == (2, 1, 8, 8)
    for data, size in ((image((200, 200), "RGB"), 120_000), (png(200, 200, depth=16, channels=4), 320_000)):
        with pytest.raises(ValidationError) as err:
            images_batch([data], spec)
        (error,) = err.value.errors()
        assert error["type"] == "image_too_large" and error["loc"] == ("images", 0)
        assert f"decodes to {size} bytes" in error["msg"] and "NOISEWISE_MAX_IMAGE_BYTES" in error["msg"]
    assert Settings().max_image_bytes == 4096 * 4096 * 4
    assert Settings.from_env({"NOISEWISE_MAX_IMAGE_BYTES": "1000"}).max_image_bytes == 1000
    with pytest.raises(SettingsError, match="NOISEWISE_MAX_IMAGE_BYTES"):
        Settings.from_env({"NOISEWISE_MAX_IMAGE_BYTES": "lots"})

    with serve({"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE": "0", "NOISEWISE_MAX_IMAGE_BYTES": "100000"}) \
            as client:
        response = client.post("/predict_image", files=[("images", ("a.png", image((200, 200), "RGB"), "image/png"))])
        assert response.status_code == 413, response.text
        assert response.json()["error"].startswith("images[0]: image decodes to 120000 bytes (200 x 200 x 3 channels")


def test_decoding_stops_once_its_request_gave_up():
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        images_batch([image((8, 8), "L")], InputSpec(shape=(1, 8, 8)), stop)


def test_work_queue_is_bounded_and_drops_work_nobody_waits_for():
    queue = WorkQueue(threads=1, max_pending=2, name="test-decode")
    release, started, seen_stop = threading.Event(), [], []

    def blocking(stop: threading.Event) -> str:
        started.append("blocking")
        release.wait(10)
        seen_stop.append(stop.is_set())
        return "done"

    def quick(stop: threading.Event) -> str:
        started.append("quick")
        return "quick"

    async def scenario():
        first = asyncio.create_task(queue.run(blocking, timeout=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # queued behind the first: it never starts
            await queue.run(quick, timeout=0.1)
        second = asyncio.create_task(queue.run(quick, timeout=5))
        await asyncio.sleep(0.05)
        assert queue.pending == 2
        with pytest.raises(Overloaded, match="decoding queue is full"):
            await queue.run(quick, timeout=5)
        with pytest.raises(TimeoutError):
            await first
        release.set()
        assert await second == "quick"

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        queue.close()
    assert started == ["blocking", "quick"]  # the timed-out quick job was never started
    assert seen_stop == [True]  # the running job was told that nobody waits for it any more
    deadline = time.monotonic() + 5
    while queue.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.pending == 0


def test_request_metrics_label_routes_not_paths():
    routes = ["/predict", "/feedback"]
    assert endpoint_label("/predict", routes) == "/predict"
    assert endpoint_label("/metrics") == "/metrics" and endpoint_label("/docs.json") == "/docs.json"
    assert endpoint_label("/static_content/swagger-ui.css") == "/static_content"
    made_up = {endpoint_label(f"/x{i}/{'a' * i}", routes) for i in range(100)}
    assert made_up == {UNMATCHED}
    assert endpoint_label("/predict/", routes) == UNMATCHED and endpoint_label("/PREDICT", routes) == UNMATCHED

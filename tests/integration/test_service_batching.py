"""Adaptive batching and start-up failures of the service, in-process. Each test starts its own service
(one at a time: the ASGI app is shared, see tests/integration/serving_model.py), so they live apart from
test_service.py's module-wide client."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

import noisewise.services.service as service_module
from noisewise.services.service import StartupError, load_served
from noisewise.services.settings import Settings
from tests.integration.serving_model import asgi_app, digits, direct_predictions, ensure_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    return ensure_model()


@contextlib.contextmanager
def serve(env: dict, delay_s: float = 0.0, passes: list | None = None):
    """A running in-process service; ``passes`` collects the batch size of every forward pass, each of
    which takes at least ``delay_s`` (a stand-in for a bigger network)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if passes is not None:
            def slow_load(settings):
                served = load_served(settings)
                forward = served.forward

                def counted(x):
                    time.sleep(delay_s)
                    passes.append(len(x))
                    return forward(x)

                served.forward = counted
                return served

            mp.setattr(service_module, "load_served", slow_load)
        with TestClient(asgi_app()) as client:
            yield client


# --- batching -------------------------------------------------------------------------------------
def concurrent_singles(client, n=16):
    x, _ = digits(n, start=300)
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda row: client.post("/predict", json={"inputs": [row.tolist()]}), x))
    assert [r.status_code for r in responses] == [200] * n
    return x, [r.json()["predictions"][0] for r in responses]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_forward_passes_when_batching_is_on(ref, batching):
    passes: list[int] = []
    env = {"NOISEWISE_MODEL": ref, "NOISEWISE_BATCHING": "1" if batching else "0"}
    with serve(env, delay_s=0.05, passes=passes) as client:
        assert client.post("/model").json()["serving"]["batching"] is batching
        passes.clear()  # the start-up warm-up pass
        x, predictions = concurrent_singles(client)
        assert [p["label"] for p in predictions] == [p.label for p in direct_predictions(ref, x)]
        assert sum(passes) == 16
        if batching:
            assert len(passes) < 16 and max(passes) > 1, passes
        else:
            assert passes == [1] * 16
        passes.clear()
        many, _ = digits(40)
        assert client.post("/predict", json={"inputs": many.tolist()}).status_code == 200
        assert passes == [40]  # one request of N inputs: one pass


def test_a_request_larger_than_a_batch_is_split_across_passes(ref):
    passes: list[int] = []
    env = {"NOISEWISE_MODEL": ref, "NOISEWISE_BATCH_MAX_SIZE": "16"}
    with serve(env, passes=passes) as client:
        passes.clear()
        x, _ = digits(40)
        response = client.post("/predict", json={"inputs": x.tolist()})
        assert response.status_code == 200
        assert [p["label"] for p in response.json()["predictions"]] == [p.label for p in direct_predictions(ref, x)]
        assert passes == [16, 16, 8]


# --- start-up -------------------------------------------------------------------------------------
def test_missing_model_is_one_clear_error():
    with pytest.raises(StartupError, match=r"cannot serve model 'no-such-model@champion': .*not found"):
        load_served(Settings(model="no-such-model@champion"))


def test_service_does_not_start_without_its_model(monkeypatch):
    monkeypatch.setenv("NOISEWISE_MODEL", "no-such-model@champion")
    with pytest.raises(StartupError, match="no-such-model"), TestClient(asgi_app()):
        pass


def test_uncalibrated_model_is_refused(ref, monkeypatch):
    from noisewise.models import registry

    real = registry.load_model

    def uncalibrated(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.calibration = None
        return loaded

    monkeypatch.setattr(registry, "load_model", uncalibrated)
    with pytest.raises(StartupError, match=r"has no calibration: run `noisewise calibrate --model serving-test@"):
        load_served(Settings(model=ref))


def test_broken_model_is_refused(ref, monkeypatch):
    from noisewise.models import registry

    real = registry.load_model

    def broken(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.calibration.class_names = loaded.calibration.class_names[:3]
        return loaded

    monkeypatch.setattr(registry, "load_model", broken)
    with pytest.raises(StartupError, match="is broken: ValueError: calibration has 3 classes"):
        load_served(Settings(model=ref))



"""Finished requests release their memory: BentoML 1.4's TimeoutMiddleware kept each request's context
(tracing span and all) alive for traffic.timeout (60 s) through a timer it never cancelled; the service
cancels it (services/bentoml_patches.py, _cancel_request_timers)."""

from __future__ import annotations

import gc

import pytest
from starlette.testclient import TestClient

from tests.integration.serving_model import asgi_app, digits, ensure_model

pytestmark = pytest.mark.slow


def test_finished_requests_leave_no_spans_behind(monkeypatch):
    from opentelemetry.sdk.trace import _Span

    for key, value in {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE": "0",
                       "NOISEWISE_RELOAD_INTERVAL_S": "0"}.items():
        monkeypatch.setenv(key, value)
    x, _ = digits(1)
    with TestClient(asgi_app()) as client:
        gc.collect()
        before = sum(isinstance(o, _Span) for o in gc.get_objects())
        for _ in range(200):
            assert client.post("/predict", json={"inputs": x.reshape(1, -1).tolist()}).status_code == 200
        gc.collect()
        alive = sum(isinstance(o, _Span) for o in gc.get_objects())
    # unpatched: one span per request (200) lives on for 60 s
    assert alive - before <= 5, alive - before

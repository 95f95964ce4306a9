"""NOISEWISE_STORE=0: predictions are served and not stored; the feedback routes answer 503 and say why."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from tests.integration.serving_model import asgi_app, digits, ensure_model

pytestmark = pytest.mark.slow


def test_store_off_answers_503(monkeypatch):
    for key, value in {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_STORE": "0",
                       "NOISEWISE_RELOAD_INTERVAL_S": "0"}.items():
        monkeypatch.setenv(key, value)
    with TestClient(asgi_app()) as client:
        assert client.post("/predict", json={"inputs": [digits(1)[0].ravel().tolist()]}).status_code == 200
        for route, body in (("/feedback", {"items": [{"prediction_id": "x", "label": 1}]}), ("/suspects", {})):
            response = client.post(route, json=body)
            assert response.status_code == 503 and "NOISEWISE_STORE=0" in response.json()["error"]

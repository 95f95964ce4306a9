"""/predict over HTTP (the service in-process under Starlette's test client, a real registered model): the
answer is, byte for byte, the ``PredictResponse`` the pydantic models render for the model's own outputs, and
bad inputs sent as JSON get the same 400 as before the vectorized validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from noisewise.services.schemas import (
    ModelRef,
    Prediction,
    PredictResponse,
    empty_set_reason,
    finite_or_none,
    guarantees_from,
)
from tests.integration.serving_model import digits, direct_predictions, ensure_model, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    return ensure_model()


@pytest.fixture(scope="module")
def client(ref):
    with serve({"NOISEWISE_MODEL": ref}) as c:
        yield c


def rendered(ref: str, x: np.ndarray, ids: list[str], explain: bool) -> bytes:
    """What the pydantic models write for the registered model's own predictions of ``x`` under ``ids``."""
    from noisewise.models.registry import load_model

    loaded = load_model(ref, device="cpu")
    guarantees = guarantees_from(loaded.calibration.summary())
    threshold = finite_or_none(float(loaded.calibration.certified.threshold))
    model = ModelRef(name=loaded.name, version=loaded.version)
    predictions = []
    for out, pid in zip(direct_predictions(ref, x), ids):
        fields = out.to_dict()
        fields["score"] = fields.pop("confidence")
        predictions.append(Prediction(id=pid, model=model, threshold=threshold,
                                      set_reason=empty_set_reason(out.prediction_set, out.is_ood), **fields))
    block = guarantees if explain else guarantees.summary()
    return PredictResponse(predictions=predictions, guarantees=block).model_dump_json().encode()


@pytest.mark.parametrize("explain", [False, True])
def test_answer_is_the_pydantic_rendering_byte_for_byte(client, ref, explain):
    x, _ = digits(8)
    body = {"inputs": x.tolist()} if not explain else {"inputs": x.reshape(8, -1).tolist(), "explain": True}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    ids = [p["id"] for p in response.json()["predictions"]]
    assert len(set(ids)) == 8
    assert response.content == rendered(ref, x, ids, explain)


@pytest.mark.parametrize(("items", "error"), [
    ([[[0.5] * 8] * 8, [[[0.5] * 7 + [True]] * 8]], "inputs[1]: expected numbers, found a boolean"),
    ([[0.5] * 63 + [1e39]], "inputs[0]: expected finite numbers, found inf at index [63]"),
    ([[[[0.5] * 8] * 3 + [[0.5] * 7] + [[0.5] * 8] * 4]],
     "inputs[0]: expected nested arrays of numbers with equal lengths at each level"),
    ([[0.5] * 64, [0.5] * 65], ("inputs[1]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got "
                                "shape [65]")),
    ([[0.5] * 63 + ["0.5"]], "inputs[0]: expected numbers, found a string"),
])
def test_bad_inputs_sent_as_json_name_the_item(client, items, error):
    response = client.post("/predict", content=json.dumps({"inputs": items}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == error

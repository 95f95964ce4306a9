"""The BentoML service in-process (``Noisewise.to_asgi()`` under Starlette's test client) with a real
registered, calibrated model: every field of a prediction, every input form, every bad input -> 400."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid

import numpy as np
import pytest
from PIL import Image

from noisewise.services.schemas import (
    GUARANTEES_DETAIL,
    InputSpec,
    OODResult,
    PredictRequest,
    Prediction,
    TopK,
    empty_set_reason,
    round_readable,
)
from noisewise.services.settings import Settings, SettingsError
from tests.integration.serving_model import serve, digits, direct_predictions, ensure_model

pytestmark = pytest.mark.slow

MAX_BODY, MAX_PIXELS = 2_000_000, 100_000


@pytest.fixture(scope="module")
def ref():
    return ensure_model()


@pytest.fixture(scope="module")
def client(ref):
    env = {"NOISEWISE_MODEL": ref, "NOISEWISE_MAX_BODY_BYTES": str(MAX_BODY),
           "NOISEWISE_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}
    with serve(env) as c:
        yield c


@pytest.fixture(scope="module")
def info(client):
    response = client.post("/model")
    assert response.status_code == 200
    return response.json()


def image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_uint8(x: np.ndarray) -> np.ndarray:
    """[1, 8, 8] in [0, 1] -> 8x8 uint8 pixels (what a PNG of the input holds)."""
    return np.round(x[0] * 255).astype(np.uint8)


# --- happy paths ----------------------------------------------------------------------------------
def test_prediction_has_every_field_and_matches_the_model(client, ref, info):
    x, _ = digits(8)
    response = client.post("/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    predictions, expected = body["predictions"], direct_predictions(ref, x)
    assert len(predictions) == 8
    classes = info["classes"]
    threshold = info["calibration"]["abstention"]["threshold"]
    for p, e in zip(predictions, expected):
        assert set(p) == {"id", "label", "class_name", "score", "threshold", "top_k", "prediction_set", "set_reason",
                          "ood", "decision", "reason", "model"}
        assert uuid.UUID(p["id"]).version == 4
        assert p["label"] == e.label and p["class_name"] == classes[p["label"]]
        # the selective score, rounded to 4 decimals, next to the certified threshold it is compared with
        assert p["score"] == pytest.approx(e.confidence, abs=1e-4) and p["score"] == round(p["score"], 4)
        assert p["threshold"] == pytest.approx(threshold, abs=1e-4)
        assert p["prediction_set"] == e.prediction_set and set(p["prediction_set"]) <= set(classes)
        assert p["set_reason"] is None  # clean digits: never an empty set with this model
        probabilities = [t["probability"] for t in p["top_k"]]
        assert len(p["top_k"]) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert probabilities == pytest.approx([t["probability"] for t in e.top_k], abs=1e-4)
        assert probabilities == [round(v, 4) for v in probabilities]
        assert p["top_k"][0]["label"] == p["label"] and p["top_k"][0]["class_name"] == p["class_name"]
        assert p["ood"] == pytest.approx({"score": e.ood_score, "p_value": e.ood_p_value, "is_ood": e.is_ood},
                                         abs=1e-4)
        assert p["ood"]["p_value"] == round_readable(p["ood"]["p_value"])
        assert 0 < p["ood"]["p_value"] <= 1
        assert (p["decision"], p["reason"]) == (e.decision, e.reason)
        assert (p["reason"] is None) == (p["decision"] == "accept")
        if p["ood"]["is_ood"]:
            assert p["reason"] == "ood"
        elif abs(e.confidence - threshold) > 1e-3:  # away from the rounding: the response shows why it decided
            assert (p["decision"] == "accept") == (p["score"] >= p["threshold"])
        assert p["model"] == {"name": info["name"], "version": info["version"]}
    assert len({p["id"] for p in predictions}) == 8
    # by default the guarantees are short: each part's kind and target, and where the full block is
    short = body["guarantees"]
    assert short == {"prediction_set": {"kind": "valid", "target_coverage": 0.9},
                     "abstention": {"kind": "valid", "risk_target": 0.25, "certified": True},
                     "ood": {"kind": "valid", "alpha_ood": 0.05}, "detail": GUARANTEES_DETAIL}
    assert len(json.dumps(short, separators=(",", ":"))) < 300
    full = client.post("/predict", json={"inputs": x[:1].tolist(), "explain": True})
    assert full.status_code == 200, full.text
    g = full.json()["guarantees"]
    assert len(json.dumps(g, separators=(",", ":"))) > 1000  # what the short form saves on every response
    assert g["prediction_set"]["target_coverage"] == pytest.approx(0.9)
    assert g["prediction_set"]["alpha"] == pytest.approx(0.1)
    assert g["prediction_set"]["eps"] == round(0.2 * 10 / 9, 4)  # 20% flips, uniform convention; 4 decimals
    assert g["abstention"]["risk_target"] == pytest.approx(0.25) and g["abstention"]["certified"] is True
    assert g["ood"]["alpha_ood"] == pytest.approx(0.05)
    assert g["assumptions"] and g["assumptions"] == info["calibration"]["assumptions"]
    # symmetric noise injected by noisewise: known by construction, so every guarantee is valid
    assert {g[part]["kind"] for part in ("prediction_set", "abstention", "ood")} == {"valid"}
    assert "frontier" not in g["abstention"]  # the table is on /model, not repeated on every response


def test_one_request_of_many_inputs_keeps_their_order(client, ref):
    x, y = digits(120, start=200)
    response = client.post("/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200
    labels = [p["label"] for p in response.json()["predictions"]]
    assert labels == [p.label for p in direct_predictions(ref, x)]
    assert np.mean(np.array(labels) == y) > 0.5  # the weak test model is still far above chance (0.1)
    decisions = {p["decision"] for p in response.json()["predictions"]}
    assert decisions == {"accept", "abstain"}


def test_flat_vectors_and_channelless_arrays_equal_shaped_ones(client):
    x, _ = digits(3, start=40)
    shaped = client.post("/predict", json={"inputs": x.tolist()}).json()["predictions"]
    flat = client.post("/predict", json={"inputs": x.reshape(3, -1).tolist()}).json()["predictions"]
    two_d = client.post("/predict", json={"inputs": x[:, 0].tolist()}).json()["predictions"]
    strip = lambda ps: [{k: v for k, v in p.items() if k != "id"} for p in ps]
    assert strip(flat) == strip(shaped) == strip(two_d)


def test_base64_png_and_data_url_equal_the_array(client):
    x, _ = digits(2, start=80)
    pixels = [as_uint8(item) for item in x]
    arrays = client.post("/predict", json={"inputs": [(p / 255.0)[None].tolist() for p in pixels]})
    images = client.post("/predict", json={"images": [b64(image_bytes(pixels[0])),
                                                       "data:image/png;base64," + b64(image_bytes(pixels[1]))]})
    assert arrays.status_code == images.status_code == 200, images.text
    for a, b in zip(arrays.json()["predictions"], images.json()["predictions"]):
        assert (a["label"], a["prediction_set"], a["decision"]) == (b["label"], b["prediction_set"], b["decision"])
        assert a["score"] == pytest.approx(b["score"], abs=2e-4)


def test_images_are_converted_to_the_model_input(client):
    rgb = np.random.default_rng(0).integers(0, 255, size=(28, 20, 3), dtype=np.uint8)
    response = client.post("/predict", json={"images": [b64(image_bytes(rgb, "JPEG")), b64(image_bytes(rgb, "PNG"))]})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2


def test_file_upload_equals_base64(client):
    x, _ = digits(2, start=120)
    files = [image_bytes(as_uint8(item)) for item in x]
    parts = [("images", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)]
    upload = client.post("/predict_image", files=parts)
    inline = client.post("/predict", json={"images": [b64(f) for f in files]})
    assert upload.status_code == 200, upload.text
    strip = lambda ps: [{k: v for k, v in p.items() if k != "id"} for p in ps]
    assert strip(upload.json()["predictions"]) == strip(inline.json()["predictions"])
    assert upload.json()["guarantees"] == inline.json()["guarantees"]
    explained = client.post("/predict_image", files=parts, data={"explain": "true"})
    assert explained.status_code == 200, explained.text
    assert explained.json()["guarantees"] == client.post("/predict", json={"images": [b64(f) for f in files],
                                                                            "explain": True}).json()["guarantees"]
    assert "assumptions" in explained.json()["guarantees"] and "assumptions" not in upload.json()["guarantees"]


def test_an_empty_prediction_set_says_why(client):
    x, _ = digits(4, start=300)
    noise = np.random.default_rng(0).random((40, 1, 8, 8))
    blank = np.full((1, 1, 8, 8), 0.5)  # no digit at all: this model spreads its probability over every class
    response = client.post("/predict", json={"inputs": np.concatenate([x, noise, blank]).tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    empty = [p for p in predictions if not p["prediction_set"]]
    assert empty and len(empty) < len(predictions)
    for p in predictions:
        expected = None if p["prediction_set"] else ("ood" if p["ood"]["is_ood"] else "no_class_passes")
        assert p["set_reason"] == expected
    assert predictions[-1]["set_reason"] == "ood"


def test_get_model_answers_as_post(client, info):
    answer = client.get("/model")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    assert answer.content == client.post("/model").content and answer.json() == info
    assert client.put("/model").status_code == 405


def test_model_info(info, ref):
    assert (info["name"], info["alias"]) == ("serving-test", "champion")
    assert info["version"].isdigit() and info["uri"] == f"models:/serving-test/{info['version']}"
    assert info["classes"] == [str(i) for i in range(10)] and info["arch"] == "mlp"
    assert info["input"] == {"shape": [1, 8, 8], "size": 64, "dtype": "float32", "range": [0.0, 1.0], "images": True,
                             "image_mode": "L", "preprocess": None}  # preprocessing: imported models only
    calibration = info["calibration"]
    assert {"prediction_set", "abstention", "ood", "noise", "assumptions"} <= set(calibration)
    assert calibration["noise"]["method"] == "known" and calibration["abstention"]["certified"] is True
    # every guarantee says its kind; the certified risk-coverage frontier is on /model (not on every response)
    for part in ("prediction_set", "abstention", "ood"):
        assert calibration[part]["kind"] in ("valid", "conservative", "none") and calibration[part]["condition"]
    frontier = calibration["abstention"]["frontier"]
    assert [row["risk"] for row in frontier] == [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
    coverage = [row["coverage"] for row in frontier]
    assert coverage == sorted(coverage) and all(0 <= c <= 1 for c in coverage)
    assert info["serving"]["batching"] is True and info["serving"]["max_inputs_per_request"] == 256


def test_probes_and_metrics(client):
    for probe in ("/readyz", "/livez", "/healthz"):
        assert client.get(probe).status_code == 200
    client.post("/predict", json={"inputs": [[0.5] * 64]})
    metrics = client.get("/metrics").text
    assert "noisewise_forward_passes_total" in metrics and "noisewise_batch_inputs_bucket" in metrics
    assert 'bentoml_service_request_total{' in metrics and 'endpoint="/predict"' in metrics


def test_openapi_describes_the_endpoints(client):
    spec = client.get("/docs.json").json()
    predict = spec["paths"]["/predict"]["post"]
    request = predict["requestBody"]["content"]["application/json"]["schema"]
    assert set(request["properties"]) == {"inputs", "images", "explain"} and request["additionalProperties"] is False
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(ok["properties"]) == {"predictions", "guarantees"}
    assert predict["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    prediction = spec["components"]["schemas"]["Prediction"]
    assert set(prediction["properties"]) == {"id", "label", "class_name", "score", "threshold", "top_k",
                                             "prediction_set", "set_reason", "ood", "decision", "reason", "model"}
    assert "not a probability" in prediction["properties"]["score"]["description"].lower()
    assert "multipart/form-data" in spec["paths"]["/predict_image"]["post"]["requestBody"]["content"]
    for method in ("get", "post"):
        model = spec["paths"]["/model"][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert {"name", "version", "alias", "classes", "input", "calibration", "serving"} <= set(model["properties"])
    assert {"ErrorResponse", "Guarantees", "GuaranteesSummary", "CalibrationSummary"} <= set(spec["components"]["schemas"])


def test_openapi_document_is_noisewise_own_and_valid(client):
    import jsonschema_rs
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    import noisewise

    spec = client.get("/docs.json").json()
    assert (spec["openapi"], spec["info"]["title"], spec["info"]["version"]) == ("3.1.0", "noisewise",
                                                                                noisewise.__version__)
    text = json.dumps(spec["info"])
    assert "BentoML" not in text and "None" not in text and "/predict" in spec["info"]["description"]
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e}" for e in OPENAPI_31_VALIDATOR.iter_errors(spec)]
    assert errors == []
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs and refs <= set(spec["components"]["schemas"])  # every reference resolves
    # every schema is valid JSON Schema 2020-12 (the dialect of OpenAPI 3.1), e.g. no type "file"
    dialect = "https://json-schema.org/draft/2020-12/schema"
    for name, schema in spec["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid({"$schema": dialect, **schema}), name
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "NOISEWISE_API_KEYS" in scheme["description"]
    # no keys configured here: no route needs one, none says 401
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "security" not in operation and "401" not in operation["responses"], (path, method)


def test_index_page_is_noisewise_swagger_ui(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>noisewise API</title>" in page.text and "./docs.json" in page.text
    assert "validatorUrl: null" in page.text
    for foreign in ("BentoML", "googletagmanager", "github.com", "validator.swagger.io"):
        assert foreign not in page.text, foreign
    # the assets it loads are served
    for asset in ("./static_content/swagger-ui.css", "./static_content/swagger-ui-bundle.js"):
        assert asset in page.text and client.get(asset[1:]).status_code == 200


# --- bad input: always 400 with the location and the expected form -------------------------------
ROW = [0.5] * 64


def raw(text: str) -> bytes:
    return text.encode()


def png_b64(size=(8, 8), fmt="PNG") -> str:
    return b64(image_bytes(np.full(size, 128, dtype=np.uint8), fmt))


BAD_JSON = [
    ("wrong shape", {"inputs": [ROW, [0.5] * 5]},
     "inputs[1]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [5]"),
    ("wrong nested shape", {"inputs": [[[ROW[:8]] * 8] * 2]}, "inputs[0]: expected 64 numbers", "got shape [2, 8, 8]"),
    ("string", {"inputs": [ROW[:63] + ["0.5"]]}, "inputs[0]: expected numbers, found a string"),
    ("boolean among numbers", {"inputs": [ROW[:63] + [True]]}, "inputs[0]: expected numbers, found a boolean"),
    ("booleans", {"inputs": [[True] * 64]}, "inputs[0]: expected numbers, found a boolean"),
    ("null", {"inputs": [ROW[:63] + [None]]}, "inputs[0]: expected numbers, found null"),
    ("object", {"inputs": [[{"x": 1}] * 64]}, "inputs[0]: expected numbers, found an object"),
    ("ragged", {"inputs": [[ROW[:8]] * 7 + [ROW[:5]]]}, "inputs[0]: expected nested arrays of numbers with equal"),
    ("number for an input", {"inputs": [0.5]}, "inputs[0]: expected an array of numbers, got a number"),
    ("inputs not an array", {"inputs": "0.5"}, "inputs: expected an array"),
    ("NaN", raw('{"inputs": [[NaN' + ", 0.5" * 63 + "]]}"), "inputs[0]: expected finite numbers, found nan"),
    ("Infinity", raw('{"inputs": [[0.5, -Infinity' + ", 0.5" * 62 + "]]}"),
     "expected finite numbers, found -inf at index [1]"),
    ("float32 overflow", {"inputs": [[1e39] + ROW[1:]]}, "inputs[0]: expected finite numbers, found inf"),
    ("empty batch", {"inputs": []}, "inputs: empty batch"),
    ("empty input", {"inputs": [[]]}, "inputs[0]: expected numbers, got an empty array"),
    ("no inputs", {}, "body: expected 'inputs' (arrays of numbers) or 'images'"),
    ("inputs and images", {"inputs": [ROW], "images": [png_b64()]}, "either 'inputs' or 'images'"),
    ("unknown field", {"inputs": [ROW], "threshold": 0.1}, "threshold: unknown field"),
    ("invalid JSON", raw('{"inputs": [[0.5,'), "body: Invalid JSON"),
    ("not an object", [ROW], "body: expected a JSON object with 'inputs' or 'images'"),
    ("bad base64", {"images": ["not base64!"]}, "images[0]: not valid base64"),
    ("not an image", {"images": [png_b64(), b64(b"GIF89a but not really")]}, "images[1]: cannot decode"),
    ("GIF", {"images": [png_b64(fmt="GIF")]}, "images[0]: expected a PNG or JPEG image, got GIF"),
    ("truncated PNG", {"images": [b64(base64.b64decode(png_b64((64, 64)))[:60])]}, "images[0]: cannot decode"),
    ("image not a string", {"images": [7]}, "images[0]: expected a base64-encoded PNG or JPEG string, got a number"),
    ("empty image", {"images": [""]}, "images[0]: empty image"),
    ("empty images", {"images": []}, "images: empty batch"),
]


@pytest.mark.parametrize("case", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_input_is_a_400_naming_the_field(client, case):
    _, body, *expected = case
    if isinstance(body, bytes):
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert set(answer) == {"error", "detail"} and answer["detail"]
    for text in expected:
        assert text in answer["error"], answer["error"]
    assert all({"loc", "msg", "type"} <= set(d) for d in answer["detail"])


@pytest.mark.parametrize("body, expected", [
    ({"inputs": [ROW] * 257}, ["inputs: 257 items, at most 256", "NOISEWISE_MAX_BATCH"]),
    ({"images": [png_b64((400, 400))]}, ["images[0]: image has 160000 pixels, at most 100000"]),
], ids=["batch over the maximum", "image too large"])
def test_input_over_a_size_limit_is_a_413_naming_the_limit(client, body, expected):
    response = client.post("/predict", json=body)  # more in tests/integration/test_limits.py
    assert response.status_code == 413, response.text
    for text in expected:
        assert text in response.json()["error"]


def test_several_problems_are_all_reported(client):
    answer = client.post("/predict", json={"inputs": [ROW, [0.5] * 3, ROW, ["a"] * 64]}).json()
    assert [d["loc"] for d in answer["detail"]] == [["inputs", 1], ["inputs", 3]]


BAD_UPLOADS = [
    ("not an image", [("images", ("a.png", b"hello", "image/png"))], 400, "images[0]: cannot decode"),
    ("GIF", [("images", ("a.gif", base64.b64decode(png_b64(fmt="GIF")), "image/gif"))], 400,
     "images[0]: expected a PNG or JPEG image, got GIF"),
    ("second of two broken", [("images", ("a.png", base64.b64decode(png_b64()), "image/png")),
                              ("images", ("b.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))], 400, "images[1]"),
]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_is_a_400_naming_the_file(client, case):
    _, files, status, text = case
    response = client.post("/predict_image", files=files)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]


def test_upload_without_files_or_with_unknown_fields_is_a_400(client):
    # parsed by BentoML before noisewise sees it: BentoML's own 400 format, still naming the field
    empty = client.post("/predict_image", data={"other": "x"}, files=[("note", ("n.txt", b"x", "text/plain"))])
    assert empty.status_code == 400 and "images" in json.dumps(empty.json())
    extra = client.post("/predict_image", data={"threshold": "0.1"},
                        files=[("images", ("a.png", base64.b64decode(png_b64()), "image/png"))])
    assert extra.status_code == 400 and "threshold" in json.dumps(extra.json())


def test_body_over_the_limit_is_a_413(client):
    body = b"{" + b" " * MAX_BODY + b"}"
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "NOISEWISE_MAX_BODY_BYTES" in response.json()["error"]


# --- settings and schemas without a server --------------------------------------------------------
@pytest.mark.parametrize("name, value, message", [
    ("NOISEWISE_MAX_BATCH", "many", "NOISEWISE_MAX_BATCH: expected a positive integer, got 'many'"),
    ("NOISEWISE_TOP_K", "0", "NOISEWISE_TOP_K: expected a positive integer, got 0"),
    ("NOISEWISE_BATCHING", "maybe", "NOISEWISE_BATCHING: expected 1/0"),
    ("NOISEWISE_DEVICE", "tpu", "NOISEWISE_DEVICE: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("NOISEWISE_MODEL", "name with space", "NOISEWISE_MODEL: expected NAME@ALIAS or NAME/VERSION"),
    ("NOISEWISE_BATCH_MAX_LATENCY_MS", "-5", "NOISEWISE_BATCH_MAX_LATENCY_MS: expected a positive integer"),
])
def test_bad_settings_name_the_variable(name, value, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    assert message in str(err.value)


def test_settings_defaults_and_alias():
    settings = Settings.from_env({})
    assert (settings.model, settings.device, settings.max_batch, settings.top_k, settings.batching) == (
        "noisewise-demo@champion", "auto", 256, 3, True)
    assert Settings.from_env({"NOISEWISE_BATCHING": "off"}).batching is False
    assert Settings(model="m/3").alias is None and Settings(model="m").alias == "champion"
    assert Settings(model="m@staging").alias == "staging"


def test_empty_set_reason_says_whether_the_input_is_ood():
    assert empty_set_reason(["3"], is_ood=True) is None and empty_set_reason(["3", "5"], is_ood=False) is None
    assert empty_set_reason([], is_ood=True) == "ood" and empty_set_reason([], is_ood=False) == "no_class_passes"


def test_responses_are_rounded_in_json_only():
    prediction = Prediction(
        id="x", label=1, class_name="1", score=3.14159265, threshold=2.718281828,
        top_k=[TopK(label=1, class_name="1", probability=0.95234567)], prediction_set=["1"],
        ood=OODResult(score=12.3456789, p_value=0.000123456, is_ood=True), decision="abstain", reason="ood",
        model={"name": "m", "version": "1"})
    body = json.loads(prediction.model_dump_json())
    assert (body["score"], body["threshold"], body["top_k"][0]["probability"]) == (3.1416, 2.7183, 0.9523)
    assert body["ood"] == {"score": 12.3457, "p_value": 0.0001235, "is_ood": True}
    assert prediction.model_dump()["score"] == 3.14159265 and prediction.score == 3.14159265
    assert (round_readable(0.2222222), round_readable(450.123456), round_readable(0.0), round_readable(None)) == (
        0.2222, 450.1235, 0.0, None)


def test_request_model_without_a_spec_checks_types_only():
    request = PredictRequest.model_validate({"inputs": [[1, 2, 3]]})
    assert request.inputs[0].dtype == np.float32 and request.inputs[0].shape == (3,)
    with pytest.raises(RuntimeError, match="without an InputSpec"):
        request.batch  # noqa: B018
    spec = InputSpec(shape=(64,))
    assert spec.expected() == "an array of 64 numbers" and spec.image_mode is None

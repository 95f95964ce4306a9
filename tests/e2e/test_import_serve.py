"""Imported models served for real: a CNN trained here in plain torch, saved as TorchScript with
forward_features/forward_head, as logits-only TorchScript and as a torch.export program, imported with the
`noisewise import` command (a real process, the session's MLflow store) and served by `bentoml serve` (one server
per model kind, started together); /predict answers every field for arrays and for images as clients have them,
with the CNN's own predictions, and a logits-only model says which OOD score it rests on."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.e2e.test_server import ROOT, START_TIMEOUT_S, free_port, server_env, stop
from tests.integration.test_import import PREPROCESS, reference_logits, save_models, train_cnn

pytestmark = pytest.mark.slow

KINDS = {"features": "torchscript", "logits": "torchscript", "program": "export"}
FIELDS = {"id", "label", "class_name", "score", "threshold", "top_k", "prediction_set", "set_reason", "ood", "decision",
          "reason", "model"}


@pytest.fixture(scope="module")
def cnn():
    return train_cnn()


@pytest.fixture(scope="module")
def served(cnn, tmp_path_factory):
    """`noisewise import` of each form as a user runs it (version 1 of each name, promoted), and one
    `bentoml serve` per version, the three started together; ``{key: (import output, url)}``. Servers are stopped
    by PID."""
    paths = save_models(cnn, tmp_path_factory.mktemp("import-models"))
    logs = tmp_path_factory.mktemp("logs")
    procs, out = {}, {}
    for key in KINDS:  # one at a time: on 2 cores, imports overlapping server start-ups only slow both down
        proc = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "import", str(paths[key]), "--dataset",
                               "digits", "--register", f"e2e-import-{key}", "--promote", *PREPROCESS, "--json"],
                              capture_output=True, text=True, env=server_env(), timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        out[key] = json.loads(proc.stdout)
    try:
        for key in KINDS:
            port = free_port()
            out[key] = (out[key], f"http://127.0.0.1:{port}")
            with open(logs / f"{key}.log", "wb") as log:
                procs[key] = subprocess.Popen(
                    [sys.executable, "-m", "bentoml", "serve", "noisewise.services.service:Noisewise", "--host",
                     "127.0.0.1", "--port", str(port)],
                    cwd=ROOT, env=server_env(NOISEWISE_MODEL=f"e2e-import-{key}@champion"), stdout=log,
                    stderr=subprocess.STDOUT)
        waiting, deadline = set(KINDS), time.monotonic() + START_TIMEOUT_S
        while waiting:
            for key in sorted(waiting):
                if procs[key].poll() is not None:
                    pytest.fail(f"bentoml serve ({key}) exited:\n{(logs / f'{key}.log').read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{out[key][1]}/readyz", timeout=2).status_code == 200:
                        waiting.discard(key)
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {START_TIMEOUT_S} s: {sorted(waiting)}")
            time.sleep(0.3)
        yield out
    finally:
        for proc in procs.values():
            stop(proc)


def _png(image: np.ndarray, size: int = 32) -> str:
    """A digit as a client has it: an RGB PNG, 32x32 instead of the model's 8x8 grey."""
    from PIL import Image

    pixels = (np.clip(image[0], 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").resize((size, size), Image.NEAREST).convert("RGB").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decoded(png: str) -> np.ndarray:
    """The array the service makes of an image for a version taking [1, 8, 8] (the calibration inputs' form)."""
    from noisewise.services.schemas import InputSpec, decode_image

    return decode_image(base64.b64decode(png), InputSpec(shape=(1, 8, 8)))


@pytest.mark.parametrize("key", list(KINDS))
def test_imported_model_serves_every_field_with_its_own_predictions(served, cnn, key):
    from sklearn.datasets import load_digits

    version, url = served[key]
    assert version["arch"] == KINDS[key] and version["logits_only"] is (key != "features")
    bunch = load_digits()
    x = (bunch.images[-12:] / 16.0).astype(np.float32)[:, None]  # in the test split or not: any digits
    expected = reference_logits(cnn, x).argmax(1).tolist()

    answer = httpx.post(f"{url}/predict", json={"inputs": x.tolist(), "explain": True}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [p["label"] for p in body["predictions"]] == expected
    for p in body["predictions"]:
        assert set(p) == FIELDS
        assert set(p["ood"]) == {"score", "p_value", "is_ood"} and 0 < p["ood"]["p_value"] <= 1
        assert p["decision"] in ("accept", "abstain") and p["model"] == {"name": f"e2e-import-{key}", "version": "1"}
        assert p["class_name"] == str(p["label"]) and p["top_k"][0]["label"] == p["label"]
    ood = body["guarantees"]["ood"]
    assert body["guarantees"]["prediction_set"]["target_coverage"] == pytest.approx(0.9)
    if key == "features":
        assert ood["scorer"] == "knn" and "logits-only" not in ood["condition"]
    else:  # the response says what the OOD score rests on
        assert ood["scorer"] == "energy" and "logits-only (no features available)" in ood["condition"]

    images = [_png(row) for row in x[:4]]
    answer = httpx.post(f"{url}/predict", json={"images": images}, timeout=60)
    assert answer.status_code == 200, answer.text
    decoded = np.stack([_decoded(png) for png in images])
    assert [p["label"] for p in answer.json()["predictions"]] == reference_logits(cnn, decoded).argmax(1).tolist()

    model = httpx.post(f"{url}/model", timeout=30).json()
    assert model["arch"] == KINDS[key] and model["input"]["shape"] == [1, 8, 8] and model["input"]["images"] is True
    assert model["calibration"]["ood"]["scorer"] == ood["scorer"]
    assert any("not trained on the calibration and test items" in a for a in model["calibration"]["assumptions"])

    wrong = httpx.post(f"{url}/predict", json={"inputs": [[0.5] * 63]}, timeout=30)
    assert wrong.status_code == 400 and "expected 64 numbers or an array shaped [1, 8, 8]" in wrong.json()["error"]

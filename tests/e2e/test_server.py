"""A real ``bentoml serve noisewise.services.service:Noisewise`` on a free loopback port: real HTTP, then stopped by
PID (terminate, kill after a timeout, never left running)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.serving_model import digits, direct_predictions, ensure_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(ROOT), **extra}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `bentoml serve` sets up its own
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (BentoML's process manager stops its workers), SIGKILL after a timeout; then any
    of its worker processes that outlived it, each by PID."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def bentoml_serve(target: str, env: dict, log: Path):
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop(proc)


def forward_passes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^noisewise_forward_passes_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def concurrent_singles(url: str, rows) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*[client.post("/predict", json={"inputs": [row.tolist()]}) for row in rows])


@pytest.fixture(scope="module")
def ref():
    return ensure_model()


@pytest.fixture(scope="module")
def server(ref, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "bentoml-serve.log"
    with bentoml_serve("noisewise.services.service:Noisewise", server_env(NOISEWISE_MODEL=ref), log) as url:
        yield url


def test_one_and_many_inputs(server, ref):
    x, _ = digits(100, start=500)
    expected = direct_predictions(ref, x)
    one = httpx.post(f"{server}/predict", json={"inputs": [x[0].tolist()]}, timeout=30)
    assert one.status_code == 200, one.text
    p = one.json()["predictions"][0]
    assert uuid.UUID(p["id"]).version == 4 and p["label"] == expected[0].label
    assert p["decision"] in ("accept", "abstain") and set(p["ood"]) == {"score", "p_value", "is_ood"}
    assert one.json()["guarantees"]["prediction_set"]["target_coverage"] == pytest.approx(0.9)
    before = forward_passes(server)
    many = httpx.post(f"{server}/predict", json={"inputs": x.reshape(100, -1).tolist()}, timeout=30)
    assert many.status_code == 200
    assert [q["label"] for q in many.json()["predictions"]] == [e.label for e in expected]
    assert forward_passes(server) - before == 1


def test_sixteen_concurrent_requests(server, ref):
    x, _ = digits(16, start=700)
    before = forward_passes(server)
    responses = asyncio.run(concurrent_singles(server, x))
    assert [r.status_code for r in responses] == [200] * 16
    predictions = [r.json()["predictions"][0] for r in responses]
    assert [q["label"] for q in predictions] == [e.label for e in direct_predictions(ref, x)]
    assert len({q["id"] for q in predictions}) == 16
    # a sub-millisecond network is done before the next request is parsed, so BentoML's dispatcher may
    # rightly not batch here; test_batching_merges_concurrent_requests shows the merging with a slower one
    assert 1 <= forward_passes(server) - before <= 16


def test_model_docs_probes_and_bad_input(server):
    info = httpx.post(f"{server}/model", timeout=10).json()
    assert info["name"] == "serving-test" and info["input"]["shape"] == [1, 8, 8]
    assert {"/predict", "/predict_image", "/model"} <= set(httpx.get(f"{server}/docs.json", timeout=10).json()["paths"])
    for probe in ("/readyz", "/livez", "/healthz"):
        assert httpx.get(f"{server}{probe}", timeout=10).status_code == 200
    bad = httpx.post(f"{server}/predict", json={"inputs": [[0.5] * 5]}, timeout=10)
    assert bad.status_code == 400
    assert "inputs[0]: expected 64 numbers or an array shaped [1, 8, 8]" in bad.json()["error"]
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    assert "noisewise_batch_inputs_bucket" in metrics and "bentoml_service_request_total" in metrics


def test_batching_merges_concurrent_requests(ref, tmp_path):
    """The same service with every forward pass slowed to 50 ms (tests/e2e/slow_service.py), as a bigger
    network would be: 16 concurrent single-input requests share a few passes."""
    env = server_env(NOISEWISE_MODEL=ref, NOISEWISE_TEST_PASS_DELAY_MS="50")
    with bentoml_serve("tests.e2e.slow_service:Noisewise", env, tmp_path / "slow.log") as url:
        x, _ = digits(16, start=900)
        asyncio.run(concurrent_singles(url, x[:4]))  # BentoML's dispatcher learns the pass cost first
        before = forward_passes(url)
        responses = asyncio.run(concurrent_singles(url, x))
        assert [r.status_code for r in responses] == [200] * 16
        assert [r.json()["predictions"][0]["label"] for r in responses] == [e.label for e in direct_predictions(ref, x)]
        assert forward_passes(url) - before < 16


def test_missing_model_exits_non_zero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "noisewise.services.service:Noisewise", "--host", "127.0.0.1", "--port",
         str(free_port())],
        cwd=ROOT, env=server_env(NOISEWISE_MODEL="no-such-model@champion"), capture_output=True, text=True,
        timeout=START_TIMEOUT_S, check=False,
    )
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 3
    assert output == [output[0]] and output[0].startswith("noisewise: error: cannot serve model "
                                                          "'no-such-model@champion': ")
    assert "not found" in output[0]

"""Start-up of `noisewise serve` and of the service: the command becomes the server (no wrapper process stays
beside it), only the worker loads torch and the network, and the check before the worker starts still
refuses what cannot be served with one line and exit status 3."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_server import ROOT, START_TIMEOUT_S, free_port, server_env, stop
from tests.integration.serving_model import ensure_model, run_in_process, stored_artifacts

pytestmark = pytest.mark.slow


def maps_torch(process: psutil.Process) -> bool:
    """Whether ``process`` has torch's shared library mapped (it imported torch)."""
    try:
        return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return False


def serve(ref: str, port: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "noisewise.services.cli", "serve", "--model", ref, "--port", str(port)],
                            cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def test_serve_is_the_server_and_only_the_worker_loads_torch():
    proc, lines = serve(ensure_model(), port := free_port())
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("try it:" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "not ready:\n" + "".join(lines)
            time.sleep(0.2)
        assert sum("try it:" in line for line in lines) == 1
        server = psutil.Process(proc.pid)
        assert server.cmdline()[1:4] == ["-m", "bentoml", "serve"]  # the command became the server
        deadline = time.monotonic() + 10
        while len(server.children(recursive=True)) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the child that printed the curl has exited
        children = server.children(recursive=True)
        assert len(children) == 1, [c.cmdline() for c in children]
        assert not maps_torch(server) and maps_torch(children[0])
        assert server.memory_info().rss < 300 * 2**20  # no model, no torch, no MLflow in the server process

        body = next(line for line in lines if "try it:" in line).split("-d @", 1)[1].strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=Path(body).read_bytes(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 1

        proc.send_signal(signal.SIGTERM)  # to the command's own process: the server stops, with its status
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        stop(proc)


def test_serve_refuses_an_uncalibrated_model_before_any_worker_starts():
    name = "startup-uncalibrated"
    from noisewise.models.registry import has_alias

    if not has_alias(name):
        status, _, err = run_in_process("train", "--dataset", "digits", "--recipe", "ce", "--epochs", "1",
                                        "--no-calibrate", "--register", name, "--promote", "--quiet")
        assert status == 0, err
    started = time.monotonic()
    proc, lines = serve(f"{name}@champion", free_port())
    try:
        assert proc.wait(timeout=START_TIMEOUT_S) == 3
    finally:
        stop(proc)
    time.sleep(0.2)
    output = [line.strip() for line in lines if line.strip()]
    assert output[0].startswith(f"noisewise: starting {name}@champion on ")
    assert len(output) == 2, output
    assert output[1].startswith(f"noisewise: error: model '{name}@champion' ({name}/") and "has no calibration" in output[1]
    assert time.monotonic() - started < START_TIMEOUT_S / 2


CHECK_IN_A_FRESH_PROCESS = """
import gc, json
from noisewise.services.service import check_model_here
status = check_model_here()
import torch
modules = sum(isinstance(o, torch.nn.Module) for o in gc.get_objects())
print(json.dumps({"status": status, "modules": modules}))
"""


def test_the_check_builds_no_network_and_writes_the_example(tmp_path):
    example = tmp_path / "example.json"
    env = server_env(NOISEWISE_MODEL=ensure_model(), NOISEWISE_STORE="0", NOISEWISE_EXAMPLE_REQUEST=str(example))
    proc = subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": 0, "modules": 0}
    inputs = json.loads(example.read_text())["inputs"]
    assert len(inputs) == 1 and len(inputs[0]) == 64  # one 8x8 digit, flattened


def test_an_edited_calibration_is_refused_with_or_without_its_digest(monkeypatch, capsys):
    """A calibration.json edited to an impossible value is refused before any worker starts: by the document
    checks when its digest was re-recorded to match, by the full load when the version records none."""
    from noisewise.models import registry
    from noisewise.services.service import EXIT_MODEL, check_model_here

    name = "startup-edited"
    ref = ensure_model(name)
    _, _, run_id = registry.resolve_version(ref)
    client = registry._mlflow().MlflowClient()
    tag = f"{registry.DIGEST_TAG}calibration.json"
    expected = client.get_run(run_id).data.tags[tag]
    stored = [p for p in stored_artifacts(ref, "calibration.json") if registry._sha256(p) == expected]
    assert stored
    for path in stored:
        doc = json.loads(path.read_text())
        doc["threshold"]["alpha"] = 1.5
        path.write_text(json.dumps(doc))
    monkeypatch.setenv("NOISEWISE_MODEL", ref)
    monkeypatch.setenv("NOISEWISE_STORE", "0")
    monkeypatch.delenv("NOISEWISE_EXAMPLE_REQUEST", raising=False)
    capsys.readouterr()
    for digest in (registry._sha256(stored[0]), None):
        if digest is None:
            client.delete_tag(run_id, tag)  # as a version registered before the digest was recorded
        else:
            client.set_tag(run_id, tag, digest)
        assert check_model_here() == EXIT_MODEL
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"noisewise: error: cannot serve model '{ref}': "), err
        assert "threshold.alpha must be in (0, 1), got 1.5" in err, err

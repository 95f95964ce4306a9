"""`noisewise serve` as `make run` uses it: starts a real server, prints a curl that works; then
`noisewise demo` sends traffic to it. Stopped by PID afterwards (its BentoML children too)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.test_server import free_port, server_env, stop
from tests.integration.serving_model import ensure_model

pytestmark = pytest.mark.slow


def test_serve_prints_a_working_curl_and_demo_reports(tmp_path):
    ref = ensure_model()
    port = free_port()
    env = server_env()
    proc = subprocess.Popen([sys.executable, "-m", "noisewise.services.cli", "serve", "--model", ref, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not any("try it:" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "server not ready in 150 s:\n" + "".join(lines)
            time.sleep(0.5)
        curl = next(line for line in lines if "try it:" in line).split("try it:", 1)[1].strip()
        assert curl.startswith(f"curl -s -X POST http://127.0.0.1:{port}/predict")
        answer = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60, check=True)
        prediction = json.loads(answer.stdout)["predictions"][0]
        for key in ["id", "label", "class_name", "score", "threshold", "top_k", "prediction_set", "set_reason", "ood",
                    "decision", "reason", "model"]:
            assert key in prediction, key
        assert any(f"http://127.0.0.1:{port}/metrics" in line for line in lines)

        demo = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "demo", "--url", f"http://127.0.0.1:{port}",
                               "--model", ref, "--n", "30", "--batch", "4", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert demo.returncode == 0, demo.stderr
        streams = json.loads(demo.stdout)["streams"]
        assert streams["id"]["sent"] == 30 and streams["photos"]["sent"] == 10
        s = streams["id"]
        assert s["accepted"] + s["abstained_ood"] + s["abstained_low_confidence"] == 30
        # far-OOD photo patches are mostly flagged by the KNN gate
        assert streams["photos"]["abstained_ood"] >= 7
        # the feedback loop ran: every label stored, suspects scored, a monitor report; 30 labels are too few
        # for a recalibration, which is refused with the reason (and the alias stays where it was)
        feedback = json.loads(demo.stdout)["feedback"]
        assert feedback["counts"]["stored"] >= 30 + 10 and feedback["counts"]["rejected"] == 0
        assert feedback["monitor"]["n_feedback"] >= feedback["counts"]["stored"]  # the session's store is shared
        assert "refused" in feedback["recalibration"] and "items" in feedback["recalibration"]["refused"]
    finally:
        stop(proc)
    assert proc.poll() is not None

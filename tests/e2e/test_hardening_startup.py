"""``bentoml serve`` with a store it cannot open stops before any worker starts: one line, exit status 3
(not a worker restarted again and again until the caller gives up waiting)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.e2e.test_server import ROOT, START_TIMEOUT_S, free_port, server_env
from tests.integration.serving_model import ensure_model

pytestmark = pytest.mark.slow


def test_a_store_that_cannot_be_opened_stops_the_server_with_one_line(tmp_path):
    env = server_env(NOISEWISE_MODEL=ensure_model(), NOISEWISE_STORE_URL=f"sqlite:///{tmp_path}")  # a directory
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "noisewise.services.service:Noisewise", "--host", "127.0.0.1",
         "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False,
    )
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 3, output[-20:]
    assert len(output) == 1, output[-20:]
    assert output[0].startswith(f"noisewise: error: cannot open the store sqlite:///{tmp_path}: ")
    assert "NOISEWISE_STORE_URL" in output[0]
    assert time.monotonic() - started < START_TIMEOUT_S / 2

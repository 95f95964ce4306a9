"""A real `evidently ui` on a free loopback port, for the tests that open the Evidently workspace."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.e2e.test_server import free_port


@contextlib.contextmanager
def evidently_ui(workspace: Path, log_path: Path, timeout_s: float = 90) -> Iterator[str]:
    """Serve ``workspace`` with `evidently ui` until it answers ``/api/projects``; yields its base URL and stops
    it afterwards. Its output goes to ``log_path`` (shown when it exits or does not answer in time)."""
    port = free_port()
    evidently = Path(sys.executable).with_name("evidently")
    with log_path.open("w") as log:
        process = subprocess.Popen([str(evidently), "ui", "--workspace", str(workspace), "--host", "127.0.0.1",
                                    "--port", str(port)], env={**os.environ, "DO_NOT_TRACK": "true"},
                                   stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if httpx.get(f"{base}/api/projects", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, f"evidently ui did not answer within {timeout_s:g} s"
                time.sleep(0.25)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

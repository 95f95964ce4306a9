"""The service makes OpenMP's idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``) before torch can load OpenMP,
which reads the variable once; an explicit value is kept. In a fresh interpreter, as a BentoML worker starts:
the service module is imported, then the model loads torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(300)

# Records OMP_WAIT_POLICY at the moment torch is first imported, whoever imports it.
PROBE = textwrap.dedent("""
    import json, os, sys

    seen = {}

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "at_torch" not in seen:
                seen["at_torch"] = os.environ.get("OMP_WAIT_POLICY")
            return None

    sys.meta_path.insert(0, Watch())
    import noisewise.services.service
    import torch
    print(json.dumps(seen))
    """)


def _probe(**env: str) -> dict:
    environ = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240, check=False,
                          env={**environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_passive_before_torch_loads():
    assert _probe()["at_torch"] == "PASSIVE"


def test_an_explicit_policy_is_kept():
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["at_torch"] == "ACTIVE"

"""Serving-test setup. prometheus_client must see PROMETHEUS_MULTIPROC_DIR before it is first imported, or
BentoML's /metrics hangs under the test client; conftest modules are imported before the test modules."""

import os
import tempfile

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="noisewise-prometheus-"))
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="noisewise-bentoml-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

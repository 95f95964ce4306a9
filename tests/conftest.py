"""Test-session environment: an isolated NOISEWISE_HOME and MLflow store, no telemetry."""

import os
import tempfile

# Before anything imports mlflow/bentoml/prometheus_client.
_HOME = tempfile.mkdtemp(prefix="noisewise-test-home-")
os.environ["NOISEWISE_HOME"] = _HOME
os.environ.pop("MLFLOW_TRACKING_URI", None)
for _name in ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK"):
    os.environ[_name] = "true"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

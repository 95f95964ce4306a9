"""A small registered, calibrated model for the serving tests, trained once per test session.

Trained through the real CLI (in-process) into the session's NOISEWISE_HOME (set by tests/conftest.py), so
the in-process service tests and the real-server tests share it. Digits (8x8, 10 classes), 20% symmetric
noise, 4 epochs: weak (~70% clean accuracy) but fast, and r* = 0.25 so that abstention certifies and both
decisions occur.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json

NAME = "serving-test"
REF = f"{NAME}@champion"


def ensure_model(name: str = NAME) -> str:
    """``NAME@champion`` of the small digits test model, trained and promoted once per test session; another
    ``name`` gives a copy of it that a test may move aliases on without touching the shared one."""
    from noisewise.models.registry import has_alias

    if not has_alias(name):
        from noisewise.services.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs",
                           "4", "--risk", "0.25", "--seed", "0", "--register", name, "--promote", "--json",
                           "--quiet"])
        assert status == 0, out.getvalue()
        assert json.loads(out.getvalue())["calibration"]["abstention"]["certified"], "test model did not certify"
    return f"{name}@champion"


def stored_artifacts(ref: str, file_name: str) -> list:
    """The copies of ``file_name`` of version ``ref`` in the artifact store (what load_model reads). Selected by
    the version's own artifact folder, never by content: a model trained with the same seed has identical bytes,
    and a test that tampers with its own version must leave that one alone."""
    from noisewise.models import registry

    name, version, _ = registry.resolve_version(ref)
    source = registry._mlflow().MlflowClient().get_model_version(name, version).source
    folder = source.rstrip("/").split("/")[-1]
    return [p for p in registry.home_dir().rglob(file_name) if folder in p.parts]


def prediction_rows(model, outputs, ids) -> list:
    """Store rows for ``outputs`` of ``model`` (a LoadedModel) under ``ids``, as the service records them."""
    import numpy as np

    from noisewise.monitoring.store import PredictionRow

    return [PredictionRow(id=i, model_name=model.name, model_version=model.version, weights=model.weights,
                          predicted=o.label, confidence=o.confidence, prediction_set=o.set_indices, is_ood=o.is_ood,
                          ood_score=o.ood_score, ood_p_value=o.ood_p_value, decision=o.decision, reason=o.reason,
                          probs=np.asarray(o.probs, dtype=np.float32))
            for i, o in zip(ids, outputs)]


def run_in_process(*argv: str) -> tuple[int, str, str]:
    """``noisewise ARGV`` in this process (the session's NOISEWISE_HOME): ``(exit status, stdout, stderr)``."""
    from noisewise.services.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def digits(n: int, start: int = 0):
    """``n`` clean digits images ``[n, 1, 8, 8]`` in [0, 1] and their labels, as the model was trained on."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[start:start + n] / 16.0).astype("float32")[:, None]
    return x, bunch.target[start:start + n]


def direct_predictions(ref: str, x):
    """The registered model's own predictions (models.predictor), to compare the service against."""
    from noisewise.models.predictor import Predictor
    from noisewise.models.registry import load_model

    loaded = load_model(ref, device="cpu")
    return Predictor(loaded.net, loaded.calibration, device="cpu").predict(x)


@functools.cache
def asgi_app():
    """``Noisewise.to_asgi()``, built once per process: BentoML registers its Prometheus metrics when the app
    is built, and a second build in the same process fails with DuplicateTimeseries. Each TestClient
    context runs the app's lifespan again, i.e. creates a new service instance from the current environment."""
    from noisewise.services.service import Noisewise

    return Noisewise.to_asgi()


@contextlib.contextmanager
def serve(env: dict):
    """``TestClient(asgi_app())`` with ``env`` set for the service's lifespan."""
    import pytest
    from starlette.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(asgi_app()) as client:
            yield client

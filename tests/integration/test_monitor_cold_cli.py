"""`noisewise monitor` as an operator runs it (a new process): the Evidently reports come from the child process
forked at its start, the parent never imports Evidently, and the report is the one the in-process path writes;
a broken report side ends the command with one line and a non-zero status, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from noisewise.monitoring.feedback import score_feedback
from noisewise.monitoring.store import FeedbackRow, PredictionRow, Store

from tests.integration.serving_model import run_in_process as run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "monitor-cold-test"
REF = f"{NAME}@champion"
# The drift report's fields that differ between two runs of the same window.
PER_RUN = ("timestamp", "html", "json", "snapshot_id", "project_id", "workspace")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """A registered digits model and a store of 500 predictions with one label each (20% wrong, known places)."""
    from noisewise.models.registry import has_alias, load_model

    if not has_alias(NAME):
        status, out, _ = run("train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs",
                             "3", "--risk", "0.25", "--seed", "2", "--register", NAME, "--promote", "--json", "--quiet")
        assert status == 0, out
    model = load_model(REF, network=False)
    k = model.calibration.num_classes
    rng = np.random.default_rng(3)
    n = 500
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    labels = np.where(rng.random(n) < 0.2, (predicted + rng.integers(1, k, n)) % k, predicted)
    scores = score_feedback(probs, labels, np.asarray(model.calibration.cl_thresholds, dtype=np.float32))
    url = f"sqlite:///{tmp_path_factory.mktemp('monitor-cold') / 'store.db'}"
    store = Store(url)
    ids = [f"p{i:04d}" for i in range(n)]
    store.add_predictions([
        PredictionRow(id=ids[i], model_name=model.name, model_version=model.version, weights="w",
                      predicted=int(predicted[i]), confidence=float(probs[i].max()), prediction_set=[int(predicted[i])],
                      is_ood=bool(i % 20 == 0), ood_score=0.5, ood_p_value=0.5, decision="accept", reason=None,
                      probs=probs[i]) for i in range(n)])
    store.add_feedback([
        FeedbackRow(prediction_id=ids[i], label=int(labels[i]), annotator="a" if i % 2 else "b", audited=False,
                    quality=float(scores.quality[i]), suspect=bool(scores.suspect[i]), proposed=int(scores.proposed[i]),
                    in_set=bool(labels[i] == predicted[i])) for i in range(n)])
    store.close()
    return url


def cold(store_url: str, code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter, with this session's NOISEWISE_HOME and the store."""
    env = {**os.environ, "NOISEWISE_STORE_URL": store_url}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def test_cold_monitor_keeps_evidently_out_of_the_parent_and_reports_as_in_process(store_url, tmp_path):
    done = cold(store_url, f"""
        import sys
        from noisewise.services.cli import main
        status = main(["monitor", "--model", {REF!r}, "--window", "400", "--workspace", {str(tmp_path / 'cold')!r},
                       "--json"])
        assert status == 0, status
        heavy = sorted(m for m in ("evidently", "evidently.core") if m in sys.modules)
        assert not heavy, heavy
        """)
    assert done.returncode == 0, done.stderr[-3000:]
    cold_report = json.loads(done.stdout)
    with pytest.MonkeyPatch.context() as mp:  # the in-process path: no worker, the reports computed here
        mp.setenv("NOISEWISE_STORE_URL", store_url)
        from noisewise.models.registry import load_model
        from noisewise.monitoring.monitor import run_monitor

        store = Store(store_url)
        try:
            here = run_monitor(store, load_model(REF, network=False), tmp_path / "here", window=400)
        finally:
            store.close()
    from noisewise.services.cli import _round_all

    here = json.loads(json.dumps(_round_all(here)))  # as --json prints it
    for report in (cold_report, here):
        for key in PER_RUN:
            report["drift"].pop(key)
    assert cold_report == here
    assert cold_report["n_feedback"] == 400 and cold_report["drift"]["label_drift"]["n_current"] > 300
    assert list((tmp_path / "cold" / "reports").glob("*.html"))


def test_a_broken_report_side_ends_the_command_with_one_line(store_url, tmp_path):
    fake = tmp_path / "site" / "evidently"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('evidently is broken on purpose')\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "monitor", "--model", REF, "--workspace",
                           str(tmp_path / "ws"), "--json"], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "NOISEWISE_STORE_URL": store_url, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("noisewise: error:")]
    assert lines == [("noisewise: error: the Evidently report process failed: cannot import the report's "
                      "dependencies: ImportError: evidently is broken on purpose")], done.stderr
    assert time.monotonic() - started < 120


def test_an_early_failure_stops_the_child_at_once(store_url):
    # An unknown model fails before any report: one line, status 2, and no wait for the child's import.
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "monitor", "--model",
                           "no-such-model@champion"], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "NOISEWISE_STORE_URL": store_url})
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith("noisewise: error:") and "no-such-model" in done.stderr
    assert elapsed < 60

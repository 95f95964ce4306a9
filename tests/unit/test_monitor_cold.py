"""A cold `noisewise monitor` splits its work over two processes: the parent loads the model, reads the store and
computes the feedback state without ever importing Evidently; a child forked first imports Evidently meanwhile and
computes the reports. These tests pin that split (what each side imports), that the child's report equals the
in-process one, and that every failure of the child ends in one line, promptly, without a leftover process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from noisewise.monitoring.report_worker import (
    DriftJob,
    ReportWorker,
    ReportWorkerError,
    compute_drift,
)

pytestmark = pytest.mark.timeout(300)

NAMES = ["cat", "dog", "fox", "owl"]
# What each process of the command must not import: the parent's heavy modules stay out of the child, and
# Evidently out of the parent (each import is seconds of CPU on the same two cores).
HEAVY_PARENT = ("torch", "mlflow")
HEAVY_CHILD = ("evidently",)


def imported_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``."""
    probe = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_worker_module_imports_only_the_standard_library():
    # The fork happens before anything heavy is imported: the child starts small and the parent at once.
    modules = imported_after("import noisewise.monitoring.report_worker")
    assert not modules & {"numpy", "pandas", "evidently", "torch", "mlflow", "scipy", "sqlalchemy"}, modules


def test_the_report_side_imports_neither_torch_nor_mlflow():
    modules = imported_after("import noisewise.monitoring.drift, noisewise.monitoring.operator_view")
    assert "evidently" in modules
    assert not modules & set(HEAVY_PARENT), modules & set(HEAVY_PARENT)


def test_the_monitor_side_never_imports_evidently():
    # run_monitor, the store and the feedback estimates: Evidently stays in the child (or in compute_drift).
    modules = imported_after("import noisewise.monitoring.monitor, noisewise.monitoring.store, "
                             "noisewise.services.cli_feedback")
    assert not modules & set(HEAVY_CHILD), modules & set(HEAVY_CHILD)


def window(seed: int = 0, n: int = 400) -> DriftJob:
    """A monitor window of ``n`` predictions with one feedback label each (15% of them wrong, 5% OOD)."""
    rng = np.random.default_rng(seed)
    predicted = rng.integers(0, len(NAMES), n)
    label = np.where(rng.random(n) < 0.15, (predicted + 1) % len(NAMES), predicted)
    feedback = pd.DataFrame({
        "prediction_id": [f"p{i}" for i in range(n)], "label": label, "predicted": predicted,
        "suspect": rng.random(n) < 0.1, "annotator": rng.choice(["", "ann", "bob"], n),
        "is_ood": rng.random(n) < 0.05, "audited": np.zeros(n, bool),
        "received_at": pd.date_range("2026-01-01", periods=n, freq="s", tz="UTC")})
    reference = pd.DataFrame({"label": rng.integers(0, len(NAMES), 300), "predicted": rng.integers(0, len(NAMES), 300)})
    state = {"n": int((~feedback["is_ood"]).sum()), "n_ood": int(feedback["is_ood"].sum()), "noise": {},
             "best": None, "coverage": {}, "suspect_share": 0.1, "target": 0.9}
    return DriftJob(reference=reference, predictions=pd.DataFrame({"predicted": predicted}), feedback=feedback,
                    class_names=NAMES, workspace=Path("unused"), model="unit/1", state=state, calibration_noise={},
                    above=None)


def comparable(report: dict) -> dict:
    """A drift report without what differs between two runs (time, file names, snapshot ids)."""
    return {k: v for k, v in report.items()
            if k not in ("timestamp", "html", "json", "snapshot_id", "project_id", "workspace")}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_child_computes_the_same_report_as_this_process(tmp_path):
    job = window()
    with ReportWorker() as worker:
        pid = worker.pid
        child = worker.drift(DriftJob(**{**job.__dict__, "workspace": tmp_path / "child"}))
    here = compute_drift(DriftJob(**{**job.__dict__, "workspace": tmp_path / "here"}))
    assert comparable(child) == comparable(here)
    assert child["label_drift"]["n_current"] == here["label_drift"]["n_current"] > 300
    assert Path(child["html"]).is_file() and Path(child["html"]).parent.parent == tmp_path / "child"
    assert gone(pid)


def test_a_refused_job_raises_the_in_process_error(tmp_path):
    job = window()
    bad = DriftJob(**{**job.__dict__, "reference": job.reference.iloc[:0], "workspace": tmp_path})
    with pytest.raises(ValueError) as here:
        compute_drift(bad)
    with ReportWorker() as worker, pytest.raises(ValueError) as child:
        worker.drift(bad)
    assert str(child.value) == str(here.value) and "reference" in str(child.value)


def test_a_killed_child_is_reported_in_one_line_without_waiting(tmp_path):
    with ReportWorker() as worker:
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ReportWorkerError) as err:
            worker.drift(DriftJob(**{**window().__dict__, "workspace": tmp_path}))
        assert time.monotonic() - started < 10
    message = str(err.value)
    assert "\n" not in message and "killed by signal 9" in message, message


def test_a_job_that_does_not_pickle_fails_in_one_line_and_stops_the_child(tmp_path):
    job = DriftJob(**{**window().__dict__, "workspace": tmp_path, "state": {"n": lambda: 0}})
    with ReportWorker() as worker:
        pid = worker.pid
        started = time.monotonic()
        with pytest.raises(ReportWorkerError) as err:
            worker.drift(job)
        assert time.monotonic() - started < 10
    assert str(err.value).startswith("cannot send the window to the report process: ") and "\n" not in str(err.value)
    assert gone(pid)


def test_closing_an_unused_worker_stops_the_child_at_once():
    # The command failed before its reports (unknown model, no store): the child, still importing, is ended.
    worker = ReportWorker()
    pid = worker.pid
    started = time.monotonic()
    worker.close()
    assert time.monotonic() - started < 3
    assert gone(pid)


def test_a_child_that_cannot_import_evidently_fails_in_one_line(tmp_path):
    # A broken Evidently install (shadowed here by a package that fails on import) reaches the parent as one
    # line naming the cause, not as a traceback from the child.
    fake = tmp_path / "site" / "evidently"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('evidently is broken on purpose')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / 'site')!r})
        import pandas as pd
        from noisewise.monitoring.report_worker import DriftJob, ReportWorker, ReportWorkerError
        job = DriftJob(reference=pd.DataFrame({{"label": [0, 1], "predicted": [0, 1]}}),
                       predictions=pd.DataFrame({{"predicted": [0]}}), feedback=pd.DataFrame(), class_names=["a", "b"],
                       workspace={str(tmp_path / 'ws')!r}, model=None, state={{}}, calibration_noise={{}}, above=None)
        with ReportWorker() as worker:
            try:
                worker.drift(job)
            except ReportWorkerError as err:
                print(err)
                sys.exit(3)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == ("the Evidently report process failed: cannot import the report's dependencies: "
                                   "ImportError: evidently is broken on purpose")
    assert "Traceback" not in done.stderr

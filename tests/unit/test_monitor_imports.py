"""`noisewise monitor` loads no torch: its parent process (the CLI, the registry's document-only load of a
calibration, the store, the feedback estimates) runs on numpy, pandas and ``scipy.special`` (torch and
``scipy.stats`` are seconds of imports on a cold start), and computes what the same functions compute in a process
that has torch. The binomial intervals read ``scipy.special.betaincinv``, equal to ``scipy.stats.beta.ppf``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

from noisewise.models.calibrate import Calibration
from noisewise.models.uncertainty.conformal import ConformalThreshold
from noisewise.models.uncertainty.labelnoise import _clopper_pearson_many, clopper_pearson
from noisewise.models.uncertainty.selective import _clopper_pearson_upper
from noisewise.monitoring.monitor import _jsonable, feedback_state
from tests.unit.test_calibration_digest import _calibration
from tests.unit.test_feedback import NAMES, _audit_frame, _duplicate_frame

pytestmark = pytest.mark.timeout(300)

#: Never imported by the command's parent process (Evidently is the child's: tests/unit/test_monitor_cold.py).
HEAVY = ("torch", "scipy.stats", "sklearn", "safetensors.torch")

# What `noisewise monitor` runs in its parent, in a fresh interpreter: the CLI's modules, the registry's load of a
# calibration without its tensors, and the feedback state and suspects of a window. Prints the results and which
# heavy modules were loaded.
PROBE = textwrap.dedent("""
    import json, pickle, sys
    import noisewise.services.cli, noisewise.services.cli_feedback, noisewise.monitoring.store
    from noisewise.models import registry
    from noisewise.models.calibrate import Calibration
    from noisewise.models.uncertainty.conformal import ConformalThreshold
    from noisewise.monitoring.feedback import suspects
    from noisewise.monitoring.monitor import _jsonable, feedback_state

    saved, frames, heavy = sys.argv[1], pickle.load(open(sys.argv[2], "rb")), json.loads(sys.argv[3])
    document = Calibration.load(saved, tensors=False)
    calibration = Calibration(**pickle.load(open(sys.argv[4], "rb")),
                              threshold=ConformalThreshold(**json.loads(sys.argv[5])))
    out = {"classes": document.class_names, "q": document.threshold.q,
           "states": [_jsonable(feedback_state(frame, calibration)) for frame in frames],
           "suspects": [_jsonable(suspects(frame, calibration.class_names, limit=20)) for frame in frames],
           "loaded": sorted(name for name in heavy if name in sys.modules)}
    print(json.dumps(out))
    """)

THRESHOLD = {"q": 0.9, "method": "nacp", "alpha": 0.1, "tau": 0.9, "n": 1000, "eps": 0.0}


def _monitor_calibration() -> dict:
    """The fields of a 10-class calibration without OOD state (what the feedback state reads)."""
    return {"class_names": NAMES, "ood_scorer": None, "ood_gate": None, "conformity_score": "lac",
            "conformity_params": {}, "noise": {}, "confidence_name": "msp", "confidence_params": {},
            "certified": None, "cl_thresholds": [0.5] * len(NAMES), "settings": {"seed": 0}}


def test_the_monitor_process_imports_no_torch_and_computes_the_same(tmp_path):
    saved = tmp_path / "calibration"
    _calibration("knn", {"k": 10}).save(saved)
    rng = np.random.default_rng(7)
    # an audit (the estimate used for guarantees and the coverage correction) and duplicate labels
    frames = [_audit_frame(rng, 0.2), _duplicate_frame(rng, 0.2)]
    (tmp_path / "frames.pkl").write_bytes(pickle.dumps(frames))
    (tmp_path / "calibration.pkl").write_bytes(pickle.dumps(_monitor_calibration()))
    done = subprocess.run([sys.executable, "-c", PROBE, str(saved), str(tmp_path / "frames.pkl"), json.dumps(HEAVY),
                           str(tmp_path / "calibration.pkl"), json.dumps(THRESHOLD)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loaded"] == []
    full = Calibration.load(saved)  # with its tensors, in this process (torch imported)
    assert (out["classes"], out["q"]) == (full.class_names, full.threshold.q)

    calibration = Calibration(**_monitor_calibration(), threshold=ConformalThreshold(**THRESHOLD))
    here = [json.loads(json.dumps(_jsonable(feedback_state(frame, calibration)))) for frame in frames]
    assert out["states"] == here
    assert [state["best"] for state in here] == ["audit", "duplicates"]
    assert here[0]["coverage"]["corrected"] is not None
    from noisewise.monitoring.feedback import suspects

    listed = [json.loads(json.dumps(_jsonable(suspects(frame, NAMES, limit=20)))) for frame in frames]
    assert out["suspects"] == listed and listed[0]["n_suspects"] > 0


def test_the_cli_command_imports_no_torch_before_it_runs():
    # `noisewise monitor`'s handler and everything the CLI imports at its start
    probe = ("import sys, json; import noisewise.services.cli, noisewise.services.cli_feedback, "
             "noisewise.monitoring.monitor, noisewise.monitoring.report_worker, noisewise.models.calibrate; "
             f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_the_binomial_intervals_equal_scipy_stats_to_the_bit(confidence):
    a = 1.0 - confidence
    rng = np.random.default_rng(int(confidence * 1000))
    ns = np.r_[np.arange(1, 60), rng.integers(60, 2_000_000, 400)]
    for n in ns:
        ks = np.unique(np.r_[0, 1, n - 1, n, rng.integers(0, n + 1, 8)].clip(0, n))
        lo, hi = _clopper_pearson_many(ks, np.full(ks.shape, n), confidence)
        for i, k in enumerate(ks):
            expected = (0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1)),
                        1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k)))
            assert clopper_pearson(int(k), int(n), confidence) == expected
            assert (lo[i], hi[i]) == expected
            if k < n:  # the one-sided bound of certified abstention, at delta = a
                assert _clopper_pearson_upper(int(k), int(n), a) == float(stats.beta.ppf(1 - a, k + 1, n - k))

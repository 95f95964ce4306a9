"""benchmarks/validity.py in quick mode (digits, confusion:0.2 and symmetric:0.2, 20 splits, 3 training epochs):
the report's structure, and the policy choices it must show. Statistical claims live in
tests/integration/test_validity.py; with 20 splits and a 3-epoch model only the policy's choices, identities and
wide bounds are asserted here."""

import json
import sys
from pathlib import Path

import pytest

from tests.benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    return load_benchmark("validity")


bench = _load_benchmark()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validity") / "validity.md"
    capture = tmp_path_factory.mktemp("stdout") / "report.json"
    saved = sys.stdout
    try:
        with capture.open("w") as stdout:
            sys.stdout = stdout
            bench.main(["--quick", "--out", str(out), "--json"])
    finally:
        sys.stdout = saved
    return json.loads(capture.read_text()), out.read_text()


def _setting(report, noise):
    return next(s for s in report["settings"] if s["noise"] == noise)


def test_report_structure(run):
    report, markdown = run
    meta = report["meta"]
    assert meta["quick"] and meta["splits"] == bench.QUICK_SPLITS and meta["epochs"] == bench.QUICK_EPOCHS
    assert meta["nproc"] >= 1 and len(meta["load_average_start"]) == 3 and len(meta["load_average_end"]) == 3
    assert [(s["dataset"], s["noise"]) for s in report["settings"]] == [
        ("digits", noise) for noise in bench.QUICK_NOISES]
    for s in report["settings"]:
        assert s["splits"] == bench.QUICK_SPLITS and s["n_cal"] + s["n_test"] <= s["n_pool"]
        assert set(s["sets"]) == set(bench.SET_METHODS) and set(s["abstention"]) == set(bench.ABSTAIN_METHODS)
        for row in s["sets"].values():
            assert 0.0 <= row["coverage_mean"] <= 1.0 and 0.0 <= row["below_target"] <= 1.0
            assert 0.0 <= row["size_mean"] <= s["k"]
        assert s["sets"]["oracle"]["size_ratio"] == pytest.approx(1.0)
        for row in s["abstention"].values():
            assert 0.0 <= row["test_share_mean"] <= 1.0 and 0.0 <= row["pool_violation"] <= 1.0
        assert 0.0 <= s["drift"]["false_alarm_rate"] <= 1.0 and s["drift"]["current"] == bench.DRIFT_CURRENT
        assert {c["id"] for c in s["criteria"]} >= {"default_coverage", "default_finite_below",
                                                    "audit_plugin_on_target", "audit_conditional_below",
                                                    "direct_interval", "abstention_policy"}
    for heading in ("## Prediction sets", "## Noise-rate estimates and drift test", "## Certified abstention",
                    "## Acceptance checks", "## What it shows"):
        assert heading in markdown
    assert "Command: `" in markdown and "load average" in markdown and f"nproc {meta['nproc']}" in markdown


def test_policy_choices_per_noise(run):
    report, _ = run
    confusion, symmetric = _setting(report, "confusion:0.2"), _setting(report, "symmetric:0.2")
    # confusion noise: split CP on the observed labels (conservative), the same threshold as on labels of unknown
    # origin; abstention falls back to the worst-case bound (known rate, not symmetric)
    assert confusion["knowledge"] == {"source": "known", "kind": "confusion", "flip_rate": 0.2}
    assert confusion["sets"]["default"]["method"] == ["split"]
    assert confusion["sets"]["default"]["kind"] == ["conservative"]
    assert confusion["sets"]["default_finite"]["method"] == ["split_conditional"]
    assert confusion["sets"]["naive"]["same_as_default"] and not confusion["sets"]["nacp_true"]["same_as_default"]
    assert confusion["abstention"]["policy"]["correction"] == ["max_wrong_labels"]
    assert confusion["abstention"]["policy"]["kind"] == ["valid"]
    # symmetric noise: NACP at the known rate (valid), symmetric-noise correction for abstention
    assert symmetric["sets"]["default"]["method"] == ["nacp"] and symmetric["sets"]["default"]["kind"] == ["valid"]
    assert not symmetric["sets"]["naive"]["same_as_default"]
    assert symmetric["abstention"]["policy"]["correction"] == ["noise_eps"]
    for s in (confusion, symmetric):
        assert s["sets"]["naive"]["method"] == ["split"] and s["sets"]["naive"]["kind"] == ["conservative"]
        assert s["sets"]["nacp_true"]["kind"] == ["conservative"]  # asserted by the user, not known
        for m in bench.AUDIT_SIZES:
            assert s["sets"][f"audit_{m}"]["method"] == ["audit_rectified"]
            assert s["sets"][f"audit_conditional_{m}"]["method"] == ["audit_rectified_conditional"]
            assert s["sets"][f"audit_{m}"]["kind"] == ["valid"] and s["abstention"][f"audit_{m}"]["kind"] == ["valid"]
        assert s["abstention"]["observed"]["correction"] == ["none"]
        assert s["abstention"]["observed"]["kind"] == ["conservative"]
        # the finite-sample threshold is never below the plug-in one, so it covers at least as much in every split
        assert s["sets"]["default_finite"]["coverage_mean"] >= s["sets"]["default"]["coverage_mean"]


def test_calibration_sets_come_from_the_pool(run):
    report, _ = run
    for s in report["settings"]:
        # each calibration set is a random subset of the pool: the mean of its flip rate over 20 splits is the
        # pool's within 0.02 (the split-to-split sd is about 0.013 at n_cal = 400, so 0.02 is > 6 s.e.)
        assert abs(s["noise_rate"]["realized_mean"] - s["model"]["pool_flip_rate"]) < 0.02

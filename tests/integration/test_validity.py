"""Statistical acceptance tests of the calibration policy on human-like (``confusion``) label noise.

One network per noise rate is trained on the noisy digits training labels (the benchmark's recipe and epochs),
then benchmarks/validity.py's ``run_setting`` re-draws 200 calibration/test partitions of the pooled cal + test
items and fits every threshold with ``fit_set_threshold`` / ``fit_abstention``, exactly as ``noisewise
calibrate`` does. Tolerances come from the number of splits: 3 standard errors of a mean over splits, or of a
share of splits at its nominal level (binomial). m = 200 audited items is the largest audit the benchmark uses;
the digits pool (719 items, 400 calibrating) allows it.

The abstention checks use the clean selective risk over the whole pool at the served threshold: the pool is the
finite population each calibration set is drawn from, so that is the risk the guarantee bounds (the risk on the
319 test items adds test-sampling noise on top; docs/validity.md shows both).
"""

import math
from pathlib import Path

import pytest

from tests.benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SPLITS = 200
RATES = (0.1, 0.3)
AUDIT = 200


def _load_benchmark():
    return load_benchmark("validity")


bench = _load_benchmark()
TARGET = bench.TARGET
pytestmark = pytest.mark.slow


def _binomial_cap(level: float) -> float:
    """Largest share of splits consistent with a true share of ``level``: level + 3 binomial s.e."""
    return level + 3 * math.sqrt(level * (1 - level) / SPLITS)


def _run(dataset: str, noise: str) -> dict:
    pool = bench.make_pool(dataset, noise, epochs=bench.EPOCHS, seed=0)
    n_cal, n_test = bench.DATASETS[dataset]
    raw = bench.run_setting(pool, SPLITS, n_cal, n_test, seed=0, drift=False)
    return {"pool": pool, "raw": raw, "summary": bench.summarize(pool, raw)}


@pytest.fixture(scope="module", params=RATES, ids=[f"confusion:{r:g}" for r in RATES])
def setting(request):
    return _run("digits", f"confusion:{request.param:g}")


def test_no_audit_default_is_split_cp_and_covers(setting):
    s = setting["summary"]
    default, naive = s["sets"]["default"], s["sets"]["naive"]
    assert s["knowledge"]["kind"] == "confusion"
    assert default["method"] == ["split"] and default["kind"] == ["conservative"]
    floor = TARGET - 0.01 - 3 * default["coverage_se"]
    assert default["coverage_mean"] >= floor, (default, floor)
    assert default["size_mean"] <= naive["size_mean"] + 1e-12


def test_no_audit_finite_sample_rarely_under_target(setting):
    finite = setting["summary"]["sets"]["default_finite"]
    assert finite["method"] == ["split_conditional"]
    assert finite["below_target"] <= _binomial_cap(0.10), finite


def test_audit_rectified_plugin_on_target(setting):
    row = setting["summary"]["sets"][f"audit_{AUDIT}"]
    assert row["kind"] == ["valid"]
    assert abs(row["coverage_mean"] - TARGET) <= 0.01 + 3 * row["coverage_se"], row


def test_audit_rectified_conditional_rarely_under_target(setting):
    row = setting["summary"]["sets"][f"audit_conditional_{AUDIT}"]
    assert row["method"] == ["audit_rectified_conditional"]
    assert row["below_target"] <= _binomial_cap(0.05), row


def test_direct_noise_rate_interval_holds_the_realized_rate(setting):
    floor = 0.93 - 3 * math.sqrt(0.95 * 0.05 / SPLITS)
    rates = setting["summary"]["noise_rate"]
    for m in bench.AUDIT_SIZES:
        assert rates[f"direct_{m}"]["interval_covers"] >= floor, (m, rates[f"direct_{m}"])
    # the realized rate moves from split to split: the intervals are checked against a moving target
    assert setting["raw"]["realized"].std() > 0


@pytest.mark.parametrize("variant", ["policy", f"audit_{AUDIT}"])
def test_abstention_controls_clean_risk(setting, variant):
    row = setting["summary"]["abstention"][variant]
    assert row["kind"] == ["valid"]
    if variant == "policy":  # no audit, noise known by construction but not symmetric: the worst-case bound
        assert row["correction"] == ["max_wrong_labels"]
    assert row["pool_violation"] <= _binomial_cap(bench.RISK_DELTA), row
    # the frontier's rows are claimed together at the same delta
    assert row["frontier_pool_violation"] <= _binomial_cap(bench.RISK_DELTA), row


def test_audit_makes_abstention_useful(setting):
    """Without trusted labels the worst-case bound abstains on (almost) everything on this noise; 200 audited
    labels certify r* in most splits. A power check: it fails if the audit path stops certifying."""
    policy, audited = (setting["summary"]["abstention"][v] for v in ("policy", f"audit_{AUDIT}"))
    assert audited["certified"] >= 0.5, audited
    assert audited["test_share_mean"] > policy["test_share_mean"] + 0.2, (policy, audited)


def test_contrast_uniform_nacp_at_the_exact_rate_undercovers(setting):
    """Uniform NACP given the exact flip rate of the calibration set over-subtracts on ambiguity-driven noise: the
    policy must never pick it for noise that is not uniform by construction."""
    row = setting["summary"]["sets"]["nacp_true"]
    assert row["coverage_mean"] + 3 * row["coverage_se"] < TARGET - 0.02, row
    assert row["below_target"] >= 0.9, row


def test_contrast_old_default_undercovers(setting):
    """The old default, uniform NACP at the confident-learning lower bound, misses the target on this noise.

    Only at 30%: a network trained on these labels agrees with part of the wrong ones, so confident learning
    under-states the rate (about half of it on digits), and at 10% its bound is so low that NACP at it is
    nearly split CP and lands near the target; the benchmark table shows it. At 30% the regression would also
    fail the default's own coverage check above."""
    s = setting["summary"]
    if s["noise"] != "confusion:0.3":
        pytest.skip("the confident-learning bound is too low at this rate for NACP at it to miss the target")
    row = s["sets"]["nacp_cl"]
    assert s["noise_rate"]["confident_learning"]["lower_mean"] > 0.1  # NACP actually corrects something here
    assert row["coverage_mean"] + 3 * row["coverage_se"] < TARGET - 0.01, row
    assert row["coverage_mean"] < TARGET - 0.01 - 3 * s["sets"]["default"]["coverage_se"], row


def test_no_audit_default_covers_on_mnist5k():
    """On mnist5k the network learns part of the annotators' confusions (it predicts a quarter to two fifths of the
    wrong labels), the case where split CP on observed labels is closest to under-covering."""
    s = _run("mnist5k", "confusion:0.2")["summary"]
    default = s["sets"]["default"]
    assert default["coverage_mean"] >= TARGET - 0.01 - 3 * default["coverage_se"], default

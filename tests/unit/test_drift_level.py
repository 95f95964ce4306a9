"""The two-sample drift test of monitoring/drift.py: its statistic, its level over many same-distribution
redraws (including a class the model almost never predicts), its power, and its input checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from evidently.legacy.calculations.stattests import chi_stat_test
from evidently.legacy.core import ColumnType
from scipy import stats

from noisewise.monitoring.drift import MIN_EXPECTED, chi2_two_sample

K = 10
N_REFERENCE, N_CURRENT = 1250, 300
ALPHA = 0.05
# A class the model almost never predicts (2.5 expected reference counts, 0.6 current), and the rest even.
RARE = np.r_[np.full(K - 1, (1 - 0.002) / (K - 1)), 0.002]
UNIFORMISH = np.linspace(0.07, 0.13, K) / np.linspace(0.07, 0.13, K).sum()


def _redraws(rng: np.random.Generator, draws: int, p_reference: np.ndarray, p_current: np.ndarray | None = None,
             n_reference: int = N_REFERENCE, n_current: int = N_CURRENT):
    p_current = p_reference if p_current is None else p_current
    for _ in range(draws):
        yield rng.multinomial(n_reference, p_reference), rng.multinomial(n_current, p_current)


def _max_rate(draws: int, alpha: float = ALPHA) -> float:
    """The accepted false-alarm rate: the level plus 3 binomial standard errors."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)


# ------------------------------------------------------------------------------ the statistic


@pytest.mark.parametrize("seed", range(5))
def test_statistic_and_large_sample_p_value_equal_scipy_chi2_contingency(seed):
    rng = np.random.default_rng(seed)
    reference, current = next(_redraws(rng, 1, rng.dirichlet(np.ones(K)) * 0.5 + 0.05))
    kept = reference + current > 0
    table = np.array([reference[kept], current[kept]])
    expected = stats.chi2_contingency(table, correction=False)
    result = chi2_two_sample(reference, current, min_expected=0)  # always the chi-square approximation
    assert result["statistic"] == pytest.approx(expected.statistic, rel=1e-10)
    assert result["p_value"] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    assert result["dof"] == expected.dof == kept.sum() - 1 and result["method"] == "chi2"
    assert result["min_expected_count"] == pytest.approx(expected.expected_freq.min(), rel=1e-12)
    # The Monte Carlo path tests the same statistic.
    assert chi2_two_sample(reference, current, min_expected=math.inf)["statistic"] == result["statistic"]


def test_method_follows_the_smallest_expected_count():
    reference, current = np.array([500, 400, 350]), np.array([120, 100, 80])
    assert chi2_two_sample(reference, current)["method"] == "chi2"       # smallest expected count ~84
    rare = chi2_two_sample(np.array([500, 400, 3]), np.array([120, 100, 1]))
    assert rare["method"] == "monte_carlo" and rare["min_expected_count"] == pytest.approx(4 * 221 / 1124)
    assert rare["min_expected_count"] < MIN_EXPECTED


def test_classes_absent_from_both_samples_are_dropped():
    reference, current = np.array([40, 0, 25, 3, 0]), np.array([10, 0, 9, 2, 0])
    full, dropped = chi2_two_sample(reference, current), chi2_two_sample(reference[[0, 2, 3]], current[[0, 2, 3]])
    assert full == dropped and full["n_classes"] == 3 and full["dof"] == 2


def test_one_class_in_both_samples_is_no_evidence_of_drift():
    assert chi2_two_sample([0, 50, 0], [0, 7, 0]) == {
        "statistic": 0.0, "p_value": 1.0, "method": "single_class", "dof": 0, "min_expected_count": 7 * 57 / 57,
        "n_classes": 1}


def test_p_value_does_not_depend_on_class_numbering_and_is_reproducible():
    rng = np.random.default_rng(0)
    for reference, current in _redraws(rng, 20, RARE):
        order = rng.permutation(K)
        result = chi2_two_sample(reference, current, min_expected=math.inf)
        assert chi2_two_sample(reference[order], current[order], min_expected=math.inf)["p_value"] == result["p_value"]
        assert chi2_two_sample(reference, current, min_expected=math.inf)["p_value"] == result["p_value"]


def test_monte_carlo_p_value_is_never_zero_and_matches_the_chi2_tail_when_counts_are_large():
    # Strong drift: the smallest Monte Carlo p-value is 1 / (B + 1), never 0.
    assert chi2_two_sample([500, 500, 2], [10, 290, 0], min_expected=math.inf, n_resamples=999)["p_value"] == 1e-3
    # Large counts: the Monte Carlo p-value estimates the chi-square tail, within 4 of its standard errors.
    reference, current = np.array([300, 260, 240, 200]), np.array([60, 75, 50, 45])
    asymptotic = chi2_two_sample(reference, current, min_expected=0)["p_value"]
    simulated = chi2_two_sample(reference, current, min_expected=math.inf)["p_value"]
    assert 0.05 < asymptotic < 0.95
    assert abs(simulated - asymptotic) < 4 * math.sqrt(asymptotic * (1 - asymptotic) / 9999) + 1e-4


# -------------------------------------------------------------------------------- the level


@pytest.mark.parametrize("seed, name, p, n_reference, n_current, expected_method", [
    (1, "rare class", RARE, N_REFERENCE, N_CURRENT, "monte_carlo"),
    (2, "uniform-ish", UNIFORMISH, N_REFERENCE, N_CURRENT, "chi2"),
    (3, "small samples", RARE, 120, 40, "monte_carlo"),
])
def test_false_alarm_rate_holds_the_level(seed, name, p, n_reference, n_current, expected_method):
    """No drift (both samples from one distribution): the test fires at most alpha + 3 s.e. of the time."""
    rng = np.random.default_rng(seed)
    draws = 300
    results = [chi2_two_sample(r, c) for r, c in _redraws(rng, draws, p, n_reference=n_reference,
                                                          n_current=n_current)]
    rate = np.mean([r["p_value"] < ALPHA for r in results])
    assert rate <= _max_rate(draws), (name, rate)
    # The path named is the one tested (the rare class sends almost every draw to the Monte Carlo p-value).
    assert np.mean([r["method"] == expected_method for r in results]) >= 0.9
    # Under no drift the p-values are about uniform: their mean is 1/2 up to 4 s.e. (discreteness makes
    # them slightly conservative, never anti-conservative).
    mean = np.mean([r["p_value"] for r in results])
    assert 0.5 - 4 * math.sqrt(1 / 12 / draws) <= mean <= 0.5 + 4 * math.sqrt(1 / 12 / draws) + 0.05


def test_the_goodness_of_fit_chisquare_does_not_hold_the_level_on_a_rare_class():
    """Why the two-sample test: Evidently's ``chisquare`` (reference proportions taken as exact) fires far
    above 5% on the same redraws, mostly through the class that is almost never predicted."""
    rng = np.random.default_rng(7)
    draws, fired = 300, 0
    for reference, current in _redraws(rng, draws, RARE):
        ref = pd.Series(np.repeat(np.arange(K), reference))
        cur = pd.Series(np.repeat(np.arange(K), current))
        with np.errstate(divide="ignore", invalid="ignore"):
            fired += chi_stat_test(ref, cur, ColumnType.Categorical, ALPHA).drifted
    # Measured about 0.16 here (3 s.e. above the bound the two-sample test meets).
    assert fired / draws > _max_rate(draws), fired / draws


# -------------------------------------------------------------------------------- the power


@pytest.mark.parametrize("name, p_reference, p_current", [
    ("one class doubles", np.full(K, 0.1), np.r_[0.2, np.full(K - 1, 0.8 / (K - 1))]),
    ("the rare class appears", RARE, np.r_[np.full(K - 1, (1 - 0.03) / (K - 1)), 0.03]),
])
def test_clear_shift_is_detected_in_most_draws(name, p_reference, p_current):
    """Power at alpha = 0.05 predicted by the noncentral chi-square (noncentrality
    n_eff sum_k (p1_k - p0_k)^2 / p0_k, n_eff = n_r n_c / (n_r + n_c)) is >= 0.95 for both shifts; the
    measured rate must reach 0.8 (more than 3 s.e. of 200 draws below the prediction)."""
    n_eff = N_REFERENCE * N_CURRENT / (N_REFERENCE + N_CURRENT)
    noncentrality = n_eff * np.sum((p_current - p_reference) ** 2 / p_reference)
    predicted = stats.ncx2.sf(stats.chi2.isf(ALPHA, K - 1), K - 1, noncentrality)
    assert predicted >= 0.95
    rng = np.random.default_rng(11)
    draws = 200
    rate = np.mean([chi2_two_sample(r, c)["p_value"] < ALPHA
                    for r, c in _redraws(rng, draws, p_reference, p_current)])
    assert rate >= 0.8, (name, rate, predicted)


# ----------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("reference, current, kwargs, message", [
    ([[1, 2]], [1, 2], {}, r"reference_counts must be a 1-D array"),
    ([1, 2], [1, -2], {}, r"current_counts must hold non-negative integer counts"),
    ([1, 2.5], [1, 2], {}, r"reference_counts must hold non-negative integer counts"),
    ([1, np.nan], [1, 2], {}, r"reference_counts must hold finite counts"),
    (["a", "b"], [1, 2], {}, r"reference_counts must hold finite counts"),
    ([0, 0], [1, 2], {}, r"reference_counts must count at least one item"),
    ([1, 2, 3], [1, 2], {}, r"must count the same K classes"),
    ([1, 2], [1, 2], {"min_expected": -1}, r"min_expected must be"),
    ([1, 2], [1, 2], {"n_resamples": 0}, r"n_resamples must be a positive integer"),
])
def test_invalid_input_names_the_argument(reference, current, kwargs, message):
    with pytest.raises(ValueError, match=message):
        chi2_two_sample(reference, current, **kwargs)

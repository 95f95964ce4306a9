"""Conformity scores, sets and thresholds against hand values, MAPIE and simulation."""

import json
import math

import numpy as np
import pytest
import torch
from mapie.classification import SplitConformalClassifier
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedShuffleSplit

from noisewise.models.uncertainty.conformal import (
    CONFORMITY_SCORES,
    MAPIE_CONVENTION,
    ConformalThreshold,
    aps_scores,
    audit_rectified_threshold,
    audit_split_threshold,
    lac_scores,
    nacp_delta,
    nacp_threshold,
    prediction_sets,
    raps_scores,
    split_conformal_threshold,
)
from noisewise.models.uncertainty.labelnoise import flip_rate_to_uniform

# Parameters that make every registry entry a proper score for K = 10 (RAPS penalizes rank > 3).
SCORE_PARAMS = {"lac": {}, "aps": {}, "raps": {"lam": 0.01, "k_reg": 3}}


def test_score_params_cover_registry():
    assert set(SCORE_PARAMS) == set(CONFORMITY_SCORES) == set(MAPIE_CONVENTION)


# ------------------------------------------------------------------------------------------
# Hand-computed scores
# ------------------------------------------------------------------------------------------

# Row 0 sorted, row 1 the same probabilities permuted (class 1 on top), row 2 with a tie.
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]], dtype=torch.float64)


def test_lac_by_hand():
    expected = [[0.5, 0.7, 0.8], [0.8, 0.5, 0.7], [0.6, 0.6, 0.8]]
    torch.testing.assert_close(lac_scores(PROBS), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # mass ranked at or above y; the tied pair shares its block's mass 0.8
        ({}, [[0.5, 0.8, 1.0], [1.0, 0.5, 0.8], [0.8, 0.8, 1.0]]),
        # mass strictly above y (MAPIE's served set)
        ({"include_last_label": True}, [[0.0, 0.5, 0.8], [0.8, 0.0, 0.5], [0.0, 0.0, 0.8]]),
        # above + u * own mass (the tie block's own mass is 0.8)
        ({"u": 0.5}, [[0.25, 0.65, 0.9], [0.9, 0.25, 0.65], [0.4, 0.4, 0.9]]),
        (
            {"u": torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)},
            [[0.0, 0.5, 0.8], [1.0, 0.5, 0.8], [0.2, 0.2, 0.85]],
        ),
    ],
)
def test_aps_by_hand(params, expected):
    torch.testing.assert_close(aps_scores(PROBS, **params), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # lam = 0.1 per rank beyond k_reg = 1; ranks (1, 2, 3), the tie block has rank 2
        ({}, [[0.5, 0.9, 1.2], [1.2, 0.5, 0.9], [0.9, 0.9, 1.2]]),
        # served: penalty of the label ranked just above (ranks above: 0, 1, 2)
        ({"include_last_label": True}, [[0.0, 0.5, 0.9], [0.9, 0.0, 0.5], [0.0, 0.0, 0.9]]),
        ({"u": 0.5}, [[0.25, 0.75, 1.1], [1.1, 0.25, 0.75], [0.5, 0.5, 1.1]]),
    ],
)
def test_raps_by_hand(params, expected):
    got = raps_scores(PROBS, lam=0.1, k_reg=1, **params)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_raps_without_penalty_is_aps():
    probs = torch.softmax(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.testing.assert_close(raps_scores(probs, lam=0.0), aps_scores(probs))
    torch.testing.assert_close(raps_scores(probs, lam=0.3, k_reg=7), aps_scores(probs))


def test_randomized_aps_is_seeded_and_uses_one_u_per_row():
    probs = torch.softmax(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    first = aps_scores(probs, u="random", generator=torch.Generator().manual_seed(7))
    again = aps_scores(probs, u="random", generator=torch.Generator().manual_seed(7))
    other = aps_scores(probs, u="random", generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    above, through = aps_scores(probs, include_last_label=True), aps_scores(probs)
    share = (first - above) / (through - above)
    assert ((share >= 0) & (share <= 1)).all()
    torch.testing.assert_close(share, share[:, :1].expand_as(share))


@pytest.mark.parametrize("name", sorted(CONFORMITY_SCORES))
def test_scores_keep_shape_dtype_and_order(name):
    probs = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    scores = CONFORMITY_SCORES[name](probs, **SCORE_PARAMS[name])
    assert scores.shape == probs.shape and scores.dtype == torch.float32 and scores.device == probs.device
    # a more probable label never has a larger score
    order = probs.argsort(dim=1, descending=True)
    assert (scores.gather(1, order).diff(dim=1) >= 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CONFORMITY_SCORES))
def test_scores_on_cuda_match_cpu(name):
    probs = torch.softmax(torch.randn(64, 10, generator=torch.Generator().manual_seed(3)), dim=1)
    cpu = CONFORMITY_SCORES[name](probs, **SCORE_PARAMS[name])
    gpu = CONFORMITY_SCORES[name](probs.cuda(), **SCORE_PARAMS[name])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    assert prediction_sets(gpu, 0.5).device.type == "cuda"


def test_prediction_sets_threshold_rule():
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.5, 0.2, 0.6]])
    expected = torch.tensor([[True, True, False], [True, True, False]])
    assert torch.equal(prediction_sets(scores, 0.5), expected)
    assert prediction_sets(scores, math.inf).all()


# ------------------------------------------------------------------------------------------
# Parity with MAPIE 1.x SplitConformalClassifier at eps = 0
# ------------------------------------------------------------------------------------------


class PassThrough(ClassifierMixin, BaseEstimator):
    """Prefit 'model' whose input is a row index into precomputed probabilities."""

    def __init__(self, probs=None):
        self.probs = probs

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(self.probs.shape[1])
        self.n_features_in_ = 1
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X).ravel().astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("name", sorted(CONFORMITY_SCORES))
def test_sets_equal_mapie(name, alpha, seed):
    rng = np.random.default_rng(seed)
    k, n, n_test = (3, 5, 10)[seed], 300, 400
    probs = rng.dirichlet(np.ones(k), size=n + n_test)
    labels = (probs.cumsum(axis=1) > rng.random((n + n_test, 1))).argmax(axis=1)
    mapie = SplitConformalClassifier(
        PassThrough(probs).fit(),
        confidence_level=1 - alpha,
        conformity_score=name,
        prefit=True,
        random_state=seed,
    )
    mapie.conformalize(np.arange(n).reshape(-1, 1), labels[:n])
    mapie_sets = mapie.predict_set(np.arange(n, n + n_test).reshape(-1, 1))[1][:, :, 0]

    fitted = mapie._mapie_classifier.conformity_score_function_
    cal, params = np.arange(n), {}
    if name == "raps":
        # MAPIE fits lambda and k_reg on a stratified held-out part and calibrates on the rest.
        split = StratifiedShuffleSplit(n_splits=1, test_size=fitted.size_raps, random_state=seed)
        cal = next(split.split(cal.reshape(-1, 1), labels[:n]))[0]
        params = {"lam": float(fitted.lambda_star), "k_reg": int(np.ravel(fitted.k_star)[0])}
    calibration = dict(MAPIE_CONVENTION[name]["calibration"], **params)
    if calibration.get("u") == "random":
        # MAPIE scores (mass at or above y) - U p_y with U from check_random_state(seed).
        calibration["u"] = torch.tensor(1 - np.random.RandomState(seed).uniform(size=cal.size))
    score = CONFORMITY_SCORES[name]
    cal_scores = score(torch.tensor(probs[cal]), **calibration)[np.arange(cal.size), labels[cal]]
    q = split_conformal_threshold(cal_scores, alpha)
    assert q == pytest.approx(float(fitted.quantiles_[0]), abs=1e-12)
    ours = prediction_sets(score(torch.tensor(probs[n:]), **MAPIE_CONVENTION[name]["serving"], **params), q)
    np.testing.assert_array_equal(ours.numpy(), mapie_sets)
    if name != "lac":  # LAC sets may be empty (in MAPIE too); APS/RAPS always keep the top label
        assert ours.any(dim=1).all()


# ------------------------------------------------------------------------------------------
# Thresholds: exact definitions
# ------------------------------------------------------------------------------------------


def _random_scores(rng, n, k, ties):
    scores = rng.random((n, k))
    return np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_split_threshold_is_mapie_order_statistic(ties):
    rng = np.random.default_rng(4)
    for n in [1, 2, 9, 10, 19, 50, 101, 1000]:
        scores = _random_scores(rng, n, 1, ties)[:, 0]
        for alpha in [0.01, 0.05, 0.1, 0.2, 0.5, 0.9]:
            level = np.ceil((n + 1) * (1 - alpha)) / n
            expected = np.quantile(scores, level, method="lower") if level <= 1 else math.inf
            assert split_conformal_threshold(scores, alpha) == expected


@pytest.mark.parametrize("ties", [False, True])
def test_nacp_at_zero_noise_is_split_cp(ties):
    rng = np.random.default_rng(5)
    for n in [3, 9, 10, 57, 200, 999]:
        scores = _random_scores(rng, n, 4, ties)
        labels = rng.integers(0, 4, n)
        for alpha in [0.05, 0.1, 0.25]:
            threshold = nacp_threshold(scores, labels, alpha, eps=0.0)
            assert threshold.q == split_conformal_threshold(scores[np.arange(n), labels], alpha)
            assert threshold.tau == np.ceil((n + 1) * (1 - alpha)) / n
            assert threshold.full_sets == math.isinf(threshold.q)


def _nacp_brute_force(scores, labels, tau, eps):
    # F_n and F_r change only at score values, so F_c is constant between consecutive distinct
    # values of all_scores: checking it there (right-continuous) checks it everywhere.
    n, k = scores.shape
    noisy = scores[np.arange(n), labels]
    grid = np.unique(scores)
    f_c = [((noisy <= q).mean() - eps * (scores <= q).mean()) / (1 - eps) for q in grid]
    for q in np.unique(noisy):
        if all(f >= tau for g, f in zip(grid, f_c) if g >= q):
            return q
    return math.inf


@pytest.mark.parametrize("ties", [False, True])
def test_nacp_matches_brute_force(ties):
    rng = np.random.default_rng(6)
    for trial in range(60):
        n, k = int(rng.integers(5, 40)), int(rng.integers(2, 6))
        scores = _random_scores(rng, n, k, ties)
        labels = rng.integers(0, k, n)
        alpha, eps = float(rng.uniform(0.05, 0.4)), float(rng.uniform(0, 0.6))
        delta = None if trial % 2 else float(rng.uniform(0.2, 0.9))
        threshold = nacp_threshold(scores, labels, alpha, eps, delta)
        expected = _nacp_brute_force(scores, labels, threshold.tau, eps) if threshold.tau <= 1 else math.inf
        assert threshold.q == expected, (trial, threshold)


def test_nacp_checks_left_limits():
    # Noisy-label scores (candidates) 0.1, 0.2, 0.5; the other scores 0.3-0.45 sit between the
    # last two. With eps = 0.5, F_c = 2 F_n - F_r:
    #   F_c(0.1) = 2/3 - 1/9 = 0.56, F_c(0.2) = 4/3 - 2/9 = 1.11, F_c(0.5) = 2 - 7/9 = 1.22,
    #   but just below 0.5: F_c(0.5^-) = 4/3 - 6/9 = 0.67.
    # alpha = 0.3 and n = 3 give tau = ceil(4 * 0.7) / 3 = 1: every candidate from 0.2 on reaches
    # tau, yet F_c dips below it on [0.45, 0.5), so the threshold must be 0.5, not 0.2.
    scores = np.array([[0.2, 0.3, 0.35], [0.5, 0.4, 0.45], [0.1, 0.9, 0.95]])
    labels = np.array([0, 0, 0])
    threshold = nacp_threshold(scores, labels, alpha=0.3, eps=0.5)
    assert threshold.tau == 1.0
    assert threshold.q == 0.5
    assert _nacp_brute_force(scores, labels, 1.0, 0.5) == 0.5


def _audit_brute_force(scores, labels, index, trusted, tau, conditional, z):
    n, m = scores.shape[0], index.size
    noisy = scores[np.arange(n), labels]
    a_true, a_noisy = scores[index, trusted], noisy[index]
    cand = np.unique(np.concatenate([noisy, a_true]))
    levels = []
    for q in cand:
        f_n = (noisy <= q).mean()
        d = (a_true <= q).astype(float) - (a_noisy <= q)
        level = f_n + d.mean()
        if conditional:
            level -= z * math.sqrt(d.var(ddof=1) / m + f_n * (1 - f_n) / n)
        levels.append(level)
    for j, q in enumerate(cand):
        if all(level >= tau for level in levels[j:]):
            return q
    return math.inf


@pytest.mark.parametrize("conditional", [False, True])
def test_audit_rectified_matches_brute_force(conditional):
    rng = np.random.default_rng(7)
    for trial in range(60):
        n, k = int(rng.integers(20, 60)), int(rng.integers(2, 6))
        scores = _random_scores(rng, n, k, ties=bool(trial % 2))
        labels = rng.integers(0, k, n)
        index = rng.choice(n, size=int(rng.integers(2, n // 2)), replace=False)
        trusted = np.where(rng.random(index.size) < 0.6, labels[index], rng.integers(0, k, index.size))
        alpha = float(rng.uniform(0.05, 0.3))
        threshold = audit_rectified_threshold(
            scores, labels, index, trusted, alpha, conditional=conditional, z=1.645
        )
        expected = _audit_brute_force(scores, labels, index, trusted, threshold.tau, conditional, 1.645)
        assert threshold.q == expected, (trial, threshold)


def test_audit_rectified_reduces_to_split_cp():
    rng = np.random.default_rng(8)
    n, k, alpha = 500, 6, 0.1
    scores = rng.random((n, k))
    clean, noisy = rng.integers(0, k, n), rng.integers(0, k, n)
    index = rng.choice(n, 100, replace=False)
    # an audit that agrees with the noisy labels changes nothing
    agreeing = audit_rectified_threshold(scores, noisy, index, noisy[index], alpha)
    assert agreeing.q == split_conformal_threshold(scores[np.arange(n), noisy], alpha)
    # auditing every item recovers the clean CDF exactly
    everything = audit_rectified_threshold(scores, noisy, np.arange(n), clean, alpha)
    assert everything.q == split_conformal_threshold(scores[np.arange(n), clean], alpha)
    # the split-CP wrapper on the audited items
    alone = audit_split_threshold(scores, index, clean[index], alpha)
    assert alone.q == split_conformal_threshold(scores[index, clean[index]], alpha)
    assert (alone.method, alone.n, alone.m) == ("audit_split", 100, 100)


def test_nacp_delta_formula():
    h = 0.8 / 1.2
    assert nacp_delta(1000, 0.2, 0.1) == pytest.approx(math.sqrt(math.log(40) / (2 * 1000 * h * h)))
    scores = np.random.default_rng(9).random((1000, 10))
    threshold = nacp_threshold(scores, np.zeros(1000, int), alpha=0.1, eps=0.2, delta=0.1)
    assert threshold.method == "nacp_delta"
    assert threshold.Delta == nacp_delta(1000, 0.2, 0.1)
    assert threshold.tau == pytest.approx(0.9 + threshold.Delta)


# ------------------------------------------------------------------------------------------
# Statistical coverage (synthetic calibrated model)
# ------------------------------------------------------------------------------------------
# K = 10, logits N(0, 4.5^2), p = softmax (top-1 accuracy ~0.77), true label y ~ p: the model is
# calibrated, so the coverage of a set C(x) given x is exactly sum_{y in C(x)} p_y(x). We average
# that over N_TEST fresh inputs per split (no label-sampling noise). Each of SPLITS = 200 splits
# draws fresh calibration and test sets; everything is seeded.
#
# Tolerances for a mean over splits: 4 standard errors, SE = sd over splits / sqrt(200), so a
# correct method fails with probability ~6e-5 (normal approximation; the split means are iid).
# For scale: split CP's coverage given the calibration set is Beta(k, n + 1 - k), variance
# ~alpha(1 - alpha)/(n + 2) = 9e-5 at n = 1000, and averaging per-input coverages in [0, 1] with
# mean 0.9 over N_TEST inputs adds at most 0.9 * 0.1 / N_TEST = 9e-5: SE <= 0.00095. NACP divides
# the noise of F_n by (1 - eps) (SE ~0.0015); the audit term adds var(d)/m with
# var(d) <= P(y~ != y) <= 0.2 (SE <= 0.0021). Observed SEs are 0.0007-0.0014.
# Bias allowances (one-sided, upwards): the plug-ins aim at tau = ceil((n+1)(1-alpha))/n, which is
# 1/n above 1 - alpha, and "F_c stays >= tau from there on" takes the last crossing of a noisy
# increasing curve: for a walk with drift 1 and variance rate v the overshoot has mean ~v/2, with
# v ~ 2/n for NACP (F_n increments over (1 - eps)^2, plus F_r) and v ~ 0.4/m + 1/n for the audit
# (flipped items add a +1/m and a -1/m step). We allow 5/n for NACP and 1/n + 1/m for the audit,
# 2-3 times those estimates.

K, N_CAL, N_TEST, SPLITS, ALPHA = 10, 1000, 1000, 200, 0.1
LOGIT_SCALE = 4.5
EPS, DELTA, M_AUDIT = 0.2, 0.1, 300


def _standard_error(values):
    return values.std(ddof=1) / math.sqrt(values.size)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(2024)
    probs = torch.softmax(torch.tensor(rng.normal(size=(SPLITS, N_CAL + N_TEST, K)) * LOGIT_SCALE), dim=-1)
    p = probs.numpy()
    clean = (p.cumsum(axis=-1) > rng.random((SPLITS, N_CAL + N_TEST, 1))).argmax(axis=-1)[:, :N_CAL]
    # uniform ("all") convention: with prob EPS the label is redrawn from all K classes
    uniform = np.where(rng.random((SPLITS, N_CAL)) < EPS, rng.integers(0, K, (SPLITS, N_CAL)), clean)
    # instance-dependent: with prob 0.2 the label becomes the model's second most likely class
    # (unchanged when that already is the true label, so the realized flip rate is ~0.17)
    second = np.argsort(-p[:, :N_CAL], axis=-1)[:, :, 1]
    confusable = np.where(rng.random((SPLITS, N_CAL)) < 0.2, second, clean)
    audits = np.stack([rng.choice(N_CAL, M_AUDIT, replace=False) for _ in range(SPLITS)])
    return {"probs": probs, "clean": clean, "uniform": uniform, "confusable": confusable, "audits": audits}


@pytest.fixture(scope="module", params=sorted(CONFORMITY_SCORES))
def coverage(request, synthetic):
    """(coverage, mean set size) per split, per method, for one conformity score."""
    name = request.param
    probs = synthetic["probs"]
    scores = CONFORMITY_SCORES[name](probs.reshape(-1, K), **SCORE_PARAMS[name]).reshape(probs.shape).numpy()
    p = probs.numpy()
    rows = np.arange(N_CAL)
    out = {}
    for s in range(SPLITS):
        cal, test = scores[s, :N_CAL], scores[s, N_CAL:]
        clean, uniform = synthetic["clean"][s], synthetic["uniform"][s]
        confusable = synthetic["confusable"][s]
        audit = synthetic["audits"][s]
        realized = flip_rate_to_uniform(float((confusable != clean).mean()), K)
        thresholds = {
            "oracle": split_conformal_threshold(cal[rows, clean], ALPHA),
            "naive": split_conformal_threshold(cal[rows, uniform], ALPHA),
            "nacp": nacp_threshold(cal, uniform, ALPHA, EPS).q,
            "nacp_delta": nacp_threshold(cal, uniform, ALPHA, EPS, DELTA).q,
            "naive_confusable": split_conformal_threshold(cal[rows, confusable], ALPHA),
            "nacp_confusable": nacp_threshold(cal, confusable, ALPHA, realized).q,
            "audit": audit_rectified_threshold(cal, confusable, audit, clean[audit], ALPHA).q,
            "audit_conditional": audit_rectified_threshold(
                cal, confusable, audit, clean[audit], ALPHA, conditional=True
            ).q,
            "audit_split": audit_split_threshold(cal, audit, clean[audit], ALPHA).q,
        }
        for method, q in thresholds.items():
            sets = test <= q
            out.setdefault(method, []).append(((p[s, N_CAL:] * sets).sum(-1).mean(), sets.sum(-1).mean()))
    return {method: np.array(values).T for method, values in out.items()}


def test_oracle_split_cp_covers_exactly(coverage):
    cov, _ = coverage["oracle"]
    expected = math.ceil((N_CAL + 1) * (1 - ALPHA)) / (N_CAL + 1)  # E[coverage] of split CP, exactly
    assert abs(cov.mean() - expected) < 4 * _standard_error(cov)


def test_naive_cp_on_noisy_labels_over_covers(coverage):
    cov, size = coverage["naive"]
    _, oracle_size = coverage["oracle"]
    # naive CP solves (1 - eps) F + eps F_r = 1 - alpha: F = 1 - alpha + eps (1 - alpha - F_r) / (1 - eps),
    # with F_r = mean size / K ~ 0.1-0.3 here, i.e. ~0.05-0.2 too much coverage
    assert cov.mean() > 1 - ALPHA + 0.03
    assert size.mean() > 1.3 * oracle_size.mean()


def test_nacp_plugin_covers_at_target(coverage):
    cov, size = coverage["nacp"]
    _, naive_size = coverage["naive"]
    se = _standard_error(cov)
    assert 1 - ALPHA - 4 * se < cov.mean() < 1 - ALPHA + 4 * se + 5 / N_CAL
    assert size.mean() < naive_size.mean()


def test_nacp_with_delta_is_valid_with_probability_one_minus_delta(coverage):
    cov, _ = coverage["nacp_delta"]
    big_delta = nacp_delta(N_CAL, EPS, DELTA)
    # Each split succeeds with probability >= 1 - delta; a binomial proportion over 200 splits
    # has sd <= sqrt(0.1 * 0.9 / 200) = 0.021, so allow 3 sd = 0.064 below 1 - delta. The test
    # coverage is an estimate (sd <= 0.0095 per split), small next to Delta = 0.064.
    assert (cov >= 1 - ALPHA).mean() >= 1 - DELTA - 0.064
    assert (cov <= 1 - ALPHA + 2 * big_delta).mean() >= 1 - DELTA - 0.064
    # the plug-in, which has no margin, misses the target in a large share of splits
    assert (coverage["nacp"][0] < 1 - ALPHA).mean() > 0.25


def test_audit_rectified_covers_under_instance_dependent_noise(coverage):
    # This noise is not benign: naive CP over-covers with larger sets, and uniform NACP, even
    # given the realized rate, over-subtracts (wrong labels score lower than uniform ones).
    naive_cov, naive_size = coverage["naive_confusable"]
    assert naive_cov.mean() > 1 - ALPHA + 0.01
    assert coverage["nacp_confusable"][0].mean() < 1 - ALPHA - 0.02
    cov, size = coverage["audit"]
    se = _standard_error(cov)
    assert 1 - ALPHA - 4 * se < cov.mean() < 1 - ALPHA + 4 * se + 1 / N_CAL + 1 / M_AUDIT
    assert size.mean() < naive_size.mean()
    # the conditional form holds 1 - alpha in ~95% of splits (binomial sd 0.015; allow 3 sd)
    cov_conditional, size_conditional = coverage["audit_conditional"]
    assert (cov_conditional >= 1 - ALPHA).mean() >= 0.95 - 0.046
    assert size_conditional.mean() > size.mean()


def test_split_cp_on_audit_alone_covers(coverage):
    cov, _ = coverage["audit_split"]
    expected = math.ceil((M_AUDIT + 1) * (1 - ALPHA)) / (M_AUDIT + 1)
    assert abs(cov.mean() - expected) < 4 * _standard_error(cov)


# ------------------------------------------------------------------------------------------
# Edge cases and validation
# ------------------------------------------------------------------------------------------


def test_too_few_items_give_full_sets_with_a_reason():
    rng = np.random.default_rng(10)
    scores, labels = rng.random((5, 3)), rng.integers(0, 3, 5)
    assert split_conformal_threshold(scores[np.arange(5), labels], 0.1) == math.inf
    for threshold in [
        nacp_threshold(scores, labels, 0.1, 0.0),
        nacp_threshold(scores, labels, 0.1, 0.2),
        nacp_threshold(rng.random((200, 3)), rng.integers(0, 3, 200), 0.1, 0.2, delta=0.05),  # Delta = 0.17
        audit_rectified_threshold(scores, labels, np.arange(3), labels[:3], 0.1),
        audit_split_threshold(rng.random((100, 3)), np.arange(5), labels, 0.1),
    ]:
        assert threshold.full_sets and threshold.q == math.inf
        assert "full" in threshold.note
        assert prediction_sets(torch.tensor(scores), threshold.q).all()
    finite = nacp_threshold(rng.random((200, 3)), rng.integers(0, 3, 200), 0.1, 0.2)
    assert not finite.full_sets and math.isfinite(finite.q) and finite.note == ""


def test_threshold_round_trips_through_json():
    rng = np.random.default_rng(11)
    for threshold in [
        nacp_threshold(rng.random((300, 4)), rng.integers(0, 4, 300), 0.1, 0.1, delta=0.1),
        nacp_threshold(rng.random((5, 4)), rng.integers(0, 4, 5), 0.1, 0.1),
        audit_rectified_threshold(
            rng.random((300, 4)), rng.integers(0, 4, 300), np.arange(50), np.zeros(50, int), 0.1, conditional=True
        ),
    ]:
        text = json.dumps(threshold.to_dict(), allow_nan=False)
        assert ConformalThreshold.from_dict(json.loads(text)) == threshold
        assert ConformalThreshold.from_state(threshold.config(), threshold.state_dict()) == threshold
    with pytest.raises(ValueError, match="unknown keys"):
        ConformalThreshold.from_dict({**threshold.to_dict(), "bogus": 1})


SCORES = np.random.default_rng(12).random((20, 4))
LABELS = np.random.default_rng(13).integers(0, 4, 20)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: split_conformal_threshold(SCORES, 0.1), "true_scores"),
        (lambda: split_conformal_threshold(SCORES[:, 0], 0.0), "alpha"),
        (lambda: split_conformal_threshold(SCORES[:, 0], 1.0), "alpha"),
        (lambda: nacp_threshold(SCORES[:, 0], LABELS, 0.1, 0.1), "all_scores"),
        (lambda: nacp_threshold(SCORES[:, :1], LABELS, 0.1, 0.1), "all_scores"),
        (lambda: nacp_threshold(SCORES, LABELS[:-1], 0.1, 0.1), "noisy_labels"),
        (lambda: nacp_threshold(SCORES, LABELS + 4, 0.1, 0.1), "noisy_labels"),
        (lambda: nacp_threshold(SCORES, LABELS - 5, 0.1, 0.1), "noisy_labels"),
        (lambda: nacp_threshold(SCORES, LABELS.astype(float), 0.1, 0.1), "noisy_labels"),
        (lambda: nacp_threshold(SCORES, LABELS, 1.5, 0.1), "alpha"),
        (lambda: nacp_threshold(SCORES, LABELS, 0.1, 1.0), "eps"),
        (lambda: nacp_threshold(SCORES, LABELS, 0.1, -0.1), "eps"),
        (lambda: nacp_threshold(SCORES, LABELS, 0.1, 0.1, delta=0.0), "delta"),
        (lambda: nacp_threshold(np.full((20, 4), np.nan), LABELS, 0.1, 0.1), "all_scores"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [0, 20], [1, 1], 0.1), "audit_index"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [-1], [1], 0.1), "audit_index"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [1, 1], [1, 1], 0.1), "audit_index"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [], [], 0.1), "audit_index"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [0, 1], [1], 0.1), "audit_labels"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [0, 1], [1, 9], 0.1), "audit_labels"),
        (lambda: audit_rectified_threshold(SCORES, LABELS, [0], [1], 0.1, conditional=True, z=-1), "z"),
        (lambda: audit_split_threshold(SCORES, [0, 99], [1, 1], 0.1), "audit_index"),
        (lambda: lac_scores(torch.rand(5)), "probs"),
        (lambda: aps_scores(torch.rand(5, 1)), "probs"),
        (lambda: aps_scores(np.random.rand(5, 3)), "probs"),
        (lambda: aps_scores(torch.ones(5, 3, dtype=torch.long)), "probs"),
        (lambda: aps_scores(torch.rand(5, 3), u=1.5), "u"),
        (lambda: aps_scores(torch.rand(5, 3), u="sometimes"), "u"),
        (lambda: aps_scores(torch.rand(5, 3), u=torch.rand(4)), "u"),
        (lambda: aps_scores(torch.rand(5, 3), u=0.5, include_last_label=True), "u"),
        (lambda: raps_scores(torch.rand(5, 3), lam=-0.1), "lam"),
        (lambda: raps_scores(torch.rand(5, 3), k_reg=1.5), "k_reg"),
        (lambda: prediction_sets(torch.rand(5), 0.5), "scores"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()

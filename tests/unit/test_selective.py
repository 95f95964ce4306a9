"""Tests for models/uncertainty/selective.py (DESIGN.md 4.6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.uncertainty.selective import (
    CONFIDENCE_FUNCTIONS,
    PNORM_GRID,
    CertifiedThreshold,
    aurc,
    certify_threshold,
    confidence,
    decide,
    eaurc,
    maxlogit_pnorm_confidence,
    msp_confidence,
    optimal_aurc,
    risk_coverage_curve,
    select_pnorm,
)

# Parameters that make each registry entry callable.
REGISTRY_PARAMS = {"msp": {}, "maxlogit_pnorm": {"p": 2}}


# ------------------------------------------------------------------ confidence functions


def test_registry_params_cover_registry():
    assert set(REGISTRY_PARAMS) == set(CONFIDENCE_FUNCTIONS)


def test_maxlogit_pnorm_hand_example():
    # z = [1, 2, 3]: centered u = [-1, 0, 1], max u = 1, ||u||_p = 2^(1/p).
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert maxlogit_pnorm_confidence(z, p=0).item() == pytest.approx(1.0)
    assert maxlogit_pnorm_confidence(z, p=1).item() == pytest.approx(0.5)
    assert maxlogit_pnorm_confidence(z, p=2).item() == pytest.approx(1 / math.sqrt(2))
    assert maxlogit_pnorm_confidence(z, p=3).item() == pytest.approx(2 ** (-1 / 3))
    assert maxlogit_pnorm_confidence(z, p=9).item() == pytest.approx(2 ** (-1 / 9))
    e = np.exp([1.0, 2.0, 3.0])
    assert msp_confidence(z).item() == pytest.approx(e[2] / e.sum(), rel=1e-6)
    # p = 0 is the centered max logit, not scale-free: doubling logits doubles it.
    assert maxlogit_pnorm_confidence(2 * z, p=0).item() == pytest.approx(2.0)
    assert maxlogit_pnorm_confidence(2 * z, p=2).item() == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize("name", sorted(CONFIDENCE_FUNCTIONS))
def test_registry_entry_contract(name):
    params = REGISTRY_PARAMS[name]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 7, generator=gen) * 3
    g = confidence(z, name, **params)
    assert g.shape == (64,) and g.dtype == torch.float32 and g.device == z.device
    # Adding a per-row constant to the logits changes neither softmax nor centered logits.
    shift = torch.randn(64, 1, generator=gen) * 10
    torch.testing.assert_close(confidence(z + shift, name, **params), g, atol=1e-4, rtol=1e-4)
    # A peaked row is more confident than a flat one; constant logits give a finite value.
    peaked = torch.tensor([[8.0, 0.0, 0.0, 0.0], [1.0, 0.9, 0.8, 0.7], [0.0, 0.0, 0.0, 0.0]])
    gp = confidence(peaked, name, **params)
    assert torch.isfinite(gp).all() and gp[0] > gp[1] >= gp[2]
    # Half-precision input is scored in fp32.
    g16 = confidence(z.half(), name, **params)
    assert g16.dtype == torch.float32
    torch.testing.assert_close(g16, g, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("p", PNORM_GRID)
def test_pnorm_constant_logits_give_zero(p):
    assert maxlogit_pnorm_confidence(torch.full((3, 5), 2.5), p=p).tolist() == [0.0, 0.0, 0.0]


def test_confidence_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="name"):
        confidence(z, "entropy")
    with pytest.raises(ValueError, match="missing \\['p'\\]"):
        confidence(z, "maxlogit_pnorm")
    with pytest.raises(ValueError, match="unknown \\['p'\\]"):
        confidence(z, "msp", p=2)
    with pytest.raises(ValueError, match="`p`"):
        confidence(z, "maxlogit_pnorm", p=10)
    with pytest.raises(ValueError, match="`p`"):
        confidence(z, "maxlogit_pnorm", p=2.0)
    with pytest.raises(ValueError, match="`logits`"):
        confidence(torch.randn(4), "msp")
    with pytest.raises(ValueError, match="`logits`"):
        confidence(np.zeros((4, 3)), "msp")
    with pytest.raises(ValueError, match="`logits`"):
        confidence(torch.zeros(4, 3, dtype=torch.long), "msp")


def test_select_pnorm_picks_the_ranking_that_explains_errors():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 10, generator=gen) * 3
    # Errors exactly where centered max logit is low: p = 0 ranks perfectly, MSP does not.
    g0 = maxlogit_pnorm_confidence(z, p=0)
    correct = (g0 > g0.median()).numpy()
    assert aurc(g0, correct) < aurc(msp_confidence(z), correct)
    assert select_pnorm(z, correct) == 0
    # Errors exactly where MSP is low: MSP is optimal, no p beats it strictly -> fallback None.
    g = msp_confidence(z)
    correct = (g > g.median()).numpy()
    assert aurc(g, correct) == pytest.approx(optimal_aurc(2000, int((~correct).sum())))
    assert select_pnorm(z, correct) is None


def test_select_pnorm_bad_inputs():
    with pytest.raises(ValueError, match="`correct`"):
        select_pnorm(torch.randn(10, 3), np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="`p`"):
        select_pnorm(torch.randn(10, 3), np.ones(10, dtype=bool), p_grid=(1, 12))


# ------------------------------------------------------------------ risk-coverage, AURC


def test_aurc_hand_examples():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    # Perfect ranking, errors last: risks at top-1..4 = 0, 0, 1/3, 2/4.
    perfect = np.array([True, True, False, False])
    assert aurc(conf, perfect) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert eaurc(conf, perfect) == pytest.approx(0.0, abs=1e-12)
    # Worst ranking, errors first: 1/1, 2/2, 2/3, 2/4.
    worst = perfect[::-1].copy()
    assert aurc(conf, worst) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4)
    assert eaurc(conf, worst) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4 - (1 / 3 + 2 / 4) / 4)
    # No errors / all errors.
    assert aurc(conf, np.ones(4, bool)) == 0.0 and eaurc(conf, np.ones(4, bool)) == 0.0
    assert aurc(conf, np.zeros(4, bool)) == 1.0 and eaurc(conf, np.zeros(4, bool)) == 0.0


def test_aurc_ties_use_expected_order():
    # All tied with 2 errors of 4: expected errors in top-i is i/2, risk 1/2 at every i.
    conf = np.full(4, 0.5)
    assert aurc(conf, np.array([False, True, False, True])) == pytest.approx(0.5)
    assert aurc(conf, np.array([True, True, False, False])) == pytest.approx(0.5)
    # Result does not depend on the input order of tied items.
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 5, 200).astype(float)
    correct = rng.random(200) < 0.7
    perm = rng.permutation(200)
    assert aurc(conf, correct) == pytest.approx(aurc(conf[perm], correct[perm]), abs=1e-12)


def test_eaurc_perfect_ranking_is_zero_and_optimal_aurc_formula():
    rng = np.random.default_rng(1)
    correct = rng.random(5000) < 0.8
    conf = correct + rng.random(5000) * 0.5  # every correct item above every error
    assert eaurc(conf, correct) == pytest.approx(0.0, abs=1e-12)
    r = (~correct).mean()
    # Continuous limit r + (1-r) ln(1-r), accurate to O(log n / n).
    assert optimal_aurc(5000, int((~correct).sum())) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=2e-3)
    # A random ranking has AURC ~ error rate (expected risk r at every coverage).
    assert aurc(rng.random(5000), correct) == pytest.approx(r, abs=0.03)


def test_risk_coverage_curve_hand_example():
    cov, risk, thr = risk_coverage_curve(
        np.array([0.9, 0.8, 0.8, 0.7]), np.array([True, False, True, False])
    )
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(cov, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.5])
    # Torch inputs are accepted.
    cov_t, risk_t, _ = risk_coverage_curve(torch.tensor([0.9, 0.8, 0.8, 0.7]), torch.tensor([1, 0, 1, 0]))
    np.testing.assert_allclose(cov_t, cov) and np.testing.assert_allclose(risk_t, risk)


def test_risk_functions_bad_inputs():
    with pytest.raises(ValueError, match="`confidence`"):
        aurc(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="`confidence`"):
        aurc(np.zeros((2, 2)), np.array([True, False]))
    with pytest.raises(ValueError, match="`correct`"):
        aurc(np.array([0.1, 0.2]), np.array([True]))
    with pytest.raises(ValueError, match="`correct`"):
        eaurc(np.array([0.1, 0.2]), np.array([0, 2]))


# ------------------------------------------------------------------ certified threshold

# Synthetic calibration data with a known error curve: g ~ U(0, 1), P(error | g) = (1 - g)^2 / 2.
# True selective risk at threshold t (accept g >= t): R(t) = int_t^1 (1-g)^2/2 dg / (1 - t)
# = (1 - t)^2 / 6, exact, so no finite test set is needed. Oracle coverage at r*: sqrt(6 r*).
N_CAL, N_SPLITS, R_STAR, DELTA, K = 2000, 200, 0.1, 0.1, 10
ORACLE_COVERAGE = math.sqrt(6 * R_STAR)
# If P(served risk > r*) <= delta, the number of violating splits is stochastically below
# Bin(N_SPLITS, delta); a correct implementation exceeds its 0.999 quantile with prob <= 1e-3.
MAX_VIOLATIONS = int(stats.binom.ppf(0.999, N_SPLITS, DELTA))


def _true_risk(threshold: float) -> float:
    if math.isinf(threshold):
        return 0.0  # abstains on everything: no accepted error
    return (1 - threshold) ** 2 / 6


def _split(rng, noise_eps=0.0):
    g = rng.random(N_CAL)
    wrong = rng.random(N_CAL) < (1 - g) ** 2 / 2
    if noise_eps == 0.0:
        return g, wrong
    # Uniform-convention symmetric noise on the label: a correct prediction looks wrong when the
    # label is resampled to another class (prob eps (K-1)/K); a wrong prediction looks right when
    # the label is resampled onto the predicted class (prob eps/K).
    u = rng.random(N_CAL)
    observed = np.where(wrong, u >= noise_eps / K, u < noise_eps * (K - 1) / K)
    return g, observed


def _run_splits(seed, label_eps=0.0, min_accepted=50, **kw):
    rng = np.random.default_rng(seed)
    results = [certify_threshold(*_split(rng, label_eps), R_STAR, DELTA, min_accepted, **kw) for _ in range(N_SPLITS)]
    violations = sum(_true_risk(r.threshold) > R_STAR for r in results)
    coverage = np.mean([r.coverage for r in results])
    return results, violations, coverage


def test_certify_controls_true_risk_clean_labels():
    results, violations, coverage = _run_splits(0)
    assert all(r.certified for r in results)
    assert violations <= MAX_VIOLATIONS, (violations, MAX_VIOLATIONS)
    # Power: near the oracle. At the boundary ~1550 items are accepted, the binomial margin is
    # ~1.3 sd = 0.01 of risk, i.e. coverage ~0.735 against 0.775; 0.9 * oracle leaves room.
    assert 0.9 * ORACLE_COVERAGE < coverage < ORACLE_COVERAGE
    # Reported UCB is the one-sided Clopper-Pearson bound at the served point, and >= observed risk.
    r = results[0]
    assert r.risk_ucb == pytest.approx(stats.beta.ppf(1 - DELTA, r.n_errors + 1, r.n_accepted - r.n_errors))
    assert r.observed_risk <= r.risk_ucb and r.risk == R_STAR and r.effective_risk == R_STAR


def test_certify_naive_rule_would_fail_this_test():
    # Sanity of the statistical test: serving the lowest threshold whose *empirical* risk is
    # <= r* violates in about half the splits, far above MAX_VIOLATIONS.
    rng = np.random.default_rng(0)
    violations = 0
    for _ in range(N_SPLITS):
        g, wrong = _split(rng)
        cov, risk, thr = risk_coverage_curve(g, ~wrong)
        violations += _true_risk(thr[np.flatnonzero(risk <= R_STAR)[-1]]) > R_STAR
    assert violations > 2 * MAX_VIOLATIONS


# With noisy labels even the most confident items show a noisy-risk floor of eps (K-1)/K, so the
# first tested points need enough items to separate from it; the noisy tests start at 400.
NOISY_MIN_ACCEPTED = 400


def test_certify_noisy_labels_without_correction_is_conservative():
    # eps = 0.05: noisy risk = 0.045 + 0.95 R, so certifying it at r* = 0.1 only accepts
    # R <= 0.058, coverage at most sqrt(6 * 0.058) = 0.589 against 0.775 on clean labels.
    eps = 0.05
    _, violations, coverage = _run_splits(1, label_eps=eps, min_accepted=NOISY_MIN_ACCEPTED)
    noisy_limit = math.sqrt(6 * (R_STAR - eps * 0.9) / (1 - eps))
    assert violations == 0
    assert 0.6 * noisy_limit < coverage < noisy_limit < ORACLE_COVERAGE


def test_certify_with_symmetric_noise_correction():
    eps = 0.2
    kw = dict(label_eps=eps, num_classes=K, min_accepted=NOISY_MIN_ACCEPTED)
    _, violations, coverage = _run_splits(2, noise_eps=eps, **kw)
    assert violations <= MAX_VIOLATIONS, (violations, MAX_VIOLATIONS)
    # Power: noisier errors widen the margin and the noisy floor 0.18 makes some splits stop
    # early, but coverage stays well above what no correction could reach (nothing: 0.18 > r*).
    assert 0.8 * ORACLE_COVERAGE < coverage < ORACLE_COVERAGE
    # A lower bound eps_L < eps is still valid, and more conservative.
    _, violations_l, coverage_l = _run_splits(2, noise_eps=0.15, **kw)
    assert violations_l <= MAX_VIOLATIONS and coverage_l < coverage
    # An over-estimate is the unsafe side: with eps = 0.35 the test accepts far too much.
    _, violations_hi, _ = _run_splits(2, noise_eps=0.35, **kw)
    assert violations_hi > 2 * MAX_VIOLATIONS
    # Without the correction nothing certifies: the noisy floor 0.18 is above r* = 0.1.
    results, _, _ = _run_splits(2, label_eps=eps, min_accepted=NOISY_MIN_ACCEPTED)
    assert not any(r.certified for r in results)


def test_certify_correction_level_and_ucb():
    rng = np.random.default_rng(3)
    r = certify_threshold(*_split(rng, 0.2), R_STAR, DELTA, noise_eps=0.2, num_classes=K)
    # r_eff = eps (K-1)/K + (1 - eps) r* in the uniform convention (= flip + (1 - flip K/(K-1)) r*).
    assert r.effective_risk == pytest.approx(0.2 * 0.9 + 0.8 * 0.1)
    noisy_ucb = stats.beta.ppf(1 - DELTA, r.n_errors + 1, r.n_accepted - r.n_errors)
    assert r.risk_ucb == pytest.approx((noisy_ucb - 0.18) / 0.8)
    assert r.risk_ucb < r.observed_risk  # observed (noisy) risk over-states the clean risk


def _reference_fixed_sequence(conf, err, risk, delta, min_accepted):
    """Plain loop over distinct thresholds, most confident first."""
    served = None
    for t in sorted(set(conf.tolist()), reverse=True):
        acc = conf >= t
        n, k = int(acc.sum()), int(err[acc].sum())
        if n < min_accepted:
            continue
        if stats.binom.cdf(k, n, risk) > delta:
            break
        served = (t, n, k)
    return served


def test_certify_matches_reference_loop():
    rng = np.random.default_rng(4)
    for _ in range(20):
        conf = np.round(rng.random(300), 2)  # ties on purpose
        err = rng.random(300) < (1 - conf) * 0.4
        r_star = rng.uniform(0.05, 0.2)
        ref = _reference_fixed_sequence(conf, err, r_star, 0.1, 30)
        got = certify_threshold(conf, err, r_star, 0.1, min_accepted=30)
        if ref is None:
            assert not got.certified
        else:
            assert (got.threshold, got.n_accepted, got.n_errors) == pytest.approx(ref)
            assert got.coverage == pytest.approx(ref[1] / 300)


def test_certify_hand_example_and_skipping():
    conf = np.arange(100, 0, -1).astype(float)  # 100 most confident ... 1 least
    err = np.zeros(100, bool)
    err[-10:] = True  # the 10 least confident are wrong
    # r* = 0.2: even full coverage passes, BinomCDF(10; 100, 0.2) = 0.0057 <= 0.1.
    r = certify_threshold(conf, err, 0.2, 0.1)
    assert r.certified and r.threshold == 1.0 and r.coverage == 1.0 and r.n_errors == 10
    # Errors on the 5 MOST confident: skipped points (n < 50) neither certify nor stop, so the
    # sequence starts at n = 50 with k = 5: BinomCDF(5; 50, 0.2) = 0.048 <= 0.1 -> certified.
    err = np.zeros(100, bool)
    err[:5] = True
    assert certify_threshold(conf, err, 0.2, 0.1, min_accepted=50).certified
    # Without skipping, the first point (1 item, 1 error) fails and stops the sequence.
    r = certify_threshold(conf, err, 0.2, 0.1, min_accepted=1)
    assert not r.certified and r.threshold == math.inf


def test_nothing_certifies_abstains_on_everything_loudly():
    rng = np.random.default_rng(5)
    g, wrong = _split(rng)
    r = certify_threshold(g, wrong, 0.001, DELTA)
    assert not r.certified and r.threshold == math.inf and r.coverage == 0.0 and r.n_accepted == 0
    assert r.reason.startswith("NOTHING CERTIFIED") and "ABSTAINS ON EVERY INPUT" in r.reason
    assert r.risk == 0.001  # r* not loosened
    assert not decide(torch.from_numpy(g), r).any()
    # Too few items for even one tested point.
    r = certify_threshold(g[:20], wrong[:20], 0.5, DELTA)
    assert not r.certified and "fewer than min_accepted" in r.reason


def test_certified_threshold_roundtrip_strict_json():
    rng = np.random.default_rng(6)
    g, wrong = _split(rng)
    for r in (
        certify_threshold(g, wrong, R_STAR, DELTA),
        certify_threshold(g, wrong, 0.001, DELTA),
        certify_threshold(g, wrong, R_STAR, DELTA, noise_eps=0.05, num_classes=K),
    ):
        d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
        back = CertifiedThreshold.from_dict(d)
        assert back.to_dict() == r.to_dict()
        assert back.threshold == r.threshold
    with pytest.raises(ValueError, match="missing keys"):
        CertifiedThreshold.from_dict({"threshold": 0.5})


def test_decide():
    conf = torch.tensor([0.2, 0.5, 0.7, float("nan")])
    assert decide(conf, 0.5).tolist() == [False, True, True, False]
    assert decide(conf, math.inf).tolist() == [False] * 4
    assert decide(conf, -math.inf).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="`threshold`"):
        decide(conf, float("nan"))
    with pytest.raises(ValueError, match="`confidence`"):
        decide(conf[None], 0.5)


def test_certify_bad_inputs():
    g, e = np.linspace(0, 1, 100), np.zeros(100, bool)
    with pytest.raises(ValueError, match="`risk`"):
        certify_threshold(g, e, 0.0, 0.1)
    with pytest.raises(ValueError, match="`delta`"):
        certify_threshold(g, e, 0.1, 1.0)
    with pytest.raises(ValueError, match="`errors`"):
        certify_threshold(g, e[:-1], 0.1, 0.1)
    with pytest.raises(ValueError, match="`min_accepted`"):
        certify_threshold(g, e, 0.1, 0.1, min_accepted=0)
    with pytest.raises(ValueError, match="`num_classes`"):
        certify_threshold(g, e, 0.1, 0.1, noise_eps=0.1)
    with pytest.raises(ValueError, match="`noise_eps`"):
        certify_threshold(g, e, 0.1, 0.1, noise_eps=1.2, num_classes=10)
    with pytest.raises(ValueError, match="chance"):
        certify_threshold(g, e, 0.6, 0.1, noise_eps=0.1, num_classes=2)
    with pytest.raises(ValueError, match="`confidence`"):
        certify_threshold(np.r_[g[:-1], np.inf], e, 0.1, 0.1)


@pytest.mark.parametrize("name", sorted(CONFIDENCE_FUNCTIONS))
def test_hot_path_runs_on_meta_device_without_host_sync(name):
    # Meta tensors have no data: any .item(), .cpu() or data-dependent branch would raise.
    z = torch.empty(16, 5, device="meta")
    g = confidence(z, name, **REGISTRY_PARAMS[name])
    assert g.device.type == "meta" and g.shape == (16,)
    assert decide(g, 0.5).device.type == "meta"

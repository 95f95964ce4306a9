"""Parity with MAPIE 1.x (installed: 1.6) for what the array API fits.

Split conformal: the score-level parity (LAC, APS, RAPS thresholds and sets against
``SplitConformalClassifier``) is in ``tests/unit/test_conformal.py::test_sets_equal_mapie``; here the same
comparison goes through ``NoiseAwareClassifier`` end to end (no trusted labels, unknown noise: split
conformal on the observed labels).

Certified abstention (``certify_threshold``, what ``fit_abstention`` calls) against MAPIE's Learn-then-Test
risk control (``mapie.risk_control``: ``compute_hoeffding_bentkus_p_value``, ``control_fwer`` with
``"fixed_sequence"`` and ``MultiClassificationLTTController``, which abstains when the top probability is
below the threshold, as MSP does). Conventions, read from ``mapie/risk_control`` (1.6):

* p-value. MAPIE's binary Hoeffding-Bentkus p-value is ``min(exp(-n h1(r_hat, r)), BinomCDF(ceil(n r_hat);
  n, r))``. For a binary loss the Hoeffding (Chernoff) term is never below the exact binomial tail, so it is
  ``BinomCDF(k; n, r)``, our p-value, EXCEPT where the float product ``n * (k / n)`` rounds above ``k``:
  ``ceil`` then counts ``k + 1`` errors (about 4% of the ``(k, n)`` pairs with ``n < 3000``; about 20% when
  the risk is computed as ``1 - precision``). MAPIE's p-value is then larger, never smaller: it certifies a
  prefix of what we certify.
* Order of the fixed sequence. Ours is fixed before seeing the data: most confident first. MAPIE infers the
  direction from the empirical risk over the given thresholds (reversing it when the risk decreases,
  warning when it is not monotone), a data-dependent order.
* Grid and start. MAPIE tests the thresholds it is given (default ``linspace(0, 0.99, 100)``) from the first
  one; ours are the distinct calibration confidences from the first point with ``max(min_accepted, n0)``
  accepted items (``n0``: the fewest items at which zero errors can pass). Giving MAPIE that grid
  reproduces ours.
* Selection. MAPIE serves the valid threshold that minimizes a secondary risk; with the abstention rate
  that is the lowest valid threshold, the one we serve.
* Label noise. The symmetric-noise correction is a test at ``r_eff``, the same in MAPIE with target ``r_eff``;
  the worst-case correction tests ``min(n_j, k_j + W)`` errors, which MAPIE's label-based risks cannot
  express. ``control_fwer`` applied to our p-values reproduces all three exactly.
"""

import math
import warnings

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from mapie.risk_control import BinaryRisk, MultiClassificationLTTController, abstention_rate, control_fwer
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy import stats

from noisewise.models.arrays import NoiseAwareClassifier
from noisewise.models.uncertainty.labelnoise import flip_rate_to_uniform
from noisewise.models.uncertainty.selective import certify_threshold, wrong_label_bound
from tests.unit.test_conformal import PassThrough

#: MAPIE's selective risk: errors among the items it does not abstain on (abstention = NaN prediction).
SELECTIVE_ERROR = BinaryRisk(
    risk_occurrence=lambda y_true, y_pred: y_pred != y_true,
    risk_condition=lambda y_true, y_pred: ~np.isnan(y_pred.astype(float)),
    higher_is_better=False,
)


def _problem(rng, n, k=10):
    """Probabilities with a spread of confidence, labels drawn from them (a calibrated model)."""
    logits = rng.normal(size=(n, k)) * rng.lognormal(1.8, 0.6, size=(n, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return probs, labels


def _tested_grid(conf, errors, level, delta, min_accepted, wrong=0):
    """Our fixed sequence, rebuilt independently: distinct confidences from most to least confident, the
    accepted and error counts at each, from the first point with max(min_accepted, n0) accepted items."""
    thresholds = np.unique(conf)[::-1]
    n_acc = (conf[None, :] >= thresholds[:, None]).sum(1)
    k_err = ((conf[None, :] >= thresholds[:, None]) & errors[None, :]).sum(1)
    ns = np.arange(1, len(conf) + 1)
    passable = (ns > wrong) & (stats.binom.cdf(np.minimum(ns, wrong), ns, level) <= delta)
    n0 = int(ns[passable][0]) if passable.any() else len(conf) + 1
    tested = n_acc >= max(min_accepted, n0)
    return thresholds[tested], n_acc[tested], k_err[tested]


# ------------------------------------------------------------------------------------------------
# split conformal through the array API
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_array_api_split_conformal_equals_mapie(alpha, seed):
    rng = np.random.default_rng(seed)
    n, n_test = 400, 500
    probs, labels = _problem(rng, n + n_test, k=(3, 5, 10)[seed])
    mapie = SplitConformalClassifier(PassThrough(probs).fit(), confidence_level=1 - alpha, conformity_score="lac",
                                     prefit=True, random_state=seed)
    mapie.conformalize(np.arange(n).reshape(-1, 1), labels[:n])
    mapie_sets = mapie.predict_set(np.arange(n, n + n_test).reshape(-1, 1))[1][:, :, 0]

    model = NoiseAwareClassifier(alpha=alpha, inputs="probs", ood_scorer="msp", score="lac")
    model.conformalize(probs[:n], labels[:n])
    threshold = model.calibration_.threshold
    assert threshold.method == "split" and model.guarantees()["prediction_set"]["kind"] == "conservative"
    fitted = mapie._mapie_classifier.conformity_score_function_
    assert threshold.q == pytest.approx(float(fitted.quantiles_[0]), abs=1e-12)
    np.testing.assert_array_equal(model.predict_set(probs[n:]), mapie_sets)


# ------------------------------------------------------------------------------------------------
# certified abstention against MAPIE's Learn-then-Test
# ------------------------------------------------------------------------------------------------


def test_binomial_p_value_is_mapies_bentkus_p_value_up_to_float_rounding():
    ks, ns, levels = [], [], []
    for n in range(1, 1500, 7):
        k = np.arange(n + 1)
        ks.append(k), ns.append(np.full(n + 1, n)), levels.append(np.full(n + 1, (0.02, 0.05, 0.1, 0.3)[n % 4]))
    k, n, level = (np.concatenate(a) for a in (ks, ns, levels))
    ours = stats.binom.cdf(k, n, level)
    mapie = np.concatenate([
        compute_hoeffding_bentkus_p_value(k[n == m] / m, int(m), float(level[n == m][0]), binary=True)[:, 0]
        for m in np.unique(n)])
    exact_count = np.ceil(n * (k / n)) == k
    np.testing.assert_allclose(mapie[exact_count], ours[exact_count], rtol=1e-9, atol=1e-300)
    # where n * (k / n) rounds above k, MAPIE tests k + 1 errors: a larger p-value, never a smaller one
    assert np.all(mapie[~exact_count] >= ours[~exact_count])
    assert 0.01 < np.mean(~exact_count) < 0.1


@pytest.mark.parametrize("correction", ["none", "symmetric", "worst-case"])
def test_fixed_sequence_equals_mapie_control_fwer(correction):
    """On our p-values, MAPIE's fixed-sequence procedure rejects exactly the points we certify."""
    rng = np.random.default_rng({"none": 0, "symmetric": 1, "worst-case": 2}[correction])
    outcomes = []
    for _ in range(150):
        n = int(rng.integers(200, 1500))
        probs, labels = _problem(rng, n)
        conf = np.round(probs.max(1), int(rng.integers(2, 6)))  # rounding makes ties: groups enter together
        flip_rate = {"none": 0.0, "symmetric": 0.1, "worst-case": 0.02}[correction]
        flipped = rng.random(n) < flip_rate  # symmetric label noise at the rate the correction is told
        labels = np.where(flipped, (labels + rng.integers(1, 10, size=n)) % 10, labels)
        errors = probs.argmax(1) != labels
        risk, delta = float(rng.choice([0.02, 0.05, 0.1, 0.2])), float(rng.choice([0.01, 0.05, 0.1]))
        min_accepted = int(rng.integers(1, n // 2))
        kwargs, level, wrong = {}, risk, 0
        if correction == "symmetric":
            eps = flip_rate_to_uniform(flip_rate, 10)
            kwargs, level = {"noise_eps": eps, "num_classes": 10}, eps * 0.9 + (1 - eps) * risk
        elif correction == "worst-case":
            wrong = wrong_label_bound(n, flip_rate, delta / 2)
            kwargs = {"max_wrong_labels": wrong}
        cert = certify_threshold(conf, errors, risk, delta, min_accepted=min_accepted, **kwargs)

        thresholds, n_acc, k_err = _tested_grid(conf, errors, level, delta, min_accepted, wrong)
        counted = np.minimum(n_acc, k_err + wrong)
        valid = control_fwer(stats.binom.cdf(counted, n_acc, level), delta, "fixed_sequence") if len(n_acc) else []
        assert list(valid) == list(range(len(valid)))  # a prefix: the sequence stops at its first failure
        if len(valid):
            assert cert.certified and cert.threshold == thresholds[valid[-1]] and cert.n_accepted == n_acc[valid[-1]]
        else:
            assert not cert.certified and math.isinf(cert.threshold)
        outcomes.append(bool(len(valid)))
    assert 10 <= sum(outcomes) <= len(outcomes) - 10  # both outcomes were exercised


def test_mapie_multiclass_ltt_controller_certifies_a_prefix_of_ours_and_mostly_the_same():
    """MAPIE's public controller on the same probabilities and labels, given our grid: it never serves a
    lower threshold than ours, and serves exactly ours unless its float-rounded error count differs on the
    tested prefix."""
    rng = np.random.default_rng(7)
    same = differ = skipped = certified = 0
    for _ in range(60):
        n = int(rng.integers(300, 900))
        probs, labels = _problem(rng, n)
        conf, errors = probs.max(1), probs.argmax(1) != labels
        risk, delta = float(rng.choice([0.05, 0.1, 0.15])), 0.05
        min_accepted = n // 2
        cert = certify_threshold(conf, errors, risk, delta, min_accepted=min_accepted)
        thresholds, n_acc, k_err = _tested_grid(conf, errors, risk, delta, min_accepted)
        if len(thresholds) < 2 or np.mean(np.diff(k_err[::-1] / n_acc[::-1])) >= 0:
            skipped += 1  # MAPIE would test from the least confident end: not the same procedure
            continue
        controller = MultiClassificationLTTController(
            predict_function=PassThrough(probs).fit().predict_proba, risks=[SELECTIVE_ERROR], target_level=[risk],
            confidence_level=1 - delta, best_predict_param_choice=abstention_rate,
            list_predict_params=np.sort(thresholds), classes=np.arange(probs.shape[1]), fwer_method="fixed_sequence")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-monotone empirical risk, or nothing valid
            controller.calibrate(np.arange(n).reshape(-1, 1), labels)
        served = math.inf if controller.best_predict_param is None else controller.best_predict_param
        assert served >= cert.threshold  # MAPIE certifies a prefix of ours
        prefix = slice(0, cert.n_tested)
        if np.all(np.ceil(n_acc[prefix] * (k_err[prefix] / n_acc[prefix])) == k_err[prefix]):
            assert served == cert.threshold
        same += served == cert.threshold
        differ += served != cert.threshold
        certified += cert.certified
    assert skipped <= 6 and certified >= 20 and same > differ

"""monitoring.feedback: per-item scoring (cleanlab parity), suspects listing, noise-rate estimates
from feedback frames, realized coverage with its noise correction, recalibration.

Frames are synthetic: a calibrated softmax model (logits s * g with a per-item scale, the true
label drawn from the model's own probabilities) and uniform label noise injected at a known rate.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from cleanlab.count import compute_confident_joint, get_confident_thresholds
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from noisewise.models.calibrate import Calibration
from noisewise.models.uncertainty.conformal import ConformalThreshold
from noisewise.models.uncertainty.labelnoise import flip_rate_to_uniform, noise_rate_direct, uniform_to_flip_rate
from noisewise.monitoring.feedback import (
    FEEDBACK_COLUMNS,
    MIN_AUDIT_ITEMS,
    MIN_AUDITED_FOR_RECTIFIED,
    MIN_DUPLICATE_ITEMS,
    MIN_RECALIBRATION_ITEMS,
    Recalibration,
    RecalibrationRefused,
    batch_label_issues,
    best_estimate,
    noise_rate_estimates,
    realized_coverage,
    recalibrated_threshold,
    required_items,
    score_feedback,
    suspects,
)

K = 10
NAMES = [f"c{i}" for i in range(K)]
T0 = pd.Timestamp("2026-01-01T00:00:00Z")


# ------------------------------------------------------------------------------------------------
# Synthetic model, noise and frames
# ------------------------------------------------------------------------------------------------


def model_probs(rng: np.random.Generator, n: int, k: int = K, mu: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated softmax outputs [n, k] (float32) and true labels drawn from them."""
    scale = np.exp(mu + 0.5 * rng.standard_normal(n))[:, None]
    z = scale * rng.standard_normal((n, k))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p = p.astype(np.float32)
    p /= p.sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1).clip(max=k - 1)
    return p, y.astype(np.int64)


def uniform_noise(rng: np.random.Generator, y: np.ndarray, eps: float, k: int = K) -> np.ndarray:
    """Uniform-convention noise: with probability eps the label is redrawn from all k classes."""
    redraw = rng.random(y.size) < eps
    return np.where(redraw, rng.integers(0, k, y.size), y)


def make_frame(probs: np.ndarray, items: list[tuple[int, int, str, bool]], q: float = 0.8,
               is_ood: np.ndarray | None = None, weights: str = "w1", thresholds: np.ndarray | None = None,
               start: pd.Timestamp = T0, id_offset: int = 0) -> pd.DataFrame:
    """Feedback frame: ``items`` = (prediction index, label, annotator, audited), in arrival order.

    Served sets are LAC sets {j : 1 - p_j <= q}."""
    idx = np.array([i for i, *_ in items], dtype=np.int64)
    labels = np.array([lab for _, lab, *_ in items], dtype=np.int64)
    p = probs[idx]
    sets = (1.0 - p) <= q
    t = np.full(K, 0.5) if thresholds is None else thresholds
    scored = score_feedback(p, labels, t)
    ood = np.zeros(len(probs), bool) if is_ood is None else is_ood
    n = len(items)
    return pd.DataFrame({
        "feedback_id": np.arange(n) + id_offset,
        "prediction_id": [f"{weights}-p{i}" for i in idx],
        "annotator": [a for _, _, a, _ in items],
        "label": labels,
        "audited": np.array([au for *_, au in items], dtype=bool),
        "received_at": start + pd.to_timedelta(np.arange(n), unit="s"),
        "predicted": p.argmax(1),
        "probs": list(p),
        "in_set": sets[np.arange(n), labels],
        "set_size": sets.sum(1),
        "is_ood": ood[idx],
        "ood_score": np.where(ood[idx], 5.0, 0.1),
        "ood_p_value": np.where(ood[idx], 0.001, 0.5),
        "confidence": p.max(1).astype(float),
        "decision": "accept",
        "reason": None,
        "model_name": "m",
        "model_version": "1",
        "weights": weights,
        "quality": scored.quality,
        "suspect": scored.suspect,
        "proposed": scored.proposed,
    })


def calibration(alpha: float = 0.1, score: str = "lac", conformal: str = "plugin") -> Calibration:
    """A real Calibration; recalibration reads only its names, score, threshold and settings."""
    return Calibration(
        class_names=NAMES, ood_scorer=None, ood_gate=None, conformity_score=score, conformity_params={},
        threshold=ConformalThreshold(q=0.9, method="nacp", alpha=alpha, tau=0.9, n=1000, eps=0.0),
        noise={}, confidence_name="msp", confidence_params={}, certified=None, cl_thresholds=[0.5] * K,
        settings={"seed": 0, "conformal": conformal, "delta": 0.001},
    )


# ------------------------------------------------------------------------------------------------
# score_feedback
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_feedback_parity_with_cleanlab(seed):
    rng = np.random.default_rng(seed)
    p_cal, y_cal = model_probs(rng, 2000)
    y_cal = uniform_noise(rng, y_cal, 0.3)
    thresholds = get_confident_thresholds(y_cal, p_cal.astype(np.float64))
    p, y = model_probs(rng, 3000)
    y = uniform_noise(rng, y, 0.3)
    out = score_feedback(p, y, thresholds)
    assert out.quality.shape == (3000,) and out.suspect.dtype == bool and out.proposed.dtype == np.int64
    np.testing.assert_allclose(out.quality, get_label_quality_scores(y, p, method="self_confidence"), rtol=1e-6)

    _, off = compute_confident_joint(y, p.astype(np.float64), thresholds=thresholds,
                                     return_indices_of_off_diagonals=True)
    cleanlab_off = np.zeros(len(y), bool)
    cleanlab_off[off] = True
    # Every flag is off-diagonal in cleanlab's joint ...
    assert not np.any(out.suspect & ~cleanlab_off)
    # ... and where the argmax reaches its threshold the two agree exactly, proposed = argmax.
    top = p.argmax(1)
    top_confident = p[np.arange(len(y)), top] >= thresholds[top] - 1e-6
    assert top_confident.mean() > 0.5
    np.testing.assert_array_equal(out.suspect[top_confident], cleanlab_off[top_confident])
    np.testing.assert_array_equal(out.proposed[top_confident & out.suspect], top[top_confident & out.suspect])
    assert out.suspect.sum() > 100  # the comparison is not vacuous

    margin = score_feedback(p, y, thresholds, method="normalized_margin").quality
    np.testing.assert_allclose(margin, get_label_quality_scores(y, p, method="normalized_margin"), rtol=1e-6)


def test_score_feedback_validation():
    p = np.full((4, 3), 1 / 3, dtype=np.float32)
    t = np.full(3, 0.3)
    with pytest.raises(ValueError, match=r"`labels` must hold class indices in \[0, 2\]; item 2 is 3"):
        score_feedback(p, np.array([0, 1, 3, 0]), t)
    with pytest.raises(ValueError, match="`labels` must have length 4"):
        score_feedback(p, np.array([0, 1]), t)
    with pytest.raises(ValueError, match="thresholds"):
        score_feedback(p, np.array([0, 1, 2, 0]), np.full(4, 0.3))
    with pytest.raises(ValueError, match="probs"):
        score_feedback(p[0], np.array([0]), t)
    with pytest.raises(ValueError, match="method"):
        score_feedback(p, np.array([0, 1, 2, 0]), t, method="entropy")
    empty = score_feedback(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), t)
    assert empty.quality.shape == empty.suspect.shape == empty.proposed.shape == (0,)


# ------------------------------------------------------------------------------------------------
# batch_label_issues
# ------------------------------------------------------------------------------------------------


def test_batch_label_issues_is_cleanlab_and_handles_edge_cases():
    rng = np.random.default_rng(3)
    p, y = model_probs(rng, 800)
    y_noisy = uniform_noise(rng, y, 0.3)
    mask = batch_label_issues(p, y_noisy)
    np.testing.assert_array_equal(mask, find_label_issues(y_noisy, p, n_jobs=1))
    # it finds flips far better than chance
    flips = y_noisy != y
    assert (mask & flips).sum() / mask.sum() > 2 * flips.mean()

    assert batch_label_issues(np.zeros((0, K), np.float32), np.zeros(0, np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="at least 20"):
        batch_label_issues(p[:10], y_noisy[:10])
    # a class absent from the labels: no cleanlab warning escapes, and with the calibration's
    # thresholds the absent class can be proposed (it is counted in the confident joint)
    keep = y_noisy != 7
    thresholds = get_confident_thresholds(y_noisy, p.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        without = batch_label_issues(p[keep], y_noisy[keep])
        with_t = batch_label_issues(p[keep], y_noisy[keep], thresholds=thresholds)
    assert without.shape == with_t.shape == (keep.sum(),)
    truly_7 = y[keep] == 7
    assert with_t[truly_7].sum() > without[truly_7].sum()


# ------------------------------------------------------------------------------------------------
# suspects
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suspect_frame():
    rng = np.random.default_rng(4)
    p, y = model_probs(rng, 400, mu=1.5)
    noisy = uniform_noise(rng, y, 0.4)
    thresholds = get_confident_thresholds(noisy, p.astype(np.float64))
    ood = np.zeros(400, bool)
    ood[:40] = True
    items = [(i, int(noisy[i]), f"a{i % 3}", i % 17 == 0) for i in range(400)]
    return make_frame(p, items, is_ood=ood, thresholds=thresholds)


def test_suspects_ranking_counts_and_ood(suspect_frame):
    f = suspect_frame
    out = suspects(f, NAMES, limit=1000)
    ind = f[~f["is_ood"]]
    assert out["n_feedback"] == len(f) and out["n_ood"] == int(f["is_ood"].sum()) == 40
    assert out["n_suspects"] == int(ind["suspect"].sum()) == len(out["suspects"]) > 20
    qualities = [s["quality"] for s in out["suspects"]]
    assert qualities == sorted(qualities)
    assert qualities[0] == pytest.approx(ind.loc[ind["suspect"], "quality"].min())
    # OOD feedback never in the suspects list, even when flagged at ingestion
    ood_ids = set(f.loc[f["is_ood"], "feedback_id"])
    assert f.loc[f["is_ood"], "suspect"].any()
    assert not ood_ids & {s["feedback_id"] for s in out["suspects"]}
    assert {o["feedback_id"] for o in out["ood"]} == ood_ids
    first = out["suspects"][0]
    row = f.set_index("feedback_id").loc[first["feedback_id"]]
    assert first["label"] == NAMES[row["label"]] and first["proposed"] == NAMES[row["proposed"]]
    assert first["proposed"] != first["label"]
    assert first["annotator"] == row["annotator"] and first["audited"] == bool(row["audited"])
    assert pd.Timestamp(first["received_at"]) == row["received_at"]
    assert set(first) == {"prediction_id", "feedback_id", "annotator", "label", "proposed", "quality",
                          "received_at", "audited"}


def test_suspects_filters_and_limit(suspect_frame):
    f = suspect_frame
    top = suspects(f, NAMES, limit=5)
    full = suspects(f, NAMES, limit=1000)
    assert len(top["suspects"]) == 5 and top["suspects"] == full["suspects"][:5]
    assert top["n_suspects"] == full["n_suspects"] and len(top["ood"]) == 5

    since = T0 + pd.Timedelta(seconds=200)
    late = suspects(f, NAMES, since=since.isoformat(), limit=1000)
    assert late["n_feedback"] == 200
    assert all(pd.Timestamp(s["received_at"]) >= since for s in late["suspects"])
    assert late["n_suspects"] == int((f["suspect"] & ~f["is_ood"] & (f["received_at"] >= since)).sum())
    naive = suspects(f, NAMES, since=since.tz_localize(None).to_pydatetime(), limit=1000)
    assert naive["n_suspects"] == late["n_suspects"]

    c3 = suspects(f, NAMES, class_name="c3", limit=1000)
    assert c3["n_feedback"] == int((f["label"] == 3).sum())
    assert c3["suspects"] and all(s["label"] == "c3" for s in c3["suspects"])
    with pytest.raises(ValueError, match="valid names.*'c0'"):
        suspects(f, NAMES, class_name="cat")
    with pytest.raises(ValueError, match="limit"):
        suspects(f, NAMES, limit=0)
    with pytest.raises(ValueError, match="lacks column"):
        suspects(f.drop(columns=["quality"]), NAMES)
    empty = suspects(f.iloc[:0], NAMES)
    assert empty == {"suspects": [], "ood": [], "n_feedback": 0, "n_suspects": 0, "n_ood": 0}


# ------------------------------------------------------------------------------------------------
# Noise-rate estimates: coverage of the stated intervals over seeded trials
# ------------------------------------------------------------------------------------------------

TRIALS = 200
# The intervals are exact (Clopper-Pearson based) at 95%. With 200 trials at true coverage 0.95 the
# hit count has mean 190 and sd 3.1; the issue's bar, 90% = 180 hits, sits 3.2 sd below it.
MIN_HITS = math.ceil(0.90 * TRIALS)


def _duplicate_frame(rng, eps, n_pairs=300, n_single=200):
    p, y = model_probs(rng, n_pairs + n_single)
    first, second = uniform_noise(rng, y, eps), uniform_noise(rng, y, eps)  # independent annotators
    items = []
    for i in range(n_pairs + n_single):
        items.append((i, int(first[i]), "ann-a", False))
        if i < n_pairs:
            # second annotator, anonymous half the time (an anonymous label is its own annotator)
            items.append((i, int(second[i]), "" if i % 2 else "ann-b", False))
    return make_frame(p, items)


def _audit_frame(rng, eps, n=600, n_audit=150):
    p, y = model_probs(rng, n, mu=1.5)
    noisy = uniform_noise(rng, y, eps)
    items = []
    for i in range(n):
        # predictions 0..74 carry both labels, 500..574 only an audited one
        if i < 500:
            items.append((i, int(noisy[i]), "ann", False))
        if i < n_audit // 2 or 500 <= i < 500 + n_audit // 2:
            items.append((i, int(y[i]), "expert", True))
    return make_frame(p, items)


@pytest.mark.parametrize("method,builder", [("duplicates", _duplicate_frame), ("audit", _audit_frame)])
def test_noise_rate_intervals_cover_the_injected_rate(method, builder):
    rng = np.random.default_rng(5)
    eps = 0.25
    flip = uniform_to_flip_rate(eps, K)  # the injected noise as a flip rate, the one convention
    hits, points = 0, []
    for _ in range(TRIALS):
        est = noise_rate_estimates(builder(rng, eps), K)[method]
        hits += est.lower <= flip <= est.upper
        points.append(est.flip_rate)
        assert est.method == method and not est.heuristic and est.to_dict()["convention"] == "flip"
    assert hits >= MIN_HITS, f"{method}: {hits}/{TRIALS} intervals contain the flip rate {flip}"
    # and the point estimate is centred on the truth (mean within 4 standard errors)
    assert abs(np.mean(points) - flip) < 4 * np.std(points) / math.sqrt(TRIALS) + 0.01


def test_noise_rate_estimates_keys_minimums_and_ood():
    rng = np.random.default_rng(6)
    f = _duplicate_frame(rng, 0.2)
    est = noise_rate_estimates(f, K)
    assert set(est) == {"duplicates", "confident_learning"}
    assert est["duplicates"].n == 300
    assert est["confident_learning"].heuristic and est["confident_learning"].method == "confident_learning"
    assert best_estimate(est) is est["duplicates"]
    # the heuristic alone is never the estimate used for guarantees
    assert best_estimate({"confident_learning": est["confident_learning"]}) is None
    # OOD rows are ignored entirely: garbage labels on OOD inputs change nothing
    ood = f.iloc[:200].copy()
    ood["is_ood"] = True
    ood["label"] = 0
    ood["feedback_id"] += 10_000
    ood["prediction_id"] = ood["prediction_id"] + "-ood"
    est_ood = noise_rate_estimates(pd.concat([f, ood]), K)
    assert est_ood["duplicates"] == est["duplicates"] and est_ood["confident_learning"] == est["confident_learning"]
    # below the minimum number of pairs the method is absent
    few = _duplicate_frame(rng, 0.2, n_pairs=MIN_DUPLICATE_ITEMS - 1, n_single=100)
    assert "duplicates" not in noise_rate_estimates(few, K)
    # the audit counts only predictions with both labels (75 here; the 75 audited-only ones have no
    # ordinary label to compare with)
    audit = noise_rate_estimates(_audit_frame(rng, 0.2), K)
    assert set(audit) == {"audit", "confident_learning"} and best_estimate(audit) is audit["audit"]
    assert audit["audit"].n == 75 and audit["audit"].confusion_matrix.sum() == 75
    short = noise_rate_estimates(_audit_frame(rng, 0.2, n_audit=2 * (MIN_AUDIT_ITEMS - 1)), K)
    assert "audit" not in short
    assert best_estimate({}) is None


def test_audit_estimate_pairs_the_first_ordinary_and_the_first_audited_label():
    rng = np.random.default_rng(15)
    p, y = model_probs(rng, 60)
    noisy = uniform_noise(rng, y, 0.4)
    items = []
    for i in range(60):
        items.append((i, int(noisy[i]), "ann", False))
        items.append((i, int((noisy[i] + 1) % K), "late", False))  # a later ordinary label: not used
        items.append((i, int(y[i]), "expert", True))
        if i % 3 == 0:
            items.append((i, int((y[i] + 1) % K), "expert-2", True))  # a later audited label: not used
    est = noise_rate_estimates(make_frame(p, items), K)["audit"]
    assert est == noise_rate_direct(noisy, y, K)
    assert est.flip_rate == pytest.approx(np.mean(noisy != y))


# ------------------------------------------------------------------------------------------------
# Realized coverage
# ------------------------------------------------------------------------------------------------


def test_realized_coverage_noise_correction_recovers_clean_coverage():
    rng = np.random.default_rng(7)
    n, eps, reps = 2000, 0.3, 100
    flip = uniform_to_flip_rate(eps, K)
    hits, errors, raw_errors = 0, [], []
    for _ in range(reps):
        p, y = model_probs(rng, n)
        noisy = uniform_noise(rng, y, eps)
        f = make_frame(p, [(i, int(noisy[i]), "a", False) for i in range(n)], q=0.7)
        sets = (1.0 - p) <= 0.7
        true_cov = float(sets[np.arange(n), y].mean())
        out = realized_coverage(f, flip, K, target=0.9)
        assert out["n"] == n and out["raw_lower"] <= out["raw"] <= out["raw_upper"]
        assert out["flip_rate"] == flip and out["noise_method"] == "given"
        hits += out["corrected_lower"] <= true_cov <= out["corrected_upper"]
        errors.append(out["corrected"] - true_cov)
        raw_errors.append(out["raw"] - true_cov)
    # Given the items, c~ is an average of n independent Bernoullis with mean exactly
    # (1 - eps) c + eps mean|C|/K, so the corrected estimate is unbiased with sd at most
    # 0.5 / sqrt(n) / (1 - eps) per repetition.
    sd = 0.5 / math.sqrt(n) / (1 - eps)
    assert abs(np.mean(errors)) < 4 * sd / math.sqrt(reps)
    assert np.max(np.abs(errors)) < 5 * sd
    assert np.mean(raw_errors) < -10 * sd  # the raw coverage is clearly biased: the correction matters
    # the 95% interval covers the true coverage (binomial tolerance: >= 95% - 3 sd of the hit count)
    assert hits >= 0.95 * reps - 3 * math.sqrt(reps * 0.95 * 0.05)


def test_realized_coverage_corrects_only_with_non_heuristic_estimates():
    rng = np.random.default_rng(16)
    f = _duplicate_frame(rng, 0.2)
    est = noise_rate_estimates(f, K)
    with_dup = realized_coverage(f, est["duplicates"], K, target=0.9)
    same = realized_coverage(f, est["duplicates"].flip_rate, K, target=0.9)
    assert with_dup["corrected"] == same["corrected"] and with_dup["corrected"] > with_dup["raw"]
    assert with_dup["noise_method"] == "duplicates" and with_dup["flip_rate"] == est["duplicates"].flip_rate
    assert "duplicates estimate, not a heuristic" in with_dup["correction"]
    with pytest.raises(ValueError, match="heuristic"):
        realized_coverage(f, est["confident_learning"], K, target=0.9)
    none = realized_coverage(f, best_estimate({"confident_learning": est["confident_learning"]}), K, target=0.9)
    assert none["corrected"] is None and none["corrected_upper"] is None and not none["below_target"]
    assert none["flip_rate"] is None and none["correction"].startswith("none: no non-heuristic")
    assert none["raw"] == with_dup["raw"]


def test_realized_coverage_flags_and_edges():
    rng = np.random.default_rng(8)
    p, y = model_probs(rng, 1000)
    f = make_frame(p, [(i, int(y[i]), "a", False) for i in range(1000)], q=0.5)
    clean = realized_coverage(f, 0.0, K, target=0.9)
    assert clean["corrected"] == clean["raw"] and clean["audited"]["n"] == 0
    low = clean["raw_upper"] - 0.01  # a target under the interval: not below
    assert not realized_coverage(f, 0.0, K, target=low)["below_target"]
    # the point estimate below target but the interval reaching it: not flagged
    assert not realized_coverage(f, 0.0, K, target=clean["raw"] + 0.005)["below_target"]
    assert realized_coverage(f, 0.0, K, target=min(clean["raw_upper"] + 0.01, 0.99))["below_target"]
    # OOD rows and audited rows are left out of the noisy estimate; audited ones reported apart,
    # with their own check against the target (no assumption needed)
    g = f.copy()
    g.loc[:99, "is_ood"] = True
    g.loc[100:199, "audited"] = True
    out = realized_coverage(g, 0.1, K, target=0.9)
    assert out["n"] == 800 and out["audited"]["n"] == 100
    assert out["audited"]["coverage"] == pytest.approx(g.loc[100:199, "in_set"].mean())
    assert out["audited"]["below_target"] == (out["audited"]["upper"] < 0.9)
    assert realized_coverage(g, 0.1, K, target=0.99)["audited"]["below_target"]
    none = realized_coverage(f.iloc[:0], 0.1, K, target=0.9)
    assert none["n"] == 0 and none["corrected"] is None and not none["below_target"]
    # a flip rate of (K-1)/K or more leaves nothing to correct; negative rates and targets of 1 are errors
    for bad in ({"noise": 0.9}, {"noise": -0.1}, {"target": 1.0}):
        kw = {"noise": 0.1, "target": 0.9, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            realized_coverage(f, kw["noise"], K, target=kw["target"])


# ------------------------------------------------------------------------------------------------
# Recalibration
# ------------------------------------------------------------------------------------------------


def _recal_frame(rng, n=1000, eps=0.2, n_dup=300, n_audit=0, weights="w1", start=T0, id_offset=0):
    p, y = model_probs(rng, n, mu=1.5)
    first, second = uniform_noise(rng, y, eps), uniform_noise(rng, y, eps)
    items = []
    for i in range(n):
        items.append((i, int(first[i]), "ann-a", False))
        if i < n_dup:
            items.append((i, int(second[i]), "ann-b", False))
        if i < n_audit:
            items.append((i, int(y[i]), "expert", True))
    order = rng.permutation(len(items))  # arrivals interleave
    return make_frame(p, [items[j] for j in order], weights=weights, start=start, id_offset=id_offset)


@pytest.mark.parametrize("n_audit,method,given", [(0, "split", None), (200, "audit", None), (0, "nacp", 0.18)])
def test_recalibrated_sets_cover_clean_labels(n_audit, method, given):
    rng = np.random.default_rng(9)
    cal = calibration(alpha=0.1)
    splits, n_test, n = 100, 2000, 1000
    coverages = []
    explicit = {} if given is None else {"noise_flip_rate": given, "assume_uniform_noise": True}
    for _ in range(splits):
        rec = recalibrated_threshold(_recal_frame(rng, n=n, eps=0.2, n_audit=n_audit), cal, **explicit)
        assert isinstance(rec, Recalibration) and rec.method == method and rec.n == n
        p_test, y_test = model_probs(rng, n_test, mu=1.5)
        coverages.append(float(np.mean(1.0 - p_test[np.arange(n_test), y_test] <= rec.threshold.q)))
    # Marginal validity: the mean coverage over splits must reach the target within 3 standard
    # errors of that mean. The split-to-split sd is at least that of split CP on n clean labels
    # plus the test sampling, sqrt(alpha (1 - alpha) (1/n + 1/n_test)); the audit term adds its own
    # variance, so the larger of that floor and the observed sd is used. (Uniform noise is
    # dispersive, so split conformal on the noisy labels is conservative here.)
    sd = max(math.sqrt(0.09 / n + 0.09 / n_test), float(np.std(coverages, ddof=1)))
    assert np.mean(coverages) >= 0.9 - 3 * sd / math.sqrt(splits), (method, np.mean(coverages))
    assert rec.threshold.q < 1.0 and not rec.threshold.full_sets
    record = rec.to_dict()
    assert record["guarantee_kind"] == rec.guarantee_kind and record["condition"] == rec.condition
    if method == "split":
        # no noise rate is used: split CP on the observed labels, conservative under a stated condition
        assert rec.eps is None and rec.threshold.method == "split" and rec.guarantee_kind == "conservative"
        assert "dispersive" in rec.condition and "audited" in rec.condition
        assert rec.noise["best"]["method"] == "duplicates"  # reported, not used
        # it pays for the noise with larger sets than the noise-aware methods
        assert np.mean(coverages) > 0.95
    elif method == "audit":
        assert rec.guarantee_kind == "valid" and "no noise model" in rec.condition
        assert rec.n_audited == n_audit and rec.eps is None and rec.threshold.m == n_audit
        assert np.mean(coverages) < 0.98  # informative sets
    else:
        assert rec.guarantee_kind == "conservative" and "uniform" in rec.condition and f"{given:g}" in rec.condition
        assert rec.eps == pytest.approx(flip_rate_to_uniform(given, K)) and rec.threshold.eps == rec.eps
        assert np.mean(coverages) < 0.98


def test_recalibration_refusals_and_explicit_noise_arguments():
    rng = np.random.default_rng(10)
    cal = calibration(alpha=0.1)
    small = _recal_frame(rng, n=80, n_dup=60)
    with pytest.raises(RecalibrationRefused, match="too little feedback: 80 labelled predictions") as err:
        recalibrated_threshold(small, cal)
    assert "\n" not in err.value.reason and isinstance(err.value, ValueError)
    assert required_items(0.1, 0.0) == MIN_RECALIBRATION_ITEMS
    assert required_items(0.1, 0.0, min_items=5) == 9  # ceil((1 - alpha) / alpha)
    # an explicit lower floor accepts the same feedback
    rec = recalibrated_threshold(small, cal, min_items=50)
    assert rec.n == 80 and rec.method == "split"
    # no noise-rate estimate at all (no duplicates, no audit, too few labels for the heuristic):
    # split conformal needs none, and nothing heuristic is plugged in
    bare = recalibrated_threshold(_recal_frame(rng, n=40, n_dup=0), cal, min_items=10)
    assert bare.method == "split" and bare.noise["best"] is None and bare.eps is None
    # NACP only with an explicit rate AND an explicit uniform noise model
    with pytest.raises(ValueError, match="assume_uniform_noise=True"):
        recalibrated_threshold(small, cal, min_items=50, noise_flip_rate=0.1)
    with pytest.raises(ValueError, match="needs `noise_flip_rate`"):
        recalibrated_threshold(small, cal, min_items=50, assume_uniform_noise=True)
    with pytest.raises(ValueError, match="noise_flip_rate"):
        recalibrated_threshold(small, cal, min_items=50, noise_flip_rate=0.95, assume_uniform_noise=True)
    # NACP needs more items as the rate grows: 1/h^2 times the finite-quantile count
    assert required_items(0.1, flip_rate_to_uniform(0.5, K)) > MIN_RECALIBRATION_ITEMS
    # the finite-sample margin pushes tau above 1 on few items: full sets are refused
    with pytest.raises(RecalibrationRefused, match="full label sets"):
        recalibrated_threshold(_recal_frame(rng, n=150, n_dup=150), calibration(conformal="finite-sample"),
                               noise_flip_rate=0.5, assume_uniform_noise=True)
    ood_only = small.assign(is_ood=True)
    with pytest.raises(RecalibrationRefused, match="no in-distribution feedback"):
        recalibrated_threshold(ood_only, cal)
    with pytest.raises(ValueError, match="window"):
        recalibrated_threshold(small, cal, window=0)


def test_recalibration_finite_sample_split_is_calibration_conditional():
    rng = np.random.default_rng(17)
    frame = _recal_frame(rng, n=600, n_dup=0)
    plugin = recalibrated_threshold(frame, calibration())
    conditional = recalibrated_threshold(frame, calibration(conformal="finite-sample"))
    assert plugin.threshold.method == "split" and conditional.threshold.method == "split_conditional"
    assert conditional.threshold.q >= plugin.threshold.q and conditional.threshold.delta == 0.001
    assert "with probability >= 1 - delta" in conditional.condition


def test_recalibration_uses_one_weights_and_the_window():
    rng = np.random.default_rng(11)
    cal = calibration(alpha=0.1)
    old = _recal_frame(rng, n=400, n_dup=200, weights="old")
    new = _recal_frame(rng, n=600, n_dup=300, weights="new", start=T0 + pd.Timedelta(days=1), id_offset=10_000)
    # older weights with probabilities that would wreck the threshold if they were mixed in
    old["probs"] = [np.full(K, 1.0 / K, dtype=np.float32)] * len(old)
    both = pd.concat([old, new], ignore_index=True)
    rec = recalibrated_threshold(both, cal)
    only_new = recalibrated_threshold(new, cal)
    assert rec.weights == "new" and rec.n == 600 and rec.n_feedback == len(new)
    assert rec.threshold.q == only_new.threshold.q
    rec_old = recalibrated_threshold(both, cal, weights="old")
    assert rec_old.weights == "old" and rec_old.n == 400
    # the window keeps the last N feedback items by received_at (of the chosen weights)
    windowed = recalibrated_threshold(both, cal, window=500)
    assert windowed.n_feedback == 500
    last = new.sort_values("received_at").tail(500)
    assert windowed.n == last["prediction_id"].nunique()


def test_recalibration_prefers_the_audit_when_it_suffices():
    rng = np.random.default_rng(12)
    cal = calibration(alpha=0.1)
    enough = recalibrated_threshold(_recal_frame(rng, n=800, n_audit=MIN_AUDITED_FOR_RECTIFIED), cal)
    assert enough.method == "audit" and enough.threshold.method == "audit_rectified"
    assert enough.noise["best"]["method"] == "audit"
    assert enough.guarantee_kind == "valid"
    few = recalibrated_threshold(_recal_frame(rng, n=800, n_audit=MIN_AUDITED_FOR_RECTIFIED - 1), cal)
    assert few.method == "split" and few.n_audited == MIN_AUDITED_FOR_RECTIFIED - 1
    assert few.guarantee_kind == "conservative" and f"only {MIN_AUDITED_FOR_RECTIFIED - 1} audited" in few.note
    assert few.noise["best"]["method"] == "audit"  # 49 audited items still feed the noise-rate estimate
    # the audit wins over an explicitly given rate: it removes the noise assumption
    both = recalibrated_threshold(_recal_frame(rng, n=800, n_audit=MIN_AUDITED_FOR_RECTIFIED), cal,
                                  noise_flip_rate=0.2, assume_uniform_noise=True)
    assert both.method == "audit" and both.eps is None and "not needed" in both.note
    # APS follows MAPIE's calibration convention (randomized, seeded): reproducible
    aps = calibration(score="aps")
    frame = _recal_frame(rng, n=500)
    assert recalibrated_threshold(frame, aps).threshold.q == recalibrated_threshold(frame, aps).threshold.q


def test_feedback_columns_contract():
    rng = np.random.default_rng(13)
    f = _recal_frame(rng, n=20, n_dup=0)
    assert list(f.columns) == list(FEEDBACK_COLUMNS)

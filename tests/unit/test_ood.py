"""Tests of models/uncertainty/ood.py: scorers (parity with pytorch-ood, interface, separation) and
the conformal OOD gate (exact p-values, false-OOD rate, uniformity)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from scipy import stats

from noisewise.models.uncertainty.ood import (
    OOD_SCORERS,
    KNNScorer,
    MahalanobisScorer,
    OODGate,
    OODScorer,
    ViMScorer,
    build_ood_scorer,
)

ALL = sorted(OOD_SCORERS)
FITTED = sorted(n for n, c in OOD_SCORERS.items() if c.requires_fit)
FEATURE_SCORERS = sorted(n for n, c in OOD_SCORERS.items() if "features" in c.uses)
# small parameters so every scorer fits on the little synthetic sets below
SMALL = {"knn": {"k": 5}}


def make_id_data(seed: int, n_per_class: int = 40, k: int = 4, d: int = 32, dtype=torch.float32):
    """ID features: class c has mean 3 on dims 4c..4c+3 (signal spread over several units, as in a
    real penultimate layer; ReAct's clipping needs that); noise sd 1 on dims 0..15 and 0.1 on dims
    16..31, so the principal subspace is dims 0..15. The head is linear with rows = class means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(k, d, dtype=torch.float64)
    for c in range(k):
        means[c, 4 * c : 4 * c + 4] = 3.0
    labels = torch.arange(k).repeat_interleave(n_per_class)
    sd = torch.cat([torch.ones(d // 2), torch.full((d - d // 2,), 0.1)]).to(torch.float64)
    feats = means[labels] + torch.randn(len(labels), d, generator=g, dtype=torch.float64) * sd
    weight = means.clone()
    bias = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    return feats.to(dtype), labels, (weight.to(dtype), bias.to(dtype))


def make_ood_data(seed: int, n: int = 100, d: int = 32, dtype=torch.float32):
    """A far cluster off the ID principal subspace (dims 16..31)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.zeros(d, dtype=torch.float64)
    mean[d // 2 :] = 2.0
    return (mean + torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def logits_of(features, head):
    weight, bias = head
    return features @ weight.T + bias


def fitted(name: str, seed: int = 0, dtype=torch.float32, **params) -> OODScorer:
    feats, labels, head = make_id_data(seed, dtype=dtype)
    scorer = build_ood_scorer(name, **{**SMALL.get(name, {}), **params})
    return scorer.fit(feats, logits_of(feats, head), labels, head=head)


def query(seed: int = 1, n: int = 30, dtype=torch.float32):
    feats, _, head = make_id_data(seed, n_per_class=n // 4, dtype=dtype)
    _, _, head0 = make_id_data(0, dtype=dtype)  # logits from the fitted head
    x = torch.cat([feats, make_ood_data(seed, n=6, dtype=dtype)])
    return x, logits_of(x, head0)


# ---------------------------------------------------------------------------------------------
# pytorch-ood as a test oracle
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pood():
    """``pytorch_ood.detector`` from pytorch-ood 0.4.0 (test oracle only), loaded without torchvision.

    ``import pytorch_ood`` runs the package ``__init__``, which imports its ``model`` and ``dataset``
    subpackages, and those import torchvision at top level; PyPI's torchvision wheels do not load
    beside this machine's torch 2.13.0 CPU build ("operator torchvision::nms does not exist"), and
    torch must not change. The code we compare against (``detector/``, ``api.py``, ``utils/``) imports
    only torch, numpy, typing_extensions and (for KNN) scikit-learn. So, only when plain import
    fails, this fixture registers an empty package object named ``pytorch_ood`` whose ``__path__`` is
    the installed source directory (its ``__init__.py`` is skipped) and imports
    ``pytorch_ood.detector`` through the normal machinery. Nothing stands in for torchvision, and
    every ``pytorch_ood*`` entry it added to ``sys.modules`` is removed at teardown.
    """
    spec = importlib.util.find_spec("pytorch_ood")  # locates the package without executing it
    if spec is None:
        pytest.skip("pytorch-ood is not installed (test oracle: pip install pytorch-ood==0.4.0)")
    before = set(sys.modules)
    try:
        detector = importlib.import_module("pytorch_ood.detector")
    except ImportError:
        for key in set(sys.modules) - before:
            del sys.modules[key]
        package = types.ModuleType("pytorch_ood")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["pytorch_ood"] = package
        detector = importlib.import_module("pytorch_ood.detector")
    yield detector
    for key in [k for k in set(sys.modules) - before if k == "pytorch_ood" or k.startswith("pytorch_ood.")]:
        del sys.modules[key]


def test_parity_logit_scorers(pood):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 7, generator=g, dtype=torch.float64) * 4
    torch.testing.assert_close(build_ood_scorer("msp").score(None, logits), pood.MaxSoftmax.score(logits))
    torch.testing.assert_close(
        build_ood_scorer("msp", temperature=2.5).score(None, logits), pood.MaxSoftmax.score(logits, t=2.5)
    )
    torch.testing.assert_close(build_ood_scorer("maxlogit").score(None, logits), pood.MaxLogit.score(logits))
    torch.testing.assert_close(build_ood_scorer("energy").score(None, logits), pood.EnergyBased.score(logits))
    torch.testing.assert_close(
        build_ood_scorer("energy", temperature=3.0).score(None, logits), pood.EnergyBased.score(logits, t=3.0)
    )


def test_parity_knn_through_exact_transform(pood):
    # pytorch-ood: Euclidean distance of normalized vectors (sklearn NearestNeighbors, float64);
    # ours: cosine distance 1 - <q, b>. For unit vectors ||q - b||^2 = 2 - 2<q, b> = 2 d_cos.
    train, labels, _ = make_id_data(0)
    x, _ = query()
    ref = pood.KNN(None, k=7).fit_features(train, labels).predict_features(x)
    ours = build_ood_scorer("knn", k=7).fit(train).score(x)
    torch.testing.assert_close(ours.double(), ref**2 / 2, atol=2e-6, rtol=0)
    # k = 1 on the training items themselves: the nearest neighbour is the item, distance 0
    assert build_ood_scorer("knn", k=1).fit(train).score(train).abs().max() < 1e-5


def test_parity_mahalanobis_through_exact_transform(pood):
    # pytorch-ood: 0.5 min_c (f - mu_c)^T S^-1 (f - mu_c) with S = the within-class scatter sum
    # (N Sigma) + 1e-6 I, in float32. Ours with shrinkage=0 uses Sigma = S / N and no 1/2: so
    # ours = 2 N * theirs up to the 1e-6 ridge (relative effect ~1e-6 / (N lambda_min) < 1e-7).
    train, labels, _ = make_id_data(0, dtype=torch.float64)
    x, _ = query(dtype=torch.float64)
    # (pytorch-ood's Mahalanobis works in float32 only; ours gets the same values in float64.)
    ref = pood.Mahalanobis(None).fit_features(train.float(), labels).predict_features(x.float()).double()
    ours = build_ood_scorer("mahalanobis", shrinkage=0.0).fit(train, None, labels).score(x)
    torch.testing.assert_close(ours, 2 * len(train) * ref, rtol=1e-4, atol=1e-3)


def test_parity_vim(pood):
    train, labels, head = make_id_data(0)
    x, logits = query()
    ref_det = pood.ViM(None, d=16, w=head[0], b=head[1]).fit_features(train, labels)
    ref = ref_det.predict_features(x)
    ours = build_ood_scorer("vim", dim=16).fit(train, logits_of(train, head), head=head)
    assert ours.config()["alpha"] == pytest.approx(ref_det.alpha, rel=1e-4)
    torch.testing.assert_close(ours.score(x, logits), ref, rtol=1e-4, atol=1e-3)
    # default dim = D // 2 = 16 for D = 32 (ViM reference rule)
    assert build_ood_scorer("vim").fit(train, None, head=head).config()["dim_used"] == 16


def test_parity_react(pood):
    train, labels, head = make_id_data(0)
    x, _ = query()
    for percentile in (0.9, 0.75):
        ref_det = pood.ReAct(backbone=None, head=lambda f: logits_of(f, head), percentile=percentile)
        ref_det.fit_feature_maps(train, labels)
        ours = build_ood_scorer("react", percentile=percentile).fit(train, None, head=head)
        assert ours.config()["threshold"] == pytest.approx(ref_det.threshold, rel=1e-6)
        torch.testing.assert_close(ours.score(x), ref_det.predict_feature_maps(x), rtol=1e-5, atol=1e-5)


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import LedoitWolf

    train, labels, _ = make_id_data(2, n_per_class=10, dtype=torch.float64)  # N = 40 < 2 D: shrinkage matters
    scorer = build_ood_scorer("mahalanobis").fit(train, None, labels)
    means = scorer.state_dict()["means"]
    resid = (train - means[labels]).numpy()
    lw = LedoitWolf(assume_centered=True).fit(resid)
    assert scorer.config()["shrinkage_used"] == pytest.approx(lw.shrinkage_, rel=1e-10)
    chol = scorer.state_dict()["cholesky"]
    np.testing.assert_allclose((chol @ chol.T).numpy(), lw.covariance_, rtol=1e-10, atol=1e-12)
    assert 0.05 < lw.shrinkage_ < 1  # a real shrinkage, not a degenerate case


def test_mahalanobis_equals_per_class_reference():
    train, labels, _ = make_id_data(0, dtype=torch.float64)
    x, _ = query(dtype=torch.float64)
    scorer = build_ood_scorer("mahalanobis", shrinkage=0.3).fit(train, None, labels)
    chol = scorer.state_dict()["cholesky"]
    precision = torch.linalg.inv(chol @ chol.T)
    ref = torch.stack(
        [((x - mu) @ precision * (x - mu)).sum(1) for mu in scorer.state_dict()["means"]], dim=1
    ).amin(1)
    torch.testing.assert_close(scorer.score(x), ref, rtol=1e-9, atol=1e-9)
    # classes absent from labels get no mean, the others keep theirs
    keep = labels != 2
    partial = build_ood_scorer("mahalanobis").fit(train[keep], None, labels[keep])
    assert partial.config()["classes"] == [0, 1, 3]


def test_knn_chunking_matches_brute_force():
    train, _, _ = make_id_data(0)
    x, _ = query()
    cosine = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(train).T
    brute = (1 - cosine).sort(dim=1).values[:, 9]  # the 10th smallest distance
    for chunk in (7, 50, 4096):  # 7 < k: the running top-k merges partial blocks
        scorer = KNNScorer(k=10, chunk_size=chunk).fit(train)
        torch.testing.assert_close(scorer.score(x), brute, rtol=0, atol=1e-6)
    assert scorer.state_dict()["bank"].dtype == torch.float32  # fp32 on CPU


# ---------------------------------------------------------------------------------------------
# the common interface, over the whole registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_gives_identical_scores(name):
    scorer = fitted(name)
    x, logits = query()
    config = json.loads(json.dumps(scorer.config()))  # must be JSON
    state = {k: v.clone() for k, v in scorer.state_dict().items()}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(type(scorer)._state_keys)
    for loader in (OODScorer, type(scorer)):
        restored = loader.from_state(config, state)
        assert type(restored) is type(scorer) and restored.params() == scorer.params()
        assert torch.equal(restored.score(x, logits), scorer.score(x, logits))


@pytest.mark.parametrize("name", ALL)
def test_float32_cpu_shapes_and_batch_invariance(name):
    scorer = fitted(name)
    x, logits = query()
    scores = scorer.score(x, logits)
    assert scores.shape == (len(x),) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat([scorer.score(x[i : i + 1], logits[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(scores, one_by_one, rtol=1e-5, atol=1e-5)
    assert scorer.score(x[:0], logits[:0]).shape == (0,)
    assert scorer.to("cpu") is scorer and scorer.device.type == "cpu"


@pytest.mark.parametrize("name", ALL)
def test_float64_inputs_keep_float64(name):
    scorer = fitted(name, dtype=torch.float64)
    x, logits = query(dtype=torch.float64)
    expected = torch.float32 if name == "knn" else torch.float64  # the knn bank is fp32/fp16 by design
    assert scorer.score(x, logits).dtype == expected


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_value_error_naming_the_argument(name):
    scorer = fitted(name)
    x, logits = query()
    with pytest.raises(ValueError, match="features"):
        scorer.score(x[0], logits)
    with pytest.raises(ValueError, match="logits"):
        scorer.score(x, logits[None])
    with pytest.raises(ValueError, match="same number of rows"):
        scorer.score(x, logits[:-1])
    with pytest.raises(ValueError, match="features must be a torch.Tensor"):
        scorer.score(x.numpy(), logits)
    needed = scorer.uses[0]
    with pytest.raises(ValueError, match=f"{needed} is None"):
        scorer.score(**{"features": x, "logits": logits, needed: None})
    with pytest.raises(ValueError, match="unknown parameter"):
        build_ood_scorer(name, nonsense=1)


@pytest.mark.parametrize("name", FITTED)
def test_unfitted_scorer_raises(name):
    scorer = build_ood_scorer(name)
    x, logits = query()
    with pytest.raises(ValueError, match="not fitted"):
        scorer.score(x, logits)
    assert scorer.config()["fitted"] is False and scorer.state_dict() == {}
    with pytest.raises(ValueError, match="features is None"):
        scorer.fit(None, logits)
    # an unfitted config round-trips to an unfitted scorer
    assert not OODScorer.from_state(scorer.config(), {}).is_fitted


@pytest.mark.parametrize("name", sorted(n for n, c in OOD_SCORERS.items() if not c.requires_fit))
def test_stateless_scorers_score_without_fit(name):
    _, logits = query()
    assert build_ood_scorer(name).score(None, logits).shape == (len(logits),)


def test_fit_requirements_and_parameters():
    train, labels, head = make_id_data(0)
    with pytest.raises(ValueError, match="unknown OOD scorer name 'nope'; valid names: \\['energy'"):
        build_ood_scorer("nope")
    with pytest.raises(ValueError, match="labels is None"):
        MahalanobisScorer().fit(train)
    with pytest.raises(ValueError, match="labels must have shape"):
        MahalanobisScorer().fit(train, None, labels[:-1])
    for name in ("vim", "react"):
        with pytest.raises(ValueError, match="head is None"):
            build_ood_scorer(name).fit(train)
        with pytest.raises(ValueError, match="head weight must have shape"):
            build_ood_scorer(name).fit(train, None, head=(head[0][:, :5], head[1]))
        with pytest.raises(ValueError, match="head bias"):
            build_ood_scorer(name).fit(train, None, head=(head[0], head[1][:2]))
    with pytest.raises(ValueError, match="k=500 exceeds"):
        KNNScorer(k=500).fit(train)
    with pytest.raises(ValueError, match="dim must satisfy"):
        ViMScorer(dim=32).fit(train, None, head=head)
    with pytest.raises(ValueError, match="singular"):  # D = 32 > N = 8: needs shrinkage
        MahalanobisScorer(shrinkage=0.0).fit(train[::20], None, labels[::20])
    bad_params = [
        ("knn", "k", 0),
        ("knn", "chunk_size", -1),
        ("energy", "temperature", 0),
        ("msp", "temperature", float("inf")),
        ("mahalanobis", "shrinkage", 1.5),
        ("mahalanobis", "shrinkage", "oas"),
        ("react", "percentile", 90),
        ("vim", "dim", 0),
    ]
    for name, param, value in bad_params:
        with pytest.raises(ValueError, match=param):
            build_ood_scorer(name, **{param: value})
    with pytest.raises(ValueError, match="config\\['name'\\]"):
        KNNScorer.from_state({"name": "vim", "params": {}}, {})
    state = fitted("knn").state_dict()
    with pytest.raises(ValueError, match="lacks \\['bank'\\]"):
        OODScorer.from_state(fitted("knn").config(), {k: v for k, v in state.items() if k != "bank"})


@pytest.mark.parametrize("name", FEATURE_SCORERS)
def test_feature_scorers_separate_a_far_cluster(name):
    # sanity, not a benchmark: ID Gaussian clusters vs a cluster off their principal subspace
    from sklearn.metrics import roc_auc_score

    scorer = fitted(name)
    x_id, _, _ = make_id_data(7, n_per_class=50)
    x_ood = make_ood_data(8, n=200)
    _, _, head = make_id_data(0)
    x = torch.cat([x_id, x_ood])
    scores = scorer.score(x, logits_of(x, head)).numpy()
    auroc = roc_auc_score(np.r_[np.zeros(len(x_id)), np.ones(len(x_ood))], scores)
    assert auroc > 0.95, f"{name}: AUROC {auroc:.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    scorer = fitted(name)
    x, logits = query()
    cpu = scorer.score(x, logits)
    scorer.to("cuda")
    if name == "knn":
        assert scorer.state_dict()["bank"].dtype == torch.float16  # fp16 bank on GPU
    got = scorer.score(x.cuda(), logits.cuda())
    assert got.device.type == "cuda"
    # fp16 cosines of unit vectors: ~1e-3 absolute
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-4, atol=2e-3 if name == "knn" else 1e-4)
    restored = OODScorer.from_state(scorer.config(), scorer.state_dict())
    assert restored.device.type == "cuda" and torch.equal(restored.score(x.cuda(), logits.cuda()), got)


# ---------------------------------------------------------------------------------------------
# the conformal gate
# ---------------------------------------------------------------------------------------------


def test_gate_p_values_by_hand():
    gate = OODGate(torch.tensor([3.0, 1.0, 4.0, 2.0]), alpha_ood=0.2)  # sorted: 1 2 3 4, n = 4
    s = torch.tensor([0.0, 1.0, 2.5, 4.0, 4.5])
    # #{s_i >= s} = 4, 4, 2, 1, 0  ->  p = 5/5, 5/5, 3/5, 2/5, 1/5
    expected = torch.tensor([5, 5, 3, 2, 1]) / 5
    torch.testing.assert_close(gate.p_value(s), expected, rtol=0, atol=0)
    assert gate.is_ood(s).tolist() == [False, False, False, False, True]  # p = 1/5 <= 0.2 is flagged
    p, flag = gate(s)
    assert torch.equal(p, gate.p_value(s)) and torch.equal(flag, gate.is_ood(s))
    # ties count as ">=": calibration 1 1 2, s = 1 -> (1 + 3)/4, s = 2 -> (1 + 1)/4
    with pytest.warns(UserWarning, match="no input can be flagged"):  # n = 3 < 1/alpha - 1
        tied = OODGate(torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(tied.p_value(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 0.5]))


def test_gate_boundary_state_and_errors():
    cal = torch.arange(19, dtype=torch.float32)  # n = 19: smallest p = 1/20 = alpha exactly
    gate = OODGate(cal, alpha_ood=0.05)
    assert gate.is_ood(torch.tensor([18.5, 18.0])).tolist() == [True, False]
    restored = OODGate.from_state(json.loads(json.dumps(gate.config())), gate.state_dict())
    s = torch.linspace(-1, 20, 50)
    assert torch.equal(restored.p_value(s), gate.p_value(s)) and restored.alpha_ood == 0.05
    with pytest.warns(UserWarning, match="no input can be flagged"):
        OODGate(cal[:10], alpha_ood=0.05)
    with pytest.raises(ValueError, match="alpha_ood"):
        OODGate(cal, alpha_ood=1.5)
    with pytest.raises(ValueError, match="calibration_scores must be a 1-D"):
        OODGate(cal[None])
    with pytest.raises(ValueError, match="calibration_scores must all be finite"):
        OODGate(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="calibration_scores is empty"):
        OODGate(cal[:0])
    with pytest.raises(ValueError, match="scores must be a 1-D"):
        gate.p_value(s[None])
    with pytest.raises(ValueError, match="n"):
        OODGate.from_state({"alpha_ood": 0.05, "n": 3}, gate.state_dict())


def _gate_draws(rng: np.random.Generator, draws: int, n: int, alpha: float, sampler) -> np.ndarray:
    """p-value of one fresh ID point per draw, each draw with fresh calibration scores."""
    scores = torch.from_numpy(sampler(rng, (draws, n + 1)))
    return np.array([OODGate(row[:n], alpha).p_value(row[n:]).item() for row in scores])


@pytest.mark.parametrize(
    "n, sampler, continuous",
    [
        (39, lambda rng, size: rng.standard_normal(size), True),  # alpha (n + 1) = 2: exact rate = alpha
        (30, lambda rng, size: rng.exponential(size=size), True),  # exact rate floor(1.55) / 31 = 0.032
        (39, lambda rng, size: rng.integers(0, 6, size=size).astype(np.float64), False),  # ties
    ],
    ids=["normal-n39", "exponential-n30", "ties-n39"],
)
def test_gate_false_ood_rate_is_at_most_alpha(n, sampler, continuous):
    # Each draw is an independent Bernoulli(r) event "fresh ID point flagged", with
    # r = floor(alpha (n + 1)) / (n + 1) <= alpha for continuous exchangeable scores (<= r with ties).
    # Over R draws the flag rate has sd sqrt(r (1 - r) / R); with R = 10_000 and r <= 0.05 that is
    # <= 0.0022, so the bound alpha + 3.29 sd fails a valid gate with probability <= 5e-4 (one-sided
    # normal tail; the normal approximation is good at R r >= 300). The two-sided check against r
    # itself (continuous case) catches a gate that is too conservative as well as one that is invalid.
    alpha, draws = 0.05, 10_000
    p = _gate_draws(np.random.default_rng(n), draws, n, alpha, sampler)
    rate = float(np.mean(p <= alpha + 1e-12))
    r = math.floor(alpha * (n + 1)) / (n + 1)
    tol = 3.29 * math.sqrt(max(r, 1e-3) * (1 - r) / draws)
    assert rate <= alpha + 3.29 * math.sqrt(alpha * (1 - alpha) / draws)
    assert rate <= r + tol
    if continuous:  # the rate is exactly r in expectation
        assert rate >= r - tol


def test_gate_p_values_are_uniform():
    # With continuous exchangeable scores the p-value is uniform on {1/(n+1), ..., 1}: Pearson
    # chi-square over the n + 1 = 20 values, R = 10_000 draws (500 expected per cell, far above the
    # >= 5 rule), 19 degrees of freedom; reject at 1e-3.
    n, draws = 19, 10_000
    p = _gate_draws(np.random.default_rng(11), draws, n, 0.05, lambda rng, size: rng.standard_normal(size))
    counts = np.bincount(np.rint(p * (n + 1)).astype(int) - 1, minlength=n + 1)
    assert counts.sum() == draws and len(counts) == n + 1
    assert stats.chisquare(counts).pvalue > 1e-3
    # the check has power: p-values shifted up by one step (a gate too conservative by one
    # calibration item) are rejected
    biased = np.minimum(p + 1 / (n + 1), 1.0)
    biased_counts = np.bincount(np.rint(biased * (n + 1)).astype(int) - 1, minlength=n + 1)
    assert stats.chisquare(biased_counts).pvalue < 1e-3

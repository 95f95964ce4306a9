"""The fast paths of the conformity scores and of NACP against simple reference implementations.

The references are the straightforward forms: per-label rank masses built with a full sort, a
scatter per quantity and a cummax tie-block search (the scores), and one sort of all n*K scores
(NACP). The fast code must give the same numbers on random inputs of many shapes, with ties, in
several row blocks and through every level of NACP's bucket counting.
"""

import math

import numpy as np
import pytest
import torch
from noisewise.models.uncertainty import conformal
from noisewise.models.uncertainty.conformal import (
    aps_scores,
    lac_scores,
    nacp_threshold,
    raps_scores,
)


def _reference_rank_masses(probs):
    n, k = probs.shape
    sorted_p, order = probs.sort(dim=1, descending=True)
    cums = sorted_p.cumsum(dim=1).clamp_max(1.0)
    excl = torch.nn.functional.pad(cums[:, :-1], (1, 0))
    idx = torch.arange(k).expand(n, k)
    differs = sorted_p[:, 1:] != sorted_p[:, :-1]
    starts_block = torch.nn.functional.pad(differs, (1, 0), value=True)
    ends_block = torch.nn.functional.pad(differs, (0, 1), value=True)
    start = torch.where(starts_block, idx, 0).cummax(dim=1).values
    end = (k - 1) - torch.where(ends_block, (k - 1) - idx, 0).flip(1).cummax(dim=1).values.flip(1)

    def unsort(values):
        return torch.empty_like(values).scatter_(1, order, values)

    return (unsort(excl.gather(1, start)), unsort(cums.gather(1, end)),
            unsort(start.to(probs.dtype)), unsort((end + 1).to(probs.dtype)))


def _reference_scores(name, probs, u=1.0, include_last_label=False, lam=0.0, k_reg=0):
    if name == "lac":
        return 1.0 - probs
    if include_last_label:
        u = 0.0
    above, through, count_above, count_through = _reference_rank_masses(probs)
    score = above + u * (through - above)
    if name == "raps":
        rank = count_above if include_last_label else count_through
        score = score + lam * (rank - k_reg).clamp(min=0)
    return score


def _random_probs(rng, n, k, ties, dtype=torch.float64):
    logits = rng.normal(size=(n, k)) * rng.uniform(0.1, 8.0, size=(n, 1))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    if ties:  # rounded probabilities: many tied values, including whole rows and exact zeros
        probs = np.round(probs * rng.integers(1, 6), 0) + (rng.random((n, 1)) < 0.2)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return torch.tensor(probs, dtype=dtype)


CASES = [(n, k, ties) for n, k in [(1, 2), (7, 2), (40, 3), (33, 10), (128, 57), (20, 300)] for ties in (False, True)]


@pytest.mark.parametrize("n,k,ties", CASES)
def test_scores_equal_reference_over_seeds(n, k, ties):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        probs = _random_probs(rng, n, k, ties)
        u = torch.tensor(rng.random(n), dtype=torch.float64)
        lam, k_reg = float(rng.uniform(0, 0.5)), int(rng.integers(0, k + 1))
        checks = [
            (lac_scores(probs), _reference_scores("lac", probs)),
            (aps_scores(probs), _reference_scores("aps", probs)),
            (aps_scores(probs, u=u), _reference_scores("aps", probs, u=u[:, None])),
            (aps_scores(probs, u=0.3), _reference_scores("aps", probs, u=0.3)),
            (aps_scores(probs, include_last_label=True), _reference_scores("aps", probs, include_last_label=True)),
            (raps_scores(probs, lam=lam, k_reg=k_reg), _reference_scores("raps", probs, lam=lam, k_reg=k_reg)),
            (raps_scores(probs, lam=lam, k_reg=k_reg, u=u),
             _reference_scores("raps", probs, u=u[:, None], lam=lam, k_reg=k_reg)),
            (raps_scores(probs, lam=lam, k_reg=k_reg, include_last_label=True),
             _reference_scores("raps", probs, include_last_label=True, lam=lam, k_reg=k_reg)),
        ]
        for fast, reference in checks:
            assert fast.shape == (n, k) and fast.dtype == probs.dtype
            torch.testing.assert_close(fast, reference, rtol=0, atol=1e-12)


def test_randomized_scores_draw_the_same_uniforms_as_before():
    rng = np.random.default_rng(3)
    probs = _random_probs(rng, 300, 40, ties=False)
    for name, fn, extra in (("aps", aps_scores, {}), ("raps", raps_scores, {"lam": 0.05, "k_reg": 2})):
        fast = fn(probs, u="random", generator=torch.Generator().manual_seed(11), **extra)
        u = torch.rand(300, 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        torch.testing.assert_close(fast, _reference_scores(name, probs, u=u, **extra), rtol=0, atol=1e-12)


def test_float32_scores_equal_reference():
    rng = np.random.default_rng(8)
    probs = _random_probs(rng, 200, 30, ties=True, dtype=torch.float32)
    torch.testing.assert_close(aps_scores(probs), _reference_scores("aps", probs), rtol=0, atol=1e-6)
    torch.testing.assert_close(raps_scores(probs, lam=0.1, k_reg=2),
                               _reference_scores("raps", probs, lam=0.1, k_reg=2), rtol=0, atol=1e-6)


def test_scores_in_many_row_blocks_equal_one_block(monkeypatch):
    rng = np.random.default_rng(9)
    probs = _random_probs(rng, 101, 13, ties=True)
    u = torch.tensor(rng.random(101), dtype=torch.float64)
    whole = raps_scores(probs, lam=0.1, k_reg=2, u=u)
    monkeypatch.setattr(conformal, "_BLOCK_ELEMENTS", 13 * 7)  # 7 rows per block, a ragged last block
    torch.testing.assert_close(raps_scores(probs, lam=0.1, k_reg=2, u=u), whole, rtol=0, atol=0)
    torch.testing.assert_close(raps_scores(probs, lam=0.1, k_reg=2, u=u),
                               _reference_scores("raps", probs, u=u[:, None], lam=0.1, k_reg=2), rtol=0, atol=1e-12)


def test_tied_labels_share_one_score():
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    scores = aps_scores(probs)
    assert scores[0].tolist() == [0.6, 0.6, 1.0, 1.0]
    assert scores[1].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert raps_scores(probs, lam=1.0, k_reg=0)[0].tolist() == [2.6, 2.6, 5.0, 5.0]


# --------------------------------------------------------------------------------------------
# NACP: bracketed counting against one sort of all n*K scores
# --------------------------------------------------------------------------------------------


def _reference_nacp_q(scores, labels, tau, eps):
    n, k = scores.shape
    noisy = np.sort(scores[np.arange(n), labels])
    every = np.sort(scores, axis=None)
    cand = np.unique(noisy)

    def corrected(noisy_count, all_count):
        return (noisy_count / n - eps * (all_count / (n * k))) / (1 - eps)

    at = corrected(np.searchsorted(noisy, cand, "right"), np.searchsorted(every, cand, "right"))
    left = corrected(np.searchsorted(noisy, cand, "left"), np.searchsorted(every, cand, "left"))
    later_ok = np.append((at[1:] >= tau) & (left[1:] >= tau), True)
    admissible = (at >= tau) & np.flip(np.logical_and.accumulate(np.flip(later_ok)))
    return float(cand[np.argmax(admissible)]) if admissible.any() else math.inf


def _nacp_scores(rng, n, k, kind):
    if kind == "aps":  # clustered near 1, like APS at large K
        return aps_scores(_random_probs(rng, n, k, ties=False), u=torch.tensor(rng.random(n))).numpy()
    if kind == "ties":
        return np.round(rng.random((n, k)) * rng.integers(2, 12), 0) / 10
    if kind == "constant":
        return np.full((n, k), 0.5)
    return rng.random((n, k))


@pytest.mark.parametrize("levels", ["sort", "grid"])
@pytest.mark.parametrize("kind", ["uniform", "ties", "aps", "constant"])
def test_nacp_equals_full_sort(monkeypatch, levels, kind):
    if levels == "grid":  # a coarse grid and no shortcuts, so every level of the bracket search runs
        monkeypatch.setattr(conformal, "_GRID_BUCKETS", 8)
        monkeypatch.setattr(conformal, "_SORT_BELOW", 0)
        monkeypatch.setattr(conformal, "_COMPARE_AT_MOST", 0)
        monkeypatch.setattr(conformal, "_BLOCK_ELEMENTS", 64)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(1, 200)), int(rng.integers(2, 40))
        scores = _nacp_scores(rng, n, k, kind)
        labels = rng.integers(0, k, n)
        alpha, eps = float(rng.uniform(0.02, 0.5)), float(rng.choice([0.0, 0.05, 0.2, 0.5, 0.8]))
        delta = None if seed % 2 else float(rng.uniform(0.05, 0.9))
        threshold = nacp_threshold(scores, labels, alpha, eps, delta)
        expected = _reference_nacp_q(scores, labels, threshold.tau, eps) if threshold.tau <= 1 else math.inf
        assert threshold.q == expected, (seed, n, k, threshold)
        assert threshold.full_sets == math.isinf(expected)


def test_nacp_with_a_few_candidates_counts_by_comparison():
    # two distinct noisy-label scores: the comparison path; the answer by hand
    scores = np.array([[0.1, 0.9], [0.1, 0.9], [0.2, 0.9], [0.2, 0.9]] * 25)
    labels = np.zeros(100, dtype=np.int64)
    # eps = 0.2: F_c(0.1) = (0.5 - 0.2 * 0.25) / 0.8 = 0.5625, F_c(0.2) = (1 - 0.2 * 0.5) / 0.8 = 1.125
    assert nacp_threshold(scores, labels, alpha=0.3, eps=0.2).q == 0.2
    assert nacp_threshold(scores, labels, alpha=0.3, eps=0.2).q == _reference_nacp_q(
        scores, labels, np.ceil(101 * 0.7) / 100, 0.2)

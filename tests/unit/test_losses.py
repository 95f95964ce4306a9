"""Each loss against values computed by hand from its formula."""

import math

import pytest
import torch

from noisewise.models.losses import (
    LOSSES,
    EarlyLearningRegularization,
    GeneralizedCrossEntropy,
    SmoothedCrossEntropy,
    SymmetricCrossEntropy,
    build_loss,
    coteaching_keep_rate,
    coteaching_select,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, -1.0]])
TARGETS = torch.tensor([0, 2])
INDEX = torch.tensor([0, 1])


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


P = [_softmax(r) for r in LOGITS.tolist()]  # [[0.6652, 0.2447, 0.0900], [0.3072, 0.5065, 0.1863]]
P_Y = [P[0][0], P[1][2]]


def test_ce_matches_negative_log_likelihood():
    expected = -(math.log(P_Y[0]) + math.log(P_Y[1])) / 2
    assert SmoothedCrossEntropy(3)(LOGITS, TARGETS, INDEX).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("s", [0.1, -0.2])
def test_ce_label_smoothing_including_negative(s):
    per_item = [
        (1 - s) * -math.log(P_Y[i]) + s * sum(-math.log(p) for p in P[i]) / 3 for i in range(2)
    ]
    got = SmoothedCrossEntropy(3, label_smoothing=s)(LOGITS, TARGETS, INDEX).item()
    assert got == pytest.approx(sum(per_item) / 2, rel=1e-6)
    if s > 0:  # positive smoothing agrees with torch's built-in
        builtin = torch.nn.functional.cross_entropy(LOGITS, TARGETS, label_smoothing=s).item()
        assert got == pytest.approx(builtin, rel=1e-6)


def test_gce_formula():
    q = 0.7
    expected = sum((1 - p**q) / q for p in P_Y) / 2
    assert GeneralizedCrossEntropy(3, q=q)(LOGITS, TARGETS, INDEX).item() == pytest.approx(expected, rel=1e-6)


def test_gce_limits_are_mae():
    # q = 1 is the mean absolute error 1 - p_y
    assert GeneralizedCrossEntropy(3, q=1.0)(LOGITS, TARGETS).item() == pytest.approx(
        sum(1 - p for p in P_Y) / 2, rel=1e-6
    )


def test_sce_formula_with_log_zero_minus_four():
    ce = -(math.log(P_Y[0]) + math.log(P_Y[1])) / 2
    rce = sum(4.0 * (1 - p) for p in P_Y) / 2  # -sum_k p_k log t_k with log 0 = -4
    got = SymmetricCrossEntropy(3, alpha=0.1, beta=1.0)(LOGITS, TARGETS, INDEX).item()
    assert got == pytest.approx(0.1 * ce + 1.0 * rce, rel=1e-6)


def test_elr_first_step_value_and_target_state():
    elr = EarlyLearningRegularization(3, num_examples=4, lam=3.0, beta=0.7)
    index = torch.tensor([1, 3])
    loss = elr(LOGITS, TARGETS, index).item()
    ce = -(math.log(P_Y[0]) + math.log(P_Y[1])) / 2
    # t starts at 0, so after the first update t_i = 0.3 * p_i (p clamped to [1e-4, 1-1e-4], renormalized)
    reg = sum(math.log(1 - 0.3 * sum(p * p for p in P[i])) for i in range(2)) / 2
    assert loss == pytest.approx(ce + 3.0 * reg, rel=1e-5)
    assert torch.allclose(elr.targets[index], 0.3 * torch.tensor(P), atol=1e-5)
    assert torch.all(elr.targets[[0, 2]] == 0)  # rows of items not in the batch are untouched


def test_elr_targets_are_running_average():
    elr = EarlyLearningRegularization(3, num_examples=2, beta=0.7)
    for _ in range(3):
        elr(LOGITS, TARGETS, INDEX)
    # same predictions three times: t = (1 - 0.7^3) p
    assert torch.allclose(elr.targets, (1 - 0.7**3) * torch.tensor(P), atol=1e-5)


def test_elr_gradient_flows_only_through_predictions():
    logits = LOGITS.clone().requires_grad_(True)
    elr = EarlyLearningRegularization(3, num_examples=2)
    elr(logits, TARGETS, INDEX).backward()
    assert logits.grad is not None and not elr.targets.requires_grad


def test_coteaching_schedule():
    assert coteaching_keep_rate(0, 0.4, 10) == 1.0
    assert coteaching_keep_rate(5, 0.4, 10) == pytest.approx(0.8)
    assert coteaching_keep_rate(10, 0.4, 10) == pytest.approx(0.6)
    assert coteaching_keep_rate(50, 0.4, 10) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="forget_rate"):
        coteaching_keep_rate(0, 1.0)


def test_coteaching_exchanges_small_loss_items():
    loss_a = torch.tensor([0.1, 0.9, 0.5, 0.2])
    loss_b = torch.tensor([0.8, 0.05, 0.3, 0.6])
    for_a, for_b = coteaching_select(loss_a, loss_b, keep_rate=0.5)
    assert sorted(for_b.tolist()) == [0, 3]  # a's two smallest losses train b
    assert sorted(for_a.tolist()) == [1, 2]  # b's two smallest losses train a


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_and_differentiable(name):
    loss_fn = build_loss(name, num_classes=3, num_examples=2)
    logits = (LOGITS * 30).requires_grad_(True)  # saturated softmax must not give inf/nan
    value = loss_fn(logits, TARGETS, INDEX)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown loss 'mae'"):
        build_loss("mae", 3, 2)

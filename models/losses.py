"""Noise-robust losses.

Every loss is called as ``loss(logits [B, K], targets [B], index [B]) -> scalar``; ``index`` is the
position of each item in the training set, which per-sample methods (ELR) use to keep state.
``LOSSES`` maps recipe names to constructors; co-teaching is a training strategy (two networks
exchanging small-loss items) and its selection rule lives here too so it can be tested alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


class SmoothedCrossEntropy(nn.Module):
    """Cross-entropy against t = (1 - s) onehot(y) + s/K.

    Unlike ``F.cross_entropy(label_smoothing=...)`` this accepts negative smoothing s < 0
    (Wei et al. 2022, "To smooth or not? When label smoothing meets noisy labels").
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, **_):
        super().__init__()
        if not -1.0 < label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in (-1, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.smoothing = float(label_smoothing)

    def forward(self, logits, targets, index=None):
        log_p = F.log_softmax(logits, dim=1)
        nll = -log_p.gather(1, targets[:, None]).squeeze(1)
        if self.smoothing == 0.0:
            return nll.mean()
        uniform = -log_p.mean(dim=1)
        return ((1 - self.smoothing) * nll + self.smoothing * uniform).mean()


class GeneralizedCrossEntropy(nn.Module):
    """GCE, Zhang & Sabuncu, NeurIPS 2018: L = (1 - p_y^q) / q; q -> 0 is CE, q = 1 is MAE."""

    def __init__(self, num_classes: int, q: float = 0.7, **_):
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"gce: q must be in (0, 1], got {q}")
        self.q = float(q)

    def forward(self, logits, targets, index=None):
        p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1).clamp_min(1e-7)
        return ((1.0 - p_y.pow(self.q)) / self.q).mean()


class SymmetricCrossEntropy(nn.Module):
    """SCE, Wang et al., ICCV 2019: alpha CE + beta RCE, RCE = -sum_k p_k log t_k with log 0 := A.

    With a one-hot t, RCE = -A (1 - p_y).
    """

    def __init__(self, num_classes: int, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0, **_):
        super().__init__()
        self.alpha, self.beta, self.log_zero = float(alpha), float(beta), float(log_zero)

    def forward(self, logits, targets, index=None):
        ce = F.cross_entropy(logits, targets)
        p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        rce = (-self.log_zero * (1.0 - p_y)).mean()
        return self.alpha * ce + self.beta * rce


class EarlyLearningRegularization(nn.Module):
    """ELR, Liu et al., NeurIPS 2020: CE + lambda mean log(1 - <p_i, t_i>).

    The per-sample targets t_i are a running average of the model's own (detached, clamped,
    renormalized) predictions: t_i <- beta t_i + (1 - beta) p_i. They are stored in ``self.targets``
    ``[n_train, K]`` and indexed by the dataset position of each item.
    """

    def __init__(self, num_classes: int, num_examples: int, lam: float = 3.0, beta: float = 0.7, **_):
        super().__init__()
        self.lam, self.beta = float(lam), float(beta)
        self.register_buffer("targets", torch.zeros(num_examples, num_classes))

    def forward(self, logits, targets, index):
        p = F.softmax(logits, dim=1).clamp(1e-4, 1.0 - 1e-4)
        with torch.no_grad():
            p_detached = p.detach()
            self.targets[index] = self.beta * self.targets[index] + (1.0 - self.beta) * (
                p_detached / p_detached.sum(dim=1, keepdim=True)
            )
        ce = F.cross_entropy(logits, targets)
        reg = torch.log(1.0 - (self.targets[index] * p).sum(dim=1)).mean()
        return ce + self.lam * reg


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": SmoothedCrossEntropy,
    "gce": GeneralizedCrossEntropy,
    "sce": SymmetricCrossEntropy,
    "elr": EarlyLearningRegularization,
}


def build_loss(name: str, num_classes: int, num_examples: int, **params) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name](num_classes=num_classes, num_examples=num_examples, **params)


def coteaching_keep_rate(epoch: int, forget_rate: float, warmup_epochs: int = 10) -> float:
    """R(T) = 1 - min(T / T_k * tau, tau) (Han et al., NeurIPS 2018), T counted from 0."""
    if not 0.0 <= forget_rate < 1.0:
        raise ValueError(f"coteaching: forget_rate must be in [0, 1), got {forget_rate}")
    return 1.0 - min(epoch / warmup_epochs * forget_rate, forget_rate)


def coteaching_select(
    loss_a: torch.Tensor, loss_b: torch.Tensor, keep_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the batch) each network should learn from: the peer's small-loss items.

    Returns ``(for_a, for_b)``: ``for_a`` are the ``round(keep_rate * B)`` (at least one) items with the smallest
    loss under network b (a learns from b's selection), and vice versa.
    """
    n_keep = max(1, int(round(keep_rate * loss_a.numel())))
    for_b = torch.argsort(loss_a.detach())[:n_keep]
    for_a = torch.argsort(loss_b.detach())[:n_keep]
    return for_a, for_b

"""Label-noise rates and suspected annotation errors (DESIGN.md 4.1, 4.4, 4.5, 4.7).

Two conventions for a symmetric noise rate, and the one this package uses:

* uniform/all (used by every ``eps`` in ``models.uncertainty``): the label is resampled from
  all ``K`` classes with probability ``eps``,
  ``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K``, so ``eps`` ranges over ``[0, 1]`` with
  ``eps = 1`` meaning labels carry no information;
* flip: the label is moved to one of the other ``K - 1`` classes with probability ``eps'``,
  the realized fraction of wrong labels. ``eps = eps' K / (K - 1)``.

Estimators return a :class:`NoiseRateEstimate` in the uniform convention, with its interval,
method and sample size (DESIGN.md 4.5). The confident-learning part reimplements cleanlab's
confident joint (Northcutt, Jiang, Chuang, "Confident learning: estimating uncertainty in dataset
labels", JAIR 2021; cleanlab is Apache-2.0) in numpy for fitting and in torch for the O(K)
per-item rule applied to each feedback label at ingestion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from scipy import stats

__all__ = [
    "LABEL_QUALITY_SCORES",
    "NOISE_RATE_ESTIMATORS",
    "NoiseRateEstimate",
    "Suspects",
    "THRESHOLD_SLACK",
    "clopper_pearson",
    "confident_joint",
    "flip_rate_to_uniform",
    "label_quality",
    "noise_rate_confident_learning",
    "noise_rate_from_audit",
    "noise_rate_from_duplicates",
    "per_class_thresholds",
    "suspect_mask",
    "uniform_to_flip_rate",
]

#: A probability counts as reaching a class threshold when ``p_j >= t_j - THRESHOLD_SLACK``
#: (cleanlab's float tolerance, kept so that the per-item rule and the batch joint agree).
THRESHOLD_SLACK = 1e-6
#: Lower clip of per-class thresholds (cleanlab's CONFIDENT_THRESHOLDS_LOWER_BOUND): a class
#: whose mean probability is ~0 must not make every item "confident" for it.
_THRESHOLD_FLOOR = 2e-6


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_num_classes(num_classes: Any) -> int:
    is_int = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, (bool, np.bool_))
    if not is_int or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    return int(num_classes)


def flip_rate_to_uniform(eps_flip: float, num_classes: int) -> float:
    """Flip rate (fraction of labels moved to another class) -> uniform-convention ``eps``.

    ``eps = eps_flip * K / (K - 1)``; e.g. 40% flips among 10 classes is ``eps = 0.444``.

    Parameters
    ----------
    eps_flip : float in [0, 1]
    num_classes : int >= 2
    """
    k = _check_num_classes(num_classes)
    if not (_is_real(eps_flip) and 0.0 <= eps_flip <= 1.0):
        raise ValueError(f"`eps_flip` must be a flip rate in [0, 1], got {eps_flip!r}.")
    return float(eps_flip) * k / (k - 1)


def uniform_to_flip_rate(eps: float, num_classes: int) -> float:
    """Uniform-convention ``eps`` -> flip rate ``eps (K - 1) / K`` (the fraction of wrong labels).

    Parameters
    ----------
    eps : float in [0, K / (K - 1)]
    num_classes : int >= 2
    """
    k = _check_num_classes(num_classes)
    if not (_is_real(eps) and 0.0 <= eps <= k / (k - 1)):
        raise ValueError(
            f"`eps` must be a uniform-convention rate in [0, K/(K-1)] = [0, {k / (k - 1):.4f}], got {eps!r}."
        )
    return float(eps) * (k - 1) / k


# --------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseRateEstimate:
    """A noise-rate estimate with its interval, in the uniform convention.

    Attributes
    ----------
    estimate : float
        Point estimate of ``eps`` in ``[0, 1]`` (NaN when the method's assumptions fail; see
        ``note``).
    lower, upper : float
        Confidence interval at level ``confidence`` (a heuristic band when ``heuristic``). Plug
        ``lower`` into NACP and the abstention correction: over-estimating ``eps`` is the unsafe
        side for both.
    method : str
        A key of :data:`NOISE_RATE_ESTIMATORS`.
    n : int
        Items the estimate rests on.
    num_classes : int
    confidence : float
        Nominal level of ``[lower, upper]``.
    heuristic : bool
        True when the interval has no coverage guarantee.
    note : str
        Assumptions and caveats, human-readable.
    convention : str
        Always ``"uniform"``; see :attr:`flip_rate` for the flip-rate view.
    """

    estimate: float
    lower: float
    upper: float
    method: str
    n: int
    num_classes: int
    confidence: float
    heuristic: bool
    note: str
    convention: str = "uniform"

    @property
    def flip_rate(self) -> float:
        """Point estimate as a flip rate (expected fraction of wrong labels)."""
        return self.estimate * (self.num_classes - 1) / self.num_classes

    @property
    def flip_interval(self) -> tuple[float, float]:
        """``(lower, upper)`` as flip rates."""
        c = (self.num_classes - 1) / self.num_classes
        return self.lower * c, self.upper * c

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (NaN as the string ``"nan"``)."""
        def encode(v: Any) -> Any:
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v

        return {k: encode(v) for k, v in asdict(self).items()}

    def flip_record(self) -> dict[str, Any]:
        """:meth:`to_dict` with ``flip_rate``, ``lower`` and ``upper`` as flip rates: the form reports,
        calibrations and gauges use (``estimate`` stays in the uniform convention)."""
        lower, upper = self.flip_interval
        return {**self.to_dict(), "flip_rate": self.flip_rate, "lower": lower, "upper": upper,
                "convention_reported": "flip"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NoiseRateEstimate":
        """Inverse of :meth:`to_dict`."""
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        missing = {f.name for f in fields(cls)} - set(kw) - {"convention"}
        if missing:
            raise ValueError(f"NoiseRateEstimate.from_dict: missing keys {sorted(missing)}.")
        for k in ("estimate", "lower", "upper", "confidence"):
            kw[k] = float(kw[k])
        kw["n"], kw["num_classes"] = int(kw["n"]), int(kw["num_classes"])
        kw["heuristic"] = bool(kw["heuristic"])
        return cls(**kw)


def _check_confidence_level(confidence: Any) -> float:
    if not (_is_real(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be a level in (0, 1), e.g. 0.95, got {confidence!r}.")
    return float(confidence)


def _check_labels(labels: Any, name: str, num_classes: int, n: int | None = None) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of class indices, got shape {arr.shape}.")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"`{name}` must have length {n} to match its paired array, got {arr.shape[0]}.")
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"`{name}` must hold integer class indices, got dtype {arr.dtype}.")
        arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise ValueError(
            f"`{name}` must hold class indices in [0, {num_classes - 1}], got {int(bad.sum())} "
            f"out of range (e.g. {arr[bad][0]})."
        )
    return arr.astype(np.int64)


def _check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    arr = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise ValueError(f"`{name}` must have shape [n, K] with n >= 1 and K >= 2, got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"`{name}` must be floating-point probabilities, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"`{name}` must be finite probabilities in [0, 1].")
    # Loose tolerance: stored probabilities may have been rounded or kept in fp16.
    worst = float(np.max(np.abs(arr.sum(axis=1) - 1.0)))
    if worst > 1e-2:
        raise ValueError(
            f"rows of `{name}` must sum to 1 (softmax outputs), worst row sums to 1 {worst:+.3g}."
        )
    return arr


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided exact binomial interval for a proportion."""
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def _eps_from_agreement(agreement: float, k: int) -> float:
    chance = 1.0 / k
    return 1.0 - math.sqrt(min(max((agreement - chance) / (1.0 - chance), 0.0), 1.0))


def noise_rate_from_duplicates(
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    num_classes: int,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """Noise rate from two independent labels of the same ``m`` items.

    Two annotators with the same uniform rate ``eps``, independent given the true label, agree
    with probability ``A = (1 - eps)^2 (1 - 1/K) + 1/K`` (each lands on the true class with
    ``1 - eps + eps/K``, on any given other class with ``eps/K``), hence

    ``eps = 1 - sqrt((A - 1/K) / (1 - 1/K))``, clipped to ``[0, 1]``.

    The interval maps a two-sided Clopper-Pearson interval on ``A`` through this decreasing
    function: ``[eps(A_hi), eps(A_lo)]``, exact coverage at least ``confidence``.

    Parameters
    ----------
    labels_a, labels_b : array-like of int, shape [m]
        The two labels of each item.
    num_classes : int
    confidence : float, default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="duplicates"``, ``n = m``.
    """
    k = _check_num_classes(num_classes)
    a = _check_labels(labels_a, "labels_a", k)
    b = _check_labels(labels_b, "labels_b", k, n=a.shape[0])
    level = _check_confidence_level(confidence)
    m = a.shape[0]
    agree = int(np.sum(a == b))
    lo, hi = clopper_pearson(agree, m, level)
    return NoiseRateEstimate(
        estimate=_eps_from_agreement(agree / m, k),
        lower=_eps_from_agreement(hi, k),
        upper=_eps_from_agreement(lo, k),
        method="duplicates",
        n=m,
        num_classes=k,
        confidence=level,
        heuristic=False,
        note=(
            f"agreement {agree}/{m}; assumes two independent annotators with the same uniform "
            "(symmetric) noise rate; Clopper-Pearson interval on the agreement mapped through "
            "eps = 1 - sqrt((A - 1/K)/(1 - 1/K))"
        ),
    )


def noise_rate_from_audit(
    model_pred_audited: np.ndarray,
    audited_labels: np.ndarray,
    model_pred_ordinary: np.ndarray,
    ordinary_labels: np.ndarray,
    num_classes: int,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """Noise rate from a trusted audit subset and the model's agreement with ordinary labels.

    Let ``psi0 = P(model = y)`` (accuracy on trusted labels) and ``psi1 = P(model = y~)``. If the
    noise is uniform at rate ``eps`` and independent of ``x`` (hence of the model's prediction
    given ``y``), then
    ``psi1 = (1 - eps) P(model = y) + eps sum_j P(model = j) / K = (1 - eps) psi0 + eps / K``, so

    ``eps = (psi0 - psi1) / (psi0 - 1/K)``  (needs ``psi0 > 1/K``), clipped to ``[0, 1]``.

    Interval: Bonferroni, a two-sided Clopper-Pearson interval at level ``1 - (1-confidence)/2``
    on each of ``psi0`` and ``psi1``; both hold jointly with probability ``>= confidence``. On
    that rectangle (with ``psi0 > 1/K``) ``eps`` decreases in ``psi1`` and is monotone in
    ``psi0``, so its range is attained at the corners. When the lower bound of ``psi0`` is
    ``<= 1/K`` the upper bound is 1 (uninformative). The audited and ordinary items must come
    from the same input distribution.

    Parameters
    ----------
    model_pred_audited : array-like of int, shape [a]
        Model predictions on the audited items.
    audited_labels : array-like of int, shape [a]
        Trusted labels of the audited items.
    model_pred_ordinary : array-like of int, shape [o]
        Model predictions on items with ordinary (possibly noisy) labels.
    ordinary_labels : array-like of int, shape [o]
    num_classes : int
    confidence : float, default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="audit"``, ``n = a + o``. ``estimate`` is NaN when ``psi0 <= 1/K``.
    """
    k = _check_num_classes(num_classes)
    pa = _check_labels(model_pred_audited, "model_pred_audited", k)
    ya = _check_labels(audited_labels, "audited_labels", k, n=pa.shape[0])
    po = _check_labels(model_pred_ordinary, "model_pred_ordinary", k)
    yo = _check_labels(ordinary_labels, "ordinary_labels", k, n=po.shape[0])
    level = _check_confidence_level(confidence)
    each = 1.0 - (1.0 - level) / 2.0
    a, o = pa.shape[0], po.shape[0]
    k0, k1 = int(np.sum(pa == ya)), int(np.sum(po == yo))
    psi0, psi1 = k0 / a, k1 / o
    psi0_lo, psi0_hi = clopper_pearson(k0, a, each)
    psi1_lo, psi1_hi = clopper_pearson(k1, o, each)
    chance = 1.0 / k
    note = (
        f"psi0 (model vs audited) {k0}/{a}, psi1 (model vs ordinary) {k1}/{o}; assumes uniform "
        "noise independent of the input; Bonferroni of two Clopper-Pearson intervals"
    )

    def eps_at(p0: float, p1: float) -> float:
        return float(np.clip((p0 - p1) / (p0 - chance), 0.0, 1.0))

    if psi0_lo <= chance:
        # The rectangle reaches psi0 = 1/K where eps is unbounded: no informative interval.
        return NoiseRateEstimate(
            estimate=eps_at(psi0, psi1) if psi0 > chance else float("nan"),
            lower=0.0, upper=1.0, method="audit", n=a + o, num_classes=k, confidence=level,
            heuristic=False,
            note=note + f"; model accuracy on audited items is not clearly above chance 1/K={chance:.3g}, "
            "so the interval is uninformative" + ("" if psi0 > chance else " and the estimate undefined"),
        )
    corners = [eps_at(p0, p1) for p0 in (psi0_lo, psi0_hi) for p1 in (psi1_lo, psi1_hi)]
    return NoiseRateEstimate(
        estimate=eps_at(psi0, psi1), lower=min(corners), upper=max(corners), method="audit",
        n=a + o, num_classes=k, confidence=level, heuristic=False, note=note,
    )


# --------------------------------------------------------------------------------------------
# Confident learning (fitting: numpy, bit-compatible with cleanlab.count)
# --------------------------------------------------------------------------------------------


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class confident thresholds ``t_j = mean p_j(x)`` over items labelled ``j``.

    As ``cleanlab.count.get_confident_thresholds`` (including its lower clip at ``2e-6``), except
    that a class with no labelled item is an error here (cleanlab silently sets its threshold to
    2, so that class can never be proposed).

    Parameters
    ----------
    probs : array-like, shape [n, K]
        Out-of-sample predicted probabilities (e.g. of the calibration split).
    labels : array-like of int, shape [n]
        Given (possibly noisy) labels.
    num_classes : int

    Returns
    -------
    np.ndarray, shape [K], float64
    """
    k = _check_num_classes(num_classes)
    p = _check_probs(probs)
    if p.shape[1] != k:
        raise ValueError(f"`probs` has {p.shape[1]} columns but `num_classes` is {k}.")
    y = _check_labels(labels, "labels", k, n=p.shape[0])
    counts = np.bincount(y, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"`labels` has no item of class(es) {empty.tolist()}: a per-class threshold needs at "
            "least one labelled item per class; calibrate on data that covers every class."
        )
    sums = np.zeros((k, k))
    np.add.at(sums, y, p)
    return np.clip(sums[np.arange(k), np.arange(k)] / counts, _THRESHOLD_FLOOR, None)


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    # cleanlab.internal.util.round_preserving_sum, step for step (same argsort, same tie order),
    # so that calibrated joints are identical integer for integer.
    floats = np.asarray(row, dtype=float)
    ints = floats.round()
    orig_sum = np.sum(floats).round()
    int_sum = np.sum(ints).round()
    while abs(int_sum - orig_sum) > 1e-6:
        diff = np.round(orig_sum - int_sum)
        increment = -1 if diff < 0 else 1
        changes = min(int(abs(diff)), len(floats))
        indices = np.argsort(floats - ints)[::-increment][:changes]
        ints[indices] += increment
        int_sum = np.sum(ints).round()
    return ints.astype(int)


def confident_joint(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None = None,
    calibrate: bool = True,
) -> np.ndarray:
    """Confident joint ``C[given label i, guessed true label j]`` (Northcutt et al. 2021).

    An item is confident for class ``j`` when ``p_j >= t_j - 1e-6``. Its guessed true label is
    the single confident class, or ``argmax_j p_j`` when several classes are confident (this
    argmax runs over all classes and breaks ties towards the lower index); items confident for
    no class are not counted. Every diagonal cell is raised to at least 1. With ``calibrate``,
    rows are rescaled to the observed label counts, the whole to ``n``, and rounded keeping row
    totals. Identical to ``cleanlab.count.compute_confident_joint(labels, probs,
    thresholds=..., calibrate=...)``.

    Parameters
    ----------
    labels : array-like of int, shape [n]
    probs : array-like, shape [n, K]
    thresholds : array-like, shape [K], optional
        Defaults to :func:`per_class_thresholds`.
    calibrate : bool, default True

    Returns
    -------
    np.ndarray of int, shape [K, K]
    """
    p = _check_probs(probs)
    k = p.shape[1]
    y = _check_labels(labels, "labels", k, n=p.shape[0])
    t = per_class_thresholds(p, y, k) if thresholds is None else _check_thresholds(thresholds, k)
    confident = p >= t - THRESHOLD_SLACK
    n_confident = confident.sum(axis=1)
    guess = np.where(n_confident > 1, p.argmax(axis=1), confident.argmax(axis=1))
    counted = n_confident > 0
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (y[counted], guess[counted]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    if not calibrate:
        return joint
    label_counts = np.bincount(y, minlength=k)
    scaled = (joint.T / np.clip(joint.sum(axis=1), 1e-100, None) * label_counts).T
    scaled = scaled / np.clip(scaled.sum(), 1e-100, None) * label_counts.sum()
    return np.stack([_round_preserving_sum(r) for r in scaled]).astype(int)


def _check_thresholds(thresholds: Any, k: int) -> np.ndarray:
    t = thresholds.detach().cpu().numpy() if isinstance(thresholds, torch.Tensor) else np.asarray(thresholds)
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
    if t.shape != (k,) or not np.issubdtype(t.dtype, np.number) or not np.all(np.isfinite(t)):
        raise ValueError(f"`thresholds` must be {k} finite per-class thresholds, got shape {t.shape}.")
    return t.astype(np.float64)


def noise_rate_confident_learning(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None = None,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """Heuristic noise rate: off-diagonal mass of the calibrated confident joint.

    ``flip = 1 - trace(C) / n`` with ``C`` from :func:`confident_joint` (equals
    ``1 - trace(cleanlab.count.estimate_joint(...))``), reported as ``eps = flip K / (K - 1)``
    clipped to ``[0, 1]``. The band is a Clopper-Pearson interval treating the ``n - trace(C)``
    off-diagonal count as binomial; it ignores the error of ``probs`` and of the confident
    counting, so it is HEURISTIC (``heuristic=True``): use it for monitoring, not as the ``eps_L``
    of a guarantee. Needs out-of-sample probabilities.

    Parameters
    ----------
    labels : array-like of int, shape [n]
    probs : array-like, shape [n, K]
    thresholds : array-like, shape [K], optional
        Defaults to :func:`per_class_thresholds` of the same data.
    confidence : float, default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="confident_learning"``.
    """
    level = _check_confidence_level(confidence)
    joint = confident_joint(labels, probs, thresholds=thresholds, calibrate=True)
    k = joint.shape[0]
    n = int(joint.sum())
    off = n - int(np.trace(joint))
    lo, hi = clopper_pearson(off, n, level)
    scale = k / (k - 1)
    return NoiseRateEstimate(
        estimate=min(off / n * scale, 1.0),
        lower=min(lo * scale, 1.0),
        upper=min(hi * scale, 1.0),
        method="confident_learning",
        n=n,
        num_classes=k,
        confidence=level,
        heuristic=True,
        note=(
            f"HEURISTIC: off-diagonal mass {off}/{n} of the calibrated confident joint (Northcutt "
            "et al. 2021), converted from flip rate to uniform convention; the interval treats "
            "that count as binomial and has no coverage guarantee"
        ),
    )


#: name -> estimator returning a :class:`NoiseRateEstimate` (uniform convention).
NOISE_RATE_ESTIMATORS: dict[str, Callable[..., NoiseRateEstimate]] = {
    "duplicates": noise_rate_from_duplicates,
    "audit": noise_rate_from_audit,
    "confident_learning": noise_rate_confident_learning,
}


# --------------------------------------------------------------------------------------------
# Per-item rules (hot path at feedback ingestion: batched torch, no host sync)
# --------------------------------------------------------------------------------------------


def _self_confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return probs.gather(1, labels[:, None]).squeeze(1)


def _normalized_margin(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    given = _self_confidence(probs, labels)
    others = probs.scatter(1, labels[:, None], float("-inf"))
    return (given - others.amax(dim=1) + 1.0) / 2.0


#: name -> ``(probs [N, K], labels [N]) -> score [N]`` in ``[0, 1]``, lower = more likely mislabelled.
LABEL_QUALITY_SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "self_confidence": _self_confidence,
    "normalized_margin": _normalized_margin,
}


def _check_item_tensors(probs: Any, labels: Any) -> None:
    if (
        not isinstance(probs, torch.Tensor)
        or probs.ndim != 2
        or probs.shape[1] < 2
        or not probs.is_floating_point()
    ):
        raise ValueError(
            "`probs` must be a floating-point torch.Tensor [N, K] with K >= 2, got "
            f"{type(probs).__name__} {tuple(getattr(probs, 'shape', ()))}."
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.shape != probs.shape[:1]
        or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    ):
        raise ValueError(
            f"`labels` must be an integer torch.Tensor [N] with N = {probs.shape[0]}, got "
            f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}."
        )
    if labels.device != probs.device:
        raise ValueError(f"`labels` is on {labels.device} but `probs` on {probs.device}.")


def label_quality(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    method: str = "self_confidence",
) -> torch.Tensor | np.ndarray:
    """Label-quality score of each given label (cleanlab's definitions); low = suspicious.

    * ``self_confidence``: ``p_{y~}``;
    * ``normalized_margin``: ``(p_{y~} - max_{j != y~} p_j + 1) / 2``, cleanlab's rescaling of the
      margin to ``[0, 1]`` (same ranking as the raw margin of DESIGN.md 4.7).

    Equal to ``cleanlab.rank.get_label_quality_scores(labels, probs, method=...)``.

    Parameters
    ----------
    probs : torch.Tensor or np.ndarray, shape [N, K]
    labels : torch.Tensor or np.ndarray of int, shape [N]
        Must lie in ``[0, K)`` (not checked on tensors, to avoid a device sync).
    method : str
        A key of :data:`LABEL_QUALITY_SCORES`.

    Returns
    -------
    Same kind as ``probs``, shape [N].
    """
    if method not in LABEL_QUALITY_SCORES:
        raise ValueError(f"`method` must be one of {sorted(LABEL_QUALITY_SCORES)}, got {method!r}.")
    if isinstance(probs, np.ndarray):
        p = _check_probs(probs)
        y = _check_labels(labels, "labels", p.shape[1], n=p.shape[0])
        return LABEL_QUALITY_SCORES[method](torch.from_numpy(p), torch.from_numpy(y)).numpy()
    _check_item_tensors(probs, labels)
    return LABEL_QUALITY_SCORES[method](probs, labels.long())


class Suspects(NamedTuple):
    """Output of :func:`suspect_mask`."""

    mask: torch.Tensor
    """BoolTensor [N]: the given label is a suspected annotation error."""
    proposed: torch.Tensor
    """LongTensor [N]: most probable confident class other than the given one for suspects,
    ``argmax p`` (the model's prediction) for the rest."""


def suspect_mask(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> Suspects:
    """O(K) per-item confident-learning rule for a batch of feedback labels (DESIGN.md 4.7).

    ``suspect = exists j != y~ with p_j >= t_j - 1e-6 and p_j > p_{y~}``;
    ``proposed = argmax {p_j : j != y~, p_j >= t_j - 1e-6}`` for suspects, else ``argmax p``.

    Relation to cleanlab's confident joint (same thresholds, same ``1e-6`` slack): wherever the
    most probable class reaches its threshold (cleanlab then guesses exactly that class), an
    item is flagged here iff it lies off the diagonal of cleanlab's joint, and ``proposed`` is
    cleanlab's guess. Deliberate differences, all in the direction of flagging less:

    * exactly one class ``c != y~`` reaches its threshold but ``p_c <= p_{y~}`` (the given label
      is more probable, only below its own, higher threshold): cleanlab counts it off-diagonal;
      here it is not a suspect, because the model prefers the given label;
    * several classes reach their thresholds but the overall argmax does not: cleanlab guesses
      that (non-confident) argmax; here only confident classes can accuse a label;
    * ties ``p_j = p_{y~}``: cleanlab's argmax picks the lower index and may flag; here a tie is
      not evidence against the given label.

    Every item flagged here is off-diagonal in cleanlab's joint.

    Parameters
    ----------
    probs : torch.Tensor, shape [N, K]
    labels : torch.Tensor of int, shape [N]
        Given labels in ``[0, K)`` (not range-checked, to avoid a device sync).
    thresholds : torch.Tensor, shape [K]
        From :func:`per_class_thresholds` (stored in the Calibration).

    Returns
    -------
    Suspects
        ``(mask [N] bool, proposed [N] long)`` on the device of ``probs``.
    """
    _check_item_tensors(probs, labels)
    if not isinstance(thresholds, torch.Tensor) or thresholds.shape != probs.shape[1:]:
        raise ValueError(
            f"`thresholds` must be a torch.Tensor [K] with K = {probs.shape[1]}, got "
            f"{type(thresholds).__name__} {tuple(getattr(thresholds, 'shape', ()))}."
        )
    if thresholds.device != probs.device:
        raise ValueError(f"`thresholds` is on {thresholds.device} but `probs` on {probs.device}.")
    given = _self_confidence(probs, labels.long())
    candidates = (probs >= thresholds.to(probs.dtype) - THRESHOLD_SLACK) & (probs > given[:, None])
    mask = candidates.any(dim=1)
    best_candidate = probs.masked_fill(~candidates, float("-inf")).argmax(dim=1)
    return Suspects(mask=mask, proposed=torch.where(mask, best_candidate, probs.argmax(dim=1)))

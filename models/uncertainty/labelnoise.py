"""Label-noise rates and suspected annotation errors.

Every noise rate this module returns is a **flip rate**: the share of observed labels that differ
from the true one, ``r = P(y~ != y)``, for the point and for its interval alike. NACP and the
abstention correction of ``noisewise.models.uncertainty`` take the *uniform* convention instead (the label is
resampled from all ``K`` classes with probability ``eps``,
``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K``); under that model ``eps = r K / (K - 1)``,
which :func:`flip_rate_to_uniform` computes where a guarantee needs it.

Estimators, in order of trust (:data:`NOISE_RATE_ESTIMATORS`):

* ``audit`` (:func:`noise_rate_direct`): items that carry both an ordinary label and a trusted
  one; the share that disagree with an exact Clopper-Pearson interval. No model, no noise model.
* ``duplicates`` (:func:`noise_rate_from_duplicates`): two independent annotators; assumes both
  err uniformly over the other classes at the same rate.
* ``audit_model_heuristic`` (:func:`noise_rate_audit_model_heuristic`): the model's agreement with
  trusted and with ordinary labels; assumes uniform noise independent of the input, which human
  annotation noise breaks (annotators err where the model errs), so it is a heuristic.
* ``confident_learning`` (:func:`noise_rate_confident_learning`): off-diagonal mass of cleanlab's
  confident joint; it reads the model's own mistakes as label noise, a heuristic.

The confident-learning part reimplements cleanlab's confident joint (Northcutt, Jiang, Chuang,
"Confident learning: estimating uncertainty in dataset labels", JAIR 2021; cleanlab is Apache-2.0)
in numpy for fitting, and the O(K) per-item rule applied to each feedback label at ingestion for
torch tensors and numpy arrays alike.

torch is imported only where a tensor is handled, and the binomial intervals use ``scipy.special``
rather than ``scipy.stats``: ``noisewise monitor`` estimates noise rates without loading either
(seconds of imports).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import numpy as np
from scipy import special

from noisewise.models.uncertainty.host import as_numpy, check_labels, check_probs

if TYPE_CHECKING:
    import torch

__all__ = [
    "LABEL_QUALITY_SCORES",
    "NOISE_RATE_ESTIMATORS",
    "PER_CLASS_KEYS",
    "THRESHOLD_SLACK",
    "NoiseRateEstimate",
    "Suspects",
    "clopper_pearson",
    "confident_joint",
    "flip_rate_to_uniform",
    "label_quality",
    "noise_rate_audit_model_heuristic",
    "noise_rate_confident_learning",
    "noise_rate_direct",
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

#: Keys of one per-class entry of :attr:`NoiseRateEstimate.per_class`.
PER_CLASS_KEYS = ("class", "n", "flips", "rate", "lower", "upper")


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class NoiseRateEstimate:
    """A noise rate with its interval, in ONE convention: the flip rate.

    The flip rate is the share of observed labels that differ from the true one,
    ``r = P(y~ != y)``; ``flip_rate``, ``lower``, ``upper`` and every per-class rate are flip rates.
    Invariant (checked at construction): ``0 <= lower <= flip_rate <= upper <= 1``, except that
    ``flip_rate`` is NaN when the method's assumptions leave it undefined (see ``note``).

    Attributes
    ----------
    flip_rate : float
        Point estimate in ``[0, 1]``, or NaN.
    lower, upper : float
        Interval at level ``confidence`` (a band without coverage guarantee when ``heuristic``).
        A guarantee that corrects for noise (NACP, the abstention correction) takes ``lower``:
        over-stating the rate is the unsafe side for both. :attr:`uniform_lower` converts it.
    method : str
        A key of :data:`NOISE_RATE_ESTIMATORS`.
    n : int
        Items the estimate rests on.
    num_classes : int
    confidence : float
        Nominal level of ``[lower, upper]``.
    heuristic : bool
        True when the interval has no coverage guarantee: never feed it into a guarantee.
    note : str
        What was counted and what is assumed, human-readable.
    per_class : tuple of dict, optional
        Direct audit only: one entry per class ``c`` of the trusted label, with keys
        ``class, n, flips, rate, lower, upper`` (items whose trusted label is ``c``, how many of
        their observed labels differ, that share, and its Clopper-Pearson interval at level
        ``confidence``, each on its own, not simultaneous). ``rate`` is None when ``n = 0``.
    confusion : tuple of tuple of int, shape [K, K], optional
        Direct audit only: ``confusion[i][j]`` counts items with trusted label ``i`` and observed
        label ``j`` (:attr:`confusion_matrix` gives it as an array).
    """

    flip_rate: float
    lower: float
    upper: float
    method: str
    n: int
    num_classes: int
    confidence: float
    heuristic: bool
    note: str
    per_class: tuple[dict[str, Any], ...] | None = None
    confusion: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        k = _check_num_classes(self.num_classes)
        for name in ("flip_rate", "lower", "upper"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"NoiseRateEstimate: `{name}` must be a real number, got {getattr(self, name)!r}.")
        lo, hi, point = float(self.lower), float(self.upper), float(self.flip_rate)
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"NoiseRateEstimate: need 0 <= lower <= upper <= 1 (flip rates), got [{lo}, {hi}].")
        if not math.isnan(point) and not (lo <= point <= hi):
            raise ValueError(
                f"NoiseRateEstimate: `flip_rate` {point} lies outside its interval [{lo}, {hi}]; point and "
                "interval must be in the same (flip) convention."
            )
        if isinstance(self.n, (bool, np.bool_)) or not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise ValueError(f"NoiseRateEstimate: `n` must be an integer >= 0, got {self.n!r}.")
        _check_confidence_level(self.confidence)
        if self.per_class is not None:
            entries = tuple(dict(e) for e in self.per_class)
            if len(entries) != k or any(set(e) != set(PER_CLASS_KEYS) for e in entries):
                raise ValueError(
                    f"NoiseRateEstimate: `per_class` must hold {k} entries with keys {list(PER_CLASS_KEYS)}."
                )
            object.__setattr__(self, "per_class", entries)
        if self.confusion is not None:
            matrix = np.asarray(self.confusion)
            if matrix.shape != (k, k) or not np.issubdtype(matrix.dtype, np.integer) or (matrix < 0).any():
                raise ValueError(
                    f"NoiseRateEstimate: `confusion` must be a {k} x {k} matrix of counts, got shape {matrix.shape}."
                )
            object.__setattr__(self, "confusion", tuple(tuple(int(v) for v in row) for row in matrix))
        object.__setattr__(self, "flip_rate", point)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "num_classes", k)
        object.__setattr__(self, "confidence", float(self.confidence))
        object.__setattr__(self, "heuristic", bool(self.heuristic))

    @property
    def uniform_lower(self) -> float:
        """``lower`` in the uniform convention NACP takes: ``lower K / (K - 1)`` (may exceed 1)."""
        return flip_rate_to_uniform(self.lower, self.num_classes)

    @property
    def confusion_matrix(self) -> np.ndarray | None:
        """:attr:`confusion` as an int64 array [K, K] (rows: trusted label, columns: observed)."""
        return None if self.confusion is None else np.asarray(self.confusion, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON record: flip rates only (``"convention": "flip"``), NaN written as None.

        Keys: ``convention, flip_rate, lower, upper, method, n, num_classes, confidence, heuristic,
        note``, plus ``per_class`` (list of dicts) and ``confusion`` (list of lists) when present.
        """
        out: dict[str, Any] = {
            "convention": "flip", "flip_rate": _finite_or_none(self.flip_rate), "lower": self.lower,
            "upper": self.upper, "method": self.method, "n": self.n, "num_classes": self.num_classes,
            "confidence": self.confidence, "heuristic": self.heuristic, "note": self.note,
        }
        if self.per_class is not None:
            out["per_class"] = [dict(e) for e in self.per_class]
        if self.confusion is not None:
            out["confusion"] = [list(row) for row in self.confusion]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NoiseRateEstimate":
        """Inverse of :meth:`to_dict`; refuses records in another convention."""
        convention = d.get("convention", "flip")
        if convention != "flip":
            raise ValueError(
                f"NoiseRateEstimate.from_dict: the record is in the {convention!r} convention; only flip-rate "
                "records (convention 'flip') are read. Re-estimate the noise rate to get one."
            )
        required = ("flip_rate", "lower", "upper", "method", "n", "num_classes", "confidence", "heuristic", "note")
        missing = [key for key in required if key not in d]
        if missing:
            raise ValueError(f"NoiseRateEstimate.from_dict: missing keys {missing}.")
        point = d["flip_rate"]
        return cls(
            flip_rate=float("nan") if point is None else float(point), lower=float(d["lower"]),
            upper=float(d["upper"]), method=str(d["method"]), n=int(d["n"]), num_classes=int(d["num_classes"]),
            confidence=float(d["confidence"]), heuristic=bool(d["heuristic"]), note=str(d["note"]),
            per_class=d.get("per_class"), confusion=d.get("confusion"),
        )


def _check_confidence_level(confidence: Any) -> float:
    if not (_is_real(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be a level in (0, 1), e.g. 0.95, got {confidence!r}.")
    return float(confidence)


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided binomial interval for a proportion ``k / n`` (Clopper and Pearson, 1934).

    ``[Beta^{-1}(a/2; k, n - k + 1), Beta^{-1}(1 - a/2; k + 1, n - k)]`` with ``a = 1 - confidence``,
    ``0`` below when ``k = 0`` and ``1`` above when ``k = n`` (so ``n = 0`` gives ``[0, 1]``).
    Coverage is at least ``confidence`` for every true proportion, and also for a sample drawn
    without replacement from a finite population (the hypergeometric is less spread).

    Parameters
    ----------
    k : int in [0, n]
        Successes.
    n : int >= 0
        Trials.
    confidence : float in (0, 1)

    Returns
    -------
    (lower, upper) : tuple of float
    """
    a = 1.0 - confidence
    # betaincinv(a, b, q) is the Beta(a, b) quantile of q, the value of scipy.stats.beta.ppf(q, a, b) to the bit
    # (one Boost routine), without importing scipy.stats
    lo = 0.0 if k == 0 else float(special.betaincinv(k, n - k + 1, a / 2))
    hi = 1.0 if k == n else float(special.betaincinv(k + 1, n - k, 1 - a / 2))
    return lo, hi


def _clopper_pearson_many(k: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    # Vectorized clopper_pearson (one scipy call for all classes, K can be 1000).
    a = 1.0 - confidence
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k == 0, 0.0, special.betaincinv(np.maximum(k, 1), n - k + 1, a / 2))
        hi = np.where(k == n, 1.0, special.betaincinv(k + 1, np.maximum(n - k, 1), 1 - a / 2))
    return lo, hi


def _ordered_interval(point: float, lower: float, upper: float) -> tuple[float, float, float]:
    # The bounds come from the same monotone map as the point, so they bracket it in exact
    # arithmetic; clamp away the last-ulp rounding so the invariant holds exactly.
    lower, upper = float(np.clip(lower, 0.0, 1.0)), float(np.clip(upper, 0.0, 1.0))
    if math.isnan(point):
        return point, lower, upper
    point = float(np.clip(point, 0.0, 1.0))
    return point, min(lower, point), max(upper, point)


def noise_rate_direct(
    observed_labels: np.ndarray,
    trusted_labels: np.ndarray,
    num_classes: int,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """Flip rate counted on audited items: the share whose observed label differs from the trusted one.

    For ``m`` items that carry both an ordinary (possibly wrong) label ``y~`` and a trusted label
    ``y``, ``r = #{y~ != y} / m`` with the exact two-sided Clopper-Pearson interval. No model and
    no noise model: the interval covers the flip rate of the population the audited items are a
    random sample of, whatever the noise looks like (uniform, pairwise, input-dependent). The
    per-class rates condition on the trusted class, ``r_c = P(y~ != c | y = c)``, each with its
    own Clopper-Pearson interval at level ``confidence`` (not simultaneous over classes).

    The audited items must be drawn at random from the labelled items: auditing the suspects the
    model flags over-states the rate.

    Parameters
    ----------
    observed_labels : array-like of int, shape [m]
        The ordinary labels of the audited items.
    trusted_labels : array-like of int, shape [m]
        Their trusted (audited) labels.
    num_classes : int >= 2
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="audit"``, ``heuristic=False``, ``n = m``, with ``per_class`` and ``confusion``
        (rows: trusted label, columns: observed label).
    """
    k = _check_num_classes(num_classes)
    observed = check_labels(observed_labels, "observed_labels", k)
    trusted = check_labels(trusted_labels, "trusted_labels", k, n=observed.shape[0])
    level = _check_confidence_level(confidence)
    m = observed.shape[0]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (trusted, observed), 1)
    flips = m - int(np.trace(confusion))
    lo, hi = clopper_pearson(flips, m, level)
    n_c = confusion.sum(axis=1)
    flips_c = n_c - confusion.diagonal()
    lo_c, hi_c = _clopper_pearson_many(flips_c, n_c, level)
    per_class = tuple(
        {"class": c, "n": int(n_c[c]), "flips": int(flips_c[c]),
         "rate": float(flips_c[c] / n_c[c]) if n_c[c] else None,
         "lower": float(lo_c[c]), "upper": float(hi_c[c])}
        for c in range(k)
    )
    point, lo, hi = _ordered_interval(flips / m, lo, hi)
    return NoiseRateEstimate(
        flip_rate=point, lower=lo, upper=hi, method="audit", n=m, num_classes=k, confidence=level,
        heuristic=False,
        note=(
            f"{flips}/{m} audited items have an observed label that differs from the trusted one; exact "
            "Clopper-Pearson interval; no model and no noise model; valid for the items the audit is a "
            "random sample of"
        ),
        per_class=per_class, confusion=confusion,
    )


def _eps_from_agreement(agreement: float, k: int) -> float:
    chance = 1.0 / k
    return 1.0 - math.sqrt(min(max((agreement - chance) / (1.0 - chance), 0.0), 1.0))


def noise_rate_from_duplicates(
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    num_classes: int,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """Flip rate from two independent labels of the same ``m`` items.

    Two annotators, independent given the true label, each wrong with the same flip rate ``r``
    and then uniformly on the other ``K - 1`` classes, agree with probability
    ``A = (1 - r)^2 + r^2 / (K - 1)``, decreasing in ``r`` on ``[0, (K - 1)/K]`` (where
    ``A = 1/K``, labels carry no information). Hence, with ``eps = 1 - sqrt((A - 1/K) / (1 - 1/K))``,

    ``r = eps (K - 1) / K``, clipped to ``[0, (K - 1) / K]``.

    The interval maps a two-sided Clopper-Pearson interval on ``A`` through this decreasing
    function: ``[r(A_hi), r(A_lo)]``, coverage at least ``confidence`` under the assumptions.
    The assumption of uniform errors is not checked: annotators who make the same mistakes (on
    the same ambiguous items) agree more, and the rate is under-stated.

    Parameters
    ----------
    labels_a, labels_b : array-like of int, shape [m]
        The two labels of each item.
    num_classes : int >= 2
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="duplicates"``, ``heuristic=False``, ``n = m``.
    """
    k = _check_num_classes(num_classes)
    a = check_labels(labels_a, "labels_a", k)
    b = check_labels(labels_b, "labels_b", k, n=a.shape[0])
    level = _check_confidence_level(confidence)
    m = a.shape[0]
    agree = int(np.sum(a == b))
    lo, hi = clopper_pearson(agree, m, level)
    to_flip = (k - 1) / k
    point, lower, upper = _ordered_interval(
        _eps_from_agreement(agree / m, k) * to_flip, _eps_from_agreement(hi, k) * to_flip,
        _eps_from_agreement(lo, k) * to_flip,
    )
    return NoiseRateEstimate(
        flip_rate=point, lower=lower, upper=upper, method="duplicates", n=m, num_classes=k, confidence=level,
        heuristic=False,
        note=(
            f"agreement {agree}/{m}; assumes two independent annotators with the same flip rate whose wrong "
            "labels are spread uniformly over the other classes (shared mistakes under-state the rate); "
            "Clopper-Pearson interval on the agreement mapped through A = (1 - r)^2 + r^2/(K - 1)"
        ),
    )


def noise_rate_audit_model_heuristic(
    model_pred_audited: np.ndarray,
    audited_labels: np.ndarray,
    model_pred_ordinary: np.ndarray,
    ordinary_labels: np.ndarray,
    num_classes: int,
    confidence: float = 0.95,
) -> NoiseRateEstimate:
    """HEURISTIC flip rate from the model's agreement with trusted and with ordinary labels.

    Let ``psi0 = P(model = y)`` (accuracy on trusted labels) and ``psi1 = P(model = y~)``. If each
    label is wrong with flip rate ``r``, uniformly over the other classes and independently of the
    input (hence of the model's prediction given ``y``), then
    ``psi1 = (1 - r) psi0 + r (1 - psi0) / (K - 1)``, so

    ``r = (psi0 - psi1) (K - 1) / (K psi0 - 1)``  (needs ``psi0 > 1/K``), clipped to ``[0, 1]``.

    Human annotation noise breaks the assumption: annotators err on the ambiguous items, towards
    the classes the model also confuses, so the model agrees with wrong labels more often than
    chance, ``psi1`` is too high and ``r`` under-stated (on a public image benchmark with human labels it
    gave 0.13 for a true 0.40, and its 95% band held the truth in 60% of splits). Use
    :func:`noise_rate_direct` on the audited items whenever they also carry an ordinary label.

    Band: Bonferroni, a two-sided Clopper-Pearson interval at level ``1 - (1-confidence)/2`` on
    each of ``psi0`` and ``psi1``, mapped through the formula at the rectangle's corners; it is
    ``[0, 1]`` when the lower bound of ``psi0`` is ``<= 1/K``. Its nominal level holds only under
    the uniform-noise assumption, hence ``heuristic=True``.

    Parameters
    ----------
    model_pred_audited : array-like of int, shape [a]
        Model predictions on the audited items.
    audited_labels : array-like of int, shape [a]
        Trusted labels of the audited items.
    model_pred_ordinary : array-like of int, shape [o]
        Model predictions on items with ordinary (possibly noisy) labels.
    ordinary_labels : array-like of int, shape [o]
    num_classes : int >= 2
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="audit_model_heuristic"``, ``heuristic=True``, ``n = a + o``; ``flip_rate`` is
        NaN when ``psi0 <= 1/K``.
    """
    k = _check_num_classes(num_classes)
    pa = check_labels(model_pred_audited, "model_pred_audited", k)
    ya = check_labels(audited_labels, "audited_labels", k, n=pa.shape[0])
    po = check_labels(model_pred_ordinary, "model_pred_ordinary", k)
    yo = check_labels(ordinary_labels, "ordinary_labels", k, n=po.shape[0])
    level = _check_confidence_level(confidence)
    each = 1.0 - (1.0 - level) / 2.0
    a, o = pa.shape[0], po.shape[0]
    k0, k1 = int(np.sum(pa == ya)), int(np.sum(po == yo))
    psi0, psi1 = k0 / a, k1 / o
    psi0_lo, psi0_hi = clopper_pearson(k0, a, each)
    psi1_lo, psi1_hi = clopper_pearson(k1, o, each)
    chance = 1.0 / k
    note = (
        f"HEURISTIC: psi0 (model vs audited) {k0}/{a}, psi1 (model vs ordinary) {k1}/{o}; assumes uniform "
        "noise independent of the input, which annotators who err where the model errs break (the rate is "
        "then under-stated); Bonferroni of two Clopper-Pearson intervals"
    )

    def flip_at(p0: float, p1: float) -> float:
        return float(np.clip((p0 - p1) * (k - 1) / (k * p0 - 1.0), 0.0, 1.0))

    common = {"method": "audit_model_heuristic", "n": a + o, "num_classes": k, "confidence": level,
              "heuristic": True}
    if psi0_lo <= chance:
        # The rectangle reaches psi0 = 1/K where the formula is unbounded: no informative band.
        point = flip_at(psi0, psi1) if psi0 > chance else float("nan")
        return NoiseRateEstimate(
            flip_rate=point, lower=0.0, upper=1.0, **common,
            note=note + f"; model accuracy on audited items is not clearly above chance 1/K={chance:.3g}, "
            "so the band is uninformative" + ("" if psi0 > chance else " and the estimate undefined"),
        )
    corners = [flip_at(p0, p1) for p0 in (psi0_lo, psi0_hi) for p1 in (psi1_lo, psi1_hi)]
    point, lower, upper = _ordered_interval(flip_at(psi0, psi1), min(corners), max(corners))
    return NoiseRateEstimate(flip_rate=point, lower=lower, upper=upper, note=note, **common)


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
    p = check_probs(probs)
    if p.shape[1] != k:
        raise ValueError(f"`probs` has {p.shape[1]} columns but `num_classes` is {k}.")
    y = check_labels(labels, "labels", k, n=p.shape[0])
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
    p = check_probs(probs)
    k = p.shape[1]
    y = check_labels(labels, "labels", k, n=p.shape[0])
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
    t = as_numpy(thresholds, "thresholds")
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
    """HEURISTIC flip rate: off-diagonal mass of the calibrated confident joint.

    ``r = 1 - trace(C) / n`` with ``C`` from :func:`confident_joint` (equals
    ``1 - trace(cleanlab.count.estimate_joint(...))``). It counts a label as wrong where the model
    confidently prefers another class, so the model's own mistakes are read as label noise: on
    human annotation noise it over-states the rate (0.62 for a true 0.40 on a public image
    benchmark). The band is a Clopper-Pearson interval treating the off-diagonal count as
    binomial; it ignores the error of ``probs`` and of the confident counting. Shown for
    monitoring, never fed into a guarantee (``heuristic=True``). Needs out-of-sample
    probabilities.

    Parameters
    ----------
    labels : array-like of int, shape [n]
    probs : array-like, shape [n, K]
    thresholds : array-like, shape [K], optional
        Defaults to :func:`per_class_thresholds` of the same data.
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    NoiseRateEstimate
        ``method="confident_learning"``, ``heuristic=True``.
    """
    level = _check_confidence_level(confidence)
    joint = confident_joint(labels, probs, thresholds=thresholds, calibrate=True)
    k = joint.shape[0]
    n = int(joint.sum())
    off = n - int(np.trace(joint))
    lo, hi = clopper_pearson(off, n, level)
    point, lo, hi = _ordered_interval(off / n, lo, hi)
    return NoiseRateEstimate(
        flip_rate=point, lower=lo, upper=hi, method="confident_learning", n=n, num_classes=k,
        confidence=level, heuristic=True,
        note=(
            f"HEURISTIC: off-diagonal mass {off}/{n} of the calibrated confident joint (Northcutt et al. "
            "2021); it reads the model's own mistakes as label noise, and the band treats that count as "
            "binomial: no coverage guarantee"
        ),
    )


#: name -> estimator returning a flip-rate :class:`NoiseRateEstimate`, most trusted first. The
#: first two are not heuristics (``audit`` assumes nothing, ``duplicates`` states its assumption
#: in the note); the last two are.
NOISE_RATE_ESTIMATORS: dict[str, Callable[..., NoiseRateEstimate]] = {
    "audit": noise_rate_direct,
    "duplicates": noise_rate_from_duplicates,
    "audit_model_heuristic": noise_rate_audit_model_heuristic,
    "confident_learning": noise_rate_confident_learning,
}


# --------------------------------------------------------------------------------------------
# Per-item rules (hot path at feedback ingestion). Written once for torch tensors and numpy arrays:
# tensors stay on their device with no host sync; numpy serves the feedback writer's small batches,
# because every torch op releases the GIL (numpy only in its larger loops), and a thread that takes
# it back behind a busy event loop waits up to the interpreter's switch interval (5 ms) each time.
# --------------------------------------------------------------------------------------------

Array = Any  # torch.Tensor or np.ndarray; the rules return the kind they are given


def _self_confidence(probs: Array, labels: Array) -> Array:
    """``p_{y~}`` of each row."""
    if isinstance(probs, np.ndarray):
        return np.take_along_axis(probs, labels[:, None], 1)[:, 0]
    return probs.gather(1, labels[:, None]).squeeze(1)


def _where(condition: Array, a: Any, b: Any) -> Array:
    if isinstance(condition, np.ndarray):
        return np.where(condition, a, b)
    import torch

    return torch.where(condition, a, b)


def _normalized_margin(probs: Array, labels: Array) -> Array:
    if isinstance(probs, np.ndarray):
        classes = np.arange(probs.shape[1])
    else:
        import torch

        classes = torch.arange(probs.shape[1], device=probs.device)
    others = _where(labels[:, None] == classes, float("-inf"), probs)
    best_other = others.max(1) if isinstance(others, np.ndarray) else others.amax(1)
    return (_self_confidence(probs, labels) - best_other + 1.0) / 2.0


#: name -> ``(probs [N, K], labels [N]) -> score [N]`` in ``[0, 1]``, lower = more likely mislabelled
#: (torch tensors or numpy arrays, returned as given).
LABEL_QUALITY_SCORES: dict[str, Callable[[Array, Array], Array]] = {
    "self_confidence": _self_confidence,
    "normalized_margin": _normalized_margin,
}


def _check_item_arrays(probs: Any, labels: Any) -> Any:
    """Check the kinds, shapes and dtypes of ``probs`` [N, K] and ``labels`` [N] (both torch tensors on one
    device, or both numpy arrays); returns ``labels`` as int64."""
    numpy = isinstance(probs, np.ndarray)
    torch = None if numpy else sys.modules.get("torch")  # a tensor exists only once torch is imported
    tensor = torch is not None and isinstance(probs, torch.Tensor)
    if not (numpy or tensor) or probs.ndim != 2 or probs.shape[1] < 2 or not (
            np.issubdtype(probs.dtype, np.floating) if numpy else probs.is_floating_point()):
        raise ValueError(
            "`probs` must be a floating-point torch.Tensor or numpy array [N, K] with K >= 2, got "
            f"{type(probs).__name__} {tuple(getattr(probs, 'shape', ()))}."
        )
    kind = np.ndarray if numpy else torch.Tensor
    int_tensor_types = () if numpy else (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    if not isinstance(labels, kind) or labels.shape != probs.shape[:1] or not (
            np.issubdtype(labels.dtype, np.integer) if numpy else labels.dtype in int_tensor_types):
        raise ValueError(
            f"`labels` must be an integer {kind.__module__.split('.')[0]} {kind.__name__} [N] with N = "
            f"{probs.shape[0]} (the kind of `probs`), got {type(labels).__name__} "
            f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}."
        )
    if numpy:
        return labels.astype(np.int64, copy=False)
    if labels.device != probs.device:
        raise ValueError(f"`labels` is on {labels.device} but `probs` on {probs.device}.")
    return labels.long()


def label_quality(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    method: str = "self_confidence",
) -> torch.Tensor | np.ndarray:
    """Label-quality score of each given label (cleanlab's definitions); low = suspicious.

    * ``self_confidence``: ``p_{y~}``;
    * ``normalized_margin``: ``(p_{y~} - max_{j != y~} p_j + 1) / 2``, cleanlab's rescaling of the
      margin to ``[0, 1]`` (same ranking as the raw margin).

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
        p = check_probs(probs)
        return LABEL_QUALITY_SCORES[method](p, check_labels(labels, "labels", p.shape[1], n=p.shape[0]))
    return LABEL_QUALITY_SCORES[method](probs, _check_item_arrays(probs, labels))


class Suspects(NamedTuple):
    """Output of :func:`suspect_mask`."""

    mask: Array
    """bool [N] (torch or numpy, as given): the given label is a suspected annotation error."""
    proposed: Array
    """int64 [N]: most probable confident class other than the given one for suspects,
    ``argmax p`` (the model's prediction) for the rest."""


def suspect_mask(probs: Array, labels: Array, thresholds: Array) -> Suspects:
    """O(K) per-item confident-learning rule for a batch of feedback labels.

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
    probs : torch.Tensor or np.ndarray, shape [N, K]
    labels : torch.Tensor or np.ndarray of int, shape [N]
        Given labels in ``[0, K)`` (not range-checked, to avoid a device sync), of the kind of ``probs``.
    thresholds : torch.Tensor or np.ndarray, shape [K]
        From :func:`per_class_thresholds` (stored in the Calibration), of the kind of ``probs``.

    Returns
    -------
    Suspects
        ``(mask [N] bool, proposed [N] int64)`` of the kind of ``probs`` (on its device).
    """
    labels = _check_item_arrays(probs, labels)
    numpy = isinstance(probs, np.ndarray)
    # `probs` passed its check: a numpy array, or a tensor and then torch is imported
    if not isinstance(thresholds, np.ndarray if numpy else sys.modules["torch"].Tensor) or thresholds.shape != probs.shape[1:]:
        raise ValueError(
            f"`thresholds` must be a {'numpy array' if numpy else 'torch.Tensor'} [K] with K = {probs.shape[1]} "
            f"(the kind of `probs`), got {type(thresholds).__name__} {tuple(getattr(thresholds, 'shape', ()))}."
        )
    if not numpy and thresholds.device != probs.device:
        raise ValueError(f"`thresholds` is on {thresholds.device} but `probs` on {probs.device}.")
    floor = (thresholds.astype(probs.dtype, copy=False) if numpy else thresholds.to(probs.dtype)) - THRESHOLD_SLACK
    candidates = (probs >= floor) & (probs > _self_confidence(probs, labels)[:, None])
    mask = candidates.any(1)
    best_candidate = _where(candidates, probs, float("-inf")).argmax(1)
    return Suspects(mask=mask, proposed=_where(mask, best_candidate, probs.argmax(1)))

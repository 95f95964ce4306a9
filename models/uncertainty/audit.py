"""Audit planning: how many trusted labels buy which precision.

An *audit* is a random sample of ``m`` labelled items that an expert labels again; the expert's label is
trusted. It buys two things, and this module says how many items each needs (pure numpy/scipy, no I/O):

* **The noise rate, counted directly.** The flip rate ``r = P(y~ != y)`` of the ordinary labels is the
  share of audited items whose ordinary label differs from the trusted one, with the exact
  Clopper-Pearson interval (Clopper and Pearson, Biometrika 1934). No model and no noise model: its
  precision depends only on ``m`` and ``r`` (:func:`planned_width`, :func:`expected_width`,
  :func:`audit_size_for_rate_width`).
* **Prediction sets valid without a noise model.** The audit-rectified conformal threshold estimates
  the clean-label score CDF as the noisy-label CDF plus the audit's mean correction (in the spirit of
  prediction-powered inference, Angelopoulos et al., Science 2023). Its calibration-conditional form
  subtracts a margin ``z sqrt(v_d / m + c (1 - c) / n)`` from the coverage estimate
  (:func:`coverage_margin`, :func:`audit_size_for_coverage_margin`); the sets are then sized for
  coverage ``1 - alpha`` plus that margin, so the margin is what a small audit costs in set size.

:func:`audit_plan_table` tabulates both for a few audit sizes. Rates are flip rates (share of wrong
labels), as everywhere in ``noisewise.models.uncertainty.labelnoise``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "DEFAULT_PLAN_SIZES",
    "WORST_CASE_RATE",
    "audit_plan_table",
    "audit_size_for_coverage_margin",
    "audit_size_for_rate_width",
    "coverage_margin",
    "expected_width",
    "planned_width",
]

#: The share whose Clopper-Pearson interval is widest at every ``m``: the planner's answer when the
#: rate is unknown.
WORST_CASE_RATE = 0.5
#: Audit sizes :func:`audit_plan_table` shows by default.
DEFAULT_PLAN_SIZES = (50, 100, 200, 400, 800)
#: Largest audit the size searches consider (a width of 1e-4 at rate 0.5 needs ~4e8 items).
_MAX_AUDIT = 2**40


# --------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_open_unit(value: Any, name: str, hint: str) -> float:
    if not (_is_real(value) and 0.0 < value < 1.0):
        raise ValueError(f"`{name}` must be a number in (0, 1) ({hint}), got {value!r}.")
    return float(value)


def _check_width(width: Any) -> float:
    if not (_is_real(width) and 0.0 < width <= 1.0):
        raise ValueError(f"`width` must be the total interval width wanted, a number in (0, 1] (e.g. 0.1 for "
                         f"+-0.05), got {width!r}.")
    return float(width)


def _check_rate(rate: Any, allow_none: bool) -> float | None:
    if rate is None and allow_none:
        return None
    if not (_is_real(rate) and 0.0 <= rate <= 1.0):
        extra = " or None (unknown: worst case 0.5)" if allow_none else ""
        raise ValueError(f"`rate` must be a flip rate in [0, 1] (share of wrong labels){extra}, got {rate!r}.")
    return float(rate)


def _check_z(z: Any) -> float:
    if not (_is_real(z) and z >= 0 and math.isfinite(z)):
        raise ValueError(f"`z` must be a finite normal quantile >= 0 (1.645 for a one-sided 95% bound), got {z!r}.")
    return float(z)


def _check_n(n: Any) -> int | None:
    if n is None:
        return None
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)) or n < 1:
        raise ValueError(f"`n` must be the number of noisy-labelled calibration items, an integer >= 1, or None "
                         f"(many), got {n!r}.")
    return int(n)


def _check_sizes(m: Any, name: str = "m") -> np.ndarray:
    arr = np.asarray(m)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) and not (
        np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise ValueError(f"`{name}` must hold whole numbers of audited items, got {m!r}.")
    if arr.size == 0 or np.any(arr < 1):
        raise ValueError(f"`{name}` must hold audit sizes >= 1, got {m!r}.")
    return arr.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Widths and margins at a given audit size
# --------------------------------------------------------------------------------------------


def _cp_bounds(x: np.ndarray, m: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson bounds for (possibly fractional) counts ``x`` out of ``m``."""
    a = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(x <= 0, 0.0, stats.beta.ppf(a / 2, np.maximum(x, 1e-300), m - x + 1))
        hi = np.where(x >= m, 1.0, stats.beta.ppf(1 - a / 2, x + 1, np.maximum(m - x, 1e-300)))
    return lo, hi


def planned_width(m: Any, rate: float | None = None, confidence: float = 0.95) -> np.ndarray | float:
    """Total width of the Clopper-Pearson interval an audit of ``m`` items reports when its share is ``rate``.

    With ``x = rate * m`` disagreements among ``m`` audited items the exact interval is

    ``[Beta^{-1}(a/2; x, m - x + 1), Beta^{-1}(1 - a/2; x + 1, m - x)]``, ``a = 1 - confidence``,

    with ``0`` below when ``x = 0`` and ``1`` above when ``x = m`` (Clopper and Pearson, 1934). ``x`` is
    taken as the real number ``rate * m``: the beta quantiles are continuous in their shape parameters, so
    this interpolates between the integer counts around ``rate * m`` and the width decreases smoothly in
    ``m`` (the size searches rely on it; the unit tests check it on a grid). It is largest at
    ``rate = 0.5`` (:data:`WORST_CASE_RATE`), used when ``rate`` is None.

    Parameters
    ----------
    m : int or array-like of int, shape [S]
        Audit sizes, each >= 1.
    rate : float in [0, 1] or None
        The flip rate the audit is expected to find (None: worst case 0.5).
    confidence : float in (0, 1)
        Level of the interval.

    Returns
    -------
    float or np.ndarray of float, shape [S]
        ``upper - lower``; a float for a scalar ``m``.
    """
    sizes = _check_sizes(m)
    r = _check_rate(rate, allow_none=True)
    level = _check_open_unit(confidence, "confidence", "e.g. 0.95")
    share = WORST_CASE_RATE if r is None else r
    lo, hi = _cp_bounds(share * sizes, sizes, level)
    width = hi - lo
    return float(width) if np.ndim(m) == 0 else width


def expected_width(m: int, rate: float, confidence: float = 0.95) -> float:
    """Mean width of the Clopper-Pearson interval over the random outcome of an audit of ``m`` items.

    ``E[W] = sum_{x=0..m} C(m, x) r^x (1 - r)^(m - x) (U(x) - L(x))`` with ``X ~ Binomial(m, r)``
    disagreements and ``[L(x), U(x)]`` the exact interval at integer ``x`` (computed exactly, not by
    simulation). It is what an audit of ``m`` items delivers on average; :func:`planned_width` is the
    width at the typical share.

    Parameters
    ----------
    m : int >= 1
        Audit size.
    rate : float in [0, 1]
        True flip rate.
    confidence : float in (0, 1)

    Returns
    -------
    float
    """
    if np.ndim(m) != 0:
        raise ValueError(f"`m` must be one audit size (an integer >= 1), got {m!r}.")
    size = int(_check_sizes(m))
    r = _check_rate(rate, allow_none=False)
    level = _check_open_unit(confidence, "confidence", "e.g. 0.95")
    x = np.arange(size + 1, dtype=np.float64)
    lo, hi = _cp_bounds(x, np.full_like(x, size), level)
    pmf = stats.binom.pmf(np.arange(size + 1), size, r)
    return float(np.sum(pmf * (hi - lo)))


def coverage_margin(
    m: Any,
    rate: float,
    z: float = 1.645,
    *,
    n: int | None = None,
    coverage: float = 0.9,
) -> np.ndarray | float:
    """The margin the calibration-conditional audit-rectified threshold subtracts, at audit size ``m``.

    The threshold is the smallest ``q`` with ``L(q') >= 1 - alpha`` for every larger candidate ``q'``,

    ``L(q) = F_c(q) - z sqrt(v_d(q) / m + F_n(q) (1 - F_n(q)) / n)``,

    where ``F_n`` is the noisy-label score CDF over ``n`` items, ``F_c`` its audit-rectified version and
    ``v_d`` the variance over the audit of ``d_i = 1[S(x_i, y_i) <= q] - 1[S(x_i, y~_i) <= q]``. ``d_i``
    is zero wherever the ordinary label is right, so ``v_d <= E[d^2] = P(exactly one of the two labels
    is covered) <= P(y~ != y) = r``, the flip rate. At the threshold ``F_n ~ coverage``, hence

    ``margin(m) <= z sqrt(r / m + coverage (1 - coverage) / n)``,

    which this returns (the second term is dropped when ``n`` is None, i.e. many noisy items). The bound
    is tight when nearly every wrong label falls outside the set its true label falls in, the usual case
    for a fair model at ``coverage`` near 0.9.

    Parameters
    ----------
    m : int or array-like of int, shape [S]
        Audit sizes, each >= 1.
    rate : float in [0, 1]
        Flip rate of the ordinary labels (an upper bound of ``v_d``).
    z : float >= 0
        Normal quantile of the bound (1.645: the one-sided 95% bound the threshold uses).
    n : int >= 1, optional
        Noisy-labelled calibration items (the audited ones included).
    coverage : float in (0, 1)
        ``F_n`` at the threshold, about ``1 - alpha``.

    Returns
    -------
    float or np.ndarray of float, shape [S]
    """
    sizes = _check_sizes(m)
    r = _check_rate(rate, allow_none=False)
    z = _check_z(z)
    count = _check_n(n)
    c = _check_open_unit(coverage, "coverage", "the noisy-label coverage at the threshold, about 1 - alpha")
    noisy = 0.0 if count is None else c * (1.0 - c) / count
    margin = z * np.sqrt(r / sizes + noisy)
    return float(margin) if np.ndim(m) == 0 else margin


# --------------------------------------------------------------------------------------------
# Audit sizes
# --------------------------------------------------------------------------------------------


def audit_size_for_rate_width(width: float, rate: float | None = None, confidence: float = 0.95) -> int:
    """Smallest audit whose exact interval for the flip rate is at most ``width`` wide.

    ``m* = min {m >= 1 : planned_width(m, rate, confidence) <= width}``, with :func:`planned_width` the
    Clopper-Pearson width at the share ``rate`` (worst case 0.5 when None). The search starts from the
    normal approximation ``m0 = (2 z_{1-a/2})^2 r (1 - r) / width^2``, brackets ``m*`` by doubling and
    halving, and bisects on the exact beta quantiles (the width decreases in ``m``), so near 0 or 1,
    where the normal approximation is far off, the answer is still exact. By construction the width at
    ``m*`` is ``<= width`` and at ``m* - 1`` it is ``> width``.

    Parameters
    ----------
    width : float in (0, 1]
        Total width ``upper - lower`` wanted (0.1 means about +-0.05).
    rate : float in [0, 1] or None
        The flip rate expected; None for the worst case.
    confidence : float in (0, 1)
        Level of the interval.

    Returns
    -------
    int
        ``m*``.

    Examples
    --------
    >>> audit_size_for_rate_width(0.1, 0.2)  # +-0.05 around a 20% flip rate
    264
    """
    w = _check_width(width)
    r = _check_rate(rate, allow_none=True)
    level = _check_open_unit(confidence, "confidence", "e.g. 0.95")

    def fits(size: int) -> bool:
        return planned_width(size, r, level) <= w

    if fits(1):
        return 1
    share = WORST_CASE_RATE if r is None else r
    z = stats.norm.ppf(0.5 + level / 2)
    guess = max(2, min(_MAX_AUDIT, int((2 * z) ** 2 * max(share * (1 - share), 1e-4) / w**2)))
    lo, hi = 1, guess  # invariant: not fits(lo), fits(hi)
    while not fits(hi):
        lo, hi = hi, 2 * hi
        if hi > _MAX_AUDIT:
            raise ValueError(f"`width` {w!r} needs an audit of more than {_MAX_AUDIT} items; ask for a wider interval.")
    while hi // 2 > lo and not fits(hi // 2):  # the guess may be far above m* (rates near 0 or 1)
        lo = hi // 2
    while hi // 2 > lo and fits(hi // 2):
        hi //= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def audit_size_for_coverage_margin(
    margin: float,
    rate: float,
    z: float = 1.645,
    *,
    n: int | None = None,
    coverage: float = 0.9,
) -> int:
    """Smallest audit for which the audit-rectified threshold's coverage margin is at most ``margin``.

    Solving :func:`coverage_margin` ``z sqrt(r / m + c (1 - c) / n) <= margin`` for ``m``:

    ``m* = ceil(z^2 r / (margin^2 - z^2 c (1 - c) / n))``  (``n`` None: ``ceil(z^2 r / margin^2)``),

    then corrected by one step where floating-point rounding of the ceiling disagrees with
    :func:`coverage_margin`. ``v_d <= r`` makes it an upper bound on the audit needed.

    Parameters
    ----------
    margin : float in (0, 1)
        Largest margin accepted, in coverage units (e.g. 0.05: the sets are sized for at most 5 points
        above ``1 - alpha``).
    rate : float in [0, 1]
        Flip rate of the ordinary labels.
    z : float >= 0
        Normal quantile (1.645, as the threshold uses).
    n : int >= 1, optional
        Noisy-labelled calibration items; they take their own share of the margin.
    coverage : float in (0, 1)
        ``F_n`` at the threshold, about ``1 - alpha``.

    Returns
    -------
    int
        ``m*`` (1 when ``rate`` or ``z`` is 0).

    Raises
    ------
    ValueError
        When the ``n`` noisy items alone already use up ``margin`` (no audit is enough).

    Examples
    --------
    >>> audit_size_for_coverage_margin(0.05, 0.2)
    217
    """
    mg = _check_open_unit(margin, "margin", "the coverage margin accepted, e.g. 0.05")
    r = _check_rate(rate, allow_none=False)
    z = _check_z(z)
    count = _check_n(n)
    c = _check_open_unit(coverage, "coverage", "the noisy-label coverage at the threshold, about 1 - alpha")
    room = mg**2 - (0.0 if count is None else z**2 * c * (1.0 - c) / count)
    if room <= 0:
        floor = z * math.sqrt(c * (1.0 - c) / count)
        raise ValueError(f"`n` = {count} noisy items alone give a margin of {floor:.4f} >= `margin` {mg}; no audit "
                         "size reaches it: collect more labelled items or accept a larger margin.")
    if r == 0.0 or z == 0.0:
        return 1
    size = max(1, math.ceil(z**2 * r / room))
    if size > _MAX_AUDIT:
        raise ValueError(f"`margin` {mg!r} needs an audit of more than {_MAX_AUDIT} items; accept a larger margin.")

    def fits(k: int) -> bool:
        return coverage_margin(k, r, z, n=count, coverage=c) <= mg

    while not fits(size):
        size += 1
    while size > 1 and fits(size - 1):
        size -= 1
    return size


def audit_plan_table(
    rate: float | None,
    sizes: Sequence[int] = DEFAULT_PLAN_SIZES,
    *,
    confidence: float = 0.95,
    z: float = 1.645,
    n: int | None = None,
    coverage: float = 0.9,
) -> list[dict[str, Any]]:
    """What audits of several sizes buy: the noise rate's interval width and the coverage margin.

    For each ``m`` in ``sizes``: :func:`planned_width` (interval width at the share ``rate``),
    :func:`expected_width` (its mean over the audit's random outcome, ``X ~ Binomial(m, rate)``) and
    :func:`coverage_margin` (``z sqrt(rate / m + c (1 - c) / n)``, an upper bound). With ``rate`` None
    the widths are the worst case (share 0.5) and the margin is None: it needs a rate.

    Parameters
    ----------
    rate : float in [0, 1] or None
        The flip rate expected.
    sizes : sequence of int >= 1, shape [S]
        Audit sizes, listed in the order given.
    confidence : float in (0, 1)
        Level of the noise rate's interval.
    z : float >= 0
        Normal quantile of the coverage margin.
    n : int >= 1, optional
        Noisy-labelled calibration items.
    coverage : float in (0, 1)
        About ``1 - alpha``.

    Returns
    -------
    list of dict, length S
        ``{"m", "rate", "width", "expected_width", "coverage_margin"}`` per size (``rate`` is the share
        used: 0.5 when the argument was None).
    """
    r = _check_rate(rate, allow_none=True)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"`sizes` must be a non-empty sequence of audit sizes, got {sizes!r}.")
    m = _check_sizes(list(sizes), "sizes").astype(np.int64)
    level = _check_open_unit(confidence, "confidence", "e.g. 0.95")
    share = WORST_CASE_RATE if r is None else r
    widths = planned_width(m, share, level)
    margins = None if r is None else coverage_margin(m, r, z, n=n, coverage=coverage)
    return [
        {"m": int(size), "rate": share, "width": float(widths[i]),
         "expected_width": expected_width(int(size), share, level),
         "coverage_margin": None if margins is None else float(margins[i])}
        for i, size in enumerate(m)
    ]

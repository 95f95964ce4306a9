"""Selective classification: confidence functions, risk-coverage, AURC and a certified abstention threshold.

A model answers when its confidence ``g(x)`` reaches a threshold and abstains otherwise. The
threshold is certified on held-out calibration data with a fixed-sequence binomial test so that the
selective risk (error rate among accepted inputs) stays below a target ``r*`` with probability at
least ``1 - delta`` over the calibration draw. :func:`certified_frontier` runs the same test on a
grid of risk levels, simultaneously valid, to say what a model CAN promise when ``r*`` is out of
reach.

Labels of the certification split may be noisy. Two corrections exist, each with its own
assumption: ``noise_eps`` (symmetric noise at a known rate; invalid under instance-dependent noise)
and ``max_wrong_labels`` (a known upper bound ``W`` on the number of wrong labels; no noise model,
valid wherever the wrong labels fall, at the price of ``W / n_j`` in risk).

Conventions
-----------
* Confidence: higher means more confident. ``CONFIDENCE_FUNCTIONS`` maps a name to a batched torch
  function ``logits [N, K] -> confidence [N]``.
* Decision: accept iff ``confidence >= threshold``; ``threshold = +inf`` abstains on everything.
* Noise rates ``eps`` are in the "uniform/all" convention:
  ``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K``; the flip rate (share of labels that differ
  from the true one) is ``eps (K-1)/K``. :func:`wrong_label_bound` takes a flip rate.

References
----------
Geifman, Uziel, El-Yaniv. "Bias-reduced uncertainty estimation for deep neural classifiers",
ICLR 2019 (AURC, E-AURC).
Cattelan, Silva. "How to fix a broken confidence estimator: evaluating post-hoc methods for
selective classification with deep neural networks", UAI 2024 (MaxLogit-pNorm).
Angelopoulos, Bates, Candes, Jordan, Lei. "Learn then Test: calibrating predictive algorithms to
achieve risk control", 2021 (fixed-sequence testing of thresholds).

torch and ``scipy.stats`` are imported by the functions that use them: reading a stored threshold
(:class:`CertifiedThreshold`) needs neither (``noisewise monitor`` loads no torch).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from scipy import special

from noisewise.models.uncertainty.host import as_numpy

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIDENCE_FUNCTIONS",
    "DEFAULT_RISK_GRID",
    "PNORM_GRID",
    "CertifiedThreshold",
    "FrontierPoint",
    "aurc",
    "certified_frontier",
    "certify_threshold",
    "confidence",
    "decide",
    "eaurc",
    "frontier_sentence",
    "maxlogit_pnorm_confidence",
    "msp_confidence",
    "optimal_aurc",
    "risk_coverage_curve",
    "select_pnorm",
    "wrong_label_bound",
]

#: Exponents searched by :func:`select_pnorm` (Cattelan & Silva search the same small range).
PNORM_GRID: tuple[int, ...] = tuple(range(10))


# --------------------------------------------------------------------------------------------
# Confidence functions (hot path: batched torch on the input's device, no host sync)
# --------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_logits(logits: Any) -> None:
    import torch

    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"`logits` must be a torch.Tensor of shape [N, K], got {type(logits).__name__}."
        )
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"`logits` must have shape [N, K] with K >= 2 classes, got shape {tuple(logits.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"`logits` must be a floating-point tensor, got dtype {logits.dtype}.")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    import torch

    # fp16/bf16 logits lose the small differences that rank confident inputs; fp64 stays fp64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def msp_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability, ``g(z) = max_k softmax(z)_k``.

    Parameters
    ----------
    logits : torch.Tensor, shape [N, K]

    Returns
    -------
    torch.Tensor, shape [N]
        In ``[1/K, 1]``; computed in at least fp32 on the input's device.
    """
    import torch

    _check_logits(logits)
    return torch.softmax(_at_least_fp32(logits), dim=1).amax(dim=1)


def _check_p(p: Any) -> None:
    if not _is_int(p) or p not in PNORM_GRID:
        raise ValueError(
            f"`p` must be an integer in {PNORM_GRID[0]}..{PNORM_GRID[-1]} (0 = no normalization), "
            f"got {p!r}."
        )


def maxlogit_pnorm_confidence(logits: torch.Tensor, *, p: int) -> torch.Tensor:
    """MaxLogit-pNorm (Cattelan & Silva 2024).

    ``u = z - mean_k z_k`` (centered logits), then

    * ``p >= 1``: ``g(z) = max_k u_k / ||u||_p``, a value in ``[0, 1]``;
    * ``p = 0``:  ``g(z) = max_k u_k``, the centered max logit without normalization. ``p = 0`` is a
      convention of this library (``||.||_0`` is not a norm); it is the paper's "no normalization"
      entry of the search, and centering does not change the MaxLogit ranking.

    Normalizing by ``||u||_p`` removes the logit-scale component that label smoothing and similar
    recipes distort, which is what breaks MSP on such models. Constant logits give ``g = 0``.

    Parameters
    ----------
    logits : torch.Tensor, shape [N, K]
    p : int in 0..9, keyword-only
        Pick it with :func:`select_pnorm` on a tuning split.

    Returns
    -------
    torch.Tensor, shape [N]
    """
    _check_logits(logits)
    _check_p(p)
    z = _at_least_fp32(logits)
    centered = z - z.mean(dim=1, keepdim=True)
    top = centered.amax(dim=1)
    if p == 0:
        return top
    import torch

    norm = torch.linalg.vector_norm(centered, ord=int(p), dim=1)
    # Constant logits: top == norm == 0; clamping gives g = 0 instead of NaN.
    return top / norm.clamp_min(torch.finfo(norm.dtype).tiny)


#: name -> batched torch function ``(logits [N, K], **params) -> confidence [N]`` (higher = more confident).
CONFIDENCE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "msp": msp_confidence,
    "maxlogit_pnorm": maxlogit_pnorm_confidence,
}


def _params_of(name: str) -> set[str]:
    signature = inspect.signature(CONFIDENCE_FUNCTIONS[name])
    return {k for k in signature.parameters if k != "logits"}


def confidence(logits: torch.Tensor, name: str = "msp", **params: Any) -> torch.Tensor:
    """Confidence of each prediction under a registered confidence function.

    Parameters
    ----------
    logits : torch.Tensor, shape [N, K]
    name : str
        A key of :data:`CONFIDENCE_FUNCTIONS`: ``"msp"`` (no parameters) or ``"maxlogit_pnorm"``
        (requires ``p``).
    **params
        Parameters of that function.

    Returns
    -------
    torch.Tensor, shape [N]
        Higher = more confident, on the device of ``logits``.
    """
    if name not in CONFIDENCE_FUNCTIONS:
        raise ValueError(
            f"`name` must be one of {sorted(CONFIDENCE_FUNCTIONS)}, got {name!r}."
        )
    expected = _params_of(name)
    unknown = set(params) - expected
    missing = expected - set(params)
    if unknown or missing:
        raise ValueError(
            f"confidence function {name!r} takes parameters {sorted(expected)}; "
            f"got {sorted(params)} (missing {sorted(missing)}, unknown {sorted(unknown)})."
        )
    return CONFIDENCE_FUNCTIONS[name](logits, **params)


def select_pnorm(
    logits: torch.Tensor | np.ndarray,
    correct: torch.Tensor | np.ndarray,
    p_grid: tuple[int, ...] = PNORM_GRID,
) -> int | None:
    """Choose ``p`` of MaxLogit-pNorm by lowest AURC on a tuning split, or ``None`` for MSP.

    Parameters
    ----------
    logits : torch.Tensor or np.ndarray, shape [N, K]
        Logits of a tuning split (disjoint from the certification split).
    correct : array-like of bool, shape [N]
        Whether the model's prediction is right (with the labels at hand).
    p_grid : tuple of int
        Candidates, default 0..9.

    Returns
    -------
    int or None
        The ``p`` with the lowest AURC (smallest ``p`` among ties), or ``None`` when no ``p``
        has an AURC strictly below MSP's: then use ``"msp"`` (the safe default).
    """
    import torch

    logits_t = torch.as_tensor(logits)
    _check_logits(logits_t)
    correct_np = _check_binary(correct, "correct", logits_t.shape[0])
    for p in p_grid:
        _check_p(p)
    msp = aurc(msp_confidence(logits_t), correct_np)
    scores = {p: aurc(maxlogit_pnorm_confidence(logits_t, p=p), correct_np) for p in p_grid}
    best = min(scores, key=lambda p: (scores[p], p))
    return best if scores[best] < msp else None


# --------------------------------------------------------------------------------------------
# Risk-coverage and AURC (evaluation / fitting: numpy)
# --------------------------------------------------------------------------------------------


def _check_confidence(confidence: Any, name: str = "confidence") -> np.ndarray:
    conf = as_numpy(confidence, name)
    if conf.ndim != 1 or conf.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array [n], got shape {conf.shape}.")
    if not np.issubdtype(conf.dtype, np.number) or np.issubdtype(conf.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be real numbers, got dtype {conf.dtype}.")
    conf = conf.astype(np.float64)
    if not np.all(np.isfinite(conf)):
        raise ValueError(f"`{name}` contains {int(np.sum(~np.isfinite(conf)))} NaN/inf values.")
    return conf


def _check_binary(values: Any, name: str, n: int) -> np.ndarray:
    arr = as_numpy(values, name)
    if arr.shape != (n,):
        raise ValueError(f"`{name}` must have shape ({n},) to match the confidences, got {arr.shape}.")
    if arr.dtype != bool:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"`{name}` must be boolean (or 0/1), got values outside {{0, 1}}.")
        arr = arr.astype(bool)
    return arr


def _sorted_groups(conf: np.ndarray, err: np.ndarray):
    """Sort descending; return group thresholds, cumulative accepted and errors at each group end."""
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    cum_err = np.cumsum(err[order])
    group_end = np.r_[conf_sorted[1:] != conf_sorted[:-1], True]
    n_acc = np.flatnonzero(group_end) + 1
    return conf_sorted[group_end], n_acc, cum_err[group_end]


def risk_coverage_curve(
    confidence: np.ndarray | torch.Tensor, correct: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical risk-coverage curve at every distinct confidence threshold.

    For threshold ``t`` the model accepts ``{i : g_i >= t}``; coverage ``= n_t / n`` and selective
    risk ``= (errors among accepted) / n_t``.

    Parameters
    ----------
    confidence : array-like, shape [n]
    correct : array-like of bool, shape [n]

    Returns
    -------
    coverage, risk, thresholds : np.ndarray, each shape [m]
        ``m`` = number of distinct confidence values; thresholds descending, coverage increasing,
        the last point is full coverage.
    """
    conf = _check_confidence(confidence)
    err = ~_check_binary(correct, "correct", conf.shape[0])
    thresholds, n_acc, k_err = _sorted_groups(conf, err)
    return n_acc / conf.shape[0], k_err / n_acc, thresholds


def aurc(confidence: np.ndarray | torch.Tensor, correct: np.ndarray | torch.Tensor) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019), tie-aware.

    ``AURC = (1/n) sum_{i=1}^{n} E_i / i`` where ``E_i`` is the number of errors among the ``i``
    most confident items. Within a group of tied confidences the order is undefined, so ``E_i``
    is its expectation under a random order: the errors of the groups above plus the tie group's
    error fraction times the items taken from it (linear interpolation). Without ties this is the
    usual definition; with ties it does not depend on how a sort breaks them.

    Parameters
    ----------
    confidence : array-like, shape [n]
    correct : array-like of bool, shape [n]

    Returns
    -------
    float
        In ``[0, 1]``; lower is better.
    """
    conf = _check_confidence(confidence)
    err = ~_check_binary(correct, "correct", conf.shape[0])
    n = conf.shape[0]
    _, n_end, k_end = _sorted_groups(conf, err)
    n_start = np.r_[0, n_end[:-1]]
    k_start = np.r_[0, k_end[:-1]]
    size = n_end - n_start
    group = np.repeat(np.arange(n_end.shape[0]), size)
    i = np.arange(1, n + 1)
    expected_errors = k_start[group] + (i - n_start[group]) * (k_end - k_start)[group] / size[group]
    return float(np.mean(expected_errors / i))


def optimal_aurc(n: int, n_errors: int) -> float:
    """AURC of the ideal ranking (all correct items first) for ``n_errors`` errors among ``n``.

    ``AURC* = (1/n) sum_{i = n - e + 1}^{n} (i - (n - e)) / i``  (``~ r + (1 - r) ln(1 - r)``).
    """
    if n < 1 or not 0 <= n_errors <= n:
        raise ValueError(f"need n >= 1 and 0 <= n_errors <= n, got n={n}, n_errors={n_errors}.")
    i = np.arange(n - n_errors + 1, n + 1)
    return float(np.sum((i - (n - n_errors)) / i) / n)


def eaurc(confidence: np.ndarray | torch.Tensor, correct: np.ndarray | torch.Tensor) -> float:
    """Excess AURC (Geifman et al. 2019): ``E-AURC = AURC - AURC*``.

    ``AURC*`` is the AURC of the optimal ranking with the same number of errors, so E-AURC
    measures ranking quality alone; it is 0 for a perfect ranking.
    """
    conf = _check_confidence(confidence)
    ok = _check_binary(correct, "correct", conf.shape[0])
    return aurc(conf, ok) - optimal_aurc(conf.shape[0], int(np.sum(~ok)))


# --------------------------------------------------------------------------------------------
# Certified abstention threshold (fitting: numpy) and the serving decision (torch)
# --------------------------------------------------------------------------------------------


def _json_float(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)  # "inf" / "nan": strict JSON has no literal for them; float() reads them back


@dataclass(frozen=True)
class CertifiedThreshold:
    """Result of :func:`certify_threshold`.

    Attributes
    ----------
    threshold : float
        Accept iff ``confidence >= threshold``; ``+inf`` when nothing certified (abstain on all).
    certified : bool
    risk : float
        Target selective risk ``r*`` on clean labels (never loosened).
    delta : float
        Level of the test. The guarantee holds with probability ``>= 1 - delta`` over the
        calibration draw, given the correction's assumption (with ``max_wrong_labels`` taken from
        :func:`wrong_label_bound` at level ``delta_W``: ``>= 1 - delta - delta_W``).
    effective_risk : float
        Level the tested error rate was compared with: ``r*`` without a correction and with
        ``max_wrong_labels``, ``eps (K-1)/K + (1 - eps) r*`` with ``noise_eps``.
    risk_ucb : float
        One-sided Clopper-Pearson upper bound (level ``1 - delta``) of the selective risk at the
        threshold: on clean risk when a correction is used (given its assumption), else on the
        risk measured with the given labels (an over-estimate of clean risk under symmetric
        noise only). NaN when nothing certified.
    observed_risk : float
        ``n_errors / n_accepted`` with the given labels (NaN when nothing is accepted).
    coverage : float
        ``n_accepted / n_calibration``.
    n_accepted, n_errors, n_calibration, n_tested : int
        Accepted items, observed errors among them (with the given labels, before any
        correction), calibration size, grid points tested.
    min_accepted : int
    noise_eps : float or None
        Uniform-convention noise rate used for the symmetric correction (a lower bound), or None.
    num_classes : int or None
    reason : str
        Human-readable verdict; starts with ``"NOTHING CERTIFIED"`` when ``certified`` is False.
    max_wrong_labels : int or None
        Upper bound ``W`` on the wrong labels among the ``n_calibration`` items used by the
        worst-case correction, or None. Stored results that predate this field read back as None.
    """

    threshold: float
    certified: bool
    risk: float
    delta: float
    effective_risk: float
    risk_ucb: float
    observed_risk: float
    coverage: float
    n_accepted: int
    n_errors: int
    n_calibration: int
    n_tested: int
    min_accepted: int
    noise_eps: float | None
    num_classes: int | None
    reason: str
    max_wrong_labels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (non-finite floats as the strings ``"inf"``/``"nan"``)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CertifiedThreshold":
        """Inverse of :meth:`to_dict`; a missing ``max_wrong_labels`` (older results) reads as None."""
        names = {f.name for f in fields(cls)}
        optional = {"max_wrong_labels"}  # added later: results stored before it lack the key
        missing = names - optional - set(d)
        if missing:
            raise ValueError(f"CertifiedThreshold.from_dict: missing keys {sorted(missing)}.")
        floats = {"threshold", "risk", "delta", "effective_risk", "risk_ucb", "observed_risk", "coverage"}
        ints = {"n_accepted", "n_errors", "n_calibration", "n_tested", "min_accepted"}
        kw: dict[str, Any] = {}
        for k in names:
            v = d.get(k)
            if k in floats:
                v = float(v)
            elif k in ints:
                v = int(v)
            elif k == "noise_eps":
                v = None if v is None else float(v)
            elif k in ("num_classes", "max_wrong_labels"):
                v = None if v is None else int(v)
            elif k == "certified":
                v = bool(v)
            kw[k] = v
        return cls(**kw)


def _clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    # One-sided exact upper bound: P(Bin(n, ucb) <= k) = delta.
    if n == 0:
        return float("nan")
    if k >= n:
        return 1.0
    # betaincinv(a, b, q) is the Beta(a, b) quantile of q, scipy.stats.beta.ppf(q, a, b) to the bit
    return float(special.betaincinv(k + 1, n - k, 1.0 - delta))


def wrong_label_bound(n: int, flip_rate: float, delta: float) -> int:
    """Upper ``(1 - delta)`` quantile of the number of wrong labels among ``n`` items.

    When each of ``n`` i.i.d. items carries a wrong label with probability ``flip_rate`` (the
    flip-rate convention: share of labels that differ from the true one; ``eps (K-1)/K`` for a
    uniform-convention ``eps``), the count of wrong labels is ``Bin(n, flip_rate)`` and

        ``W = min {w : P(Bin(n, flip_rate) > w) <= delta}``

    bounds it with probability ``>= 1 - delta``. No noise model is needed: the labels may be
    wrong on exactly the hardest items (instance-dependent noise), only the marginal rate enters.
    ``W`` grows with ``flip_rate``, so an UPPER bound of the rate (e.g. the upper Clopper-Pearson
    limit of an audit) keeps it valid.

    Use it for ``max_wrong_labels`` of :func:`certify_threshold` or :func:`certified_frontier`
    and split the error budget: ``W = wrong_label_bound(n, rate, delta / 2)`` with the test at
    ``delta / 2`` gives a guarantee at level ``1 - delta`` (union bound over the event ``count >
    W`` and the test's own error). With the rate from an audit's upper limit at level
    ``delta_a``, add ``delta_a`` to the budget as well.

    Parameters
    ----------
    n : int >= 0
        Number of certification items.
    flip_rate : float in [0, 1]
        Probability that an item's label is wrong (or an upper bound of it).
    delta : float in (0, 1)

    Returns
    -------
    int
        ``W`` in ``0..n``.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"`n` (number of certification items) must be an integer >= 0, got {n!r}.")
    if not (_is_real(flip_rate) and 0.0 <= flip_rate <= 1.0):
        raise ValueError(
            f"`flip_rate` (share of wrong labels, flip-rate convention) must be in [0, 1], got {flip_rate!r}."
        )
    if not (_is_real(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    n, p = int(n), float(flip_rate)
    if n == 0 or p == 0.0:
        return 0
    if p == 1.0:
        return n
    from scipy import stats

    w = int(stats.binom.ppf(1.0 - delta, n, p))
    # ppf works on the CDF and can be off by one where 1 - delta rounds; settle it on the tail.
    while w < n and stats.binom.sf(w, n, p) > delta:
        w += 1
    while w > 0 and stats.binom.sf(w - 1, n, p) <= delta:
        w -= 1
    return w


def _first_passable_n(level: float, delta: float, wrong: int) -> int:
    """Smallest ``n`` at which a point with zero observed errors passes: ``BinomCDF(min(n, W); n,
    level) <= delta``. Below it no data can pass, so a sequence started there just stops."""
    def passes(n: int) -> bool:
        # special.bdtr is the binomial CDF ufunc without stats.binom's per-call overhead.
        return n > wrong and special.bdtr(wrong, n, level) <= delta

    if wrong == 0:
        # (1 - level)^n <= delta in closed form; the check guards the rounding of ceil.
        n = max(1, math.ceil(math.log(delta) / math.log1p(-level)))
        return n if passes(n) else n + 1
    hi = wrong + 1
    while not passes(hi):  # the CDF falls as n grows, so doubling then bisecting finds the edge
        hi *= 2
    lo = hi // 2  # fails (or is <= wrong)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def _check_max_wrong_labels(max_wrong_labels: Any, noise_eps: Any) -> None:
    if max_wrong_labels is None:
        return
    if noise_eps is not None:
        raise ValueError(
            "`max_wrong_labels` (worst-case correction, no noise model) and `noise_eps` (symmetric-"
            "noise correction) are alternatives: pass one, not both; got "
            f"max_wrong_labels={max_wrong_labels!r}, noise_eps={noise_eps!r}."
        )
    if not _is_int(max_wrong_labels) or max_wrong_labels < 0:
        raise ValueError(
            "`max_wrong_labels` must be an integer >= 0, an upper bound on the wrong labels among "
            f"the certification items (see wrong_label_bound), got {max_wrong_labels!r}."
        )


def certify_threshold(
    confidence: np.ndarray | torch.Tensor,
    errors: np.ndarray | torch.Tensor,
    risk: float,
    delta: float,
    min_accepted: int = 50,
    noise_eps: float | None = None,
    num_classes: int | None = None,
    max_wrong_labels: int | None = None,
) -> CertifiedThreshold:
    """Certify an abstention threshold with a fixed-sequence binomial test (Learn then Test).

    Grid: the distinct calibration confidence values ``t_1 > t_2 > ...`` (most to least
    confident). At ``t_j`` the model accepts the ``n_j`` items with ``g >= t_j`` and makes ``k_j``
    observed errors. Null hypothesis ``H_j``: selective risk at ``t_j`` is ``>= r_eff``; its
    p-value is ``BinomCDF(c_j; n_j, r_eff)`` with ``c_j = k_j`` (or the corrected count below).
    Walking down the grid, ``t_j`` is certified while every tested point so far has p-value
    ``<= delta``; the sequence stops at the first failure, and the last certified (lowest)
    threshold is served.

    Why the distinct values and not quantiles: every empirical selective set is
    ``{g >= t_j}`` for some ``j``, so no finer grid exists, and a coarser one only loses coverage.
    The grid being data-dependent does not break the fixed-sequence argument: for risk that
    rises as the threshold falls, the first null threshold ``lambda_b`` is a fixed number, the
    sample accepted at it is exactly the sample accepted at the smallest grid value above it,
    and serving anything riskier requires passing that test, which happens with probability
    ``<= delta``. The number of grid points costs nothing (no multiplicity correction).

    Points with ``n_j < max(min_accepted, n0)`` are skipped: they neither certify nor stop the
    sequence. Because ``n_j`` grows down the grid they form a prefix, so this just starts the
    sequence at the first point with enough accepted items; it keeps a handful of very confident
    items (where one error is a large risk swing and tiny ``n_j`` cannot pass anyway) from ending
    the sequence before it starts. ``n0`` is the smallest ``n`` at which a point with zero
    observed errors can pass, ``BinomCDF(min(n, W); n, r_eff) <= delta`` (``W = 0`` without the
    worst-case correction: ``(1 - r_eff)^n <= delta``). A point below ``n0`` fails whatever the
    data, so testing it could only end the sequence; like ``min_accepted`` it depends on the
    levels and ``W``, never on the data, so skipping it costs no validity.

    Noisy labels. ``errors`` are observed against possibly noisy labels. Under symmetric noise
    at uniform rate ``eps`` the noisy selective risk is
    ``R~ = eps (K-1)/K + (1 - eps) R = eps' + (1 - eps' K/(K-1)) R`` with flip rate
    ``eps' = eps (K-1)/K`` (the second form is the flip-rate convention).
    Since ``R~ >= R`` whenever ``R <= (K-1)/K``, testing the noisy errors against ``r*`` is
    conservative under symmetric noise. It is NOT conservative when wrong labels fall where the
    model also errs (human annotators err on ambiguous items, towards the class the model
    confuses them with): the model then agrees with the wrong label, its error is hidden, and
    the measured risk is too low. Two opt-in corrections, mutually exclusive:

    * ``noise_eps`` and ``num_classes`` (symmetric noise): test the observed errors against
      ``r_eff = eps (K-1)/K + (1 - eps) r*``, exact under symmetric noise independent of ``x``.
      Pass a LOWER confidence bound of ``eps``: ``d r_eff / d eps = (K-1)/K - r* > 0``, so
      over-estimating ``eps`` raises the allowed noisy risk and certifies thresholds whose clean
      risk exceeds ``r*``; under-estimating it only makes the test stricter. Invalid under
      instance-dependent noise.
    * ``max_wrong_labels = W`` (worst case, no noise model): per item, ``clean_error <=
      observed_error + 1[label wrong]``, so if at most ``W`` of the ``n`` labels are wrong the
      clean error count at ``t_j`` is at most ``c_j = min(n_j, k_j + W)`` (the same test as
      ``k_j + min(n_j, W)``: both reach ``n_j`` together, where the p-value is 1). The binomial
      CDF grows with ``c_j``, so every rejection on ``c_j`` is a rejection on the clean count
      and the fixed-sequence test stays valid for clean risk, wherever the wrong labels fall.
      The price is ``W / n_j`` of risk, so it is useful when ``W`` is small next to
      ``r* n_j``: a small known noise rate (synthetic injection), or a rate bounded by an
      audit. When only the rate is known, take ``W`` from :func:`wrong_label_bound` and split
      ``delta`` between the two (e.g. ``delta / 2`` each).

    Power under label noise. Even the most confident items show a noisy-risk floor of
    ``eps (K-1)/K``. When the tested level is not far above that floor, the first tested points
    (``n_j`` near ``min_accepted``) fail by chance and stop the sequence, so coverage drops or
    nothing certifies. With noisy labels choose ``min_accepted`` in the hundreds (e.g. a tenth
    of the certification split), fixed before looking at the data. Validity is unaffected
    either way.

    Parameters
    ----------
    confidence : array-like, shape [n]
        Confidences of the certification split (disjoint from any tuning split).
    errors : array-like of bool, shape [n]
        ``True`` where the prediction disagrees with the (possibly noisy) label.
    risk : float in (0, 1)
        Target selective risk ``r*`` on clean labels.
    delta : float in (0, 1)
        Allowed probability that the served threshold's risk exceeds ``r*``.
    min_accepted : int, default 50
    noise_eps : float in [0, 1), optional
        Lower bound of the uniform-convention symmetric noise rate; requires ``num_classes``.
    num_classes : int, optional
        ``K``, required with ``noise_eps``.
    max_wrong_labels : int >= 0, optional
        Upper bound ``W`` on the number of wrong labels among the ``n`` items (worst-case
        correction). Not combinable with ``noise_eps``.

    Returns
    -------
    CertifiedThreshold
        If nothing certifies: ``certified=False``, ``threshold=+inf`` (abstain on everything) and
        a ``reason`` that says so loudly. ``r*`` is never loosened.
    """
    conf = _check_confidence(confidence)
    err = _check_binary(errors, "errors", conf.shape[0])
    if not (_is_real(risk) and 0.0 < risk < 1.0):
        raise ValueError(f"`risk` (target selective risk r*) must be in (0, 1), got {risk!r}.")
    if not (_is_real(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    if not _is_int(min_accepted) or min_accepted < 1:
        raise ValueError(f"`min_accepted` must be an integer >= 1, got {min_accepted!r}.")
    _check_max_wrong_labels(max_wrong_labels, noise_eps)
    if (noise_eps is None) != (num_classes is None):
        raise ValueError(
            "`noise_eps` and `num_classes` go together: pass both to correct for symmetric label "
            f"noise, or neither; got noise_eps={noise_eps!r}, num_classes={num_classes!r}."
        )
    r_eff = float(risk)
    if noise_eps is not None:
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        if not (_is_real(noise_eps) and 0.0 <= noise_eps < 1.0):
            raise ValueError(
                f"`noise_eps` (uniform convention, lower bound) must be in [0, 1), got {noise_eps!r}."
            )
        chance = (num_classes - 1) / num_classes
        if risk >= chance:
            raise ValueError(
                f"`risk` must be below the chance error rate (K-1)/K = {chance:.4f} for the noise "
                f"correction to be monotone, got {risk!r}."
            )
        r_eff = noise_eps * chance + (1.0 - noise_eps) * risk

    n = conf.shape[0]
    wrong = 0 if max_wrong_labels is None else int(max_wrong_labels)
    n0 = _first_passable_n(r_eff, float(delta), wrong)
    start = max(int(min_accepted), n0)
    thresholds, n_acc, k_err = _sorted_groups(conf, err)
    # Count that is tested: observed errors, or with the worst-case correction an upper bound
    # of the clean errors (every wrong label may hide one error among the accepted items).
    counted = k_err if max_wrong_labels is None else np.minimum(n_acc, k_err + wrong)
    tested = n_acc >= start
    t_thr, t_n, t_k, t_c = thresholds[tested], n_acc[tested], k_err[tested], counted[tested]
    # p_j = BinomCDF(c_j; n_j, r_eff) falls as n_j grows with c_j fixed, so within a run of equal
    # counts the first point has the largest p-value: the first failure is always at the start of
    # a run, and only those points need the (costly) CDF. Exact, not an approximation.
    run_start = np.flatnonzero(np.r_[True, t_c[1:] != t_c[:-1]]) if t_c.size else t_c
    p_start = special.bdtr(t_c[run_start], t_n[run_start], r_eff)  # c_j <= n_j
    # The step itself is MAPIE's fixed-sequence procedure (Learn then Test): it rejects the leading
    # run of hypotheses with p <= delta and stops at the first failure.
    from mapie.risk_control import control_fwer

    passed = control_fwer(p_start, float(delta), "fixed_sequence").size if p_start.size else 0
    n_certified = int(run_start[passed]) if passed < run_start.size else t_thr.shape[0]
    n_tested = min(n_certified + 1, t_thr.shape[0])
    common = dict(
        risk=float(risk),
        delta=float(delta),
        effective_risk=float(r_eff),
        n_calibration=int(n),
        n_tested=int(n_tested),
        min_accepted=int(min_accepted),
        noise_eps=None if noise_eps is None else float(noise_eps),
        num_classes=None if num_classes is None else int(num_classes),
        max_wrong_labels=None if max_wrong_labels is None else wrong,
    )
    if max_wrong_labels is not None:
        correction = (
            f", worst-case wrong-label correction: up to {wrong} of the {n} labels wrong, each "
            "counted as a hidden error among the accepted items; valid only if at most "
            f"{wrong} labels are wrong"
        )
    elif noise_eps is not None:
        correction = f", symmetric-noise correction eps={noise_eps:.4g}; valid only under symmetric noise"
    else:
        correction = ""

    if n_certified == 0:
        if t_thr.shape[0] == 0:
            floor = "" if n0 <= min_accepted else (
                f", and zero errors among fewer than {n0} items cannot pass at this level"
            )
            why = (
                f"only {n} calibration items, fewer than min_accepted={min_accepted}{floor}; "
                "calibrate on more data"
            )
        else:
            k0, n0, c0 = int(t_k[0]), int(t_n[0]), int(t_c[0])
            hidden = "" if max_wrong_labels is None else f" (+ up to {c0 - k0} hidden by wrong labels)"
            why = (
                f"even the {n0} most confident calibration items have {k0} observed errors{hidden} "
                f"(risk {c0 / n0:.4f}, p-value {p_start[0]:.3g} > delta={delta}) against a tested "
                f"level of {r_eff:.4f}{correction}; raise r*, use more calibration data or a better model"
            )
        reason = (
            f"NOTHING CERTIFIED at r*={risk}, delta={delta}: {why}. The model ABSTAINS ON EVERY "
            "INPUT: this is a failed calibration, not a safe one. r* was not loosened."
        )
        return CertifiedThreshold(
            threshold=float("inf"), certified=False, risk_ucb=float("nan"),
            observed_risk=float("nan"), coverage=0.0, n_accepted=0, n_errors=0,
            reason=reason, **common,
        )

    j = n_certified - 1
    n_j, k_j, c_j = int(t_n[j]), int(t_k[j]), int(t_c[j])
    ucb = _clopper_pearson_upper(c_j, n_j, delta)
    if noise_eps is not None:
        # Clean risk is decreasing in eps for R~ < (K-1)/K, so mapping with the lower bound
        # eps_L gives an upper bound that stays conservative.
        chance = (num_classes - 1) / num_classes
        ucb = float(np.clip((ucb - noise_eps * chance) / (1.0 - noise_eps), 0.0, 1.0))
    counted_text = "" if max_wrong_labels is None else f" ({c_j} counted with hidden ones)"
    reason = (
        f"certified: selective risk <= {risk} with probability >= {1 - delta:.3g} "
        f"(fixed-sequence binomial test at level {r_eff:.4f}{correction}); "
        f"coverage {n_j / n:.4f} ({n_j} of {n}), {k_j} observed errors{counted_text}, "
        f"risk UCB {ucb:.4f}."
    )
    return CertifiedThreshold(
        threshold=float(t_thr[j]), certified=True, risk_ucb=float(ucb),
        observed_risk=k_j / n_j, coverage=n_j / n, n_accepted=n_j, n_errors=k_j,
        reason=reason, **common,
    )


# --------------------------------------------------------------------------------------------
# Certified risk-coverage frontier: what a model can promise, all levels at once
# --------------------------------------------------------------------------------------------

#: Risk levels of :func:`certified_frontier` (fixed in advance: the grid must not depend on the data).
DEFAULT_RISK_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class FrontierPoint:
    """One row of :func:`certified_frontier`.

    Attributes
    ----------
    risk : float
        Risk level ``r`` of the row (selective risk on clean labels).
    certified : bool
    coverage : float
        Share of the ``n`` certification items accepted at the row's threshold; 0 when nothing
        certified.
    threshold : float
        Accept iff ``confidence >= threshold``; ``+inf`` when nothing certified.
    risk_ucb : float
        One-sided Clopper-Pearson upper bound at level ``1 - delta_row`` of the selective risk at
        the threshold (clean risk when a correction is used); NaN when nothing certified.
    n_accepted : int
    delta_row : float
        Level of this row's test: ``delta / len(risk_grid)``.
    """

    risk: float
    certified: bool
    coverage: float
    threshold: float
    risk_ucb: float
    n_accepted: int
    delta_row: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (non-finite floats as the strings ``"inf"``/``"nan"``)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FrontierPoint":
        """Inverse of :meth:`to_dict`."""
        names = [f.name for f in fields(cls)]
        missing = set(names) - set(d)
        if missing:
            raise ValueError(f"FrontierPoint.from_dict: missing keys {sorted(missing)}.")
        return cls(
            risk=float(d["risk"]), certified=bool(d["certified"]), coverage=float(d["coverage"]),
            threshold=float(d["threshold"]), risk_ucb=float(d["risk_ucb"]),
            n_accepted=int(d["n_accepted"]), delta_row=float(d["delta_row"]),
        )


def _check_risk_grid(risk_grid: Any) -> tuple[float, ...]:
    try:
        grid = tuple(risk_grid)
    except TypeError:
        raise ValueError(
            f"`risk_grid` must be a sequence of risk levels in (0, 1), got {risk_grid!r}."
        ) from None
    if not grid or not all(_is_real(r) and 0.0 < r < 1.0 for r in grid):
        raise ValueError(
            f"`risk_grid` must be a non-empty sequence of risk levels in (0, 1), got {risk_grid!r}."
        )
    if any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError(f"`risk_grid` must be strictly increasing, got {risk_grid!r}.")
    return tuple(float(r) for r in grid)


def certified_frontier(
    confidence: np.ndarray | torch.Tensor,
    errors: np.ndarray | torch.Tensor,
    risk_grid: Sequence[float] = DEFAULT_RISK_GRID,
    delta: float = 0.05,
    min_accepted: int = 50,
    noise_eps: float | None = None,
    num_classes: int | None = None,
    max_wrong_labels: int | None = None,
) -> list[FrontierPoint]:
    """Certified risk-coverage frontier: for each risk level ``r`` of a fixed grid, the coverage
    that :func:`certify_threshold` certifies at ``r``, all rows valid at once.

    A model that cannot certify ``r*`` abstains on everything; the frontier says what it could
    promise instead ("risk 0.10 at coverage 0.62"), with the same kind of guarantee.

    Multiple testing. Row ``r`` runs the fixed-sequence test at level ``delta_row = delta / m``
    (``m = len(risk_grid)``, Bonferroni). Let ``E_r`` be the event that row ``r`` serves a
    threshold whose clean selective risk exceeds ``r``. The fixed-sequence argument of
    :func:`certify_threshold` gives ``P(E_r) <= delta_row`` for each row, and the union bound
    ``P(E_r1 or ... or E_rm) <= sum_r P(E_r) <= delta`` holds whatever the dependence between
    rows (they share the same data). Inside a row no further correction is needed: the row makes
    one claim (its served threshold), and the fixed-sequence procedure already controls the
    chance that ANY of its tested thresholds is a false certification at level ``delta_row``,
    however many thresholds it walks through. The grid must be fixed before seeing the data;
    the price of ``m`` rows is a test at ``delta / m`` instead of ``delta`` (a margin that grows
    like ``sqrt(log(m / delta))``).

    With ``max_wrong_labels`` from :func:`wrong_label_bound` at level ``delta_W`` the frontier
    holds with probability ``>= 1 - delta - delta_W``: the bound is one event shared by all rows,
    so ``delta_W`` is not split. The frontier and a separate :func:`certify_threshold` at
    ``(r*, delta')`` on the same data hold together with probability ``>= 1 - delta - delta'``.

    Monotonicity. Coverage is non-decreasing in ``r`` by construction, with no carrying forward
    of thresholds: the rows share the data, ``min_accepted`` and ``delta_row``, and each p-value
    ``BinomCDF(c_j; n_j, r_eff(r))`` is non-increasing in ``r`` (a binomial CDF falls as the
    success probability rises, and ``r_eff`` rises with ``r`` in every correction), so every
    point that passes at ``r`` passes at ``r' > r``, the first failure moves down the grid, and
    the served threshold can only fall.

    Where each row starts: at ``max(min_accepted, n0)`` accepted items, ``n0`` depending on the
    row's level (see :func:`certify_threshold`): at ``r = 0.01`` and ``delta_row = 0.00625`` zero
    errors among fewer than 505 items cannot pass, so low-risk rows start later by themselves.

    Parameters
    ----------
    confidence : array-like, shape [n]
    errors : array-like of bool, shape [n]
        As in :func:`certify_threshold`.
    risk_grid : sequence of float, strictly increasing, in (0, 1)
        Default :data:`DEFAULT_RISK_GRID`. With ``noise_eps`` every level must be below the
        chance error rate ``(K-1)/K``.
    delta : float in (0, 1), default 0.05
        Probability that ANY certified row is wrong.
    min_accepted : int, default 50
        Smallest start of every row's sequence; with noisy labels choose it in the hundreds, as
        for :func:`certify_threshold`. A start at ``n / 2`` leaves the rows whose risk is below
        the risk at half coverage with nothing certified.
    noise_eps, num_classes, max_wrong_labels
        As in :func:`certify_threshold`, shared by every row.

    Returns
    -------
    list of FrontierPoint, one per grid level, in grid order.
    """
    grid = _check_risk_grid(risk_grid)
    if not (_is_real(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    if noise_eps is not None and _is_int(num_classes) and num_classes >= 2:
        chance = (num_classes - 1) / num_classes
        if grid[-1] >= chance:
            raise ValueError(
                f"`risk_grid` must stay below the chance error rate (K-1)/K = {chance:.4f} with the "
                f"symmetric-noise correction, got a largest level of {grid[-1]}; drop the levels "
                f"at or above it, e.g. tuple(r for r in DEFAULT_RISK_GRID if r < {chance:.4g})."
            )
    if not _is_int(min_accepted) or min_accepted < 1:
        raise ValueError(f"`min_accepted` must be an integer >= 1, got {min_accepted!r}.")
    _check_max_wrong_labels(max_wrong_labels, noise_eps)
    delta_row = float(delta) / len(grid)
    frontier = []
    for r in grid:
        cert = certify_threshold(
            confidence, errors, r, delta_row, min_accepted=min_accepted, noise_eps=noise_eps,
            num_classes=num_classes, max_wrong_labels=max_wrong_labels,
        )
        frontier.append(FrontierPoint(
            risk=r, certified=cert.certified, coverage=cert.coverage, threshold=cert.threshold,
            risk_ucb=cert.risk_ucb, n_accepted=cert.n_accepted, delta_row=delta_row,
        ))
    return frontier


def _fmt_level(x: float) -> str:
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


def frontier_sentence(frontier: Sequence[FrontierPoint], target_risk: float | None = None) -> str:
    """One sentence on what a model can certify, for when the target ``r*`` cannot be met.

    Example: ``"this model can certify risk 0.10 at coverage 0.62 (and risk 0.05 at coverage
    0.00), up to coverage 0.91 at risk 0.30; all 8 levels hold together with probability >=
    0.95"``: the lowest certified level, the level just below it (which failed), and the widest
    coverage on the grid.

    Parameters
    ----------
    frontier : sequence of FrontierPoint
        From :func:`certified_frontier`.
    target_risk : float, optional
        The target ``r*``. When every certified level is above it (or none is certified) the
        sentence starts by saying that the frontier certifies nothing at or below ``r*``.

    Returns
    -------
    str
    """
    if not frontier or not all(isinstance(p, FrontierPoint) for p in frontier):
        raise ValueError(
            "`frontier` must be a non-empty sequence of FrontierPoint (see certified_frontier)."
        )
    if target_risk is not None and not (_is_real(target_risk) and 0.0 < target_risk < 1.0):
        raise ValueError(f"`target_risk` must be None or in (0, 1), got {target_risk!r}.")
    rows = sorted(frontier, key=lambda p: p.risk)
    total = sum(p.delta_row for p in rows)  # Bonferroni: the rows' levels add up to delta
    together = f"all {len(rows)} levels hold together with probability >= {1 - total:.3g}"
    ok = [p for p in rows if p.certified]
    lead = ""
    if target_risk is not None and not any(p.risk <= target_risk for p in ok):
        lead = f"no level at or below r*={_fmt_level(target_risk)} is certified; "
    if not ok:
        return (
            f"{lead}this model cannot certify any selective risk up to {_fmt_level(rows[-1].risk)} "
            f"(coverage 0.00 at every level tested; {together}): it abstains on every input"
        )
    best, widest = ok[0], max(ok, key=lambda p: (p.coverage, -p.risk))
    text = f"{lead}this model can certify risk {_fmt_level(best.risk)} at coverage {best.coverage:.2f}"
    below = [p for p in rows if p.risk < best.risk]
    if below:
        text += f" (and risk {_fmt_level(below[-1].risk)} at coverage {below[-1].coverage:.2f})"
    if widest.coverage > best.coverage:
        text += f", up to coverage {widest.coverage:.2f} at risk {_fmt_level(widest.risk)}"
    return f"{text}; {together}"


# --------------------------------------------------------------------------------------------
# Serving decision (torch, hot path)
# --------------------------------------------------------------------------------------------


def decide(confidence: torch.Tensor, threshold: float | CertifiedThreshold) -> torch.Tensor:
    """Accept/abstain decision for a served batch: ``accept = confidence >= threshold``.

    Parameters
    ----------
    confidence : torch.Tensor, shape [N]
        From the same confidence function the threshold was certified with.
    threshold : float or CertifiedThreshold
        ``+inf`` (nothing certified) rejects everything; NaN confidences are rejected.

    Returns
    -------
    torch.BoolTensor, shape [N]
        True = answer, False = abstain (reason ``low_confidence``), on the input's device.
    """
    import torch

    if not isinstance(confidence, torch.Tensor) or confidence.ndim != 1:
        raise ValueError(
            "`confidence` must be a 1-D torch.Tensor [N], got "
            f"{type(confidence).__name__} with shape {tuple(getattr(confidence, 'shape', ()))}."
        )
    if isinstance(threshold, CertifiedThreshold):
        threshold = threshold.threshold
    if not _is_real(threshold) or math.isnan(threshold):
        raise ValueError(f"`threshold` must be a float (or +inf) or a CertifiedThreshold, got {threshold!r}.")
    return confidence >= float(threshold)

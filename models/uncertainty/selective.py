"""Selective classification: confidence functions, risk-coverage, AURC and a certified abstention threshold.

DESIGN.md 4.6. A model answers when its confidence ``g(x)`` reaches a threshold and abstains
otherwise. The threshold is certified on held-out calibration data with a fixed-sequence binomial
test so that the selective risk (error rate among accepted inputs) stays below a target ``r*`` with
probability at least ``1 - delta`` over the calibration draw.

Conventions
-----------
* Confidence: higher means more confident. ``CONFIDENCE_FUNCTIONS`` maps a name to a batched torch
  function ``logits [N, K] -> confidence [N]``.
* Decision: accept iff ``confidence >= threshold``; ``threshold = +inf`` abstains on everything.
* Noise rates ``eps`` are in the "uniform/all" convention of DESIGN.md 4.4:
  ``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K``.

References
----------
Geifman, Uziel, El-Yaniv. "Bias-reduced uncertainty estimation for deep neural classifiers",
ICLR 2019 (AURC, E-AURC).
Cattelan, Silva. "How to fix a broken confidence estimator: evaluating post-hoc methods for
selective classification with deep neural networks", UAI 2024 (MaxLogit-pNorm).
Angelopoulos, Bates, Candes, Jordan, Lei. "Learn then Test: calibrating predictive algorithms to
achieve risk control", 2021 (fixed-sequence testing of thresholds).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
from scipy import stats

__all__ = [
    "CONFIDENCE_FUNCTIONS",
    "PNORM_GRID",
    "CertifiedThreshold",
    "aurc",
    "certify_threshold",
    "confidence",
    "decide",
    "eaurc",
    "maxlogit_pnorm_confidence",
    "msp_confidence",
    "optimal_aurc",
    "risk_coverage_curve",
    "select_pnorm",
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
        has an AURC strictly below MSP's: then use ``"msp"`` (the DESIGN.md 4.6 fallback).
    """
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


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_confidence(confidence: Any, name: str = "confidence") -> np.ndarray:
    conf = _to_numpy(confidence)
    if conf.ndim != 1 or conf.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array [n], got shape {conf.shape}.")
    if not np.issubdtype(conf.dtype, np.number) or np.issubdtype(conf.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be real numbers, got dtype {conf.dtype}.")
    conf = conf.astype(np.float64)
    if not np.all(np.isfinite(conf)):
        raise ValueError(f"`{name}` contains {int(np.sum(~np.isfinite(conf)))} NaN/inf values.")
    return conf


def _check_binary(values: Any, name: str, n: int) -> np.ndarray:
    arr = _to_numpy(values)
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
        The guarantee holds with probability ``>= 1 - delta`` over the calibration draw.
    effective_risk : float
        Level the observed errors were tested against: ``r*`` without noise correction, else
        ``eps (K-1)/K + (1 - eps) r*``.
    risk_ucb : float
        One-sided Clopper-Pearson upper bound (level ``1 - delta``) of the selective risk at the
        threshold: on clean risk when the noise correction is used, else on the risk measured
        with the given labels (an over-estimate of clean risk under symmetric noise). NaN when
        nothing certified.
    observed_risk : float
        ``n_errors / n_accepted`` with the given labels (NaN when nothing is accepted).
    coverage : float
        ``n_accepted / n_calibration``.
    n_accepted, n_errors, n_calibration, n_tested : int
        Accepted items, observed errors among them, calibration size, grid points tested.
    min_accepted : int
    noise_eps : float or None
        Uniform-convention noise rate used for the correction (a lower bound), or None.
    num_classes : int or None
    reason : str
        Human-readable verdict; starts with ``"NOTHING CERTIFIED"`` when ``certified`` is False.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (non-finite floats as the strings ``"inf"``/``"nan"``)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CertifiedThreshold":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"CertifiedThreshold.from_dict: missing keys {sorted(missing)}.")
        floats = {"threshold", "risk", "delta", "effective_risk", "risk_ucb", "observed_risk", "coverage"}
        ints = {"n_accepted", "n_errors", "n_calibration", "n_tested", "min_accepted"}
        kw: dict[str, Any] = {}
        for k in names:
            v = d[k]
            if k in floats:
                v = float(v)
            elif k in ints:
                v = int(v)
            elif k == "noise_eps":
                v = None if v is None else float(v)
            elif k == "num_classes":
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
    return float(stats.beta.ppf(1.0 - delta, k + 1, n - k))


def certify_threshold(
    confidence: np.ndarray | torch.Tensor,
    errors: np.ndarray | torch.Tensor,
    risk: float,
    delta: float,
    min_accepted: int = 50,
    noise_eps: float | None = None,
    num_classes: int | None = None,
) -> CertifiedThreshold:
    """Certify an abstention threshold with a fixed-sequence binomial test (Learn then Test).

    Grid: the distinct calibration confidence values ``t_1 > t_2 > ...`` (most to least
    confident). At ``t_j`` the model accepts the ``n_j`` items with ``g >= t_j`` and makes ``k_j``
    observed errors. Null hypothesis ``H_j``: selective risk at ``t_j`` is ``>= r_eff``; its
    p-value is ``BinomCDF(k_j; n_j, r_eff)``. Walking down the grid, ``t_j`` is certified while
    every tested point so far has p-value ``<= delta``; the sequence stops at the first failure,
    and the last certified (lowest) threshold is served.

    Why the distinct values and not quantiles: every empirical selective set is
    ``{g >= t_j}`` for some ``j``, so no finer grid exists, and a coarser one only loses coverage.
    The grid being data-dependent does not break the fixed-sequence argument: for risk that
    rises as the threshold falls, the first null threshold ``lambda_b`` is a fixed number, the
    sample accepted at it is exactly the sample accepted at the smallest grid value above it,
    and serving anything riskier requires passing that test, which happens with probability
    ``<= delta``. The number of grid points costs nothing (no multiplicity correction).

    Points with ``n_j < min_accepted`` are skipped: they neither certify nor stop the sequence.
    Because ``n_j`` grows down the grid they form a prefix, so this just starts the sequence at
    the first point with enough accepted items; it keeps a handful of very confident items
    (where one error is a large risk swing and tiny ``n_j`` cannot pass anyway) from ending
    the sequence before it starts.

    Noisy labels. ``errors`` are observed against possibly noisy labels. Under symmetric noise
    at uniform rate ``eps`` the noisy selective risk is
    ``R~ = eps (K-1)/K + (1 - eps) R = eps' + (1 - eps' K/(K-1)) R`` with flip rate
    ``eps' = eps (K-1)/K`` (the DESIGN.md 4.6 formula is written in the flip-rate convention).
    Since ``R~ >= R`` whenever ``R <= (K-1)/K``, testing the noisy errors against ``r*`` is
    conservative. The opt-in correction (``noise_eps`` and ``num_classes``) tests them against
    ``r_eff = eps (K-1)/K + (1 - eps) r*``, exact under symmetric noise independent of ``x``.
    Pass a LOWER confidence bound of ``eps``: ``d r_eff / d eps = (K-1)/K - r* > 0``, so
    over-estimating ``eps`` raises the allowed noisy risk and certifies thresholds whose clean
    risk exceeds ``r*``; under-estimating it only makes the test stricter (equivalently, the
    clean risk implied by an observed noisy risk falls as ``eps`` grows). Under
    instance-dependent noise the correction is invalid: prefer certifying on an audited subset.

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
    thresholds, n_acc, k_err = _sorted_groups(conf, err)
    tested = n_acc >= min_accepted
    t_thr, t_n, t_k = thresholds[tested], n_acc[tested], k_err[tested]
    p_values = stats.binom.cdf(t_k, t_n, r_eff)
    failed = np.flatnonzero(p_values > delta)
    n_certified = int(failed[0]) if failed.size else t_thr.shape[0]
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
    )

    if n_certified == 0:
        if t_thr.shape[0] == 0:
            why = (
                f"only {n} calibration items, fewer than min_accepted={min_accepted}; "
                "calibrate on more data"
            )
        else:
            k0, n0 = int(t_k[0]), int(t_n[0])
            why = (
                f"even the {n0} most confident calibration items have {k0} observed errors "
                f"(risk {k0 / n0:.4f}, p-value {p_values[0]:.3g} > delta={delta}) against a tested "
                f"level of {r_eff:.4f}; raise r*, use more calibration data or a better model"
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
    n_j, k_j = int(t_n[j]), int(t_k[j])
    ucb = _clopper_pearson_upper(k_j, n_j, delta)
    if noise_eps is not None:
        # Clean risk is decreasing in eps for R~ < (K-1)/K, so mapping with the lower bound
        # eps_L gives an upper bound that stays conservative.
        chance = (num_classes - 1) / num_classes
        ucb = float(np.clip((ucb - noise_eps * chance) / (1.0 - noise_eps), 0.0, 1.0))
    correction = "" if noise_eps is None else f", symmetric-noise correction eps={noise_eps:.4g}"
    reason = (
        f"certified: selective risk <= {risk} with probability >= {1 - delta:.3g} "
        f"(fixed-sequence binomial test at level {r_eff:.4f}{correction}); "
        f"coverage {n_j / n:.4f} ({n_j} of {n}), {k_j} observed errors, risk UCB {ucb:.4f}."
    )
    return CertifiedThreshold(
        threshold=float(t_thr[j]), certified=True, risk_ucb=float(ucb),
        observed_risk=k_j / n_j, coverage=n_j / n, n_accepted=n_j, n_errors=k_j,
        reason=reason, **common,
    )


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

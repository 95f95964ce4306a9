"""Conformity scores, prediction sets and conformal thresholds under label noise.

Two halves:

* **Scores and sets (serving hot path, torch on the input's device).** ``CONFORMITY_SCORES``
  maps a name to ``scores(probs: Tensor[N, K], **params) -> Tensor[N, K]``, the score of every
  label of every row at once; :func:`prediction_sets` turns scores and a threshold ``q`` into
  ``C(x) = {y : S(x, y) <= q}``.
* **Thresholds (calibration, numpy).** :func:`split_conformal_threshold` (split CP) and
  :func:`split_threshold` (split CP on given labels, plug-in or calibration-conditional),
  :func:`nacp_threshold` (noise-aware CP under uniform label noise, Penso, Goldberger and Fetaya,
  COPA 2025), :func:`audit_rectified_threshold` (noisy labels corrected by an audited subset, in the
  spirit of prediction-powered inference, Angelopoulos et al., Science 2023) and
  :func:`audit_split_threshold` (split CP on the audited items alone). All are exact searches
  over the candidate thresholds (no approximation by a grid); NACP counts all ``n*K`` scores below
  each candidate by bracketing bucket counts instead of sorting them, O(nK) passes in practice.

MAPIE parity
------------
With the parameters in ``MAPIE_CONVENTION`` and ``eps = 0``, our sets equal those of MAPIE 1.x
``SplitConformalClassifier(estimator, confidence_level=1 - alpha, conformity_score=name,
prefit=True, random_state=seed).conformalize(X, y).predict_set(X)`` (default
``include_last_label=True``). MAPIE's conventions, read from ``mapie/conformity_scores/sets`` and
``mapie/utils.py`` (1.6):

* Quantile: the ``k``-th smallest calibration score, ``k = ceil((n + 1)(1 - alpha))``
  (``np.quantile(scores, k / n, method="lower")``). MAPIE raises when ``n < 1/alpha``; we return
  ``q = +inf`` (full sets) when ``k > n`` and say so.
* LAC: ``S = 1 - p_y``; set ``{y : 1 - p_y <= q}``. Deterministic.
* APS: the **calibration** score is always randomized, ``S = (mass ranked at or above y) - U p_y``
  with ``U ~ Uniform(0, 1)`` drawn by ``check_random_state(random_state).uniform(size=n)``; that is
  our ``u = 1 - U``. The **served** set with ``include_last_label=True`` keeps every label up to and
  including the first one whose cumulative mass reaches ``q``: ``{y : mass ranked strictly above y
  <= q}`` (our ``include_last_label=True``). Sets are never empty (the top label has score 0).
* RAPS: as APS, plus ``lambda * max(0, rank - k_reg)`` with the 1-based rank of ``y`` in the
  calibration score, and in the served set the penalty of the label ranked just above ``y``
  (MAPIE regularizes the sorted cumulative sum and includes the label that crosses ``q``). MAPIE
  picks ``lambda`` and ``k_reg`` itself on a held-out part of the conformalization data; pass its
  ``lambda_star`` and ``k_star`` as ``lam`` and ``k_reg``.
* MAPIE compares with a 1e-8 tolerance and includes every label tied with the last included
  probability. We compare exactly (``<=``) and treat tied probabilities as one block (they share
  a rank and enter the set together), so the two agree except on scores within 1e-8 of ``q`` and
  on exactly tied probabilities at calibration, where MAPIE's order among ties is arbitrary.

Calibrate with the ``"calibration"`` parameters (for every label when a method needs the full
score matrix, e.g. NACP's ``F_r``) and serve with the ``"serving"`` ones. With randomized
calibration scores and ``include_last_label`` sets, the threshold controls the coverage of the
randomized sets and the served sets contain them, so coverage can only rise (MAPIE's choice).
The default parameters (``u = 1``, deterministic, the same in both phases) give the classic
non-randomized APS/RAPS sets ``{y : mass at or above y (+ penalty) <= q}``.

torch is imported by the functions of the first half, not with the module: reading a stored threshold
(:class:`ConformalThreshold`) and fitting one need none of it (``noisewise monitor`` loads no torch).

Label noise convention
----------------------
``eps`` is the uniform ("all") noise rate: ``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K``. A
flip-to-another-class rate ``eps'`` converts as ``eps = eps' K / (K - 1)``
(``noisewise.models.uncertainty.labelnoise.flip_rate_to_uniform``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from noisewise.models.uncertainty.host import as_numpy

if TYPE_CHECKING:
    import torch

    # A per-rank score: (mass_above, mass_through, count_above, count_through) in sorted order -> scores.
    RankScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]
    ConformityScore = Callable[..., torch.Tensor]

__all__ = [
    "CONFORMITY_SCORES",
    "MAPIE_CONVENTION",
    "ConformalThreshold",
    "lac_scores",
    "aps_scores",
    "raps_scores",
    "prediction_sets",
    "split_conformal_threshold",
    "split_threshold",
    "conditional_order_statistic",
    "nacp_threshold",
    "nacp_delta",
    "audit_rectified_threshold",
    "audit_split_threshold",
]


# --------------------------------------------------------------------------------------------
# Conformity scores (torch, batched, on the input's device)
# --------------------------------------------------------------------------------------------


def _check_probs(probs: Any) -> None:
    import torch

    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"probs must be a torch.Tensor of shape [N, K], got {type(probs).__name__}")
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape [N, K] with K >= 2 classes, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got dtype {probs.dtype}")


# Row blocks of about this many elements bound the temporaries of the score computation (a few
# [rows, K] arrays of 8 bytes each: ~32 MB per array in float64), whatever N is.
_BLOCK_ELEMENTS = 1 << 22


def _descending_order(probs: torch.Tensor) -> torch.Tensor:
    """Per row, the class indices by decreasing probability (order within tied values is arbitrary)."""
    import torch

    if probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64):
        # numpy's vectorized (AVX-512/AVX2) argsort is several times faster than torch.sort on one core;
        # the ascending order read backwards is a descending one (the order of tied values does not matter).
        ascending = np.argsort(probs.detach().numpy(), axis=1)
        return torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1]))
    return probs.sort(dim=1, descending=True).indices


def _tie_blocks(sorted_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of the first and last member of each position's tie block, per row of ``sorted_p``."""
    import torch

    n, k = sorted_p.shape
    idx = torch.arange(k, device=sorted_p.device).expand(n, k)
    differs = sorted_p[:, 1:] != sorted_p[:, :-1]
    starts_block = torch.nn.functional.pad(differs, (1, 0), value=True)
    ends_block = torch.nn.functional.pad(differs, (0, 1), value=True)
    start = torch.where(starts_block, idx, 0).cummax(dim=1).values
    end = (k - 1) - torch.where(ends_block, (k - 1) - idx, 0).flip(1).cummax(dim=1).values.flip(1)
    return start, end


def _scores_by_rank(probs: torch.Tensor, rank_score: RankScore) -> torch.Tensor:
    """Score every label of every row from its rank masses: one sort per row, one scatter back.

    Per label, in the order of decreasing probability: the mass and count strictly above its tie
    block and through it. Labels with equal probability form one block and share a rank, so the
    scores do not depend on the class order (MAPIE puts a whole tie block in or out of a set
    together). ``rank_score(mass_above, mass_through, count_above, count_through, rows)`` gets them
    in sorted order for the rows ``rows`` and returns the scores in that order. Rows go in blocks
    so the temporaries stay bounded; only rows that contain tied probabilities pay for the block
    search.
    """
    import torch

    n, k = probs.shape
    out = torch.empty_like(probs)
    step = max(1, _BLOCK_ELEMENTS // k)
    positions = torch.arange(k, device=probs.device, dtype=probs.dtype)
    for first in range(0, n, step):
        rows = slice(first, min(first + step, n))
        block = probs[rows]
        order = _descending_order(block)
        sorted_p = block.gather(1, order)
        # float rounding can push a cumulative sum a few ulps past 1, which would keep q = 1 sets from being full
        cums = sorted_p.cumsum(dim=1).clamp_max_(1.0)
        excl = torch.nn.functional.pad(cums[:, :-1], (1, 0))
        mass_above, mass_through = excl, cums
        count_above = positions.expand_as(cums)
        count_through = count_above + 1
        tied = (sorted_p[:, 1:] == sorted_p[:, :-1]).any(dim=1).nonzero().flatten()
        if tied.numel():
            start, end = _tie_blocks(sorted_p[tied])
            mass_above, mass_through = excl.clone(), cums.clone()
            mass_above[tied] = excl[tied].gather(1, start)
            mass_through[tied] = cums[tied].gather(1, end)
            count_above, count_through = count_above.clone(), count_through.clone()
            count_above[tied] = start.to(probs.dtype)
            count_through[tied] = (end + 1).to(probs.dtype)
        values = rank_score(mass_above, mass_through, count_above, count_through, rows)
        out[rows].scatter_(1, order, values)
    return out


def _resolve_u(
    probs: torch.Tensor,
    u: float | str | torch.Tensor | None,
    include_last_label: bool,
    generator: torch.Generator | None,
) -> float | torch.Tensor:
    import torch

    if include_last_label:
        if u is not None:
            raise ValueError("u must be left unset when include_last_label=True (that rule fixes the score)")
        return 0.0
    if u is None:
        return 1.0
    if isinstance(u, str):
        if u != "random":
            raise ValueError(f"u must be a float in [0, 1], a tensor of shape [N] or 'random', got {u!r}")
        return torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    if isinstance(u, torch.Tensor):
        if u.shape not in ((probs.shape[0],), (probs.shape[0], 1)):
            raise ValueError(f"u must have shape [N] = [{probs.shape[0]}], got {tuple(u.shape)}")
        if u.device != probs.device:
            raise ValueError(f"u is on {u.device} but probs is on {probs.device}")
        return u.reshape(-1, 1).to(probs.dtype)
    u = float(u)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u must be in [0, 1], got {u}")
    return u


def lac_scores(probs: torch.Tensor) -> torch.Tensor:
    """LAC (least ambiguous set-valued classifier) scores for all labels.

    ``S(x, y) = 1 - p_y(x)`` (Sadinle, Lei and Wasserman, JASA 2019); MAPIE's ``"lac"``.

    Parameters
    ----------
    probs : Tensor [N, K]
        Class probabilities.

    Returns
    -------
    Tensor [N, K]
        Scores, same device and dtype as ``probs``.
    """
    _check_probs(probs)
    return 1.0 - probs


def aps_scores(
    probs: torch.Tensor,
    *,
    u: float | str | torch.Tensor | None = None,
    include_last_label: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APS (adaptive prediction sets) scores for all labels.

    ``S_u(x, y) = sum_{j ranked above y} p_j + u * p_y`` (Romano, Sesia and Candes, NeurIPS 2020):

    * ``u = 1`` (default): ``S = sum of p_j over labels ranked at or above y``, deterministic.
    * ``u = "random"``: one ``U ~ Uniform(0, 1)`` per row from ``generator`` (randomized APS);
      a tensor ``[N]`` gives the uniforms explicitly (MAPIE's calibration draws ``U`` and scores
      ``mass at or above y - U p_y``, which is ``u = 1 - U``).
    * ``include_last_label=True``: ``S = sum_{j ranked strictly above y} p_j``, so
      ``{y : S <= q}`` keeps every label up to and including the one whose cumulative mass
      reaches ``q``: MAPIE's served set (``include_last_label=True``, its default).

    Tied probabilities form one block (``p_y`` above stands for the block's mass).

    Parameters
    ----------
    probs : Tensor [N, K]
        Class probabilities.
    u : float in [0, 1], Tensor [N], "random" or None
        Share of the label's own mass counted in its score (None: 1).
    include_last_label : bool
        Serve MAPIE's ``include_last_label=True`` set (``u`` must then be None).
    generator : torch.Generator, optional
        Source of ``U`` for ``u="random"``, on the device of ``probs``.

    Returns
    -------
    Tensor [N, K]
        Scores in [0, 1].
    """
    _check_probs(probs)
    u = _resolve_u(probs, u, include_last_label, generator)
    per_row = not isinstance(u, float)  # a tensor [N, 1] of draws or given values

    def rank_score(mass_above, mass_through, count_above, count_through, rows):
        share = u[rows] if per_row else u
        return mass_above + share * (mass_through - mass_above)

    return _scores_by_rank(probs, rank_score)


def raps_scores(
    probs: torch.Tensor,
    *,
    lam: float = 0.01,
    k_reg: int = 5,
    u: float | str | torch.Tensor | None = None,
    include_last_label: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RAPS (regularized APS) scores for all labels.

    ``S_u(x, y) = sum_{j ranked above y} p_j + u * p_y + lam * max(0, rank(y) - k_reg)``, with the
    1-based rank of ``y`` by decreasing probability (Angelopoulos, Bates, Jordan and Malik, ICLR
    2021). ``u`` as in :func:`aps_scores`. With ``include_last_label=True`` the score of ``y`` is
    the ``u = 1`` score of the label ranked just above it (0 for the top label): MAPIE's served set,
    which includes the label whose regularized cumulative mass crosses ``q``.

    Parameters
    ----------
    probs : Tensor [N, K]
        Class probabilities.
    lam : float >= 0
        Penalty per rank beyond ``k_reg`` (MAPIE's fitted ``lambda_star``).
    k_reg : int >= 0
        Number of ranks without penalty (MAPIE's fitted ``k_star``).
    u, include_last_label, generator
        As in :func:`aps_scores`.

    Returns
    -------
    Tensor [N, K]
        Scores (may exceed 1).
    """
    _check_probs(probs)
    lam = float(lam)
    if not (lam >= 0.0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if isinstance(k_reg, bool) or int(k_reg) != k_reg or k_reg < 0:
        raise ValueError(f"k_reg must be an integer >= 0, got {k_reg!r}")
    u = _resolve_u(probs, u, include_last_label, generator)
    k_reg = int(k_reg)
    per_row = not isinstance(u, float)  # a tensor [N, 1] of draws or given values

    def rank_score(mass_above, mass_through, count_above, count_through, rows):
        share = u[rows] if per_row else u
        rank = count_above if include_last_label else count_through
        return mass_above + share * (mass_through - mass_above) + lam * (rank - k_reg).clamp(min=0)

    return _scores_by_rank(probs, rank_score)


CONFORMITY_SCORES: dict[str, ConformityScore] = {
    "lac": lac_scores,
    "aps": aps_scores,
    "raps": raps_scores,
}
"""Name -> ``scores(probs [N, K], **params) -> [N, K]``; lower score = more conforming."""

MAPIE_CONVENTION: dict[str, dict[str, dict[str, Any]]] = {
    "lac": {"calibration": {}, "serving": {}},
    "aps": {"calibration": {"u": "random"}, "serving": {"include_last_label": True}},
    "raps": {"calibration": {"u": "random"}, "serving": {"include_last_label": True}},
}
"""Score parameters per phase that reproduce MAPIE's ``SplitConformalClassifier`` sets (add
``lam``/``k_reg`` for RAPS, and a ``generator`` for reproducible calibration draws)."""


def prediction_sets(scores: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Conformal prediction sets ``C(x) = {y : S(x, y) <= q}``.

    Parameters
    ----------
    scores : Tensor [N, K]
        Conformity scores of every label (from ``CONFORMITY_SCORES``).
    q : float or 0-d Tensor
        Threshold; ``+inf`` gives full sets.

    Returns
    -------
    BoolTensor [N, K]
        Membership mask, on the device of ``scores``.
    """
    import torch

    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a torch.Tensor of shape [N, K], got {got}")
    return scores <= q


# --------------------------------------------------------------------------------------------
# Thresholds (numpy, calibration time)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConformalThreshold:
    """A calibrated threshold and how it was obtained.

    Attributes
    ----------
    q : float
        Threshold for :func:`prediction_sets`; ``+inf`` means full sets.
    method : str
        ``"split"``, ``"split_conditional"``, ``"nacp"``, ``"nacp_delta"``, ``"audit_rectified"``,
        ``"audit_rectified_conditional"`` or ``"audit_split"``.
    alpha : float
        Miscoverage target.
    tau : float
        Level the corrected CDF had to reach (``1 - alpha`` for the conditional audit form, where
        the margin is subtracted from the CDF instead).
    n : int
        Calibration items (noisy labels).
    eps, delta, Delta : float or None
        Uniform noise rate, failure probability and the margin ``Delta`` (NACP only).
    full_sets : bool
        True when no finite threshold reaches the target (``q = +inf``).
    note : str
        Human-readable explanation, non-empty when ``full_sets``.
    m : int or None
        Audited items (audit methods only).
    z : float or None
        Normal quantile of the conditional audit margin.
    """

    q: float
    method: str
    alpha: float
    tau: float
    n: int
    eps: float | None = None
    delta: float | None = None
    Delta: float | None = None
    full_sets: bool = False
    note: str = ""
    m: int | None = None
    z: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict; an infinite ``q`` or ``tau`` is written as ``None``."""
        out = asdict(self)
        for key in ("q", "tau"):
            if math.isinf(out[key]):
                out[key] = None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConformalThreshold":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"data has unknown keys {sorted(unknown)}; expected keys among {sorted(names)}")
        missing = {"q", "method", "alpha", "tau", "n"} - set(data)
        if missing:
            raise ValueError(f"data is missing keys {sorted(missing)}")
        values = dict(data)
        for key in ("q", "tau"):
            values[key] = math.inf if values[key] is None else float(values[key])
        return cls(**values)

    def config(self) -> dict[str, Any]:
        """Same as :meth:`to_dict` (the storage convention of ``noisewise.models.uncertainty``)."""
        return self.to_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No tensors: everything lives in :meth:`config`."""
        return {}

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None
    ) -> "ConformalThreshold":
        """Inverse of :meth:`config` / :meth:`state_dict`."""
        return cls.from_dict(config)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (miscoverage, e.g. 0.1 for 90% sets), got {alpha}")
    return alpha


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1) (uniform-convention noise rate), got {eps}")
    return eps


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) or None, got {delta}")
    return delta


def _check_scores_1d(scores: Any, name: str) -> np.ndarray:
    s = as_numpy(scores, name).astype(np.float64, copy=False)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN")
    return s


def _check_scores_2d(scores: Any, name: str) -> np.ndarray:
    s = as_numpy(scores, name).astype(np.float64, copy=False)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] < 2:
        raise ValueError(f"{name} must have shape [n, K] with n >= 1 and K >= 2, got {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN")
    return s


def _check_labels(labels: Any, name: str, n: int, k: int) -> np.ndarray:
    y = as_numpy(labels, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one label per row of the scores), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name} must be class indices in [0, {k}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64, copy=False)


def _check_audit(audit_index: Any, audit_labels: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = as_numpy(audit_index, "audit_index")
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"audit_index must be a non-empty 1-D array of row indices, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"audit_index must hold integer row indices, got dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(
            f"audit_index must index rows of all_scores, in [0, {n}), got values in [{idx.min()}, {idx.max()}]"
        )
    if np.unique(idx).size != idx.size:
        raise ValueError("audit_index contains duplicate rows; each audited item must appear once")
    labels = _check_labels(audit_labels, "audit_labels", idx.size, k)
    return idx.astype(np.int64, copy=False), labels


def _plugin_tau(n: int, alpha: float) -> float:
    # Same float expression as MAPIE's _compute_classification_quantile, for exact parity.
    return float(np.ceil((n + 1) * (1 - alpha)) / n)


def _too_few_note(n: int, alpha: float, what: str) -> str:
    needed = math.ceil((1 - alpha) / alpha)
    return (
        f"{what}: ceil((n+1)(1-alpha))/n > 1 with n={n}, alpha={alpha}; at least {needed} "
        f"calibration items are needed for a finite threshold, so every set is the full label set"
    )


def split_conformal_threshold(true_scores: Any, alpha: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest score.

    ``q = S_(k)``, ``k = ceil((n + 1)(1 - alpha))``, i.e. the empirical quantile at level ``k / n``
    with numpy's ``method="lower"``, exactly MAPIE's ``_compute_classification_quantile``. Gives
    marginal coverage ``>= 1 - alpha`` for exchangeable data (Vovk et al. 2005; Lei et al. 2018).

    Parameters
    ----------
    true_scores : array [n]
        Scores of the calibration items at their labels.
    alpha : float in (0, 1)
        Miscoverage target.

    Returns
    -------
    float
        ``q``; ``+inf`` (full sets) when ``k > n``, i.e. fewer than ``(1 - alpha)/alpha``
        items (MAPIE raises an error there instead).
    """
    alpha = _check_alpha(alpha)
    s = _check_scores_1d(true_scores, "true_scores")
    n = s.size
    k = int(np.ceil((n + 1) * (1 - alpha)))
    if k > n:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def conditional_order_statistic(n: int, alpha: float, delta: float) -> int:
    """Smallest ``k`` whose ``k``-th smallest score covers ``>= 1 - alpha`` with probability ``>= 1 - delta``.

    For exchangeable continuous scores the coverage of the threshold ``S_(k)`` is distributed as
    ``Beta(k, n + 1 - k)`` over calibration draws (Vovk, "Conditional validity of inductive conformal
    predictors", ACML 2012), so ``k`` is the smallest integer with ``BetaCDF(1 - alpha; k, n + 1 - k) <=
    delta``, i.e. ``P(coverage < 1 - alpha) <= delta``.

    Returns ``n + 1`` when even ``k = n`` does not reach it (too few items: full sets).
    """
    from scipy import stats

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    alpha, delta = _check_alpha(alpha), _check_delta(delta)
    k = np.arange(1, n + 1)
    ok = stats.beta.cdf(1.0 - alpha, k, n + 1 - k) <= delta
    return int(k[np.argmax(ok)]) if ok.any() else n + 1


def split_threshold(
    all_scores: Any,
    labels: Any,
    alpha: float,
    delta: float | None = None,
) -> ConformalThreshold:
    """Split conformal threshold on the given (observed) labels, as a :class:`ConformalThreshold`.

    * ``delta=None`` (plug-in, ``method="split"``): :func:`split_conformal_threshold`, the
      ``ceil((n + 1)(1 - alpha))``-th smallest score: coverage ``>= 1 - alpha`` on average over
      calibration draws (MAPIE's ``SplitConformalClassifier``).
    * ``delta`` given (``method="split_conditional"``): the :func:`conditional_order_statistic`-th
      smallest score, coverage ``>= 1 - alpha`` with probability ``>= 1 - delta`` over the draw.

    Coverage is of the labels the scores were computed with. On noisy labels it is the coverage of
    the NOISY label; for the clean label it is conservative when the noise is dispersive (wrong
    labels spread over classes that score worse than the true one, Einbinder et al., "Label noise
    robustness of conformal prediction", JMLR 2024) and can fall slightly short when wrong labels
    sit on the classes the model confuses.

    Parameters
    ----------
    all_scores : array [n, K]
        Scores of every label of every calibration item.
    labels : int array [n]
        The labels to cover.
    alpha : float in (0, 1)
        Miscoverage target.
    delta : float in (0, 1), optional
        Failure probability of the calibration-conditional form.

    Returns
    -------
    ConformalThreshold
        ``q = +inf`` with ``full_sets=True`` and a note when too few items reach the level.
    """
    alpha = _check_alpha(alpha)
    scores = _check_scores_2d(all_scores, "all_scores")
    n, k = scores.shape
    y = _check_labels(labels, "labels", n, k)
    true = np.sort(scores[np.arange(n), y])
    if delta is None:
        order, method, tau = int(np.ceil((n + 1) * (1 - alpha))), "split", _plugin_tau(n, alpha)
    else:
        delta = _check_delta(delta)
        order, method = conditional_order_statistic(n, alpha, delta), "split_conditional"
        tau = order / n
    common = dict(method=method, alpha=alpha, tau=tau, n=n, delta=delta)
    if order > n:
        note = (_too_few_note(n, alpha, "split conformal") if delta is None else
                f"split conformal (calibration-conditional): n={n} items cannot give coverage >= {1 - alpha} "
                f"with probability {1 - delta}; every set is the full label set")
        return ConformalThreshold(q=math.inf, full_sets=True, note=note, **common)
    return ConformalThreshold(q=float(true[order - 1]), **common)


def nacp_delta(n: int, eps: float, delta: float) -> float:
    """Finite-sample margin of NACP: ``Delta = sqrt(log(4/delta) / (2 n h^2))``, ``h = (1-eps)/(1+eps)``.

    With ``tau = 1 - alpha + Delta``, coverage lies in ``[1 - alpha, 1 - alpha + 2 Delta]`` with
    probability ``>= 1 - delta`` over the calibration set (Penso, Goldberger and Fetaya, COPA 2025).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    eps, delta = _check_eps(eps), _check_delta(delta)
    h = (1 - eps) / (1 + eps)
    return math.sqrt(math.log(4 / delta) / (2 * n * h * h))


def _last_permanent_pass(ok: np.ndarray) -> int:
    """Index of the first True after the last False in ``ok`` (``len(ok)`` if ``ok[-1]`` is False)."""
    bad = np.flatnonzero(~ok)
    return 0 if bad.size == 0 else int(bad[-1]) + 1


# Buckets of the value grid that brackets how many of the n*K scores lie at or below each candidate.
_GRID_BUCKETS = 1 << 20
# Below this many scores, sorting them is cheaper than another bucket pass.
_SORT_BELOW = 1 << 18
_MAX_GRID_LEVELS = 4
# Up to this many candidates, count each by direct comparison.
_COMPARE_AT_MOST = 4

# verdict(which, n_at_or_below, n_below) -> (F_c(q) >= tau, F_c(q-) >= tau) for the candidates ``which``,
# given how many of all the scores are <= q and < q. The more scores below, the lower F_c.
Verdict = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _grid_bucket(values: np.ndarray, lo: float, scale: float, buckets: int) -> np.ndarray:
    """Bucket index in ``[0, buckets + 1]`` on a uniform grid; nondecreasing in the value, rounding included."""
    t = np.subtract(values, lo)
    t *= scale
    np.clip(t, -1.0, float(buckets), out=t)
    np.floor(t, out=t)
    return t.astype(np.int64) + 1


def _count_verdicts(blocks: list[np.ndarray], cand: np.ndarray, which: np.ndarray, offset: np.ndarray,
                    verdict: Verdict, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Verdicts at sorted candidates ``cand`` when ``offset + #(scores in blocks <= c)`` (and ``< c``) are the counts.

    Rather than sorting all the scores, a monotone bucket map on a uniform grid over the candidates'
    span (``s1 <= s2`` implies ``bucket(s1) <= bucket(s2)`` in floating point too) counts in one pass
    the scores of the buckets below each candidate's bucket and through it: a bracket on both counts.
    Since the verdict only worsens as the count grows, a bracket that gets the same verdict at both
    ends decides it. The scores of the buckets of undecided candidates go one level down, on a grid
    over the undecided candidates' (narrower) span; small remainders are sorted. The verdicts are
    those of the exact counts.
    """
    if cand.size <= _COMPARE_AT_MOST:  # a few candidates: one comparison pass each beats any sort
        at_or_below = np.array([sum(np.count_nonzero(block <= c) for block in blocks) for c in cand], dtype=np.int64)
        strictly_below = np.array([sum(np.count_nonzero(block < c) for block in blocks) for c in cand], dtype=np.int64)
        return verdict(which, offset + at_or_below, offset + strictly_below)
    size = sum(block.size for block in blocks)
    span = float(cand[-1]) - float(cand[0])
    # about 16 scores per bucket at most: a finer grid would cost more to count than it saves
    buckets = min(_GRID_BUCKETS, max(64, size // 16))
    scale = buckets / span if span > 0 else 0.0
    if size <= _SORT_BELOW or level >= _MAX_GRID_LEVELS or not (0.0 < scale < math.inf) \
            or not math.isfinite(float(cand[0])):
        every = np.sort(np.concatenate(blocks)) if blocks else np.empty(0)
        return verdict(which, offset + np.searchsorted(every, cand, "right"),
                       offset + np.searchsorted(every, cand, "left"))
    lo = float(cand[0])
    counts = np.zeros(buckets + 2, dtype=np.int64)
    for block in blocks:
        counts += np.bincount(_grid_bucket(block, lo, scale, buckets), minlength=counts.size)
    through = np.cumsum(counts)
    bucket = _grid_bucket(cand, lo, scale, buckets)  # >= 1: every candidate is >= lo
    below, through = offset + through[bucket - 1], offset + through[bucket]
    at_ok, left_ok = verdict(which, through, through)  # True here: True whatever the exact count
    at_maybe, left_maybe = verdict(which, below, below)  # False here: False whatever the exact count
    unsure = np.flatnonzero((at_maybe & ~at_ok) | (left_maybe & ~left_ok))
    if unsure.size:
        wanted = np.zeros(counts.size, dtype=bool)
        wanted[bucket[unsure]] = True
        inside = [block[wanted[_grid_bucket(block, lo, scale, buckets)]] for block in blocks]
        # the scores of lower wanted buckets are < c and already in `below`: take them out of the offset
        lower_wanted = np.cumsum(np.where(wanted, counts, 0))[bucket[unsure] - 1]
        sub_at, sub_left = _count_verdicts(inside, cand[unsure], which[unsure],
                                           below[unsure] - lower_wanted, verdict, level + 1)
        at_ok[unsure], left_ok[unsure] = sub_at, sub_left
    return at_ok, left_ok


def _row_blocks(scores: np.ndarray) -> list[np.ndarray]:
    step = max(1, _BLOCK_ELEMENTS // scores.shape[1])
    return [scores[first:first + step].ravel() for first in range(0, scores.shape[0], step)]


def nacp_threshold(
    all_scores: Any,
    noisy_labels: Any,
    alpha: float,
    eps: float,
    delta: float | None = None,
) -> ConformalThreshold:
    """Noise-aware conformal threshold (NACP) under uniform label noise.

    Under ``P(y~ = j | y = i) = (1 - eps) 1[i = j] + eps / K`` the noisy-label score CDF mixes the
    clean one with the random-label one, so the clean CDF is estimated by

    ``F_c(q) = (F_n(q) - eps F_r(q)) / (1 - eps)``, with
    ``F_n(q) = (1/n) sum_i 1[S(x_i, y~_i) <= q]`` and
    ``F_r(q) = (1/(nK)) sum_i |C_q(x_i)|`` (the fraction of all ``nK`` scores ``<= q``).

    ``q_hat`` is the smallest noisy-label score ``q`` with ``F_c >= tau`` at ``q`` and everywhere
    above it. ``F_c`` rises only at noisy-label scores and falls between them (``F_r`` grows), so
    it suffices to check ``F_c`` at each candidate and its left limit at each larger candidate.

    * ``delta=None`` (plug-in): ``tau = ceil((n + 1)(1 - alpha)) / n``; at ``eps = 0`` this is
      exactly :func:`split_conformal_threshold` (MAPIE's quantile).
    * ``delta`` given: ``tau = 1 - alpha + Delta`` (:func:`nacp_delta`), for
      ``1 - alpha <= coverage <= 1 - alpha + 2 Delta`` with probability ``1 - delta``
      (Penso, Goldberger and Fetaya, "Estimating the Conformal Prediction Threshold from Noisy
      Labels", COPA 2025).

    Over-estimating ``eps`` makes the sets under-cover: plug in a lower confidence bound.

    Parameters
    ----------
    all_scores : array [n, K]
        Scores of every label of every calibration item (calibration-phase parameters).
    noisy_labels : int array [n]
        Observed labels.
    alpha : float in (0, 1)
        Miscoverage target.
    eps : float in [0, 1)
        Uniform-convention noise rate.
    delta : float in (0, 1), optional
        Failure probability of the finite-sample guarantee.

    Returns
    -------
    ConformalThreshold
        ``q = +inf`` with ``full_sets=True`` and a note when ``tau > 1``.

    Notes
    -----
    One sort of the noisy-label scores and one bucket-count pass over all scores, in row blocks
    (O(n log n + nK)); the scores that share a bucket with a candidate whose verdict the bucket
    counts leave open go through finer grids, then a sort. The result is the one a sort of all
    ``n*K`` scores gives.
    """
    alpha, eps = _check_alpha(alpha), _check_eps(eps)
    scores = _check_scores_2d(all_scores, "all_scores")
    n, k = scores.shape
    labels = _check_labels(noisy_labels, "noisy_labels", n, k)
    if delta is None:
        method, big_delta, tau = "nacp", None, _plugin_tau(n, alpha)
    else:
        delta = _check_delta(delta)
        method, big_delta = "nacp_delta", nacp_delta(n, eps, delta)
        tau = 1 - alpha + big_delta
    common = dict(method=method, alpha=alpha, tau=tau, n=n, eps=eps, delta=delta, Delta=big_delta)
    if tau > 1:
        if delta is None:
            note = _too_few_note(n, alpha, "NACP plug-in")
        else:
            note = (
                f"NACP with Delta: tau = 1 - alpha + Delta = {tau:.4f} > 1 (Delta={big_delta:.4f} "
                f"for n={n}, eps={eps}, delta={delta}); more calibration items or a larger alpha "
                f"are needed, so every set is the full label set"
            )
        return ConformalThreshold(q=math.inf, full_sets=True, note=note, **common)

    noisy = np.sort(scores[np.arange(n), labels])
    cand = np.unique(noisy)
    noisy_at = np.searchsorted(noisy, cand, "right")
    noisy_left = np.searchsorted(noisy, cand, "left")

    def corrected(noisy_count: np.ndarray, all_count: np.ndarray) -> np.ndarray:
        return (noisy_count / n - eps * (all_count / (n * k))) / (1 - eps)

    if eps == 0.0:  # F_r drops out
        at_ok, left_ok = corrected(noisy_at, 0) >= tau, corrected(noisy_left, 0) >= tau
    else:
        # F_r needs the rank of each candidate among all n*K scores; only whether F_c >= tau matters, so
        # count them by brackets rather than sorting them all (same verdicts as a full sort).
        def verdict(which, all_at, all_left):
            return corrected(noisy_at[which], all_at) >= tau, corrected(noisy_left[which], all_left) >= tau

        at_ok, left_ok = _count_verdicts(_row_blocks(scores), cand, np.arange(cand.size),
                                         np.zeros(cand.size, dtype=np.int64), verdict)
    # q = cand[j] is admissible iff F_c(cand[j]) >= tau and, for every later candidate i > j,
    # both F_c(cand[i]) and its left limit (the infimum of F_c on [cand[i-1], cand[i])) are >= tau.
    later_ok = np.append(at_ok[1:] & left_ok[1:], True)
    suffix_ok = np.flip(np.logical_and.accumulate(np.flip(later_ok)))
    admissible = at_ok & suffix_ok
    if not admissible.any():
        note = f"{method}: the corrected CDF never stays >= tau={tau:.4f}; every set is the full label set"
        return ConformalThreshold(q=math.inf, full_sets=True, note=note, **common)
    return ConformalThreshold(q=float(cand[np.argmax(admissible)]), **common)


def audit_rectified_threshold(
    all_scores: Any,
    noisy_labels: Any,
    audit_index: Any,
    audit_labels: Any,
    alpha: float,
    conditional: bool = False,
    z: float = 1.645,
) -> ConformalThreshold:
    """Threshold from noisy labels rectified by an audited subset (no noise model needed).

    A random subset ``A`` (``m`` items) of the ``n`` calibration items also carries a trusted label
    ``y``. The clean score CDF is estimated without bias by

    ``F_c(q) = F_n(q) + (1/m) sum_{i in A} (1[S(x_i, y_i) <= q] - 1[S(x_i, y~_i) <= q])``,

    ``F_n(q) = (1/n) sum_{i=1..n} 1[S(x_i, y~_i) <= q]`` (all noisy items, audited ones included),
    in the spirit of prediction-powered inference (Angelopoulos et al., Science 2023). ``F_c`` is a
    step function whose steps are at the candidates (noisy-label scores and audited true-label
    scores).

    * Plug-in (``conditional=False``): the smallest candidate ``q`` with ``F_c >= tau`` at ``q``
      and every larger candidate, ``tau = ceil((n + 1)(1 - alpha)) / n``. It equals split CP on
      the noisy labels when the audit agrees with them, and on the clean labels when every item
      is audited.
    * Calibration-conditional (``conditional=True``): the smallest candidate ``q`` with
      ``L(q') = F_c(q') - z * sqrt(v_d(q') / m + F_n(q')(1 - F_n(q')) / n) >= 1 - alpha`` for all
      candidates ``q' >= q``, where ``v_d`` is the sample variance (ddof=1) of the paired
      differences ``d_i = 1[S(x_i, y_i) <= q'] - 1[S(x_i, y~_i) <= q']`` over ``A``. The
      covariance from ``A`` being inside the ``n`` items (order ``1/n``, usually negative) is left
      out. ``z = 1.645`` targets ``P(coverage >= 1 - alpha) ~ 0.95`` pointwise.

    Parameters
    ----------
    all_scores : array [n, K]
        Scores of every label of every calibration item.
    noisy_labels : int array [n]
        Observed labels of all calibration items.
    audit_index : int array [m]
        Rows of ``all_scores`` that were audited (distinct).
    audit_labels : int array [m]
        Trusted labels of those rows.
    alpha : float in (0, 1)
        Miscoverage target.
    conditional : bool
        Use the lower confidence bound instead of the plug-in.
    z : float >= 0
        Normal quantile of the margin (conditional form only).

    Returns
    -------
    ConformalThreshold
        ``method`` is ``"audit_rectified"`` or ``"audit_rectified_conditional"``.
    """
    alpha = _check_alpha(alpha)
    scores = _check_scores_2d(all_scores, "all_scores")
    n, k = scores.shape
    labels = _check_labels(noisy_labels, "noisy_labels", n, k)
    idx, trusted = _check_audit(audit_index, audit_labels, n, k)
    z = float(z)
    if not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
    m = idx.size
    method = "audit_rectified_conditional" if conditional else "audit_rectified"
    tau = 1 - alpha if conditional else _plugin_tau(n, alpha)
    common = dict(method=method, alpha=alpha, tau=tau, n=n, m=m, z=z if conditional else None)
    if tau > 1:
        return ConformalThreshold(q=math.inf, full_sets=True, note=_too_few_note(n, alpha, method), **common)

    noisy_all = scores[np.arange(n), labels]
    audit_true = scores[idx, trusted]
    audit_noisy = noisy_all[idx]
    cand = np.unique(np.concatenate([noisy_all, audit_true]))
    f_n = np.searchsorted(np.sort(noisy_all), cand, "right") / n
    n_true = np.searchsorted(np.sort(audit_true), cand, "right")
    n_noisy = np.searchsorted(np.sort(audit_noisy), cand, "right")
    f_c = f_n + (n_true - n_noisy) / m
    if conditional:
        # d_i is nonzero iff exactly one of the two audited scores is <= q.
        n_both = np.searchsorted(np.sort(np.maximum(audit_true, audit_noisy)), cand, "right")
        sum_sq = n_true + n_noisy - 2 * n_both
        mean_d = (n_true - n_noisy) / m
        var_d = np.maximum(sum_sq - m * mean_d**2, 0.0) / max(m - 1, 1)
        level = f_c - z * np.sqrt(var_d / m + f_n * (1 - f_n) / n)
    else:
        level = f_c
    start = _last_permanent_pass(level >= tau)
    if start == cand.size:
        note = f"{method}: the rectified CDF never stays >= {tau:.4f}; every set is the full label set"
        return ConformalThreshold(q=math.inf, full_sets=True, note=note, **common)
    return ConformalThreshold(q=float(cand[start]), **common)


def audit_split_threshold(
    all_scores: Any,
    audit_index: Any,
    audit_labels: Any,
    alpha: float,
) -> ConformalThreshold:
    """Split CP on the audited items alone: :func:`split_conformal_threshold` of their true-label scores.

    Valid marginally (the audit is a clean exchangeable sample) but noisier from split to split
    than :func:`audit_rectified_threshold`, since it uses ``m`` items instead of ``n``.

    Parameters
    ----------
    all_scores : array [n, K]
        Scores of every label of every calibration item.
    audit_index : int array [m]
        Audited rows.
    audit_labels : int array [m]
        Their trusted labels.
    alpha : float in (0, 1)
        Miscoverage target.

    Returns
    -------
    ConformalThreshold
        ``method="audit_split"``, ``n = m`` = number of audited items.
    """
    alpha = _check_alpha(alpha)
    scores = _check_scores_2d(all_scores, "all_scores")
    idx, trusted = _check_audit(audit_index, audit_labels, scores.shape[0], scores.shape[1])
    m = idx.size
    q = split_conformal_threshold(scores[idx, trusted], alpha)
    full = math.isinf(q)
    return ConformalThreshold(
        q=q,
        method="audit_split",
        alpha=alpha,
        tau=_plugin_tau(m, alpha),
        n=m,
        m=m,
        full_sets=full,
        note=_too_few_note(m, alpha, "audit_split") if full else "",
    )

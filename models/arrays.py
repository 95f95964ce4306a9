"""Noise-aware uncertainty for any classifier, on arrays: numpy in, numpy out.

:class:`NoiseAwareClassifier` wraps the outputs of a model you already have (scikit-learn, PyTorch,
JAX, XGBoost, ...) the way MAPIE's ``SplitConformalClassifier`` does, and adds what noisy labels need:

* ``fit`` (optional): the OOD scorer's bank, from training features;
* ``conformalize``: on a calibration split with possibly noisy labels (and, best, some trusted
  ones), fits the conformal OOD gate, the conformal threshold, the certified abstention threshold
  with its certified risk-coverage frontier, and the noise-rate record;
* ``predict_set`` / ``predict_ood`` / ``predict_decision`` / ``predict``: sets, OOD p-values and
  accept/abstain decisions for new items.

The fitting goes through the same policy functions as ``noisewise calibrate``
(:func:`noisewise.models.calibrate.fit_set_threshold`, :func:`~noisewise.models.calibrate.fit_abstention`,
:func:`~noisewise.models.calibrate.noise_knowledge`), so the same inputs give the same thresholds and
the same kind of guarantee (``valid``, ``conservative`` or ``none``, see
:data:`noisewise.models.calibrate.GUARANTEE_KINDS`), and ``calibration_`` is a regular
:class:`~noisewise.models.calibrate.Calibration` that can be saved beside a model's weights.

Which labels give which guarantee (prediction sets; abstention follows the same order):

* trusted labels for a random part of the calibration items (``trusted_labels``): audit-rectified
  threshold, ``valid``, no noise model assumed;
* labels whose noise is known by construction (``known_noise="symmetric:0.2"``, or ``"none"`` for
  clean labels): NACP at the known uniform rate (symmetric) or split conformal (clean), ``valid``;
* ``noise_model="uniform"`` with a ``noise_rate`` you vouch for: NACP, ``conservative`` (valid if the
  noise is uniform with at least that rate);
* nothing known: split conformal on the observed labels, ``conservative`` (valid when label errors are
  dispersive). A heuristic noise estimate is recorded but never feeds a guarantee.

Logits or probabilities (``inputs``). Probabilities ``p`` are turned into logits as ``log p`` (clipped at
the smallest positive float). That changes nothing for the conformal scores (they read ``p``), MSP and
MaxLogit-pNorm (shift-invariant per row) or the feature-space OOD scorers; the ``energy``, ``maxlogit``
and ``vim`` OOD scorers read the scale of the logits, which probabilities have lost, so they need
``inputs="logits"``.

Everything runs in torch on ``device`` (the ``noisewise.models.uncertainty`` code is torch); inputs may be
numpy arrays, torch tensors or anything ``numpy.asarray`` reads (JAX, TensorFlow, lists); outputs are numpy.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any, Self

import numpy as np
import torch

from noisewise.models.calibrate import (
    CONFORMAL_MODES,
    NOISE_MODELS,
    RISK_CORRECTIONS,
    Calibration,
    CalibrationSettings,
    NoiseKnowledge,
    assemble_calibration,
    noise_knowledge,
)
from noisewise.models.data import DataError, parse_noise_spec
from noisewise.models.uncertainty.conformal import CONFORMITY_SCORES, prediction_sets
from noisewise.models.uncertainty.host import as_numpy
from noisewise.models.uncertainty.ood import OOD_SCORERS, OODGate, build_ood_scorer
from noisewise.models.uncertainty.selective import confidence as confidence_fn
from noisewise.models.uncertainty.selective import select_pnorm

__all__ = ["INPUT_KINDS", "REASONS", "NoiseAwareClassifier", "NotConformalizedError"]

#: What ``logits_or_probs`` holds: raw scores before the softmax, or class probabilities.
INPUT_KINDS = ("logits", "probs")
#: ``reason`` values of :meth:`NoiseAwareClassifier.predict_decision`, indexed like the serving codes
#: ``noisewise.models.predictor.REASON_*`` (0 accepted, 1 out of distribution, 2 not confident enough).
REASONS = ("none", "ood", "low_confidence")
# OOD scorers that read the scale of the logits (energy, maxlogit, and ViM's energy term): log-probabilities
# have lost it (their logsumexp is 0), so these scorers need real logits.
_NEEDS_REAL_LOGITS = ("energy", "maxlogit", "vim")
# A row of probabilities must sum to 1 within this (float32 softmax outputs are off by ~1e-7 per class).
_PROB_SUM_TOL = 1e-3
# The calibration labels' origin when only arrays are given: not a built-in dataset and no injected noise,
# so `noise_knowledge` applies the same rule as to a user's own dataset in `noisewise calibrate`.
_ARRAYS_ORIGIN = SimpleNamespace(name="", lineage={})
_OOD_GUARANTEE = {"kind": "valid", "condition": "served in-distribution inputs are exchangeable with the calibration "
                  "inputs (no labels involved, so label noise cannot bias it)"}


class NotConformalizedError(RuntimeError):
    """A prediction method was called before :meth:`NoiseAwareClassifier.conformalize`."""


# ------------------------------------------------------------------------------------------------
# validators: numpy at the boundary, messages that name the argument and say what to do
# ------------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_open_unit(value: Any, name: str, hint: str) -> float:
    if not (_is_real(value) and 0.0 < float(value) < 1.0):
        raise ValueError(f"`{name}` must be a number in (0, 1) ({hint}), got {value!r}")
    return float(value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_matrix(x: Any, name: str, n: int | None = None, k: int | None = None, what: str = "K classes") -> np.ndarray:
    """A finite real 2-D array ``[N, D]``; float32/float64 kept as given (bit-for-bit parity with the CLI)."""
    arr = as_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [N, {what.split()[0]}] ({what}), got shape {arr.shape}"
                         + ("; reshape a single item with x[None, :]" if arr.ndim == 1 else ""))
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (shape {arr.shape}); it needs at least one item")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"`{name}` has {arr.shape[0]} rows but the labels / other arrays have {n}: one row per item")
    if k is not None and arr.shape[1] != k:
        raise ValueError(f"`{name}` has {arr.shape[1]} columns but the classifier was set up with {k} ({what})")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"`{name}` has NaN or infinite values in {len(rows)} rows (first: row {rows[0]}); "
                         "remove those items or fix the model's outputs")
    return arr


def _check_probs(probs: np.ndarray, name: str) -> None:
    lo, hi = float(probs.min()), float(probs.max())
    sums = probs.sum(axis=1, dtype=np.float64)
    if lo < 0.0 or hi > 1.0 or np.abs(sums - 1.0).max() > _PROB_SUM_TOL:
        raise ValueError(
            f"`{name}` must be class probabilities (values in [0, 1], rows summing to 1), got values in "
            f"[{lo:.4g}, {hi:.4g}] and row sums in [{sums.min():.4g}, {sums.max():.4g}]; if these are logits or "
            "decision_function scores, use inputs='logits'")


def _looks_like_probs(arr: np.ndarray) -> bool:
    return bool(arr.min() >= 0.0 and arr.max() <= 1.0
                and np.abs(arr.sum(axis=1, dtype=np.float64) - 1.0).max() <= _PROB_SUM_TOL)


def _check_labels(labels: Any, name: str, n: int, k: int) -> np.ndarray:
    """Integer class indices ``[n]`` in ``[0, k)`` (integral floats accepted)."""
    y = as_numpy(labels, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"`{name}` must be a 1-D array of {n} class indices (one per row of the scores), "
                         f"got shape {y.shape}")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"`{name}` must hold integer class indices in [0, {k}), got dtype {y.dtype}; "
                         "map class names to their column index first")
    if not np.issubdtype(y.dtype, np.integer) and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise ValueError(f"`{name}` must hold integer class indices in [0, {k}), got non-integer values")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= k)
    if bad.any():
        raise ValueError(f"`{name}` must hold class indices in [0, {k}) (the score matrix has {k} columns), "
                         f"got {int(bad.sum())} outside (e.g. {int(y[bad][0])})")
    return y


def _check_trusted(trusted: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Trusted labels as ``(increasing positions, labels)``; empty when there are none.

    Accepts an int array ``[n]`` with ``-1`` where an item was not audited, or a pair ``(index, labels)``.
    """
    empty = np.empty(0, dtype=np.int64)
    if trusted is None:
        return empty, empty
    if isinstance(trusted, tuple) and len(trusted) == 2:
        index = as_numpy(trusted[0], "trusted_labels[0] (index)")
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise ValueError("`trusted_labels` as a pair (index, labels) needs a 1-D integer index of calibration "
                             f"rows, got shape {index.shape} and dtype {index.dtype}")
        index = index.astype(np.int64)
        labels = _check_labels(trusted[1], "trusted_labels[1] (labels)", len(index), k)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"`trusted_labels` index must hold calibration rows in [0, {n}), got values in "
                             f"[{index.min()}, {index.max()}]")
        if len(np.unique(index)) != len(index):
            raise ValueError("`trusted_labels` index has repeated rows: give each audited item once")
        order = np.argsort(index, kind="stable")
        return index[order], labels[order]
    arr = as_numpy(trusted, "trusted_labels")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"`trusted_labels` must be an int array of {n} entries (one per calibration item, -1 where "
                         f"the item was not audited) or a pair (index, labels), got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`trusted_labels` must hold integer class indices (-1 = not audited), got dtype {arr.dtype}")
    index = np.flatnonzero(arr != -1).astype(np.int64)
    labels = _check_labels(arr[index], "trusted_labels", len(index), k)
    return index, labels


def _check_class_names(class_names: Any, k: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"`class_names` has {len(names)} names but the scores have {k} columns (classes)")
    if len(set(names)) != k:
        raise ValueError("`class_names` must be distinct")
    return names


# ------------------------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------------------------


class NoiseAwareClassifier:
    """Conformal sets, OOD p-values and certified abstention for a classifier's outputs, under label noise.

    The classifier itself is not wrapped: pass its outputs (logits or probabilities) as arrays.

    Parameters
    ----------
    alpha : float in (0, 1), default 0.1
        Miscoverage of the prediction sets (target coverage ``1 - alpha``), MAPIE's ``1 - confidence_level``.
    risk : float in (0, 1), default 0.05
        Target selective risk ``r*``: the error rate among accepted items that abstention certifies.
    risk_delta : float in (0, 1), default 0.05
        The certified risk holds with probability ``>= 1 - risk_delta`` over the calibration draw.
    conformal : {"plugin", "finite-sample"}, default "plugin"
        ``plugin``: coverage on average over calibration draws (MAPIE's guarantee); ``finite-sample``:
        with probability ``>= 1 - delta`` over the calibration draw.
    delta : float in (0, 1), default 0.001
        Failure probability of the ``finite-sample`` sets.
    score : {"lac", "aps", "raps"}, default "lac"
        Conformity score, in MAPIE's conventions (``noisewise.models.uncertainty.conformal.MAPIE_CONVENTION``).
    risk_correction : {"auto", "none", "symmetric", "worst-case"}, default "auto"
        Correction of the certified risk for noisy labels when no trusted labels exist (see
        :func:`noisewise.models.calibrate.fit_abstention`).
    ood_scorer : str, default "auto"
        One of ``noisewise.models.uncertainty.ood.OOD_SCORERS`` (``knn``, ``mahalanobis``, ``vim``, ``react``
        read features and need :meth:`fit`; ``energy``, ``maxlogit``, ``msp`` read logits only). ``auto``:
        ``knn`` when :meth:`fit` got training features (distances in feature space hold up best under label
        noise), else ``energy`` on logits and ``msp`` on probabilities.
    ood_params : dict, optional
        Parameters of the scorer, e.g. ``{"k": 50}`` for ``knn``.
    ood_alpha : float in (0, 1), default 0.05
        The OOD gate flags at most this share of in-distribution inputs.
    noise_model : {"auto", "uniform"}, default "auto"
        ``uniform`` asserts that label noise is uniform (independent of the input) at ``noise_rate``: the sets
        then use NACP, a ``conservative`` guarantee. ``auto`` uses NACP only where uniform noise holds by
        construction (``known_noise="symmetric:R"``).
    noise_rate : float in [0, 1), optional
        A flip rate (share of wrong calibration labels) you vouch for.
    known_noise : str, optional
        The calibration labels' noise when it is known by construction: ``"none"`` (clean labels) or a
        ``KIND:RATE`` spec of :func:`noisewise.models.data.inject_noise` (``"symmetric:0.2"``, ...). Not
        together with ``noise_rate``.
    inputs : {"logits", "probs"}, default "logits"
        What ``logits_or_probs`` (and ``logits_train``) hold everywhere.
    class_names : sequence of str, optional
        Default ``"0"``, ``"1"``, ...
    seed : int, default 0
        Seed of the randomized APS/RAPS calibration scores.
    device : str or torch.device, default "cpu"
        Where the torch computations run.

    Attributes
    ----------
    calibration_ : noisewise.models.calibrate.Calibration
        Everything :meth:`conformalize` fitted; ``calibration_.save(directory)`` stores it.
    ood_scorer_ : noisewise.models.uncertainty.ood.OODScorer
        The fitted OOD scorer.
    n_classes_ : int

    Examples
    --------
    >>> model = NoiseAwareClassifier(alpha=0.1, inputs="probs")            # doctest: +SKIP
    >>> model.conformalize(probs_cal, noisy_labels_cal, trusted_labels=trusted)  # doctest: +SKIP
    >>> sets = model.predict_set(probs_test)                                # doctest: +SKIP
    >>> model.guarantees()["prediction_set"]["kind"]                        # doctest: +SKIP
    'valid'
    """

    def __init__(self, *, alpha: float = 0.1, risk: float = 0.05, risk_delta: float = 0.05,
                 conformal: str = "plugin", delta: float = 0.001, score: str = "lac", risk_correction: str = "auto",
                 ood_scorer: str = "auto", ood_params: dict | None = None, ood_alpha: float = 0.05,
                 noise_model: str = "auto", noise_rate: float | None = None, known_noise: str | None = None,
                 inputs: str = "logits", class_names: list[str] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.alpha = _check_open_unit(alpha, "alpha", "miscoverage of the sets, e.g. 0.1 for 90% coverage")
        self.risk = _check_open_unit(risk, "risk", "target error rate among accepted items, e.g. 0.05")
        self.risk_delta = _check_open_unit(risk_delta, "risk_delta", "failure probability of the certified risk")
        self.conformal = _check_choice(conformal, "conformal", CONFORMAL_MODES)
        self.delta = _check_open_unit(delta, "delta", "failure probability of finite-sample sets")
        self.score = _check_choice(score, "score", tuple(CONFORMITY_SCORES))
        self.risk_correction = _check_choice(risk_correction, "risk_correction", RISK_CORRECTIONS)
        self.ood_scorer = _check_choice(ood_scorer, "ood_scorer", ("auto", *sorted(OOD_SCORERS)))
        if ood_params is not None and not isinstance(ood_params, dict):
            raise ValueError(f"`ood_params` must be a dict of the scorer's parameters, got {type(ood_params).__name__}")
        self.ood_params = dict(ood_params or {})
        self.ood_alpha = _check_open_unit(ood_alpha, "ood_alpha", "share of in-distribution inputs flagged OOD")
        self.noise_model = _check_choice(noise_model, "noise_model", NOISE_MODELS)
        if noise_rate is not None and not (_is_real(noise_rate) and 0.0 <= float(noise_rate) < 1.0):
            raise ValueError(f"`noise_rate` must be None or a flip rate in [0, 1) (share of wrong labels), "
                             f"got {noise_rate!r}")
        self.noise_rate = None if noise_rate is None else float(noise_rate)
        if known_noise is not None:
            if self.noise_rate is not None:
                raise ValueError("give either `noise_rate` (a rate you vouch for) or `known_noise` (noise known by "
                                 "construction), not both")
            try:
                parse_noise_spec(str(known_noise))
            except DataError as err:
                raise ValueError(f"`known_noise`: {str(err).removeprefix('--noise: ')}") from None
        self.known_noise = known_noise
        self.inputs = _check_choice(inputs, "inputs", INPUT_KINDS)
        if self.inputs == "probs" and self.ood_scorer in _NEEDS_REAL_LOGITS:
            raise ValueError(f"ood_scorer={self.ood_scorer!r} reads the scale of the logits, which probabilities "
                             "have lost: pass logits with inputs='logits', or choose 'msp', 'knn', 'mahalanobis' or "
                             "'react'")
        if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))) or seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.class_names = None if class_names is None else list(class_names)
        self.device = torch.device(device)
        self._settings = CalibrationSettings(
            noise_rate="auto" if self.noise_rate is None else self.noise_rate, noise_model=self.noise_model,
            alpha=self.alpha, delta=self.delta, conformal=self.conformal, risk=self.risk,
            risk_delta=self.risk_delta, risk_correction=self.risk_correction, ood_alpha=self.ood_alpha,
            ood_scorer=self.ood_scorer, ood_params=self.ood_params, score=self.score, seed=self.seed)
        self.ood_scorer_ = None
        self.calibration_: Calibration | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        shown = {name: getattr(self, name) for name in ("alpha", "risk", "risk_delta", "conformal", "score",
                                                        "ood_scorer", "ood_alpha", "noise_model", "noise_rate",
                                                        "known_noise", "inputs")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # --- fitting ---------------------------------------------------------------------------------

    def fit(self, features_train: Any = None, logits_train: Any = None, labels_train: Any = None, *,
            head: tuple[Any, Any] | None = None) -> Self:
        """Fit the OOD scorer on in-distribution training items (optional for the logits scorers).

        Parameters
        ----------
        features_train : array [N, D], optional
            Penultimate features (or any embedding) of training items; needed by ``knn``, ``mahalanobis``,
            ``vim`` and ``react``, and makes ``ood_scorer="auto"`` choose ``knn``.
        logits_train : array [N, K], optional
            Logits (or probabilities, per ``inputs``) of the same items.
        labels_train : int array [N], optional
            Their labels; only ``mahalanobis`` reads them.
        head : (array [K, D], array [K]), optional
            Weight and bias of the final linear layer; only ``vim`` and ``react`` need them.

        Returns
        -------
        self
        """
        name = self._resolve_ood(features_train is not None)
        scorer = self._build_scorer(name)
        features = logits = labels = None
        if features_train is not None:
            features = self._tensor(_check_matrix(features_train, "features_train", what="D features"))
        elif "features" in scorer.uses or scorer.requires_fit:
            raise ValueError(f"ood_scorer={name!r} scores features: pass features_train=... (features of training "
                             "items), or choose a logits scorer ('energy', 'maxlogit', 'msp')")
        if logits_train is not None:
            n = None if features is None else features.shape[0]
            logits, _ = self._logits_and_probs(logits_train, "logits_train", n=n)
        if scorer.needs_labels:
            if labels_train is None:
                raise ValueError(f"ood_scorer={name!r} needs labels_train (class labels of the training items)")
            k = logits.shape[1] if logits is not None else self.n_classes_
            if k is None:
                raise ValueError(f"ood_scorer={name!r}: pass logits_train too, so that the number of classes is known")
            labels = torch.as_tensor(_check_labels(labels_train, "labels_train", features.shape[0], k),
                                     device=self.device)
        if scorer.needs_head:
            if head is None:
                raise ValueError(f"ood_scorer={name!r} needs head=(weight [K, D], bias [K]) of the final linear layer")
            head = (self._tensor(as_numpy(head[0], "head[0]")), self._tensor(as_numpy(head[1], "head[1]")))
        scorer.fit(features, logits, labels, head=head)
        self.ood_scorer_ = scorer
        if logits is not None:
            self.n_classes_ = int(logits.shape[1])
        return self

    def conformalize(self, logits_or_probs: Any, labels: Any, *, trusted_labels: Any = None, features: Any = None,
                     confidence_tuning: tuple[Any, Any] | None = None) -> Self:
        """Fit the OOD gate, the conformal threshold, the certified abstention and the noise record.

        Uses a calibration split that took no part in training. The same policy as ``noisewise calibrate``:
        see the module docstring for which labels give which guarantee.

        Parameters
        ----------
        logits_or_probs : array [n, K]
            Logits (or probabilities, per ``inputs``) of the calibration items.
        labels : int array [n]
            Their observed, possibly noisy, labels.
        trusted_labels : int array [n] with -1 where unknown, or (index int array [m], labels int array [m]), optional
            Trusted (audited) labels of a random part of the calibration items. With them the set and
            abstention guarantees are ``valid`` whatever the noise.
        features : array [n, D], optional
            Features of the calibration items; required when the OOD scorer reads features.
        confidence_tuning : (array [v, K], int array [v]), optional
            Logits (or probabilities) and labels of a validation split, disjoint from the calibration one,
            to choose the confidence function (MSP or MaxLogit-pNorm, :func:`select_pnorm`). Without it MSP.

        Returns
        -------
        self
        """
        settings = self._settings
        z_cal, probs_cal = self._logits_and_probs(logits_or_probs, "logits_or_probs", k=self.n_classes_)
        n, k = z_cal.shape
        class_names = _check_class_names(self.class_names, k)
        y_cal = _check_labels(labels, "labels", n, k)
        audit_index, audit_labels = _check_trusted(trusted_labels, n, k)
        if len(audit_index) == n:
            raise ValueError("`trusted_labels`: every calibration item is audited; then the observed labels play no "
                             "part: pass the trusted labels as `labels` and known_noise='none'")
        knowledge = self._knowledge()
        if not len(audit_index):
            if self.noise_model == "uniform" and knowledge.flip_rate is None:
                raise ValueError("noise_model='uniform' needs a noise rate that is not a heuristic: give noise_rate=R "
                                 "(a flip rate you vouch for) or trusted_labels")
            if self.risk_correction in ("symmetric", "worst-case") and not knowledge.flip_rate:
                raise ValueError(f"risk_correction={self.risk_correction!r} needs a known or given noise rate: give "
                                 "noise_rate=R or known_noise='KIND:R'")

        # OOD: the scorer from fit (or a stateless logits scorer), the gate on the calibration scores
        scorer = self.ood_scorer_
        if scorer is None:
            scorer = self._build_scorer(self._resolve_ood(False))
            if scorer.requires_fit:
                raise ValueError(f"ood_scorer={scorer.name!r} must be fitted on training features first: call "
                                 "fit(features_train=...) before conformalize, or choose a logits scorer "
                                 "('energy', 'maxlogit', 'msp')")
        f_cal = self._features(scorer, features, n, "features")
        gate = OODGate(scorer.score(f_cal, z_cal), alpha_ood=self.ood_alpha)

        notes = ([f"audit: {len(audit_index)} calibration items carry trusted labels; they are assumed to be a "
                  "random sample of the calibration items"] if len(audit_index) else [])
        confidence_name, confidence_params = "msp", {}
        if confidence_tuning is not None:
            if not (isinstance(confidence_tuning, (tuple, list)) and len(confidence_tuning) == 2):
                raise ValueError("`confidence_tuning` must be a pair (logits_or_probs [v, K], labels [v]) of a "
                                 "validation split")
            z_val, _ = self._logits_and_probs(confidence_tuning[0], "confidence_tuning[0]", k=k)
            y_val = _check_labels(confidence_tuning[1], "confidence_tuning[1]", z_val.shape[0], k)
            p = select_pnorm(z_val, z_val.argmax(1).cpu().numpy() == y_val)
            confidence_name, confidence_params = ("msp", {}) if p is None else ("maxlogit_pnorm", {"p": int(p)})
        conf_cal = self._confidence(z_cal, probs_cal, confidence_name, confidence_params).double().cpu().numpy()
        self.calibration_ = assemble_calibration(
            settings, knowledge, class_names=class_names, scorer=scorer, gate=gate, probs_cal=probs_cal,
            conf_cal=conf_cal, y_cal=y_cal, audit_index=audit_index, audit_labels=audit_labels,
            confidence_name=confidence_name, confidence_params=confidence_params, ood_guarantee=dict(_OOD_GUARANTEE),
            notes=notes, extra_settings={"ood_scorer": scorer.name, "inputs": self.inputs})
        self.ood_scorer_ = scorer
        self.n_classes_ = k
        return self

    @classmethod
    def from_calibration(cls, calibration: Calibration, *, inputs: str = "logits",
                         device: str | torch.device = "cpu") -> NoiseAwareClassifier:
        """An estimator that predicts with an existing calibration (e.g. ``noisewise calibrate``'s).

        Pass the outputs of the network the calibration was fitted for (logits, or its probabilities with
        ``inputs="probs"``) to the prediction methods.
        """
        if not isinstance(calibration, Calibration):
            raise ValueError(f"`calibration` must be a noisewise Calibration, got {type(calibration).__name__}")
        s = calibration.settings
        kwargs = {name: s[name] for name in ("alpha", "risk", "risk_delta", "conformal", "delta", "score",
                                              "risk_correction", "ood_alpha", "noise_model", "seed") if name in s}
        if isinstance(s.get("noise_rate"), float):
            kwargs["noise_rate"] = s["noise_rate"]
        est = cls(**kwargs, ood_scorer=calibration.ood_scorer.name, inputs=inputs,
                  class_names=calibration.class_names, device=device)
        est.calibration_ = calibration.to(est.device)
        est.ood_scorer_ = calibration.ood_scorer
        est.n_classes_ = calibration.num_classes
        return est

    # --- prediction ------------------------------------------------------------------------------

    def predict_set(self, logits_or_probs: Any) -> np.ndarray:
        """Conformal prediction sets.

        Parameters
        ----------
        logits_or_probs : array [N, K]

        Returns
        -------
        bool array [N, K]
            ``sets[i, j]``: class ``j`` is in the set of item ``i``. LAC sets may be empty (no class is
            plausible enough); APS/RAPS sets always hold the top class.
        """
        cal = self._calibration()
        _, probs = self._logits_and_probs(logits_or_probs, "logits_or_probs", k=self.n_classes_, serving=True)
        return self._sets(cal, probs).cpu().numpy()

    def predict_ood(self, features: Any = None,
                    logits_or_probs: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """OOD scores, conformal p-values and flags.

        Parameters
        ----------
        features : array [N, D], optional
            Required when the OOD scorer reads features.
        logits_or_probs : array [N, K], optional
            Required when it reads logits.

        Returns
        -------
        scores : float array [N]
            Higher = more out-of-distribution.
        p_values : float array [N]
            ``(1 + #{calibration scores >= score}) / (n + 1)``.
        is_ood : bool array [N]
            ``p_value <= ood_alpha``: at most a share ``ood_alpha`` of in-distribution inputs is flagged.
        """
        cal = self._calibration()
        z, n = None, None
        if logits_or_probs is not None:
            z, _ = self._logits_and_probs(logits_or_probs, "logits_or_probs", k=self.n_classes_)
            n = z.shape[0]
        elif "logits" in cal.ood_scorer.uses:
            raise ValueError(f"the {cal.ood_scorer.name!r} OOD scorer reads logits: pass logits_or_probs=...")
        f = self._features(cal.ood_scorer, features, n, "features")
        score, p_value, is_ood = self._ood(cal, f, z)
        return score.double().cpu().numpy(), p_value.double().cpu().numpy(), is_ood.cpu().numpy()

    def predict_decision(self, logits_or_probs: Any, features: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Accept or abstain, as served: OOD inputs abstain first, then those below the certified threshold.

        Parameters
        ----------
        logits_or_probs : array [N, K]
        features : array [N, D], optional
            Required when the OOD scorer reads features.

        Returns
        -------
        accept : bool array [N]
        reason : str array [N]
            ``"none"`` (accepted), ``"ood"`` or ``"low_confidence"`` (:data:`REASONS`). When nothing was
            certified every input abstains (``guarantees()["abstention"]`` says what can be certified).
        """
        out = self.predict(logits_or_probs, features=features)
        return out["accept"], out["reason"]

    def predict(self, logits_or_probs: Any, features: Any = None) -> dict[str, np.ndarray]:
        """Everything at once, computed as the served predictor does.

        Parameters
        ----------
        logits_or_probs : array [N, K]
        features : array [N, D], optional
            Required when the OOD scorer reads features.

        Returns
        -------
        dict of numpy arrays
            ``label`` int [N] (argmax), ``probs`` float [N, K], ``confidence`` float [N], ``sets`` bool [N, K],
            ``ood_score`` float [N], ``ood_p_value`` float [N], ``is_ood`` bool [N], ``accept`` bool [N],
            ``reason`` str [N] (see :meth:`predict_decision`).
        """
        cal = self._calibration()
        z, probs = self._logits_and_probs(logits_or_probs, "logits_or_probs", k=self.n_classes_, serving=True)
        f = self._features(cal.ood_scorer, features, z.shape[0], "features")
        score, p_value, is_ood = self._ood(cal, f, z)
        conf = self._confidence(z, probs, cal.confidence_name, cal.confidence_params)
        confident = conf >= float(cal.certified.threshold)  # +inf when nothing certified: abstain on all
        reason = torch.where(is_ood, 1, torch.where(confident, 0, 2))  # the OOD gate comes first
        return {
            "label": probs.argmax(dim=1).cpu().numpy(), "probs": probs.cpu().numpy(),
            "confidence": conf.cpu().numpy(), "sets": self._sets(cal, probs).cpu().numpy(),
            "ood_score": score.cpu().numpy(), "ood_p_value": p_value.cpu().numpy(), "is_ood": is_ood.cpu().numpy(),
            "accept": (reason == 0).cpu().numpy(), "reason": np.asarray(REASONS)[reason.cpu().numpy()],
        }

    def noise_record(self) -> dict[str, Any]:
        """The calibration labels' noise rate as one flip-rate record (``flip_rate``, ``lower``, ``upper``,
        ``method``, ...); ``heuristic: True`` marks an estimate that feeds no guarantee.

        (Named ``noise_record`` because ``noise_rate`` is the constructor parameter.)
        """
        return dict(self._calibration().noise)

    def guarantees(self) -> dict[str, Any]:
        """What is guaranteed and under which condition: :meth:`Calibration.summary` (``prediction_set``,
        ``abstention``, ``ood``, each with ``kind`` and ``condition``; ``noise``; ``assumptions``)."""
        return self._calibration().summary()

    # --- internals -------------------------------------------------------------------------------

    def _calibration(self) -> Calibration:
        if self.calibration_ is None:
            raise NotConformalizedError("this NoiseAwareClassifier is not conformalized yet: call "
                                        "conformalize(logits_or_probs, labels, ...) on a calibration split first")
        return self.calibration_

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(arr, device=self.device)

    def _knowledge(self) -> NoiseKnowledge:
        if self.known_noise is None:
            return noise_knowledge(self._settings, _ARRAYS_ORIGIN)
        spec = parse_noise_spec(str(self.known_noise))
        if spec.kind == "none" or spec.rate == 0.0:
            return NoiseKnowledge("known", "none", 0.0)
        return NoiseKnowledge("known", spec.kind, spec.rate)

    def _resolve_ood(self, have_features: bool) -> str:
        if self.ood_scorer != "auto":
            return self.ood_scorer
        if have_features:
            return "knn"
        return "energy" if self.inputs == "logits" else "msp"

    def _build_scorer(self, name: str):
        try:
            return build_ood_scorer(name, **self.ood_params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`ood_params` {self.ood_params!r} do not fit ood_scorer={name!r}: {err}") from None

    def _logits_and_probs(self, x: Any, name: str, n: int | None = None, k: int | None = None,
                          serving: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, probs)`` tensors of one input array.

        Logits keep their dtype. Their probabilities are computed as ``noisewise calibrate`` does at
        calibration (softmax in the logits' dtype) and as the served predictor does (softmax in float32),
        so thresholds and sets are identical to theirs. Probabilities are used as given (float64) and their
        logits are ``log p``.
        """
        arr = _check_matrix(x, name, n=n, k=k)
        if arr.shape[1] < 2:
            raise ValueError(f"`{name}` needs at least 2 columns (classes), got {arr.shape[1]}")
        if self.inputs == "probs":
            _check_probs(arr, name)
            probs = self._tensor(arr.astype(np.float64))
            logits = torch.log(probs.clamp_min(torch.finfo(torch.float64).tiny))
            return logits, probs
        if _looks_like_probs(arr):
            warnings.warn(f"`{name}` looks like probabilities (values in [0, 1], rows summing to 1) but "
                          "inputs='logits': a softmax is applied to it; pass inputs='probs' if these are probabilities",
                          stacklevel=3)
        logits = self._tensor(arr)
        probs = torch.softmax(logits.float() if serving else logits, dim=1)
        return logits, probs

    def _features(self, scorer, features: Any, n: int | None, name: str) -> torch.Tensor | None:
        if features is None:
            if "features" in scorer.uses:
                raise ValueError(f"the {scorer.name!r} OOD scorer reads features: pass {name}=... (the same kind of "
                                 "features as features_train)")
            return None
        return self._tensor(_check_matrix(features, name, n=n, what="D features"))

    def _confidence(self, logits: torch.Tensor, probs: torch.Tensor, name: str, params: dict) -> torch.Tensor:
        # MSP of given probabilities is their max: no round trip through log and softmax.
        if name == "msp" and self.inputs == "probs":
            return probs.amax(dim=1)
        return confidence_fn(logits, name, **params)

    def _sets(self, cal: Calibration, probs: torch.Tensor) -> torch.Tensor:
        return prediction_sets(CONFORMITY_SCORES[cal.conformity_score](probs, **cal.conformity_params),
                               cal.threshold.q)

    def _ood(self, cal: Calibration, features: torch.Tensor | None, logits: torch.Tensor | None):
        score = cal.ood_scorer.score(features, logits)
        p_value, is_ood = cal.ood_gate(score)
        return score, p_value, is_ood


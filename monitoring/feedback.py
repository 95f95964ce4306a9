"""Label quality, noise rate, realized coverage and recalibration over production feedback.

Pure functions on numpy arrays and pandas frames: no I/O, no HTTP, no SQL. The store hands over
a *feedback frame* (one row per stored feedback item joined with the prediction it labels; the
columns are listed in :data:`FEEDBACK_COLUMNS`), the service and the CLI call these functions.

* :func:`score_feedback`: the O(K) per-item rule applied at ingestion, a thin
  wrapper of ``noisewise.models.uncertainty.labelnoise.suspect_mask`` and its label-quality scores
  (run in numpy).
* :func:`batch_label_issues`: cleanlab's ``find_label_issues`` over accumulated feedback.
* :func:`suspects`: suspected annotation errors ranked for re-annotation; feedback on OOD
  inputs listed apart (the model cannot judge those labels).
* :func:`noise_rate_estimates` / :func:`best_estimate`: flip-rate estimates of the feedback labels;
  the direct audit count whenever audited items also carry an ordinary label.
* :func:`realized_coverage`: coverage of the served sets on feedback labels, raw, on audited
  labels, and corrected for label noise with a non-heuristic estimate only.
* :func:`recalibrated_threshold`: a new conformal threshold from recent feedback (audit-rectified,
  split conformal on the observed labels, or NACP when the caller asserts uniform noise at a given
  rate), with the kind of guarantee it gives, or :class:`RecalibrationRefused` with a one-line
  reason.

Which rows feed what
--------------------
* OOD rows (``is_ood``) are left out of every estimate: the model's probabilities say nothing
  about inputs it flagged as out of distribution. :func:`suspects` lists them apart.
* *Ordinary* labels (``audited == False``) are the possibly-noisy annotations; *audited* labels
  are trusted, stored as separate feedback rows on the same ``prediction_id``. Where one label
  per prediction is needed, it is the earliest by ``received_at`` (ties broken by
  ``feedback_id``), so the choice does not depend on later annotators.
* Noise rates are flip rates (share of ordinary labels that differ from the true one), one
  convention for points and intervals (``noisewise.models.uncertainty.labelnoise.NoiseRateEstimate``).
  A heuristic estimate is shown, never used in a guarantee or a correction.
"""

from __future__ import annotations

import base64
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

# torch only where a tensor is made (recalibrated_threshold): `noisewise monitor` loads none. GUARANTEE_KINDS from
# the calibration document's module, which has none either (noisewise.models.calibrate re-exports it).
from noisewise.models.calibration_doc import GUARANTEE_KINDS
from noisewise.models.uncertainty.host import as_numpy, check_labels, check_probs
from noisewise.models.uncertainty.conformal import (
    CONFORMITY_SCORES,
    MAPIE_CONVENTION,
    ConformalThreshold,
    audit_rectified_threshold,
    nacp_threshold,
    split_threshold,
)
from noisewise.models.uncertainty.labelnoise import (
    LABEL_QUALITY_SCORES,
    NoiseRateEstimate,
    clopper_pearson,
    flip_rate_to_uniform,
    noise_rate_confident_learning,
    noise_rate_direct,
    noise_rate_from_duplicates,
    suspect_mask,
)

__all__ = [
    "ESTIMATE_PREFERENCE",
    "FEEDBACK_COLUMNS",
    "GUARANTEE_KINDS",
    "MIN_AUDITED_FOR_RECTIFIED",
    "MIN_AUDIT_ITEMS",
    "MIN_BATCH_ITEMS",
    "MIN_DUPLICATE_ITEMS",
    "MIN_HEURISTIC_ITEMS",
    "MIN_RECALIBRATION_ITEMS",
    "FeedbackScores",
    "NoiseRateEstimate",
    "Recalibration",
    "RecalibrationRefused",
    "batch_label_issues",
    "best_estimate",
    "noise_rate_estimates",
    "realized_coverage",
    "recalibrated_threshold",
    "required_items",
    "score_feedback",
    "suspects",
]

#: Columns of the feedback frame (the store's data contract).
FEEDBACK_COLUMNS = (
    "feedback_id", "prediction_id", "annotator", "label", "audited", "received_at", "predicted",
    "probs", "in_set", "set_size", "is_ood", "ood_score", "ood_p_value", "confidence", "decision",
    "reason", "model_name", "model_version", "weights", "quality", "suspect", "proposed",
)

#: :func:`batch_label_issues` refuses fewer items: cleanlab's per-class noise-rate pruning rounds
#: ``n * joint[i, j]`` to whole items, so with a handful of items it flags nothing meaningful.
MIN_BATCH_ITEMS = 20
#: Minimum number of predictions with two labels from different annotators for the duplicates
#: estimate. At 30 pairs the 95% Clopper-Pearson interval on the agreement is still ~0.3 wide,
#: below that the estimate is not worth showing.
MIN_DUPLICATE_ITEMS = 30
#: Minimum predictions carrying both an audited and an ordinary label for the direct audit estimate
#: (same reasoning: at 30 items the 95% Clopper-Pearson interval of a 0.2 rate is [0.08, 0.39]).
MIN_AUDIT_ITEMS = 30
#: Minimum ordinary labels for the confident-learning heuristic (and every class must occur).
MIN_HEURISTIC_ITEMS = 50
#: Minimum audited items among the recalibration items for the audit-rectified threshold; with
#: fewer, the audit term's standard error (~ sqrt(flip rate / m)) is comparable to alpha and the
#: recalibration falls back to split conformal on the observed labels (the audit still feeds the
#: noise-rate estimate).
MIN_AUDITED_FOR_RECTIFIED = 50
#: Floor on the number of recalibration items (predictions) when ``min_items`` is not given.
MIN_RECALIBRATION_ITEMS = 100


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _check_frame(frame: Any, columns: tuple[str, ...], caller: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{caller}: `frame` must be a pandas DataFrame (the feedback frame), got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{caller}: the feedback frame lacks column(s) {missing}; see monitoring.feedback.FEEDBACK_COLUMNS.")
    return frame


def _check_unit(value: Any, name: str, closed_low: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    low_ok = ok and (value >= 0.0 if closed_low else value > 0.0)
    if not (low_ok and value < 1.0):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return float(value)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by arrival (received_at, then feedback_id): 'first label' means the earliest."""
    return frame.sort_values(["received_at", "feedback_id"], kind="mergesort")


def _first_per_prediction(frame: pd.DataFrame) -> pd.DataFrame:
    return _ordered(frame).drop_duplicates("prediction_id", keep="first")


def _stack_probs(frame: pd.DataFrame, k: int | None = None) -> np.ndarray:
    if len(frame) == 0:
        return np.zeros((0, k or 0))
    p = np.stack([np.asarray(v, dtype=np.float64) for v in frame["probs"].to_numpy()])
    if k is not None and p.shape[1] != k:
        raise ValueError(f"stored `probs` have {p.shape[1]} classes but {k} were expected (model/calibration mismatch).")
    return p


# --------------------------------------------------------------------------------------------
# Per-item rule at ingestion
# --------------------------------------------------------------------------------------------


class FeedbackScores(NamedTuple):
    """Output of :func:`score_feedback` (numpy arrays of length N)."""

    quality: np.ndarray
    """float64 [N]: label-quality score in [0, 1], lower = more likely mislabelled."""
    suspect: np.ndarray
    """bool [N]: the given label is a suspected annotation error."""
    proposed: np.ndarray
    """int64 [N]: the model's proposed label (best confident other class for suspects, else argmax)."""


def score_feedback(
    probs: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    method: str = "self_confidence",
) -> FeedbackScores:
    """Score feedback labels one by one with the confident-learning rule.

    ``suspect = exists j != y~ with p_j >= t_j - 1e-6 and p_j > p_{y~}`` with the per-class
    thresholds ``t`` of the Calibration (``Calibration.cl_thresholds``, mean ``p_j`` over
    calibration items labelled ``j``). Each item is scored on its own in O(K), so the result does
    not depend on the other feedback. Parity with cleanlab (proved in tests): with the same
    thresholds, wherever the most probable class reaches its threshold an item is flagged iff it
    lies off the diagonal of cleanlab's confident joint, and every flagged item is off-diagonal
    (``noisewise.models.uncertainty.labelnoise.suspect_mask`` lists the deliberate differences).

    Parameters
    ----------
    probs : array-like of float, shape [N, K]
        Softmax outputs stored at serving (float32 is fine).
    labels : array-like of int, shape [N]
        Given labels, class indices in ``[0, K)``.
    thresholds : array-like of float, shape [K]
        Per-class confident thresholds.
    method : {"self_confidence", "normalized_margin"}
        Label-quality score (cleanlab's definitions).

    Returns
    -------
    FeedbackScores
        ``(quality [N] float64, suspect [N] bool, proposed [N] int64)``.
    """
    p = check_probs(probs, allow_empty=True, dtype=None)
    n, k = p.shape
    y = check_labels(labels, "labels", k, n=n, allow_empty=True)
    t = as_numpy(thresholds, "thresholds")
    if t.shape != (k,) or not np.issubdtype(t.dtype, np.number) or not np.all(np.isfinite(t)):
        raise ValueError(f"`thresholds` must be {k} finite per-class thresholds (one per column of `probs`), got shape {t.shape}.")
    if method not in LABEL_QUALITY_SCORES:
        raise ValueError(f"`method` must be one of {sorted(LABEL_QUALITY_SCORES)}, got {method!r}.")
    if n == 0:
        return FeedbackScores(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
    # numpy, not torch: the feedback writer scores on its own thread, where each torch op would release
    # the GIL and wait for the event loop to hand it back (milliseconds per op under load)
    found = suspect_mask(p, y, t.astype(p.dtype))
    return FeedbackScores(
        quality=LABEL_QUALITY_SCORES[method](p, y).astype(np.float64),  # p and y are checked above
        suspect=found.mask.astype(bool),
        proposed=found.proposed.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------
# Batch work: cleanlab
# --------------------------------------------------------------------------------------------


def batch_label_issues(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    thresholds: np.ndarray | None = None,
    filter_by: str = "prune_by_noise_rate",
    min_items: int = MIN_BATCH_ITEMS,
) -> np.ndarray:
    """``cleanlab.filter.find_label_issues`` over accumulated feedback.

    Unlike :func:`score_feedback`, cleanlab looks at the whole batch: it estimates the joint
    distribution of given and true labels and, with ``filter_by="prune_by_noise_rate"`` (its
    default), flags per off-diagonal cell the ``n * Q[i, j]`` items with the largest margin.

    Edge cases, handled instead of left to cleanlab's warnings:

    * no item: an empty mask;
    * fewer than ``min_items`` items: ``ValueError`` saying how many are needed (cleanlab's
      per-class pruning rounds counts to whole items and flags nothing meaningful on a handful);
    * classes with no feedback label: without ``thresholds`` cleanlab has no threshold for them
      and can never propose them as the true label (it warns; the warning is silenced here).
      Pass the Calibration's ``cl_thresholds`` as ``thresholds`` to build the confident joint
      from those instead, so every class can be proposed and the batch agrees with the
      ingestion rule's thresholds.

    Parameters
    ----------
    probs : array-like of float, shape [N, K]
        Out-of-sample probabilities (stored at serving).
    labels : array-like of int, shape [N]
    thresholds : array-like of float, shape [K], optional
        Per-class thresholds for the confident joint (default: cleanlab's, from this batch).
    filter_by : str
        cleanlab's ``filter_by`` (``"prune_by_noise_rate"``, ``"prune_by_class"``, ``"both"``,
        ``"confident_learning"``, ``"predicted_neq_given"``, ...).
    min_items : int

    Returns
    -------
    np.ndarray of bool, shape [N]
        True for a likely label issue.
    """
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues

    p = check_probs(probs, allow_empty=True, dtype=None)
    n, k = p.shape
    y = check_labels(labels, "labels", k, n=n, allow_empty=True)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if n < min_items:
        raise ValueError(
            f"batch_label_issues: {n} feedback item(s), at least {min_items} are needed for cleanlab's "
            "batch estimate; use score_feedback's per-item flags until more feedback arrives."
        )
    kwargs: dict[str, Any] = {"filter_by": filter_by, "n_jobs": 1}
    if thresholds is not None:
        t = as_numpy(thresholds, "thresholds").astype(np.float64)
        if t.shape != (k,) or not np.all(np.isfinite(t)):
            raise ValueError(f"`thresholds` must be {k} finite per-class thresholds, got shape {t.shape}.")
        kwargs["confident_joint"] = compute_confident_joint(y, p, thresholds=t)
    with warnings.catch_warnings():
        # "May not flag all label issues in class c, it has too few examples": documented above.
        warnings.filterwarnings("ignore", message=".*too few examples.*")
        mask = find_label_issues(y, p, **kwargs)
    return np.asarray(mask, dtype=bool)


# --------------------------------------------------------------------------------------------
# Suspects for re-annotation
# --------------------------------------------------------------------------------------------


def _to_utc(value: Any, name: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a datetime or an ISO-8601 string, got {value!r}.") from None
    if ts is pd.NaT:
        raise ValueError(f"`{name}` must be a datetime or an ISO-8601 string, got {value!r}.")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _iso(ts: Any) -> str:
    return pd.Timestamp(ts).isoformat()


def _class_name(names: list[str], index: Any) -> str | None:
    if index is None or (isinstance(index, float) and math.isnan(index)):
        return None
    i = int(index)
    return names[i] if 0 <= i < len(names) else str(i)


def suspects(
    frame: pd.DataFrame,
    class_names: list[str],
    since: datetime | str | None = None,
    class_name: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Suspected annotation errors for re-annotation, most suspicious first.

    Uses the ``suspect``, ``quality`` and ``proposed`` columns written at ingestion by
    :func:`score_feedback`. Feedback on inputs the model flagged OOD goes to the separate
    ``"ood"`` list whatever its flag: the model cannot judge those labels.

    Parameters
    ----------
    frame : pandas.DataFrame
        Feedback frame.
    class_names : list of str
        Index -> class name.
    since : datetime or ISO-8601 str, optional
        Keep feedback received at or after this time (naive times are UTC).
    class_name : str, optional
        Keep feedback whose *given* label is this class.
    limit : int >= 1
        Maximum length of each list (the counts are over all matches).

    Returns
    -------
    dict
        ``{"suspects": [...], "ood": [...], "n_feedback", "n_suspects", "n_ood"}``. Each suspect:
        ``prediction_id, feedback_id, annotator, label, proposed, quality, received_at, audited``
        (class names, ISO time), ranked by ``quality`` ascending (ties: earliest first). Each OOD
        item: ``prediction_id, feedback_id, annotator, label, predicted, ood_score, ood_p_value,
        received_at, audited``, newest first. ``n_feedback`` counts the feedback items matching
        the filters, ``n_suspects`` the in-distribution suspects among them, ``n_ood`` the OOD ones.
    """
    cols = ("feedback_id", "prediction_id", "annotator", "label", "audited", "received_at", "predicted",
            "is_ood", "ood_score", "ood_p_value", "quality", "suspect", "proposed")
    _check_frame(frame, cols, "suspects")
    names = list(class_names)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"`limit` must be an integer >= 1, got {limit!r}.")
    rows = frame
    if since is not None:
        rows = rows[pd.to_datetime(rows["received_at"], utc=True) >= _to_utc(since, "since")]
    if class_name is not None:
        if class_name not in names:
            raise ValueError(f"`class_name` {class_name!r} is not a class of this model; valid names: {names}.")
        rows = rows[rows["label"].astype(int) == names.index(class_name)]
    ood = rows["is_ood"].astype(bool)
    flagged = rows[~ood & rows["suspect"].astype(bool)]
    flagged = flagged.sort_values(["quality", "received_at", "feedback_id"], kind="mergesort")
    ood_rows = rows[ood].sort_values(["received_at", "feedback_id"], ascending=False, kind="mergesort")

    def common(r: Any) -> dict[str, Any]:
        return {
            "prediction_id": str(r.prediction_id),
            "feedback_id": int(r.feedback_id),
            "annotator": "" if r.annotator is None else str(r.annotator),
            "label": _class_name(names, r.label),
        }

    listed = [
        {**common(r), "proposed": _class_name(names, r.proposed), "quality": float(r.quality),
         "received_at": _iso(r.received_at), "audited": bool(r.audited)}
        for r in flagged.head(int(limit)).itertuples(index=False)
    ]
    listed_ood = [
        {**common(r), "predicted": _class_name(names, r.predicted), "ood_score": float(r.ood_score),
         "ood_p_value": float(r.ood_p_value), "received_at": _iso(r.received_at), "audited": bool(r.audited)}
        for r in ood_rows.head(int(limit)).itertuples(index=False)
    ]
    return {
        "suspects": listed,
        "ood": listed_ood,
        "n_feedback": len(rows),
        "n_suspects": len(flagged),
        "n_ood": len(ood_rows),
    }


class CursorError(ValueError):
    """A suspects cursor that this service did not hand out (or that was altered)."""


def encode_cursor(after: tuple | None, ood_after: tuple | None, suspects_done: bool, ood_done: bool) -> str:
    """Opaque cursor for the next suspects page: where each list stopped, or that it ended.

    Positions are the lists' sort keys (``quality``, ``received_at``, ``feedback_id`` for suspects;
    ``received_at``, ``feedback_id`` for OOD rows); floats are written with ``repr``, so they read back exact."""
    def at(position: tuple | None) -> list | None:
        if position is None:
            return None
        *key, feedback_id = position
        head = [repr(float(key[0]))] if len(key) == 2 else []  # the suspects key starts with quality
        return [*head, _iso(_to_utc(key[-1], "cursor")), int(feedback_id)]

    state = {"s": "end" if suspects_done else at(after), "o": "end" if ood_done else at(ood_after)}
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Any]:
    """``{"after", "ood_after", "suspects_done", "ood_done"}`` of a cursor from :func:`encode_cursor`.

    Raises
    ------
    CursorError
        For any other string (one line, ready to show)."""
    problem = CursorError("not a cursor returned by /suspects (`next_cursor` of the previous page)")
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
        s, o = state["s"], state["o"]
        after = None if s in (None, "end") else (float(s[0]), _to_utc(s[1], "cursor").to_pydatetime(), int(s[2]))
        ood_after = None if o in (None, "end") else (_to_utc(o[0], "cursor").to_pydatetime(), int(o[1]))
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, AttributeError):
        raise problem from None
    if after is not None and not math.isfinite(after[0]):
        raise problem
    return {"after": after, "ood_after": ood_after, "suspects_done": s == "end", "ood_done": o == "end"}


def suspects_page(page: Any, class_names: list[str], *, started: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``/suspects`` answer for one page of rows ranked in SQL (``Store.suspect_page``): the fields of
    :func:`suspects`, plus ``next_cursor`` (None once both lists are exhausted).

    ``started`` is the decoded cursor of this page (None on the first page): a list that ended on an earlier
    page stays ended."""
    names = list(class_names)
    started = started or {"after": None, "ood_after": None, "suspects_done": False, "ood_done": False}

    def common(r: dict) -> dict[str, Any]:
        return {"prediction_id": str(r["prediction_id"]), "feedback_id": int(r["feedback_id"]),
                "annotator": "" if r["annotator"] is None else str(r["annotator"]),
                "label": _class_name(names, r["label"])}

    listed = [{**common(r), "proposed": _class_name(names, r["proposed"]), "quality": float(r["quality"]),
               "received_at": _iso(_to_utc(r["received_at"], "received_at")), "audited": bool(r["audited"])}
              for r in page.suspects]
    listed_ood = [{**common(r), "predicted": _class_name(names, r["predicted"]), "ood_score": float(r["ood_score"]),
                   "ood_p_value": float(r["ood_p_value"]), "received_at": _iso(_to_utc(r["received_at"], "received_at")),
                   "audited": bool(r["audited"])}
                  for r in page.ood]
    suspects_done = started["suspects_done"] or not page.more_suspects
    ood_done = started["ood_done"] or not page.more_ood
    next_cursor = None
    if not (suspects_done and ood_done):
        last = page.suspects[-1] if page.suspects else None
        last_ood = page.ood[-1] if page.ood else None
        next_cursor = encode_cursor(
            (last["quality"], last["received_at"], last["feedback_id"]) if last else started["after"],
            (last_ood["received_at"], last_ood["feedback_id"]) if last_ood else started["ood_after"],
            suspects_done, ood_done)
    return {"suspects": listed, "ood": listed_ood, "n_feedback": page.n_feedback, "n_suspects": page.n_suspects,
            "n_ood": page.n_ood, "next_cursor": next_cursor}


# --------------------------------------------------------------------------------------------
# Noise-rate estimates
# --------------------------------------------------------------------------------------------


def _duplicate_pairs(ordinary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """First two labels per prediction from different annotators (earliest label of each).

    An anonymous label (``annotator == ""``) counts as its own annotator: the store keeps it as a
    separate submission and nothing says two anonymous labels come from the same person.
    """
    rows = _ordered(ordinary)
    anonymous = rows["annotator"].fillna("").astype(str) == ""
    who = rows["annotator"].fillna("").astype(str).where(~anonymous, "\0anon-" + rows["feedback_id"].astype(str))
    rows = rows.assign(_who=who.to_numpy()).drop_duplicates(["prediction_id", "_who"], keep="first")
    rank = rows.groupby("prediction_id", sort=False).cumcount()
    first = rows[rank == 0].set_index("prediction_id")["label"]
    second = rows[rank == 1].set_index("prediction_id")["label"]
    both = second.index
    return first.loc[both].to_numpy(np.int64), second.to_numpy(np.int64)


def noise_rate_estimates(
    frame: pd.DataFrame,
    num_classes: int,
    confidence: float = 0.95,
) -> dict[str, NoiseRateEstimate]:
    """Flip-rate estimates of the *ordinary* feedback labels, each with interval, method and n.

    OOD rows are left out first. Keys (the estimator's ``method``), present only when their data
    suffice:

    * ``"audit"``: predictions that carry both an ordinary and an audited label; the first of each
      (by arrival) are the observed and the trusted label -> ``noise_rate_direct``: the share that
      disagree, with an exact Clopper-Pearson interval, per-class rates and the confusion matrix.
      No model and no noise model. Needs :data:`MIN_AUDIT_ITEMS` such predictions. The audited
      predictions must be a random sample of the labelled traffic: auditing the *suspects*
      over-states the rate. An audited label on a prediction without an ordinary label has
      nothing to compare with and is not counted.
    * ``"duplicates"``: predictions with ordinary labels from >= 2 different annotators (an
      anonymous label counts as its own annotator); the first two (by arrival) are the pair ->
      ``noise_rate_from_duplicates`` (assumes independent annotators erring uniformly, stated in
      its note). Needs :data:`MIN_DUPLICATE_ITEMS` pairs.
    * ``"confident_learning"``: the first ordinary label per prediction and the stored
      probabilities -> ``noise_rate_confident_learning``, ``heuristic=True``: it reads the model's
      mistakes as label noise and its band has no coverage guarantee; shown, never used in a
      guarantee. Needs :data:`MIN_HEURISTIC_ITEMS` items and every class present (the per-class
      thresholds need one item per class).

    Parameters
    ----------
    frame : pandas.DataFrame
        Feedback frame.
    num_classes : int >= 2
    confidence : float in (0, 1)

    Returns
    -------
    dict of str -> NoiseRateEstimate
        Flip rates (``.to_dict()`` gives the strict-JSON record).
    """
    _check_frame(frame, ("feedback_id", "prediction_id", "annotator", "label", "audited", "received_at",
                         "predicted", "probs", "is_ood"), "noise_rate_estimates")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    k = int(num_classes)
    level = _check_unit(confidence, "confidence")
    rows = frame[~frame["is_ood"].astype(bool)]
    audited = rows["audited"].astype(bool)
    ordinary, trusted = rows[~audited], rows[audited]
    out: dict[str, NoiseRateEstimate] = {}

    first_ordinary = _first_per_prediction(ordinary)
    first_audited = _first_per_prediction(trusted)
    pairs = first_ordinary[["prediction_id", "label"]].merge(
        first_audited[["prediction_id", "label"]], on="prediction_id", suffixes=("_observed", "_trusted"))
    if len(pairs) >= MIN_AUDIT_ITEMS:
        out["audit"] = noise_rate_direct(pairs["label_observed"].to_numpy(np.int64),
                                         pairs["label_trusted"].to_numpy(np.int64), k, confidence=level)

    a, b = _duplicate_pairs(ordinary)
    if a.size >= MIN_DUPLICATE_ITEMS:
        out["duplicates"] = noise_rate_from_duplicates(a, b, k, confidence=level)

    labels = first_ordinary["label"].to_numpy(np.int64)
    if len(labels) >= MIN_HEURISTIC_ITEMS and np.unique(labels).size == k:
        out["confident_learning"] = noise_rate_confident_learning(labels, _stack_probs(first_ordinary, k),
                                                                  confidence=level)
    return out


#: Preference order of :func:`best_estimate`: the direct audit count (no assumption), then the
#: duplicates estimate (assumes uniform, independent annotator errors). Heuristics never appear.
ESTIMATE_PREFERENCE = ("audit", "duplicates")


def best_estimate(estimates: Mapping[str, NoiseRateEstimate]) -> NoiseRateEstimate | None:
    """The estimate to use where a guarantee or a correction needs a noise rate: never a heuristic.

    The first of :data:`ESTIMATE_PREFERENCE` present, not heuristic and with a finite point.
    Returns None when there is none (only the confident-learning heuristic, or nothing): callers
    then refuse to correct for noise rather than plug in a heuristic.
    """
    for key in ESTIMATE_PREFERENCE:
        est = estimates.get(key)
        if est is not None and not est.heuristic and math.isfinite(est.flip_rate):
            return est
    return None


# --------------------------------------------------------------------------------------------
# Realized coverage
# --------------------------------------------------------------------------------------------


def _correction_rate(noise: Any, k: int) -> tuple[float | None, str | None]:
    """``(flip rate, source)`` for the coverage correction; refuses heuristics."""
    if noise is None:
        return None, None
    if isinstance(noise, NoiseRateEstimate):
        if noise.heuristic:
            raise ValueError(
                f"`noise`: the {noise.method} estimate is a heuristic; it never feeds a correction. Pass "
                "best_estimate(...) (None when only a heuristic exists) or an explicit flip rate."
            )
        if not math.isfinite(noise.flip_rate):
            raise ValueError(f"`noise`: the {noise.method} estimate has no point estimate ({noise.note}).")
        if noise.flip_rate >= (k - 1) / k:
            # At r >= (K-1)/K the labels carry no information about the true class: nothing to correct.
            return None, noise.method
        return float(noise.flip_rate), noise.method
    ok = isinstance(noise, (int, float, np.integer, np.floating)) and not isinstance(noise, bool)
    if not (ok and 0.0 <= noise < (k - 1) / k):
        raise ValueError(
            f"`noise` must be a NoiseRateEstimate, None, or a flip rate in [0, (K-1)/K) = [0, {(k - 1) / k:.4f}), "
            f"got {noise!r}."
        )
    return float(noise), "given"


def realized_coverage(
    frame: pd.DataFrame,
    noise: NoiseRateEstimate | float | None,
    num_classes: int,
    target: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Coverage of the served sets on feedback labels: raw, on audited labels, and noise-corrected.

    Items: in-distribution feedback, the first ordinary label per prediction. Audited labels are
    trusted, so their coverage (under ``"audited"``) needs no correction and no assumption: it is
    the direct check, with its own ``below_target``.

    Correction (only with a non-heuristic noise rate). If each ordinary label is wrong with flip
    rate ``r``, uniformly over the other ``K - 1`` classes and independently of the input (so of
    the served set ``C``), a wrong label lands in ``C`` with probability ``(|C| - 1[y in C]) /
    (K - 1)``; averaging over items,

    ``c~ = (1 - r) c + r (E|C| - c) / (K - 1)``, hence
    ``c = (c~ - r mean(set_size) / (K - 1)) / (1 - r K / (K - 1))``,

    with ``c~`` the raw coverage and ``mean(set_size)`` over the same items (the uniform-convention
    form ``(c~ - eps E|C|/K) / (1 - eps)`` with ``eps = r K / (K - 1)``). The corrected interval
    maps the Clopper-Pearson interval of ``c~`` through this increasing affine map
    (``mean(set_size)`` treated as known), clipped to ``[0, 1]``. ``below_target`` is True only
    when the whole corrected interval lies below ``target``. When wrong labels concentrate on the
    classes the model confuses (human annotation noise) the uniform correction is itself off;
    the audited coverage is the check that assumes nothing.

    Parameters
    ----------
    frame : pandas.DataFrame
        Feedback frame (uses ``in_set``, ``set_size``, ``is_ood``, ``audited``).
    noise : NoiseRateEstimate, float or None
        The flip rate to correct with: a non-heuristic estimate (a heuristic one is refused with
        ``ValueError``), a flip rate in ``[0, (K - 1)/K)`` the caller vouches for, or None for no
        correction (the corrected fields are then None).
    num_classes : int >= 2
    target : float in (0, 1)
        Target coverage ``1 - alpha``.
    confidence : float in (0, 1)

    Returns
    -------
    dict
        ``n, raw, raw_lower, raw_upper, corrected, corrected_lower, corrected_upper, flip_rate,
        noise_method, correction, mean_set_size, target, confidence, below_target`` and
        ``audited`` (``{n, coverage, lower, upper, below_target}``, None values when ``n = 0``).
        ``flip_rate`` / ``noise_method`` say which rate corrected (``"given"`` for a float; None
        without correction) and ``correction`` says it in words. With no ordinary item, ``n = 0``
        and the estimates are None.
    """
    _check_frame(frame, ("feedback_id", "prediction_id", "received_at", "audited", "in_set", "set_size", "is_ood"),
                 "realized_coverage")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    k = int(num_classes)
    flip, source = _correction_rate(noise, k)
    target = _check_unit(target, "target")
    level = _check_unit(confidence, "confidence")
    if flip is None and source is not None:
        correction = (f"none: the {source} flip rate is at least (K-1)/K, the labels carry no information to "
                      "correct; audited is the coverage of trusted labels")
    elif flip is None:
        correction = ("none: no non-heuristic noise-rate estimate (heuristics are never used); raw is the coverage "
                      "of the possibly-wrong labels, audited the coverage of trusted ones")
    else:
        correction = (f"flip rate {flip:.4f} ({'given by the caller' if source == 'given' else source + ' estimate'}, "
                      "not a heuristic), assuming wrong labels fall uniformly on the other classes")
    rows = frame[~frame["is_ood"].astype(bool)]
    audited = rows["audited"].astype(bool)
    items = _first_per_prediction(rows[~audited])
    trusted = _first_per_prediction(rows[audited])

    out: dict[str, Any] = {"n": len(items), "flip_rate": flip, "noise_method": source, "correction": correction,
                           "target": target, "confidence": level}
    m = len(trusted)
    if m:
        hits_a = int(trusted["in_set"].astype(bool).sum())
        lo_a, hi_a = clopper_pearson(hits_a, m, level)
        out["audited"] = {"n": m, "coverage": hits_a / m, "lower": lo_a, "upper": hi_a, "below_target": hi_a < target}
    else:
        out["audited"] = {"n": 0, "coverage": None, "lower": None, "upper": None, "below_target": False}
    n = len(items)
    if n == 0:
        out.update(raw=None, raw_lower=None, raw_upper=None, corrected=None, corrected_lower=None,
                   corrected_upper=None, mean_set_size=None, below_target=False)
        return out
    hits = int(items["in_set"].astype(bool).sum())
    raw = hits / n
    lo, hi = clopper_pearson(hits, n, level)
    size = float(items["set_size"].astype(float).mean())
    out.update(raw=raw, raw_lower=lo, raw_upper=hi, mean_set_size=size)
    if flip is None:
        out.update(corrected=None, corrected_lower=None, corrected_upper=None, below_target=False)
        return out

    def correct(c: float) -> float:
        return float(np.clip((c - flip * size / (k - 1)) / (1.0 - flip * k / (k - 1)), 0.0, 1.0))

    out.update(corrected=correct(raw), corrected_lower=correct(lo), corrected_upper=correct(hi))
    out["below_target"] = bool(out["corrected_upper"] < target)
    return out


# --------------------------------------------------------------------------------------------
# Recalibration
# --------------------------------------------------------------------------------------------


class RecalibrationRefused(ValueError):
    """Recalibration declined; ``str(err)`` / ``err.reason`` is a one-line, actionable reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Recalibration:
    """A conformal threshold re-estimated on feedback, and the kind of guarantee it gives.

    Attributes
    ----------
    threshold : ConformalThreshold
        The new threshold (same score and alpha as the calibration it replaces).
    method : {"audit", "split", "nacp"}
        Audit-rectified, split conformal on the observed labels, or NACP at a caller-given rate.
    n : int
        Predictions whose ordinary label entered the threshold.
    n_audited : int
        Of those, how many also carry an audited label (used only by the audit method).
    eps : float or None
        Uniform-convention rate NACP was run with (None on the other paths, which assume no rate).
    noise : dict
        ``{"best": non-heuristic estimate record or None, "estimates": {method: record}}`` on the
        same rows (flip-rate records of ``NoiseRateEstimate.to_dict``); informative only, except
        that nothing heuristic is ever in ``best``.
    note : str
        Human-readable summary of what was done and assumed.
    guarantee_kind : {"valid", "conservative", "none"}
        ``valid`` for the audit-rectified threshold (trusted labels remove the noise assumption);
        ``conservative`` for split conformal on observed labels and for NACP (valid under the
        stated, unchecked ``condition``).
    condition : str
        What the coverage guarantee holds for, and under which condition, in plain words.
    weights : str
        The model weights whose feedback was used.
    n_feedback : int
        Feedback items in the window (before one-label-per-prediction).
    """

    threshold: ConformalThreshold
    method: str
    n: int
    n_audited: int
    eps: float | None
    noise: dict
    note: str
    guarantee_kind: str
    condition: str
    weights: str = ""
    n_feedback: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold.to_dict(), "method": self.method, "n": self.n,
                "n_audited": self.n_audited, "eps": self.eps, "noise": self.noise, "note": self.note,
                "guarantee_kind": self.guarantee_kind, "condition": self.condition,
                "weights": self.weights, "n_feedback": self.n_feedback}


def required_items(alpha: float, eps: float = 0.0, min_items: int | None = None) -> int:
    """Fewest recalibration items accepted: ``max(floor, ceil(((1 - alpha) / alpha) / h^2))``.

    ``(1 - alpha) / alpha`` items is what a finite split-conformal quantile at level ``alpha``
    needs (``ceil((n + 1)(1 - alpha)) <= n``). Under noise at rate ``eps`` the corrected CDF's
    error grows by ``1 / h``, ``h = (1 - eps) / (1 + eps)`` (the factor in NACP's margin
    ``Delta = sqrt(log(4/delta) / (2 n h^2))``), so the same precision takes ``1 / h^2`` times
    as many items. ``eps`` is NACP's uniform-convention rate (0 for the split and audit paths).
    ``floor`` is ``min_items`` when given, else :data:`MIN_RECALIBRATION_ITEMS`.
    """
    h = (1.0 - eps) / (1.0 + eps)
    finite = math.ceil(((1.0 - alpha) / alpha) / (h * h) - 1e-9)
    floor = MIN_RECALIBRATION_ITEMS if min_items is None else int(min_items)
    return max(floor, finite)


def _select_rows(frame: pd.DataFrame, window: int | None, weights: str | None) -> tuple[pd.DataFrame, str]:
    rows = _ordered(frame[~frame["is_ood"].astype(bool)])
    if len(rows) == 0:
        raise RecalibrationRefused("no in-distribution feedback to recalibrate on; send labelled feedback first")
    if weights is None:
        weights = str(rows["weights"].iloc[-1])
    rows = rows[rows["weights"].astype(str) == weights]
    if len(rows) == 0:
        raise RecalibrationRefused(f"no in-distribution feedback on predictions of weights {weights[:12]}")
    if window is not None:
        rows = rows.tail(int(window))
    return rows, weights


def _check_explicit_noise(noise_flip_rate: Any, assume_uniform_noise: Any, k: int) -> float | None:
    if not isinstance(assume_uniform_noise, (bool, np.bool_)):
        raise ValueError(f"`assume_uniform_noise` must be True or False, got {assume_uniform_noise!r}.")
    if noise_flip_rate is None:
        if assume_uniform_noise:
            raise ValueError("`assume_uniform_noise=True` needs `noise_flip_rate`: NACP corrects for a rate the "
                             "caller vouches for; an estimate from feedback is not used for it.")
        return None
    if not assume_uniform_noise:
        raise ValueError("`noise_flip_rate` is used only by NACP, whose correction holds for uniform noise: pass "
                         "`assume_uniform_noise=True` to assert that model, or leave both out for split conformal "
                         "on the observed labels.")
    ok = isinstance(noise_flip_rate, (int, float, np.integer, np.floating)) and not isinstance(noise_flip_rate, bool)
    if not (ok and 0.0 <= noise_flip_rate < (k - 1) / k):
        raise ValueError(f"`noise_flip_rate` must be a flip rate in [0, (K-1)/K) = [0, {(k - 1) / k:.4f}), "
                         f"got {noise_flip_rate!r}.")
    return float(noise_flip_rate)


#: Condition of split conformal on observed labels (``guarantee_kind="conservative"``).
SPLIT_CONDITION = (
    "the sets cover the observed feedback labels; they cover the true label at least as often if label errors "
    "are dispersive (spread over classes that score no better than the true one). Where annotators err towards "
    "the classes the model confuses they can fall slightly short: mark at least {m} feedback labels as audited "
    "(trusted) to make the guarantee valid"
)


def recalibrated_threshold(
    frame: pd.DataFrame,
    calibration: Any,
    window: int | None = None,
    min_items: int | None = None,
    *,
    weights: str | None = None,
    confidence: float = 0.95,
    noise_flip_rate: float | None = None,
    assume_uniform_noise: bool = False,
) -> Recalibration:
    """Re-estimate the conformal threshold on recent feedback, or refuse with a reason.

    Rows. In-distribution feedback only (OOD inputs carry no usable conformity score), on
    predictions made with one set of weights: ``weights`` when given, otherwise those of the
    most recently received feedback item, so a recalibration never mixes scores of different
    models. Of these, the last ``window`` feedback items by ``received_at`` (all when None).
    Then one label per prediction: its first ordinary label is the observed calibration label
    (``n`` items); its first audited label, if any, makes it an audited item (``m`` of the
    ``n``). An audited label on a prediction without an ordinary label does not enter the
    threshold, whose audit must be a random subset of the labelled items.

    Scores. The stored probabilities (float64) scored with ``calibration.conformity_score`` and
    ``MAPIE_CONVENTION[score]["calibration"]`` parameters, with a generator seeded by
    ``calibration.settings["seed"]`` for randomized scores: exactly as
    ``noisewise.models.calibrate.fit_calibration`` does, so the new threshold plugs into the same served
    sets. ``alpha`` is ``calibration.threshold.alpha``; ``calibration.settings["conformal"] ==
    "finite-sample"`` selects the calibration-conditional forms (probability ``>= 1 - delta``
    over the draw, ``delta = settings["delta"]``), anything else the plug-in forms (coverage on
    average over draws).

    Method, and the guarantee it gives (``guarantee_kind``, ``condition``):

    * ``"audit"`` when ``m >= MIN_AUDITED_FOR_RECTIFIED``: ``audit_rectified_threshold``, no
      noise model; ``valid`` for the true label (the audited items must be a random sample).
    * ``"nacp"`` only when the caller passes ``noise_flip_rate`` together with
      ``assume_uniform_noise=True`` (and the audit does not suffice): ``nacp_threshold`` at the
      uniform-convention ``eps = r K / (K - 1)``; ``conservative``: valid if the noise is uniform,
      independent of the input, with a flip rate of at least ``r``. A rate estimated from
      feedback is never plugged in here.
    * ``"split"`` otherwise: split conformal on the observed labels (``split_threshold``);
      ``conservative``: it covers the observed label, and the true one at least as often when
      label errors are dispersive; errors concentrated on the classes the model confuses can
      make it under-cover slightly (audit to make it valid).

    Refusal (:class:`RecalibrationRefused`), by rule:
    1. no in-distribution feedback for the chosen weights, or no ordinary label among it;
    2. ``n < required_items(alpha, eps, min_items)``: the finite-quantile count
       ``(1 - alpha)/alpha`` inflated by ``1/h^2``, ``h = (1 - eps)/(1 + eps)`` (``eps = 0``
       except on the NACP path), never below ``min_items`` or, when that is None,
       :data:`MIN_RECALIBRATION_ITEMS`;
    3. the threshold comes out infinite (full sets), e.g. ``tau > 1`` with the Delta margin.

    Parameters
    ----------
    frame : pandas.DataFrame
        Feedback frame.
    calibration : models.calibrate.Calibration
        The calibration in service (uses ``class_names``, ``conformity_score``, ``threshold``
        and ``settings``).
    window : int >= 1, optional
        Use only the last ``window`` feedback items.
    min_items : int >= 1, optional
        Floor on ``n`` (see rule 2).
    weights : str, optional
        Weights hash to recalibrate for (default: the most recent feedback's).
    confidence : float
        Level of the noise-rate intervals reported in ``noise``.
    noise_flip_rate : float in [0, (K-1)/K), optional
        Flip rate of the ordinary labels that the caller vouches for; only with
        ``assume_uniform_noise``.
    assume_uniform_noise : bool, default False
        Assert NACP's noise model (wrong labels uniform over the other classes, independent of
        the input); only with ``noise_flip_rate``.

    Returns
    -------
    Recalibration
    """
    _check_frame(frame, FEEDBACK_COLUMNS, "recalibrated_threshold")
    for attr in ("class_names", "conformity_score", "threshold", "settings"):
        if not hasattr(calibration, attr):
            raise ValueError(f"`calibration` must be a models.calibrate.Calibration (missing .{attr}).")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"`window` must be an integer >= 1 or None, got {window!r}.")
    if min_items is not None and (isinstance(min_items, bool) or not isinstance(min_items, (int, np.integer)) or min_items < 1):
        raise ValueError(f"`min_items` must be an integer >= 1 or None, got {min_items!r}.")
    k = len(calibration.class_names)
    given_flip = _check_explicit_noise(noise_flip_rate, assume_uniform_noise, k)
    alpha = float(calibration.threshold.alpha)
    settings = dict(calibration.settings or {})
    finite_sample = settings.get("conformal") == "finite-sample"
    delta = float(settings.get("delta", 0.001)) if finite_sample else None
    form = "with probability >= 1 - delta over the feedback draw" if finite_sample else "on average over feedback draws"

    rows, used_weights = _select_rows(frame, window, weights)
    audited_mask = rows["audited"].astype(bool)
    items = _first_per_prediction(rows[~audited_mask]).reset_index(drop=True)
    trusted = _first_per_prediction(rows[audited_mask])
    n = len(items)
    estimates = noise_rate_estimates(rows, k, confidence=confidence)
    best = best_estimate(estimates)
    noise = {"best": None if best is None else best.to_dict(),
             "estimates": {key: est.to_dict() for key, est in estimates.items()}}
    base = f"{len(rows)} feedback items (window {window or 'all'}) on weights {used_weights[:12]}"
    if n == 0:
        raise RecalibrationRefused(f"no ordinary (non-audited) labels among {base}; the conformal scores need them")

    audit_pos = np.flatnonzero(items["prediction_id"].isin(trusted["prediction_id"]).to_numpy())
    m = int(audit_pos.size)
    eps: float | None = None
    notes: list[str] = []
    if m >= MIN_AUDITED_FOR_RECTIFIED:
        method, kind = "audit", "valid"
        condition = (f"coverage of the true label {form}, corrected by {m} audited items (a random sample of the "
                     "labelled feedback); no noise model assumed")
        notes.append(f"audit-rectified threshold from {m} audited of {n} items (no noise model assumed)")
        if given_flip is not None:
            notes.append("the given noise rate is not needed: the audit removes the noise assumption")
    elif given_flip is not None:
        method, kind = "nacp", "conservative"
        eps = flip_rate_to_uniform(given_flip, k)
        condition = (f"coverage of the true label {form} if the label noise is uniform over the classes and "
                     f"independent of the input, with a flip rate of at least {given_flip:g} (given, not checked); "
                     "a higher stated rate or non-uniform noise makes NACP under-cover")
        notes.append(f"NACP at the given flip rate {given_flip:g} (uniform eps={eps:.4f}), uniform noise assumed "
                     "by the caller")
    else:
        method, kind = "split", "conservative"
        condition = f"split conformal on the observed labels, {form}: " + SPLIT_CONDITION.format(
            m=MIN_AUDITED_FOR_RECTIFIED)
        notes.append("split conformal on the observed feedback labels (no noise rate used; conservative if label "
                     "errors are dispersive)")
    if 0 < m < MIN_AUDITED_FOR_RECTIFIED:
        notes.append(f"only {m} audited items among them (< {MIN_AUDITED_FOR_RECTIFIED} for the rectified threshold)")

    needed = required_items(alpha, eps or 0.0, min_items)
    if n < needed:
        raise RecalibrationRefused(
            f"too little feedback: {n} labelled predictions in {base}, {needed} needed at alpha={alpha:g}"
            + (f" and eps={eps:.3f}" if eps else "") + "; collect more feedback or widen --window"
        )

    import torch

    score = calibration.conformity_score
    convention = MAPIE_CONVENTION[score]
    probs = torch.from_numpy(_stack_probs(items, k))
    params = dict(convention["calibration"])
    if params:
        params["generator"] = torch.Generator().manual_seed(int(settings.get("seed", 0)))
    all_scores = CONFORMITY_SCORES[score](probs, **params).cpu().numpy()
    labels = items["label"].to_numpy(np.int64)
    if method == "audit":
        audit_labels = trusted.set_index("prediction_id").loc[items["prediction_id"].iloc[audit_pos], "label"]
        threshold = audit_rectified_threshold(all_scores, labels, audit_pos, audit_labels.to_numpy(np.int64),
                                              alpha, conditional=finite_sample)
    elif method == "nacp":
        threshold = nacp_threshold(all_scores, labels, alpha, eps, delta=delta)
    else:
        threshold = split_threshold(all_scores, labels, alpha, delta=delta)
    if threshold.full_sets or not math.isfinite(threshold.q):
        raise RecalibrationRefused(
            f"the {method} threshold on {n} items gives full label sets ({threshold.note or 'no finite threshold'}); "
            "collect more feedback"
        )
    notes.insert(0, f"{base}: {n} labelled predictions")
    return Recalibration(
        threshold=threshold, method=method, n=n, n_audited=m, eps=eps, noise=noise, note="; ".join(notes),
        guarantee_kind=kind, condition=condition, weights=used_weights, n_feedback=len(rows),
    )

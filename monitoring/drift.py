"""Evidently reports on returned labels and served predictions (with ``monitoring/operator_view.py``, its
widgets and dashboard, the only Evidently imports).

One :func:`drift_report` call runs one Evidently ``Report`` and stores its snapshot in a local Evidently
workspace (``evidently ui --workspace DIR`` serves it, its project dashboard showing the operator panels),
next to HTML and JSON copies. The report opens on a summary card (noise rate with its interval and kind of
estimate, coverage raw and noise-corrected against the target, suspect share, drift, each with its verdict)
and holds:

* label drift: the feedback labels against the calibration labels, Evidently's ``ValueDrift`` with the
  stat test set explicitly (:func:`chi2_two_sample` by default). Left to itself Evidently picks its
  chi-square below 1000 reference rows and Jensen-Shannon distance above, which turns a p-value (drift
  when small) into a distance (drift when large): the score would change meaning as the calibration set
  grows;
* prediction drift: the served predicted class against the model's predictions on the calibration
  inputs, the same test;
* classification quality on labelled in-distribution feedback (Evidently's ``ClassificationPreset``:
  accuracy, macro precision/recall/F1, per-class precision/recall/F1), next to the same metrics on the
  calibration set;
* suspected annotation errors: their share overall, per given label and per annotator (``MeanValue`` of
  the 0/1 suspect flag, per group), shown in percent with their sample sizes.

Drift is shown as class shares of each sample, in percent, with both sample sizes: the samples differ in
size, so counts side by side would mislead.

The drift test is a two-sample test. Both samples are noisy: the calibration counts are a sample too,
not the true class proportions. Evidently's own ``"chisquare"`` is a goodness-of-fit test of the current
counts against the reference proportions taken as exact; it ignores the reference sample's noise and
explodes on a class the model almost never predicts (a handful of reference counts, or none), and on
same-distribution traffic it fired far above its nominal 5%. :func:`chi2_two_sample` tests homogeneity
of the 2 x K table of reference and current counts instead (Pearson's chi-square with the chi-square
approximation when every expected count is at least 5, else a Monte Carlo permutation p-value, exact
in level). It is registered in Evidently's stat-test registry under the name ``"chi2_two_sample"``
(``evidently.legacy.calculations.stattests.register_stattest``, the documented way to add a test), so
Evidently runs this very function: the report, its JSON, the workspace snapshot, the returned numbers
and the gauges all show one p-value. Evidently's ``"chisquare"``, ``"g_test"`` (goodness of fit too, and
it fails when the samples differ in size) and ``"TVD"`` (a permutation p-value that can be 0 and reseeds
numpy's global generator) are not offered; the distances (Jensen-Shannon, PSI, Hellinger, KL) stay as
explicit opt-ins, with a user-chosen threshold and no level.

Which rows enter which part (the choices behind the numbers):

* labels come back for the inputs the model saw; feedback on inputs flagged OOD is not from the
  reference distribution, and the model cannot judge those labels, so label drift, quality and suspect
  shares use in-distribution feedback only and the OOD feedback is counted apart;
* an input labelled by several annotators counts once in label drift and quality (the audited label
  if there is one, else the earliest): the two-sample test assumes independent rows, and duplicate
  labels of one input are not independent. Suspect shares count every label (they judge annotators).

Evidently's ``Report`` takes one current table, while the samples here differ in size (feedback,
served predictions). Each sample gets its own columns, padded with missing values to the longest;
``ValueDrift`` and the classification metrics drop missing values before computing (Evidently 0.7's
``get_one_column_drift`` and ``ClassificationQuality`` do so explicitly), and the tests check every
number against scipy, pandas and scikit-learn.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from evidently import DataDefinition, Dataset, MulticlassClassification, Report
from evidently.legacy.calculations.stattests import StatTest, register_stattest
from evidently.legacy.core import ColumnType
from evidently.metrics import MeanValue, ValueDrift
from evidently.metrics.group_by import GroupByMetric
from evidently.presets import ClassificationPreset
from evidently.ui.workspace import Workspace
from scipy import stats

from noisewise.monitoring.report_worker import KEEP_SNAPSHOTS

from noisewise.monitoring.operator_view import (
    DriftInShares,
    OperatorSummary,
    SuspectShares,
    ensure_dashboard,
    metadata_for,
    percent_values,
)

__all__ = [
    "CATEGORICAL_STATTESTS",
    "CHI2_TWO_SAMPLE",
    "DEFAULT_STATTEST",
    "DEFAULT_THRESHOLD",
    "MIN_EXPECTED",
    "N_RESAMPLES",
    "chi2_two_sample",
    "drift_report",
    "value_drift",
]

CHI2_TWO_SAMPLE = "chi2_two_sample"
# The tests a categorical column may use, and what their score is. A p-value means drift when
# score < threshold; a distance means drift when score >= threshold (Evidently's own rules). Only the
# two-sample test has a level; the distances are Evidently's, with no calibrated threshold.
CATEGORICAL_STATTESTS: dict[str, str] = {
    CHI2_TWO_SAMPLE: "p_value",
    "jensenshannon": "distance",
    "psi": "distance",
    "hellinger": "distance",
    "kl_div": "distance",
}
# Evidently tests left out on purpose, with the reason given to whoever asks for them.
_REJECTED_STATTESTS = {
    "chisquare": "a goodness-of-fit test against the reference proportions taken as exact: it ignores the "
                 "reference sample's noise and fires far above its level on a rarely seen class",
    "g_test": "a goodness-of-fit test against the reference counts, which fails when the samples differ "
              "in size",
    "TVD": "a permutation p-value without the +1 correction (it can be 0) that reseeds numpy's global "
           "generator",
}
DEFAULT_STATTEST = CHI2_TWO_SAMPLE
DEFAULT_THRESHOLD = 0.05
# Cochran's rule: the chi-square approximation wants every expected count >= 5; below, the Monte Carlo
# p-value. 9999 resamples put its Monte Carlo standard error at 0.05 near 0.002.
MIN_EXPECTED = 5.0
N_RESAMPLES = 9999
_RANDOM_STATE = 0
# Simulated statistics equal to the observed one up to rounding count as >= (R's chisq.test does the same).
_TIE_TOLERANCE = 64 * np.finfo(float).eps

# Columns of the report's tables. Each sample has its own columns (see the module docstring).
_LABEL, _PREDICTED = "label", "predicted"          # labelled in-distribution feedback (one per input)
_SERVED = "served_prediction"                      # served predictions
_SUSPECT = "suspect"                               # every in-distribution feedback label: 0/1
_SUSPECT_CLASS, _SUSPECT_ANNOTATOR = "suspect_given_label", "suspect_annotator"

_REFERENCE_COLUMNS = ("label", "predicted")
_PREDICTION_COLUMNS = ("predicted",)
_FEEDBACK_COLUMNS = ("label", "predicted", "suspect", "annotator", "is_ood")


# --------------------------------------------------------------------------------- two-sample test


def _check_counts(counts: npt.ArrayLike, argument: str) -> np.ndarray:
    array = np.asarray(counts)
    if array.ndim != 1:
        raise ValueError(f"{argument} must be a 1-D array of class counts, shape (K,), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) or (
            array.size and not np.all(np.isfinite(array))):
        raise ValueError(f"{argument} must hold finite counts, got dtype {array.dtype}")
    if array.size and (np.any(array < 0) or np.any(np.mod(array, 1) != 0)):
        raise ValueError(f"{argument} must hold non-negative integer counts, got {array.tolist()[:10]}")
    if array.sum() <= 0:
        raise ValueError(f"{argument} must count at least one item, got {array.tolist()[:10]}")
    return array.astype(np.int64)


def _pearson(current: np.ndarray, totals: np.ndarray, n_current: int, n_reference: int) -> np.ndarray:
    """Pearson's X^2 of 2 x K tables given by their current row, shape (..., K) -> (...,).

    With column totals T_k, N = n_c + n_r and expected current counts E_k = T_k n_c / N, the reference
    deviations are the current ones negated, so
    X^2 = sum_k (c_k - E_k)^2 (1/E_k + 1/E'_k) = N^2 / (n_c n_r) * sum_k (c_k - E_k)^2 / T_k.
    """
    n = n_current + n_reference
    expected = totals * (n_current / n)
    return (n * n / (n_current * n_reference)) * np.sum((current - expected) ** 2 / totals, axis=-1)


def chi2_two_sample(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike, *,
                    min_expected: float = MIN_EXPECTED, n_resamples: int = N_RESAMPLES,
                    random_state: int | None = _RANDOM_STATE) -> dict[str, Any]:
    """Two-sample chi-square test that the reference and current samples share their class proportions.

    Pearson's test of homogeneity of the 2 x K contingency table (reference and current counts as rows),
    both samples random (Pearson 1900; Agresti, *Categorical Data Analysis*, 3rd ed., 3.2). Classes with
    no count in either sample are dropped; they carry no information and would make 0/0 terms.

    ``X^2 = sum_{s, k} (O_sk - E_sk)^2 / E_sk`` with ``E_sk = n_s T_k / N`` (``n_s`` the sample sizes,
    ``T_k`` the class totals, ``N`` all items). When every expected count is at least ``min_expected``
    the p-value is the chi-square tail with ``K' - 1`` degrees of freedom (``K'`` the classes kept), as
    ``scipy.stats.chi2_contingency(table, correction=False)`` gives it. Otherwise (a class the model
    almost never predicts, small samples) the approximation can be off and the p-value is Monte Carlo:
    under no drift the N items are exchangeable, so given the class totals the current row is
    multivariate hypergeometric; ``n_resamples`` tables are drawn from it and
    ``p = (1 + #{X^2_b >= X^2}) / (n_resamples + 1)`` (Hope 1968, "A simplified Monte Carlo significance
    test procedure", JRSS B 30; R's ``chisq.test(simulate.p.value = TRUE)``), which satisfies
    ``P(p <= alpha) <= alpha`` for every sample size. The classes are put in a canonical order first, so
    the p-value does not depend on how the classes are numbered, and with a fixed ``random_state`` it
    is a deterministic function of the counts (the Evidently report shows the same number).

    Parameters
    ----------
    reference_counts, current_counts : array-like of int, shape (K,)
        Items per class in the reference (e.g. calibration) and current (e.g. served) samples; each
        sample counts at least one item.
    min_expected : float, default 5
        Smallest expected count for the chi-square approximation (Cochran's rule); ``0`` always uses
        it, ``inf`` always the Monte Carlo p-value.
    n_resamples : int, default 9999
        Monte Carlo tables (the smallest p-value is ``1 / (n_resamples + 1)``).
    random_state : int or None, default 0
        Seed of the Monte Carlo draws; ``None`` draws fresh entropy (p-values then vary between calls).

    Returns
    -------
    dict
        ``statistic`` (X^2), ``p_value``, ``dof`` (``K' - 1``), ``method`` (``"chi2"``, ``"monte_carlo"``,
        or ``"single_class"`` when both samples fall in one class: ``p = 1``), ``min_expected_count``
        (smallest expected count of the table) and ``n_classes`` (``K'``).
    """
    reference = _check_counts(reference_counts, "reference_counts")
    current = _check_counts(current_counts, "current_counts")
    if reference.shape != current.shape:
        raise ValueError(f"reference_counts and current_counts must count the same K classes, got shapes "
                         f"{reference.shape} and {current.shape}")
    if not (isinstance(min_expected, (int, float)) and min_expected >= 0):
        raise ValueError(f"min_expected must be a number >= 0 (inf: always Monte Carlo), got {min_expected!r}")
    if not isinstance(n_resamples, (int, np.integer)) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")

    totals = reference + current
    kept = totals > 0
    reference, current, totals = reference[kept], current[kept], totals[kept]
    # Canonical class order (by total, then current count): the Monte Carlo draws depend on the order of
    # the totals, and the p-value should not depend on how the classes are numbered.
    order = np.lexsort((current, totals))
    reference, current, totals = reference[order], current[order], totals[order]
    n_reference, n_current = int(reference.sum()), int(current.sum())
    n = n_reference + n_current
    min_expected_count = float(totals.min() * min(n_reference, n_current) / n)
    result: dict[str, Any] = {"dof": int(totals.size - 1), "min_expected_count": min_expected_count,
                              "n_classes": int(totals.size)}
    if totals.size == 1:
        return {"statistic": 0.0, "p_value": 1.0, "method": "single_class", **result}

    statistic = float(_pearson(current.astype(float), totals, n_current, n_reference))
    if min_expected_count >= min_expected:
        p_value = float(stats.chi2.sf(statistic, totals.size - 1))
        return {"statistic": statistic, "p_value": p_value, "method": "chi2", **result}
    rng = np.random.default_rng(random_state)
    simulated = rng.multivariate_hypergeometric(totals, n_current, size=int(n_resamples))
    simulated_statistics = _pearson(simulated.astype(float), totals, n_current, n_reference)
    exceed = int(np.count_nonzero(simulated_statistics >= statistic * (1 - _TIE_TOLERANCE)))
    return {"statistic": statistic, "p_value": (1 + exceed) / (int(n_resamples) + 1), "method": "monte_carlo",
            **result}


def _evidently_chi2_two_sample(reference_data: pd.Series, current_data: pd.Series, feature_type: ColumnType,
                               threshold: float) -> tuple[float, bool]:
    """:func:`chi2_two_sample` as an Evidently stat test (class values -> counts -> p-value)."""
    keys = sorted(set(reference_data.dropna().unique()) | set(current_data.dropna().unique()), key=str)
    reference = reference_data.value_counts().reindex(keys, fill_value=0).to_numpy()
    current = current_data.value_counts().reindex(keys, fill_value=0).to_numpy()
    p_value = chi2_two_sample(reference, current)["p_value"]
    return p_value, p_value < threshold


CHI2_TWO_SAMPLE_STATTEST = StatTest(name=CHI2_TWO_SAMPLE, display_name="chi-square two-sample p_value",
                                    allowed_feature_types=[ColumnType.Categorical],
                                    default_threshold=DEFAULT_THRESHOLD)
register_stattest(CHI2_TWO_SAMPLE_STATTEST, default_impl=_evidently_chi2_two_sample)



# ----------------------------------------------------------------------------------------------- input


def _require_columns(frame: Any, columns: Sequence[str], argument: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{argument} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{argument} lacks column(s) {missing}; it has {list(frame.columns)}")
    return frame


def _class_names(values: pd.Series, class_names: Sequence[str], argument: str) -> pd.Series:
    """Class indices -> class names (the report shows names), with the argument named on bad input."""
    if values.isna().any():
        raise ValueError(f"{argument} has {int(values.isna().sum())} missing class indices")
    array = values.to_numpy()
    if not (pd.api.types.is_numeric_dtype(values) or values.empty):
        raise ValueError(f"{argument} must hold class indices (int), got dtype {values.dtype}")
    if array.size and not np.all(np.equal(np.mod(array.astype(float), 1), 0)):
        raise ValueError(f"{argument} holds non-integer class indices")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= len(class_names))
    if bad.any():
        raise ValueError(f"{argument} holds class indices outside [0, {len(class_names)}): "
                         f"{sorted(set(array[bad].tolist()))[:10]}")
    return pd.Series(np.asarray(class_names, dtype=object)[array], index=values.index, dtype=object)


def _one_label_per_input(feedback: pd.DataFrame) -> pd.DataFrame:
    """The audited label of each input if there is one, else the earliest (see the module docstring)."""
    if "prediction_id" not in feedback.columns or feedback.empty:
        return feedback
    keys = [c for c in ("audited", "received_at", "feedback_id") if c in feedback.columns]
    ascending = [c != "audited" for c in keys]  # audited (True) first, then earliest
    ordered = feedback.sort_values(keys, ascending=ascending, kind="stable") if keys else feedback
    return ordered.drop_duplicates("prediction_id", keep="first").sort_index()


def _validate_test(stattest: str, threshold: float) -> str:
    if stattest in _REJECTED_STATTESTS:
        raise ValueError(f"stattest must be one of {sorted(CATEGORICAL_STATTESTS)}; Evidently's {stattest!r} is "
                         f"{_REJECTED_STATTESTS[stattest]}. Use {CHI2_TWO_SAMPLE!r}, the two-sample test")
    if stattest not in CATEGORICAL_STATTESTS:
        raise ValueError(f"stattest must be one of {sorted(CATEGORICAL_STATTESTS)} (tests for categorical "
                         f"columns), got {stattest!r}")
    kind = CATEGORICAL_STATTESTS[stattest]
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0 or (
            kind == "p_value" and threshold >= 1):
        raise ValueError(f"threshold must be in (0, 1) for the p-value test {stattest!r} "
                         f"(or > 0 for a distance), got {threshold!r}")
    return kind


def _min_rows(min_rows: int | None, n_classes: int) -> int:
    # The test stays valid on fewer rows (Monte Carlo p-value), but below about 5 rows per class it has
    # almost no power: the report says "too few rows" rather than a reassuring "no drift".
    if min_rows is None:
        return 5 * n_classes
    if not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive integer, got {min_rows!r}")
    return int(min_rows)


# ------------------------------------------------------------------------------------------ evidently


def _drift_metric(column: str, stattest: str, threshold: float) -> ValueDrift:
    # method and threshold set explicitly: Evidently never auto-selects the test (module docstring). The
    # method is a name in Evidently's registry; "chi2_two_sample" is registered at import.
    return ValueDrift(column=column, method=stattest, threshold=float(threshold))


def _padded(columns: Mapping[str, pd.Series]) -> pd.DataFrame:
    n = max((len(c) for c in columns.values()), default=0)
    return pd.DataFrame({name: pd.Series(list(col), dtype=col.dtype).reindex(range(n))
                         for name, col in columns.items()})


def _run(metrics: list, current: pd.DataFrame, reference: pd.DataFrame, definition: DataDefinition,
         current_metadata: dict[str, str] | None = None, **run_kwargs: Any):
    with warnings.catch_warnings():
        # Evidently computes column statistics of the all-missing padding columns (0/0 warnings).
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report(metrics).run(Dataset.from_pandas(current, data_definition=definition,
                                                       metadata=current_metadata),
                                   Dataset.from_pandas(reference, data_definition=definition), **run_kwargs)


def _values(snapshot) -> list[dict]:
    return snapshot.dict()["metrics"]


def _metric_value(metrics: list[dict], type_name: str, **config: Any) -> Any:
    for metric in metrics:
        cfg = metric["config"]
        if cfg["type"] == f"evidently:metric_v2:{type_name}" and all(cfg.get(k) == v for k, v in config.items()):
            return metric["value"]
    raise KeyError(f"no {type_name} {config} in the Evidently snapshot")


def _drift_result(score: float, stattest: str, threshold: float, n_reference: int, n_current: int) -> dict:
    kind = CATEGORICAL_STATTESTS[stattest]
    detected = score < threshold if kind == "p_value" else score >= threshold
    return {"score": float(score), "score_kind": kind, "stattest": stattest, "threshold": float(threshold),
            "detected": bool(detected), "n_reference": int(n_reference), "n_current": int(n_current)}


def value_drift(reference: Sequence[int] | np.ndarray | pd.Series, current: Sequence[int] | np.ndarray | pd.Series,
                class_names: Sequence[str], stattest: str = DEFAULT_STATTEST,
                threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Drift test of one class column, run by Evidently (the test behind both drift parts of :func:`drift_report`).

    With the default ``stattest`` the score is :func:`chi2_two_sample`'s p-value on the class counts of
    the two samples (Evidently runs that function; see the module docstring).

    Parameters
    ----------
    reference, current : array-like of int, shape (n_reference,) and (n_current,)
        Class indices in ``[0, K)``.
    class_names : sequence of str, length K
    stattest : str, default "chi2_two_sample"
        One of :data:`CATEGORICAL_STATTESTS`: the two-sample chi-square test (a p-value), or a distance.
    threshold : float
        Drift when a p-value is below it (or a distance at or above it).

    Returns
    -------
    dict
        ``score``, ``score_kind`` (``p_value`` or ``distance``), ``stattest``, ``threshold``, ``detected``,
        ``n_reference``, ``n_current``.
    """
    _validate_test(stattest, threshold)
    names = _validated_class_names(class_names)
    ref = _class_names(pd.Series(np.asarray(reference)), names, "reference")
    cur = _class_names(pd.Series(np.asarray(current)), names, "current")
    if ref.empty or cur.empty:
        raise ValueError(f"reference and current must be non-empty, got {len(ref)} and {len(cur)} rows")
    definition = DataDefinition(categorical_columns=["value"])
    snapshot = _run([_drift_metric("value", stattest, threshold)], pd.DataFrame({"value": cur}),
                    pd.DataFrame({"value": ref}), definition)
    score = _metric_value(_values(snapshot), "ValueDrift", column="value")
    return _drift_result(score, stattest, threshold, len(ref), len(cur))


def _validated_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names] if class_names is not None else []
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"class_names must hold at least 2 distinct names, got {list(class_names or [])!r}")
    return names


# --------------------------------------------------------------------------------------------- report


def _suspect_shares(frame: pd.DataFrame, by: str) -> dict[str, dict[str, float | int]]:
    grouped = frame.groupby(by, sort=True)[_SUSPECT]
    return {str(k): {"share": float(v.mean()), "n": int(v.size)} for k, v in grouped}


def drift_report(reference: pd.DataFrame, current_predictions: pd.DataFrame, feedback: pd.DataFrame,
                 class_names: Sequence[str], workspace: str | os.PathLike, project: str = "noisewise",
                 model: str | None = None, stattest: str = DEFAULT_STATTEST,
                 threshold: float = DEFAULT_THRESHOLD, min_rows: int | None = None,
                 timestamp: datetime | None = None, operator: Mapping[str, Any] | None = None,
                 keep_snapshots: int | None = KEEP_SNAPSHOTS) -> dict[str, Any]:
    """Run the monitoring report, store it in an Evidently workspace and return its numbers.

    The report opens on a summary card (noise rate, coverage, suspect share, drift, with their verdicts),
    shows drift and suspects as shares in percent, and the workspace project gets the operator dashboard
    (``monitoring/operator_view.py``), added once to projects created without it.

    Parameters
    ----------
    reference : DataFrame, shape (n_reference, >= 2)
        Calibration set: ``label`` (int, the calibration labels) and ``predicted`` (int, the model's
        predictions on the calibration inputs).
    current_predictions : DataFrame, shape (n_predictions, >= 1)
        Served predictions (the store's prediction frame); uses ``predicted``.
    feedback : DataFrame, shape (n_feedback, >= 5)
        The store's feedback frame; uses ``label``, ``predicted``, ``suspect``, ``annotator`` (``""`` when
        not given) and ``is_ood``, and, when present, ``prediction_id``, ``audited`` and ``received_at`` to
        keep one label per input in the drift test and quality.
    class_names : sequence of str, length K
        Class index -> name; the report shows names.
    workspace : path
        Evidently workspace directory (created when missing). HTML and JSON copies go to
        ``workspace/reports/<UTC timestamp>.html|.json``.
    project : str
        Evidently project name, created on first use.
    model : str, optional
        What is being monitored (e.g. ``"mnist5k v3"``), stored in the snapshot's metadata and tags.
    stattest : str
        Drift test for both drift parts, one of :data:`CATEGORICAL_STATTESTS` (set explicitly, never chosen
        by Evidently); default the two-sample chi-square test :func:`chi2_two_sample`.
    threshold : float
        Drift when the test's p-value is below it (or its distance at or above it).
    min_rows : int, optional
        Fewest current rows for a drift test (default ``5 K``: below about 5 rows per class the test has
        almost no power). Fewer give ``{"status": "too few rows"}``.
    timestamp : datetime, optional
        Time of the report (default: now, UTC).
    operator : mapping, optional
        The noise rate and coverage of the feedback
        (:func:`noisewise.monitoring.operator_view.operator_numbers`), shown on the summary card and stored
        in the snapshot for the dashboard; without it the card shows suspects and drift only.
    keep_snapshots : int >= 1 or None
        Keep the project's newest snapshots, this many, and delete older ones (None: keep them all). Opening
        a local Evidently workspace reads every snapshot it holds, so without a bound each report would take
        longer than the one before; the HTML and JSON files of every report are kept.

    Returns
    -------
    dict
        JSON-serializable: ``label_drift`` and ``prediction_drift`` (``score``, ``score_kind``, ``stattest``,
        ``threshold``, ``detected``, ``n_reference``, ``n_current``; or ``status`` ``"no data"`` /
        ``"too few rows"`` with the counts), ``quality`` (``accuracy``, ``precision_macro``,
        ``recall_macro``, ``f1_macro``, ``per_class`` {name: {precision, recall, f1}}, ``n``,
        ``reference_accuracy``; or ``status``), ``suspects`` (``share``, ``n``, ``n_suspect``, ``per_class``
        and ``per_annotator`` {name: {share, n}}, ``n_ood`` feedback on OOD inputs, left out), ``html``,
        ``json`` (paths, ``html`` None when there was nothing to report), ``snapshot_id``, ``project_id``,
        ``workspace``, ``timestamp``, ``model``, ``snapshots_deleted``.
    """
    kind = _validate_test(stattest, threshold)
    if keep_snapshots is not None and (isinstance(keep_snapshots, bool) or not isinstance(keep_snapshots, int)
                                       or keep_snapshots < 1):
        raise ValueError(f"keep_snapshots must be a positive number of snapshots or None, got {keep_snapshots!r}")
    names = _validated_class_names(class_names)
    needed = _min_rows(min_rows, len(names))
    _require_columns(reference, _REFERENCE_COLUMNS, "reference")
    _require_columns(current_predictions, _PREDICTION_COLUMNS, "current_predictions")
    _require_columns(feedback, _FEEDBACK_COLUMNS, "feedback")
    if reference.empty:
        raise ValueError("reference must hold the calibration rows (label, predicted), got an empty frame")
    timestamp = timestamp or datetime.now(UTC)

    ref_label = _class_names(reference["label"], names, "reference['label']")
    ref_predicted = _class_names(reference["predicted"], names, "reference['predicted']")
    served = _class_names(current_predictions["predicted"], names, "current_predictions['predicted']")
    in_dist = feedback.loc[~feedback["is_ood"].astype(bool)]
    labelled = _one_label_per_input(in_dist)
    fb_label = _class_names(labelled["label"], names, "feedback['label']")
    fb_predicted = _class_names(labelled["predicted"], names, "feedback['predicted']")
    suspect_label = _class_names(in_dist["label"], names, "feedback['label']")
    suspects = pd.DataFrame({_SUSPECT: in_dist["suspect"].astype(bool).astype(float),
                             _SUSPECT_CLASS: suspect_label,
                             _SUSPECT_ANNOTATOR: in_dist["annotator"].fillna("").astype(str)})
    annotated = suspects.loc[suspects[_SUSPECT_ANNOTATOR] != ""]

    current = _padded({_LABEL: fb_label, _PREDICTED: fb_predicted, _SERVED: served,
                       _SUSPECT: suspects[_SUSPECT], _SUSPECT_CLASS: suspects[_SUSPECT_CLASS],
                       _SUSPECT_ANNOTATOR: suspects[_SUSPECT_ANNOTATOR]})
    # The reference has no suspects (no feedback on the calibration set): all-missing columns.
    reference_table = pd.DataFrame({_LABEL: ref_label.to_numpy(), _PREDICTED: ref_predicted.to_numpy(),
                                    _SERVED: ref_predicted.to_numpy(), _SUSPECT: np.nan,
                                    _SUSPECT_CLASS: None, _SUSPECT_ANNOTATOR: None})
    definition = DataDefinition(
        categorical_columns=[_LABEL, _PREDICTED, _SERVED, _SUSPECT_CLASS, _SUSPECT_ANNOTATOR],
        numerical_columns=[_SUSPECT],
        classification=[MulticlassClassification(target=_LABEL, prediction_labels=_PREDICTED)])

    # Report order: the summary card, drift in shares, suspect shares, then Evidently's classification quality.
    drift_metrics: list = []
    drift_views: list = []
    drift_lines: list[dict[str, Any]] = []
    drift_parts = {"label_drift": (_LABEL, len(fb_label)), "prediction_drift": (_SERVED, len(served))}
    samples = {"label_drift": ("label drift", "calibration labels", "feedback labels", ref_label, fb_label),
               "prediction_drift": ("prediction drift", "calibration predictions", "served predictions",
                                    ref_predicted, served)}
    result: dict[str, Any] = {}
    for part, (column, n_current) in drift_parts.items():
        title, reference_name, current_name, ref_values, cur_values = samples[part]
        line = {"name": title, "reference_name": reference_name, "current_name": current_name,
                "n_reference": len(reference), "n_current": n_current, "threshold": float(threshold),
                "score_kind": kind, "stattest": stattest}
        if n_current == 0:
            result[part] = {"status": "no data", "n_reference": len(reference), "n_current": 0}
        elif n_current < needed:
            result[part] = {"status": "too few rows", "n_reference": len(reference), "n_current": n_current,
                            "min_rows": needed}
        drift_lines.append({**line, **({"status": result[part]["status"], "min_rows": needed}
                                       if part in result else {})})
        if part in result:
            drift_metrics.append(None)
            continue
        metric = _drift_metric(column, stattest, threshold)
        drift_metrics.append(metric)
        drift_views.append(DriftInShares(
            title=title.capitalize(), metric=metric, line=line,
            reference_counts={n: int(c) for n, c in ref_values.value_counts().reindex(names, fill_value=0).items()},
            current_counts={n: int(c) for n, c in cur_values.value_counts().reindex(names, fill_value=0).items()}))
    metrics: list = list(drift_views)
    if len(suspects):
        share_metrics = [MeanValue(column=_SUSPECT)]
        share_metrics += [GroupByMetric(metric=MeanValue(column=_SUSPECT), column_name=_SUSPECT_CLASS, label=name)
                          for name in sorted(set(suspects[_SUSPECT_CLASS]))]
        share_metrics += [GroupByMetric(metric=MeanValue(column=_SUSPECT), column_name=_SUSPECT_ANNOTATOR,
                                        label=name) for name in sorted(set(annotated[_SUSPECT_ANNOTATOR]))]
    if len(fb_label):
        quality_metrics = [ClassificationPreset()]
    else:
        quality_metrics = []
        result["quality"] = {"status": "no data", "n": 0}

    # The suspect numbers come from pandas (exact, also without Evidently metrics); the report shows the same
    # values (the tests compare them).
    result["suspects"] = {
        "share": float(suspects[_SUSPECT].mean()) if len(suspects) else None,
        "n": len(suspects), "n_suspect": int(suspects[_SUSPECT].sum()),
        "per_class": _suspect_shares(suspects, _SUSPECT_CLASS),
        "per_annotator": _suspect_shares(annotated, _SUSPECT_ANNOTATOR),
        "n_ood": int(len(feedback) - len(in_dist)),
        **({} if len(suspects) else {"status": "no data"}),
    }

    stamp = timestamp.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    root = Path(workspace)
    reports_dir = root / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    result.update({"workspace": str(root), "timestamp": timestamp.astimezone(UTC).isoformat(),
                   "model": model, "n_predictions": len(served), "n_feedback": len(feedback),
                   "html": None, "snapshot_id": None, "project_id": None,
                   "snapshots_deleted": 0})
    if len(suspects):
        metrics.append(SuspectShares(share_metrics=share_metrics, suspects=result["suspects"]))
    metrics += quality_metrics
    evidently_dict: dict | None = None
    if metrics:
        percents = percent_values(operator, result["suspects"])
        numbers = {**(operator or {}), "suspects": result["suspects"]}
        summary_title = (f"noisewise summary{f': {model}' if model else ''}: {len(feedback)} feedback labels, "
                         f"{len(served)} served predictions")
        metrics.insert(0, OperatorSummary(title=summary_title, numbers=numbers, values=percents, drift=drift_lines,
                                          drift_metrics=drift_metrics))
        metadata = {"stattest": stattest, "threshold": str(threshold), "score_kind": kind}
        if model is not None:
            metadata["model"] = str(model)
        snapshot = _run(metrics, current, reference_table, definition, current_metadata=metadata_for(percents),
                        name=f"noisewise monitor {stamp}",
                        metadata=metadata, tags=["noisewise"] + ([str(model)] if model else []),
                        timestamp=timestamp.astimezone(UTC).replace(tzinfo=None))
        values = _values(snapshot)
        for part, (column, _) in drift_parts.items():
            if part not in result:
                score = _metric_value(values, "ValueDrift", column=column)
                result[part] = _drift_result(score, stattest, threshold, len(reference), drift_parts[part][1])
        if "quality" not in result:
            result["quality"] = _quality(values, names, fb_label, ref_label, ref_predicted)
        ws = Workspace(str(root))
        found = ws.search_project(project)
        evidently_project = found[0] if found else ws.create_project(project, description=(
            "noisewise: noise rate, realized coverage, suspected annotation errors, label and prediction drift"))
        # At creation, and on every run for projects created without the operator panels (idempotent).
        ensure_dashboard(ws, evidently_project.id)
        ref = ws.add_run(evidently_project.id, snapshot)
        result["snapshot_id"], result["project_id"] = str(ref.id), str(evidently_project.id)
        result["snapshots_deleted"] = _prune_snapshots(ws, evidently_project.id, keep_snapshots)
        html = reports_dir / f"{stamp}.html"
        snapshot.save_html(str(html))
        result["html"] = str(html)
        evidently_dict = snapshot.dict()
    json_path = reports_dir / f"{stamp}.json"
    result["json"] = str(json_path)
    json_path.write_text(json.dumps({"noisewise": result, "evidently": evidently_dict}, indent=1,
                                    default=_json_default))
    return result


def _prune_snapshots(ws: Workspace, project_id: Any, keep: int | None) -> int:
    """Delete the project's snapshots older than its newest ``keep``; returns how many were deleted.
    Evidently's snapshot ids are UUIDv7, so their sorted order is their creation order."""
    if keep is None:
        return 0
    runs = sorted(str(run) for run in ws.list_runs(project_id))
    old = runs[:max(len(runs) - keep, 0)]
    for snapshot_id in old:
        ws.delete_run(project_id, snapshot_id)
    return len(old)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _quality(values: list[dict], names: list[str], fb_label: pd.Series, ref_label: pd.Series, ref_predicted: pd.Series) -> dict:
    precision = _metric_value(values, "PrecisionByLabel")
    recall = _metric_value(values, "RecallByLabel")
    f1 = _metric_value(values, "F1ByLabel")
    return {
        "accuracy": float(_metric_value(values, "Accuracy")),
        "precision_macro": float(_metric_value(values, "Precision")),
        "recall_macro": float(_metric_value(values, "Recall")),
        "f1_macro": float(_metric_value(values, "F1Score")),
        "per_class": {str(k): {"precision": float(precision[k]), "recall": float(recall.get(k, float("nan"))),
                               "f1": float(f1.get(k, float("nan")))} for k in names if k in precision},
        "n": len(fb_label),
        # The calibration set's accuracy, for comparison (the report shows both side by side).
        "reference_accuracy": float((ref_label.to_numpy() == ref_predicted.to_numpy()).mean()),
    }



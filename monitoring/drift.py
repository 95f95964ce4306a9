"""Evidently reports on returned labels and served predictions (DESIGN.md 5); the only Evidently import.

One :func:`drift_report` call runs one Evidently ``Report`` and stores its snapshot in a local Evidently
workspace (``evidently ui --workspace DIR`` serves it), next to HTML and JSON copies. The report holds:

* label drift: the feedback labels against the calibration labels, Evidently's ``ValueDrift`` with the
  stat test set explicitly (chi-square by default). Left to itself Evidently picks chi-square below 1000
  reference rows and Jensen-Shannon distance above, which turns a p-value (drift when small) into a
  distance (drift when large): the score would change meaning as the calibration set grows;
* prediction drift: the served predicted class against the model's predictions on the calibration
  inputs, the same test;
* classification quality on labelled in-distribution feedback (Evidently's ``ClassificationPreset``:
  accuracy, macro precision/recall/F1, per-class precision/recall/F1), next to the same metrics on the
  calibration set;
* suspected annotation errors: their share overall, per given label and per annotator (``MeanValue`` of
  the 0/1 suspect flag, per group).

Which rows enter which part (the choices behind the numbers):

* labels come back for the inputs the model saw; feedback on inputs flagged OOD is not from the
  reference distribution, and the model cannot judge those labels (DESIGN.md 4.7), so label drift,
  quality and suspect shares use in-distribution feedback only and the OOD feedback is counted apart;
* an input labelled by several annotators counts once in label drift and quality (the audited label
  if there is one, else the earliest): the chi-square test assumes independent rows, and duplicate
  labels of one input are not independent. Suspect shares count every label (they judge annotators).

Evidently's ``Report`` takes one current table, while the samples here differ in size (feedback,
served predictions). Each sample gets its own columns, padded with missing values to the longest;
``ValueDrift`` and the classification metrics drop missing values before computing (Evidently 0.7's
``get_one_column_drift`` and ``ClassificationQuality`` do so explicitly), and the tests check every
number against pandas/scipy.

The chi-square test is Evidently's: a goodness-of-fit test of the current counts against the reference
proportions, which treats the reference as exact. With ``n_current`` rows against ``n_reference``, the
statistic's variance under no drift is inflated by about ``1 + n_current / n_reference``: keep the
calibration set larger than the feedback window, or read small p-values with that in mind.
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
import pandas as pd
from evidently import DataDefinition, Dataset, MulticlassClassification, Report
from evidently.metrics import MeanValue, ValueDrift
from evidently.metrics.group_by import GroupByMetric
from evidently.presets import ClassificationPreset
from evidently.ui.workspace import Workspace

__all__ = [
    "CATEGORICAL_STATTESTS",
    "DEFAULT_STATTEST",
    "DEFAULT_THRESHOLD",
    "drift_report",
    "value_drift",
]

# Evidently's stat tests that accept a categorical column, and what their score is. A p-value means
# drift when score < threshold; a distance means drift when score >= threshold (Evidently's own rules).
CATEGORICAL_STATTESTS: dict[str, str] = {
    "chisquare": "p_value",
    "g_test": "p_value",
    "TVD": "p_value",
    "jensenshannon": "distance",
    "psi": "distance",
    "hellinger": "distance",
    "kl_div": "distance",
}
DEFAULT_STATTEST = "chisquare"
DEFAULT_THRESHOLD = 0.05

# Columns of the report's tables. Each sample has its own columns (see the module docstring).
_LABEL, _PREDICTED = "label", "predicted"          # labelled in-distribution feedback (one per input)
_SERVED = "served_prediction"                      # served predictions
_SUSPECT = "suspect"                               # every in-distribution feedback label: 0/1
_SUSPECT_CLASS, _SUSPECT_ANNOTATOR = "suspect_given_label", "suspect_annotator"

_REFERENCE_COLUMNS = ("label", "predicted")
_PREDICTION_COLUMNS = ("predicted",)
_FEEDBACK_COLUMNS = ("label", "predicted", "suspect", "annotator", "is_ood")


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
    if stattest not in CATEGORICAL_STATTESTS:
        raise ValueError(f"stattest must be one of {sorted(CATEGORICAL_STATTESTS)} (Evidently's tests for "
                         f"categorical columns), got {stattest!r}")
    kind = CATEGORICAL_STATTESTS[stattest]
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0 or (
            kind == "p_value" and threshold >= 1):
        raise ValueError(f"threshold must be in (0, 1) for the p-value test {stattest!r} "
                         f"(or > 0 for a distance), got {threshold!r}")
    return kind


def _min_rows(min_rows: int | None, n_classes: int) -> int:
    # Chi-square's approximation wants expected counts of about 5 per class (Cochran): 5 K rows on average.
    if min_rows is None:
        return 5 * n_classes
    if not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive integer, got {min_rows!r}")
    return int(min_rows)


# ------------------------------------------------------------------------------------------ evidently


def _drift_metric(column: str, stattest: str, threshold: float) -> ValueDrift:
    # method and threshold set explicitly: Evidently never auto-selects the test (module docstring).
    return ValueDrift(column=column, method=stattest, threshold=float(threshold))


def _padded(columns: Mapping[str, pd.Series]) -> pd.DataFrame:
    n = max((len(c) for c in columns.values()), default=0)
    return pd.DataFrame({name: pd.Series(list(col), dtype=col.dtype).reindex(range(n))
                         for name, col in columns.items()})


def _run(metrics: list, current: pd.DataFrame, reference: pd.DataFrame, definition: DataDefinition,
         **run_kwargs: Any):
    with warnings.catch_warnings():
        # Evidently computes column statistics of the all-missing padding columns (0/0 warnings).
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report(metrics).run(Dataset.from_pandas(current, data_definition=definition),
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
    """Evidently's drift test of one class column (the test behind both drift parts of :func:`drift_report`).

    Parameters
    ----------
    reference, current : array-like of int, shape (n_reference,) and (n_current,)
        Class indices in ``[0, K)``.
    class_names : sequence of str, length K
    stattest : str
        One of :data:`CATEGORICAL_STATTESTS`.
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
                 timestamp: datetime | None = None) -> dict[str, Any]:
    """Run the monitoring report, store it in an Evidently workspace and return its numbers.

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
        by Evidently).
    threshold : float
        Drift when the test's p-value is below it (or its distance at or above it).
    min_rows : int, optional
        Fewest current rows for a drift test (default ``5 K``: chi-square wants about 5 expected counts per
        class). Fewer give ``{"status": "too few rows"}``.
    timestamp : datetime, optional
        Time of the report (default: now, UTC).

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
        ``workspace``, ``timestamp``, ``model``.
    """
    kind = _validate_test(stattest, threshold)
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

    metrics: list = []
    drift_parts = {"label_drift": (_LABEL, len(fb_label)), "prediction_drift": (_SERVED, len(served))}
    result: dict[str, Any] = {}
    for part, (column, n_current) in drift_parts.items():
        if n_current == 0:
            result[part] = {"status": "no data", "n_reference": len(reference), "n_current": 0}
        elif n_current < needed:
            result[part] = {"status": "too few rows", "n_reference": len(reference), "n_current": n_current,
                            "min_rows": needed}
        else:
            metrics.append(_drift_metric(column, stattest, threshold))
    if len(fb_label):
        metrics.append(ClassificationPreset())
    else:
        result["quality"] = {"status": "no data", "n": 0}
    if len(suspects):
        metrics.append(MeanValue(column=_SUSPECT))
        metrics += [GroupByMetric(metric=MeanValue(column=_SUSPECT), column_name=_SUSPECT_CLASS, label=name)
                    for name in sorted(set(suspects[_SUSPECT_CLASS]))]
        metrics += [GroupByMetric(metric=MeanValue(column=_SUSPECT), column_name=_SUSPECT_ANNOTATOR, label=name)
                    for name in sorted(set(annotated[_SUSPECT_ANNOTATOR]))]

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
                   "html": None, "snapshot_id": None, "project_id": None})
    evidently_dict: dict | None = None
    if metrics:
        metadata = {"stattest": stattest, "threshold": str(threshold), "score_kind": kind}
        if model is not None:
            metadata["model"] = str(model)
        snapshot = _run(metrics, current, reference_table, definition, name=f"noisewise monitor {stamp}",
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
            "noisewise: label and prediction drift, feedback quality, suspected annotation errors"))
        ref = ws.add_run(evidently_project.id, snapshot)
        result["snapshot_id"], result["project_id"] = str(ref.id), str(evidently_project.id)
        html = reports_dir / f"{stamp}.html"
        snapshot.save_html(str(html))
        result["html"] = str(html)
        evidently_dict = snapshot.dict()
    json_path = reports_dir / f"{stamp}.json"
    result["json"] = str(json_path)
    json_path.write_text(json.dumps({"noisewise": result, "evidently": evidently_dict}, indent=1,
                                    default=_json_default))
    return result


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



"""Every ``noisewise_*`` Prometheus metric, in one table.

Plain ``prometheus_client`` objects: BentoML serves them on ``/metrics`` next to its own
``bentoml_service_*`` series (rate, latency, in-flight requests). Those are labelled by ``endpoint``: the
route (``/predict``, ``/feedback``, ...), and ``unmatched`` for every path that is no route, so that clients
cannot add series by sending made-up paths (``services/bentoml_patches.py``). BentoML runs workers with
``PROMETHEUS_MULTIPROC_DIR`` set, so each metric is written to per-process files and summed at scrape time;
gauges therefore say how to merge processes (``multiprocess_mode``): ``mostrecent`` for values computed
from shared state (the store, the calibration), so that every worker reports the same value once.

Counters and histograms are updated on the request path (:func:`observe_predictions`,
:func:`observe_feedback`); the feedback-derived gauges (noise rate, realized coverage, suspect share, drift)
are refreshed from the store by the service (:func:`set_feedback_gauges`, :func:`set_drift_gauges`).

======================================================  =========  =================================================
metric                                                  type       labels / meaning
======================================================  =========  =================================================
``noisewise_predictions_total``                         counter    ``decision`` (accept, abstain), ``reason`` (none,
                                                                   ood, low_confidence)
``noisewise_ood_flags_total``                           counter    inputs flagged OOD (p-value <= alpha_ood)
``noisewise_predicted_class_total``                     counter    ``class_name``: the served argmax class
``noisewise_prediction_set_size``                       histogram  classes in each conformal set
``noisewise_confidence``                                histogram  the response's ``score`` (not a probability)
``noisewise_ood_p_value``                               histogram  conformal OOD p-value of each input
``noisewise_feedback_items_total``                      counter    ``outcome``: stored, duplicate, rejected
``noisewise_feedback_disagreements_total``              counter    stored feedback labels != the served label
``noisewise_suspected_label_errors_total``              counter    ``class_name`` (the given label): suspects
``noisewise_feedback_on_ood_total``                     counter    stored feedback on inputs flagged OOD
``noisewise_model_info``                                gauge      1 for the served ``name``, ``version``,
                                                                   ``alias`` (0 for versions served before)
``noisewise_model_reloads_total``                       counter    ``outcome``: ok, failed (hot reloads)
``noisewise_target_coverage``                           gauge      1 - alpha of the served sets
``noisewise_alpha_ood``                                 gauge      the OOD gate's level (expected OOD flag rate
                                                                   on in-distribution inputs)
``noisewise_calibration_noise_rate``                    gauge      flip rate the served calibration assumed
                                                                   (lower bound used by NACP)
``noisewise_noise_rate``                                gauge      ``method``: flip-rate estimate from feedback
``noisewise_noise_rate_lower`` / ``_upper``             gauge      ``method``: its confidence interval
``noisewise_realized_coverage``                         gauge      ``kind``: raw, corrected (feedback labels in sets)
``noisewise_feedback_window_items``                     gauge      labelled in-distribution feedback behind the
                                                                   gauges above
``noisewise_suspect_share``                             gauge      share of that feedback flagged suspect
``noisewise_drift_score``                               gauge      ``report`` (label, prediction): p-value of the
                                                                   latest `noisewise monitor` drift test
``noisewise_drift_detected``                            gauge      ``report``: 1 when that test detected drift
``noisewise_forward_passes_total``                      counter    forward passes (``services/batching.py``)
``noisewise_batch_inputs``                              histogram  inputs per forward pass (``services/batching.py``)
======================================================  =========  =================================================
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import Counter, Gauge, Histogram

PREDICTIONS = Counter("noisewise_predictions", "Served predictions by decision and abstention reason.",
                      ["decision", "reason"])
OOD_FLAGS = Counter("noisewise_ood_flags", "Inputs flagged out-of-distribution by the OOD gate.")
PREDICTED_CLASS = Counter("noisewise_predicted_class", "Served predictions by predicted class.", ["class_name"])
SET_SIZE = Histogram("noisewise_prediction_set_size", "Classes in each served conformal prediction set.",
                     buckets=(0, 1, 2, 3, 4, 5, 7, 10, 20, 50, 100, 1000))
CONFIDENCE = Histogram("noisewise_confidence", "Selective score of each prediction (the response's `score`: the "
                       "calibration's confidence function, not a probability).",
                       buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
OOD_P_VALUE = Histogram("noisewise_ood_p_value", "Conformal OOD p-value of each input.",
                        buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0))

FEEDBACK_ITEMS = Counter("noisewise_feedback_items", "Feedback items by outcome (stored, duplicate, rejected).",
                         ["outcome"])
FEEDBACK_DISAGREEMENTS = Counter("noisewise_feedback_disagreements",
                                 "Stored feedback labels that differ from the served label.")
SUSPECTS = Counter("noisewise_suspected_label_errors",
                   "Stored feedback labels flagged as suspected annotation errors, by given label.", ["class_name"])
FEEDBACK_ON_OOD = Counter("noisewise_feedback_on_ood", "Stored feedback on inputs flagged OOD (not judged).")

MODEL_INFO = Gauge("noisewise_model_info", "The served model (value 1).", ["name", "version", "alias"],
                   multiprocess_mode="mostrecent")
RELOADS = Counter("noisewise_model_reloads", "Hot reloads of the served model version.", ["outcome"])
TARGET_COVERAGE = Gauge("noisewise_target_coverage", "Target coverage (1 - alpha) of the served sets.",
                        multiprocess_mode="mostrecent")
ALPHA_OOD = Gauge("noisewise_alpha_ood", "Level of the OOD gate (expected OOD rate on in-distribution inputs).",
                  multiprocess_mode="mostrecent")
CALIBRATION_NOISE = Gauge("noisewise_calibration_noise_rate",
                          "Flip noise rate of the calibration labels that the served sets assume (lower bound).",
                          multiprocess_mode="mostrecent")
NOISE_RATE = Gauge("noisewise_noise_rate", "Flip noise rate of feedback labels, estimated.", ["method"],
                   multiprocess_mode="mostrecent")
NOISE_RATE_LOWER = Gauge("noisewise_noise_rate_lower", "Lower confidence bound of the feedback noise rate.",
                         ["method"], multiprocess_mode="mostrecent")
NOISE_RATE_UPPER = Gauge("noisewise_noise_rate_upper", "Upper confidence bound of the feedback noise rate.",
                         ["method"], multiprocess_mode="mostrecent")
REALIZED_COVERAGE = Gauge("noisewise_realized_coverage",
                          "Share of in-distribution feedback labels inside the served sets (raw, noise-corrected).",
                          ["kind"], multiprocess_mode="mostrecent")
FEEDBACK_WINDOW = Gauge("noisewise_feedback_window_items",
                        "Labelled in-distribution feedback items behind the feedback gauges.",
                        multiprocess_mode="mostrecent")
SUSPECT_SHARE = Gauge("noisewise_suspect_share", "Share of in-distribution feedback flagged as suspect.",
                      multiprocess_mode="mostrecent")
DRIFT_SCORE = Gauge("noisewise_drift_score", "p-value of the latest drift test (noisewise monitor).", ["report"],
                    multiprocess_mode="mostrecent")
DRIFT_DETECTED = Gauge("noisewise_drift_detected", "1 when the latest drift test detected drift.", ["report"],
                       multiprocess_mode="mostrecent")

_model_labels: tuple[str, str, str] | None = None

DECISION_REASONS = (("accept", "none"), ("abstain", "ood"), ("abstain", "low_confidence"))
FEEDBACK_OUTCOMES = ("stored", "duplicate", "rejected")


def start_series(class_names: Iterable[str]) -> None:
    """Create every labelled series at 0, so that rates and dashboards have data before the first event."""
    for decision, reason in DECISION_REASONS:
        PREDICTIONS.labels(decision, reason)
    for name in class_names:
        PREDICTED_CLASS.labels(name)
        SUSPECTS.labels(name)
    for outcome in FEEDBACK_OUTCOMES:
        FEEDBACK_ITEMS.labels(outcome)
    for outcome in ("ok", "failed"):
        RELOADS.labels(outcome)


def set_model(name: str, version: str, alias: str | None, summary: Mapping) -> None:
    """The served model and what its calibration promises (called at start-up and after each reload)."""
    global _model_labels
    if _model_labels is not None:  # multiprocess files keep old series: zero it rather than clear() it
        MODEL_INFO.labels(*_model_labels).set(0)
    _model_labels = (name, version, alias or "")
    MODEL_INFO.labels(*_model_labels).set(1)
    TARGET_COVERAGE.set(summary["prediction_set"]["target_coverage"])
    ALPHA_OOD.set(summary["ood"]["alpha_ood"])
    noise = summary.get("noise") or {}
    # A heuristic record (or one no guarantee uses) is shown but assumed by nothing: no value to compare with.
    unused = noise.get("heuristic") or noise.get("used_for_guarantees") is False
    assumed = float("nan") if unused else float(noise.get("lower", noise.get("flip_rate", 0.0)) or 0.0)
    CALIBRATION_NOISE.set(assumed)


def observe_predictions(predictions: Sequence) -> None:
    """Count a batch of served predictions (``noisewise.services.schemas.Prediction``): one increment per label set and
    batch for the counters; histograms take every value."""
    for (decision, reason), n in collections.Counter((p.decision, p.reason or "none") for p in predictions).items():
        PREDICTIONS.labels(decision, reason).inc(n)
    for class_name, n in collections.Counter(p.class_name for p in predictions).items():
        PREDICTED_CLASS.labels(class_name).inc(n)
    flagged = sum(p.ood.is_ood for p in predictions)
    if flagged:
        OOD_FLAGS.inc(flagged)
    for p in predictions:
        SET_SIZE.observe(len(p.prediction_set))
        CONFIDENCE.observe(p.score)
        OOD_P_VALUE.observe(p.ood.p_value)


def observe_feedback(outcomes: Mapping[str, int], stored: Iterable[Mapping], class_names: list[str]) -> None:
    """Count a feedback batch: ``outcomes`` maps stored/duplicate/rejected to counts; ``stored`` has one dict
    per newly stored item with ``label``, ``predicted``, ``suspect`` and ``is_ood``."""
    for outcome, count in outcomes.items():
        if count:
            FEEDBACK_ITEMS.labels(outcome).inc(count)
    for item in stored:
        if item["label"] != item["predicted"]:
            FEEDBACK_DISAGREEMENTS.inc()
        if item["is_ood"]:
            FEEDBACK_ON_OOD.inc()
        elif item["suspect"]:
            SUSPECTS.labels(class_names[item["label"]]).inc()


def set_feedback_gauges(state: Mapping) -> None:
    """Feedback-derived gauges from :func:`noisewise.monitoring.feedback_state` output (``noise``: {method: estimate
    dict with flip_rate/lower/upper}, ``coverage``: {raw, corrected}, ``n``, ``suspect_share``)."""
    for method, est in (state.get("noise") or {}).items():
        # Flip-rate records (convention "flip"); an undefined point is None in the record: NaN here.
        point = est.get("flip_rate")
        NOISE_RATE.labels(method).set(float("nan") if point is None else point)
        NOISE_RATE_LOWER.labels(method).set(est["lower"])
        NOISE_RATE_UPPER.labels(method).set(est["upper"])
    coverage = state.get("coverage") or {}
    for kind in ("raw", "corrected"):
        if coverage.get(kind) is not None:
            REALIZED_COVERAGE.labels(kind).set(coverage[kind])
        elif kind == "corrected" and coverage.get("n"):
            # No non-heuristic noise rate to correct with: unknown, not the last value nor the raw one.
            REALIZED_COVERAGE.labels(kind).set(float("nan"))
    FEEDBACK_WINDOW.set(state.get("n", 0))
    if state.get("suspect_share") is not None:
        SUSPECT_SHARE.set(state["suspect_share"])


DRIFT_REPORTS = ("label", "prediction")


def drift_gauge_values(result: Mapping) -> dict[str, tuple[float, bool]]:
    """``{"label": (score, detected), "prediction": (...)}`` from a ``noisewise.monitoring.drift.drift_report`` result.

    A part without a test (no data, too few rows) gives ``(nan, False)`` so that the gauges do not keep
    the value of an older report.
    """
    values: dict[str, tuple[float, bool]] = {}
    for report in DRIFT_REPORTS:
        part = result.get(f"{report}_drift") or {}
        if part.get("score") is not None:
            values[report] = (float(part["score"]), bool(part["detected"]))
        else:
            values[report] = (float("nan"), False)
    return values


def set_drift_gauges(result: Mapping) -> None:
    """Drift gauges from a ``drift_report`` result (the latest `noisewise monitor` run)."""
    for report, (score, detected) in drift_gauge_values(result).items():
        DRIFT_SCORE.labels(report).set(score)
        DRIFT_DETECTED.labels(report).set(1.0 if detected else 0.0)

"""What ``noisewise monitor`` computes, and the feedback state behind the service's gauges.

:func:`feedback_state` is cheap (pandas over the recent feedback window): the service recomputes it every
``NOISEWISE_MONITOR_INTERVAL_S`` for the noise-rate, realized-coverage and suspect-share gauges.
:func:`run_monitor` adds the Evidently reports (``monitoring/drift.py``; the report opens on a summary card of
these numbers, and the workspace project has a dashboard of them, ``monitoring/operator_view.py``), stores the
result as a ``monitor`` report, from which the service exports the drift gauges. ``noisewise monitor`` has the
reports computed by a child process that imported Evidently while the command did the rest
(``monitoring/report_worker.py``); without that worker, :func:`run_monitor` computes them in its own process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from noisewise.monitoring.feedback import best_estimate, noise_rate_estimates, realized_coverage, suspects
from noisewise.monitoring.report_worker import KEEP_SNAPSHOTS

if TYPE_CHECKING:
    from noisewise.monitoring.report_worker import ReportWorker


def feedback_state(frame: pd.DataFrame, calibration) -> dict[str, Any]:
    """Noise-rate estimates (flip rates with intervals), realized coverage of the served sets (raw, on audited
    labels, and corrected with the estimate used for guarantees), suspect share, on a feedback frame of one model.

    Returns ``{"n", "n_ood", "noise": {method: NoiseRateEstimate.to_dict()}, "best": method or None, "coverage":
    realized_coverage(...) or {}, "suspect_share": float or None, "target": 1 - alpha}``. ``best`` names the
    estimate used for guarantees and the coverage correction: never a heuristic (None when only a heuristic or
    nothing exists; the coverage is then left uncorrected).
    """
    k = calibration.num_classes
    target = 1.0 - calibration.threshold.alpha
    ind = frame[~frame["is_ood"]] if len(frame) else frame
    state: dict[str, Any] = {"n": len(ind), "n_ood": int(len(frame) - len(ind)), "noise": {}, "best": None,
                             "coverage": {}, "suspect_share": None, "target": target}
    if not len(ind):
        return state
    estimates = noise_rate_estimates(frame, k)
    state["noise"] = {name: est.to_dict() for name, est in estimates.items()}
    best = best_estimate(estimates)
    state["best"] = None if best is None else best.method
    state["coverage"] = realized_coverage(frame, best, k, target)
    state["suspect_share"] = float(ind["suspect"].mean())
    return state


def reference_frame(loaded) -> pd.DataFrame:
    """The drift reference: calibration labels (``label``) and the model's classes on the calibration inputs
    (``predicted``), as stored with the version, so that monitoring needs no training data.

    A version that stores none (registered by an older noisewise) computes them from its data on disk.

    Raises
    ------
    DataError
        For such a version whose data is gone (one line naming the path).
    ValueError
        When the version stores no calibration items (nothing to compare the feedback with).
    """
    from noisewise.models import registry

    reference = registry.load_reference(loaded)
    if reference is None:
        import torch

        from noisewise.models.calibrate import features_and_logits

        if loaded.net is None:  # loaded without its network (``load_model(..., network=False)``): needed now
            net = registry.load_model(f"{loaded.name}/{loaded.version}").net
            loaded = dataclasses.replace(loaded, net=net)

        dataset = registry.training_data(loaded, needed_by="monitor (the drift reference)",
                                         alternative=f"calibrate it on labelled data you hold (`noisewise calibrate "
                                         f"--model {loaded.name}/{loaded.version} --dataset FILE`): the new version "
                                         "stores its drift reference")
        x_cal, y_cal, _ = dataset.split("cal")
        with torch.no_grad():
            device = next((p.device for p in loaded.net.parameters()), torch.device("cpu"))
            _, logits = features_and_logits(loaded.net, x_cal, device)
        return pd.DataFrame({"label": np.asarray(y_cal, dtype=np.int64),
                             "predicted": logits.argmax(1).cpu().numpy().astype(np.int64)})
    if len(reference.cal_labels) == 0:
        raise ValueError(f"{loaded.name}/{loaded.version} stores no calibration items to compare the feedback with")
    return pd.DataFrame({"label": reference.cal_labels, "predicted": reference.cal_predicted})


def run_monitor(store, loaded, workspace: Path, window: int | None = None, limit: int = 20, *,
                reports: ReportWorker | None = None, keep_snapshots: int | None = KEEP_SNAPSHOTS) -> dict[str, Any]:
    """The ``noisewise monitor`` report: feedback state, suspects, Evidently drift/quality reports (saved to the
    workspace), stored in the store as a ``monitor`` report for the service's drift gauges.

    Everything is computed over the newest ``window`` feedback items and predictions of the model (all when
    None), read newest first through the store's indexes, so the cost follows the window, not the store;
    ``totals`` (whole store: predictions, feedback, OOD feedback, suspects) come from SQL counts.
    ``n_predictions`` and ``n_feedback`` are the window's. The workspace keeps the newest ``keep_snapshots``
    snapshots of the project (None: all of them).

    ``reports``, a :class:`~noisewise.monitoring.report_worker.ReportWorker` started earlier, computes the
    Evidently reports in its child process (which has imported Evidently meanwhile) while this one counts the
    totals and ranks the suspects; without it they are computed here. The result is the same.

    Raises
    ------
    ReportWorkerError
        When ``reports`` is given and its child fails or exits without answering (one line).
    """
    from noisewise.monitoring.report_worker import DriftJob, compute_drift

    calibration = loaded.calibration
    feedback = store.feedback_frame(window=window, model_name=loaded.name)
    predictions = store.prediction_frame(limit=window, model_name=loaded.name)
    state = feedback_state(feedback, calibration)
    calibration_noise = calibration.noise or {}
    above = _noise_above_calibration(state, calibration_noise)
    # The report's summary card and the workspace dashboard show the same noise rate and coverage.
    job = DriftJob(reference=reference_frame(loaded), predictions=predictions, feedback=feedback,
                   class_names=list(calibration.class_names), workspace=Path(workspace),
                   model=f"{loaded.name}/{loaded.version}", state=state, calibration_noise=calibration_noise,
                   above=above, keep_snapshots=keep_snapshots)
    if reports is not None:
        reports.submit(job)  # the child computes the reports while the totals and suspects are computed here
    totals = store.feedback_totals(loaded.name)
    flagged = suspects(feedback, calibration.class_names, limit=limit)
    drift = reports.result() if reports is not None else compute_drift(job)
    report = {
        "model": {"name": loaded.name, "version": loaded.version},
        "window": window, "n_predictions": len(predictions), "n_feedback": len(feedback), "totals": totals,
        "feedback": state,
        "calibration_noise": {"flip_rate": calibration_noise.get("flip_rate"), "lower": calibration_noise.get("lower"),
                              "method": calibration_noise.get("method"),
                              "heuristic": bool(calibration_noise.get("heuristic", False))},
        "suspects": {"n_suspects": flagged.get("n_suspects"), "n_ood": flagged.get("n_ood"),
                     "top": flagged.get("suspects", [])[:limit]},
        "drift": drift,
    }
    if above is not None:
        report["noise_above_calibration"] = above
    store.add_report("monitor", _jsonable(report))
    return report


def _noise_above_calibration(state: dict[str, Any], calibration_noise: dict[str, Any]) -> bool | None:
    """Whether the feedback's noise-rate lower bound exceeds the flip rate the calibration assumed; None when
    either side is missing or a heuristic (never compared)."""
    best = state.get("best")  # never a heuristic, on either side of the comparison
    if best is None or calibration_noise.get("lower") is None or calibration_noise.get("heuristic"):
        return None
    return bool(state["noise"][best]["lower"] > float(calibration_noise["lower"]))


def _jsonable(value: Any) -> Any:
    """numpy scalars, NaN and timestamps -> JSON-safe values (reports go into a JSON column)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value

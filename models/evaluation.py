"""What the guarantees mean on data: coverage, set size, selective risk and OOD detection of a
:class:`~noisewise.models.predictor.Predictor` on a dataset's test split and on OOD sets."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from noisewise.models.data import OOD_DATASETS, Dataset, load_ood
from noisewise.models.predictor import BatchOutput, Predictor
from noisewise.models.uncertainty.selective import aurc, eaurc


def forward_all(predictor: Predictor, x: np.ndarray, batch_size: int = 512) -> BatchOutput:
    """:meth:`Predictor.forward` over ``x`` in batches, concatenated on the host."""
    parts = [predictor.forward(torch.as_tensor(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return BatchOutput(*[torch.cat([getattr(p, f).cpu() for p in parts]) for f in BatchOutput.__dataclass_fields__])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |B|/n |acc(B) - conf(B)|."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - conf[members].mean())
    return float(total)


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Share of ID inputs flagged when the threshold catches 95% of OOD inputs (higher score = OOD)."""
    threshold = np.quantile(ood_scores, 0.05)
    return float((id_scores >= threshold).mean())


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return {"auroc": float(roc_auc_score(y, np.r_[id_scores, ood_scores])), "fpr95": fpr_at_95_tpr(id_scores, ood_scores)}


def reference_labels(y_observed: np.ndarray, y_clean: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The labels to score against: ``(row mask, labels, description)``.

    Reference labels (``y_clean``, -1 where unknown) wherever they exist; otherwise every observed label, said
    plainly, since coverage and risk measured on noisy labels are not those of the true labels.
    """
    if y_clean is not None and (y_clean >= 0).any():
        known = y_clean >= 0
        what = "reference (y_clean)" if known.all() else f"reference (y_clean) on the {int(known.sum())} items that have one"
        return known, y_clean[known], what
    return (np.ones(len(y_observed), dtype=bool), y_observed,
            "observed (no reference labels: coverage and risk are measured against possibly noisy labels)")


def evaluate(predictor: Predictor, dataset: Dataset, ood_sets: tuple[str, ...] = OOD_DATASETS,
             n_ood: int = 500, seed: int = 0) -> dict:
    """Metrics on the test split against the reference labels where known (see :func:`reference_labels`)."""
    x, y_observed, y_clean = dataset.split("test")
    rows, labels, what = reference_labels(y_observed, y_clean)
    out = forward_all(predictor, x)
    probs = out.probs.numpy()[rows]
    pred = out.label.numpy()[rows]
    correct = pred == labels
    sets = out.sets.numpy()[rows]
    accept = out.accept.numpy()[rows]
    confidence = out.confidence.numpy()[rows]
    summary = predictor.calibration.summary()
    realized = None
    if y_clean is not None and rows.any() and what.startswith("reference"):
        realized = float((y_observed[rows] != labels).mean())
    result = {
        "labels": what,
        "n_test": int(len(labels)),
        "realized_noise_rate": realized,
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(probs, labels),
        "aurc": aurc(confidence, correct),
        "eaurc": eaurc(confidence, correct),
        "coverage": float(sets[np.arange(len(labels)), labels].mean()),
        "mean_set_size": float(sets.sum(1).mean()),
        "empty_set_rate": float((sets.sum(1) == 0).mean()),
        "target_coverage": summary["prediction_set"]["target_coverage"],
        "selective_coverage": float(accept.mean()),
        "selective_risk": float((~correct[accept]).mean()) if accept.any() else None,
        "risk_target": summary["abstention"]["risk_target"],
        "id_ood_flag_rate": float(out.is_ood.numpy().mean()),
        "alpha_ood": summary["ood"]["alpha_ood"],
        "ood_auroc": {},
        "ood_fpr95": {},
        "ood_flag_rate": {},
        "guarantees": {part: {"kind": summary[part]["kind"], "condition": summary[part]["condition"]}
                       for part in ("prediction_set", "abstention", "ood")},
        "can_certify": summary["abstention"]["can_certify"],
        "frontier": summary["abstention"]["frontier"],
        "assumptions": {"eps": summary["prediction_set"]["eps"], "delta": summary["prediction_set"]["delta"],
                        "risk_delta": summary["abstention"]["delta"], "noise": summary["noise"],
                        "statements": summary["assumptions"]},
    }
    if len(dataset.input_shape) == 3:
        id_scores = out.ood_score.numpy()
        for name in ood_sets:
            x_ood = load_ood(name, dataset.input_shape, n=n_ood, seed=seed, reference=x)
            ood_out = forward_all(predictor, x_ood)
            metrics = ood_metrics(id_scores, ood_out.ood_score.numpy())
            result["ood_auroc"][name] = metrics["auroc"]
            result["ood_fpr95"][name] = metrics["fpr95"]
            result["ood_flag_rate"][name] = float(ood_out.is_ood.numpy().mean())
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """Numeric entries of :func:`evaluate`'s result as flat MLflow metric names."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict) and key.startswith("ood_"):
            flat.update({f"{key}_{name}": v for name, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat

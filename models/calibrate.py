"""Fit everything a served prediction needs besides the weights: the :class:`Calibration`.

One calibration = an OOD scorer fitted on the training features with a conformal gate over held-out
calibration scores, a conformal threshold that accounts for noisy calibration labels (NACP, or the
audit-rectified threshold when audited labels exist), a certified abstention threshold, and the
per-class confident-learning thresholds used to flag suspicious feedback. It is stored as
``calibration.json`` (validated fields) + ``calibration.safetensors`` (tensors) beside the weights.

Which labels are used where (DESIGN.md 4.3-4.7):

- OOD bank: features of the train split (no labels). OOD gate: scores of the calibration split.
- Confidence function (MSP or MaxLogit-pNorm): chosen on the validation split (noisy labels; tuning
  needs no guarantee and keeps the calibration split whole for certification).
- Conformal threshold and certified abstention: the calibration split, whose observed labels may be
  noisy. ``noise_rate`` is a **flip rate** (fraction of wrong labels), converted to the uniform
  convention for NACP.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.data import BUILTIN_DATASETS, Dataset
from models.nets import Classifier
from models.uncertainty.conformal import (
    CONFORMITY_SCORES,
    MAPIE_CONVENTION,
    ConformalThreshold,
    audit_rectified_threshold,
    nacp_threshold,
)
from models.uncertainty.labelnoise import (
    flip_rate_to_uniform,
    noise_rate_confident_learning,
    noise_rate_from_audit,
    per_class_thresholds,
)
from models.uncertainty.ood import OODGate, OODScorer, build_ood_scorer
from models.uncertainty.selective import CertifiedThreshold, certify_threshold, select_pnorm
from models.uncertainty.selective import confidence as confidence_fn

CALIBRATION_FORMAT = "noisewise-calibration/1"
CONFORMAL_MODES = ("plugin", "finite-sample")
RISK_CORRECTIONS = ("auto", "none", "symmetric")


class CalibrationError(ValueError):
    """Bad calibration settings, or calibration artifacts that are missing or malformed."""


@dataclass
class Calibration:
    """Fitted uncertainty state of one model version (see the module docstring)."""

    class_names: list[str]
    ood_scorer: OODScorer
    ood_gate: OODGate
    conformity_score: str
    conformity_params: dict
    threshold: ConformalThreshold
    noise: dict
    confidence_name: str
    confidence_params: dict
    certified: CertifiedThreshold
    cl_thresholds: list[float]
    settings: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: str | torch.device) -> "Calibration":
        self.ood_scorer.to(device)
        self.ood_gate.to(device)
        return self

    def summary(self) -> dict[str, Any]:
        """What the guarantees are and what they assume: for responses, /model and `evaluate`."""
        t, c = self.threshold, self.certified
        return {
            "prediction_set": {
                "target_coverage": 1 - t.alpha, "alpha": t.alpha, "method": t.method, "score": self.conformity_score,
                "q": t.q, "tau": t.tau, "n": t.n, "eps": t.eps, "delta": t.delta, "Delta": t.Delta,
                "full_sets": t.full_sets, "note": t.note,
            },
            "abstention": {
                "risk_target": c.risk, "delta": c.delta, "certified": c.certified, "threshold": c.threshold,
                "risk_ucb": c.risk_ucb, "coverage": c.coverage, "confidence": self.confidence_name,
                "confidence_params": self.confidence_params, "noise_correction_eps": c.noise_eps, "reason": c.reason,
            },
            "ood": {"scorer": self.ood_scorer.name, "alpha_ood": self.ood_gate.alpha_ood, "n_calibration": self.ood_gate.n},
            "noise": self.noise,
            "assumptions": self.assumptions,
        }

    # --- storage: JSON + safetensors, never pickle -------------------------------------------------
    def save(self, directory: Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"ood_scorer.{k}": v for k, v in self.ood_scorer.state_dict().items()}
        tensors.update({f"ood_gate.{k}": v for k, v in self.ood_gate.state_dict().items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        document = {
            "format": CALIBRATION_FORMAT,
            "class_names": self.class_names,
            "ood_scorer": self.ood_scorer.config(),
            "ood_gate": self.ood_gate.config(),
            "conformity_score": self.conformity_score,
            "conformity_params": self.conformity_params,
            "threshold": self.threshold.to_dict(),
            "noise": self.noise,
            "confidence_name": self.confidence_name,
            "confidence_params": self.confidence_params,
            "certified": self.certified.to_dict(),
            "cl_thresholds": self.cl_thresholds,
            "settings": self.settings,
            "assumptions": self.assumptions,
        }
        json_path, tensor_path = directory / "calibration.json", directory / "calibration.safetensors"
        json_path.write_text(json.dumps(document, indent=2, default=_json_default))
        save_file(tensors, str(tensor_path))
        return [json_path, tensor_path]

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> "Calibration":
        directory = Path(directory)
        json_path, tensor_path = directory / "calibration.json", directory / "calibration.safetensors"
        if not json_path.is_file() or not tensor_path.is_file():
            raise CalibrationError(f"{directory} has no calibration (calibration.json + calibration.safetensors)")
        try:
            doc = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise CalibrationError(f"calibration.json is not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"calibration.json: expected format {CALIBRATION_FORMAT!r}")
        required = {"class_names", "ood_scorer", "ood_gate", "conformity_score", "threshold", "certified",
                    "confidence_name", "cl_thresholds"}
        missing = required - set(doc)
        if missing:
            raise CalibrationError(f"calibration.json: missing fields {sorted(missing)}")
        if doc["conformity_score"] not in CONFORMITY_SCORES:
            raise CalibrationError(f"calibration.json: unknown conformity score {doc['conformity_score']!r}")
        if len(doc["cl_thresholds"]) != len(doc["class_names"]):
            raise CalibrationError("calibration.json: cl_thresholds must have one value per class")
        try:
            tensors = load_file(str(tensor_path), device=str(device))
        except Exception as err:  # safetensors raises its own types for truncated/tampered files
            raise CalibrationError(f"cannot read {tensor_path.name}: {err}") from None
        try:
            scorer = OODScorer.from_state(doc["ood_scorer"], _prefixed(tensors, "ood_scorer."))
            gate = OODGate.from_state(doc["ood_gate"], _prefixed(tensors, "ood_gate."))
            threshold = ConformalThreshold.from_dict(doc["threshold"])
            certified = CertifiedThreshold.from_dict(doc["certified"])
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"calibration artifacts are inconsistent: {err}") from None
        _check_document(doc, threshold, certified)
        return cls(
            class_names=list(doc["class_names"]), ood_scorer=scorer.to(device), ood_gate=gate.to(device),
            conformity_score=doc["conformity_score"], conformity_params=dict(doc.get("conformity_params") or {}),
            threshold=threshold, noise=dict(doc.get("noise") or {}), confidence_name=doc["confidence_name"],
            confidence_params=dict(doc.get("confidence_params") or {}), certified=certified,
            cl_thresholds=[float(t) for t in doc["cl_thresholds"]], settings=dict(doc.get("settings") or {}),
            assumptions=list(doc.get("assumptions") or []),
        )


def _check_document(doc: dict, threshold: ConformalThreshold, certified: CertifiedThreshold) -> None:
    """Field types and ranges of a loaded calibration.json: a tampered value is refused here, not served as
    empty or full sets (a NaN threshold, alpha outside (0, 1), thresholds outside [0, 1], ...)."""
    import inspect

    from models.uncertainty.selective import CONFIDENCE_FUNCTIONS

    def fail(message: str):
        raise CalibrationError(f"calibration.json: {message}")

    def real(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(doc["class_names"], list) or not all(isinstance(c, str) for c in doc["class_names"]):
        fail("class_names must be a list of strings")
    if not (0 < threshold.alpha < 1):
        fail(f"threshold.alpha must be in (0, 1), got {threshold.alpha}")
    if math.isnan(threshold.q) or threshold.q < 0:
        fail(f"threshold.q must be a number >= 0 (or null for full sets), got {threshold.q}")
    raw = doc["certified"].get("certified") if isinstance(doc["certified"], dict) else None
    if not isinstance(raw, bool):  # from_dict would coerce "yes" to True
        fail(f"certified.certified must be true or false, got {raw!r}")
    for name in ("threshold", "risk", "delta"):
        value = getattr(certified, name)
        if not real(value) or math.isnan(value):
            fail(f"certified.{name} must be a number, got {value!r}")
    if not (0 < certified.risk < 1 and 0 < certified.delta < 1):
        fail(f"certified.risk and certified.delta must be in (0, 1), got {certified.risk}, {certified.delta}")
    cl = doc["cl_thresholds"]
    if not isinstance(cl, list) or not all(real(t) and 0 <= t <= 1 for t in cl):
        fail("cl_thresholds must be a list of numbers in [0, 1]")
    name, params = doc["confidence_name"], doc.get("confidence_params") or {}
    if name not in CONFIDENCE_FUNCTIONS:
        fail(f"unknown confidence function {name!r}; expected one of {sorted(CONFIDENCE_FUNCTIONS)}")
    if not isinstance(params, dict) or not set(params) <= set(inspect.signature(CONFIDENCE_FUNCTIONS[name]).parameters):
        fail(f"confidence_params {params!r} do not fit {name!r}")
    for key, kind in (("conformity_params", dict), ("noise", dict), ("settings", dict), ("assumptions", list)):
        if doc.get(key) is not None and not isinstance(doc[key], kind):
            fail(f"{key} must be a JSON {'object' if kind is dict else 'array'}")
    if not all(isinstance(a, str) for a in doc.get("assumptions") or []):
        fail("assumptions must be strings")


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@dataclass(frozen=True)
class CalibrationSettings:
    """User-facing knobs of `noisewise calibrate` (flip-rate convention for ``noise_rate``)."""

    noise_rate: float | str = "auto"
    audit: int = 0
    alpha: float = 0.1
    delta: float = 0.001
    conformal: str = "plugin"
    risk: float = 0.05
    risk_delta: float = 0.05
    risk_correction: str = "auto"
    ood_alpha: float = 0.05
    ood_scorer: str = "knn"
    ood_params: dict = field(default_factory=dict)
    # LAC by default: its served set is the set the threshold is calibrated for, so coverage lands on
    # 1 - alpha with the smallest sets; MAPIE's APS serves include-last-label supersets that over-cover
    # by ~5 points (docs/conformal.md).
    score: str = "lac"
    seed: int = 0

    def check(self) -> None:
        def in_open_unit(name, value):
            if not 0.0 < value < 1.0:
                raise CalibrationError(f"--{name}: must be in (0, 1), got {value}")

        for name in ("alpha", "delta", "risk", "risk_delta", "ood_alpha"):
            in_open_unit(name.replace("_", "-"), getattr(self, name))
        if self.noise_rate != "auto" and not (isinstance(self.noise_rate, float) and 0.0 <= self.noise_rate < 1.0):
            raise CalibrationError(f"--noise-rate: expected 'auto' or a flip rate in [0, 1), got {self.noise_rate!r}")
        if self.audit < 0:
            raise CalibrationError(f"--audit: must be >= 0, got {self.audit}")
        if self.conformal not in CONFORMAL_MODES:
            raise CalibrationError(f"--conformal: expected one of {CONFORMAL_MODES}, got {self.conformal!r}")
        if self.risk_correction not in RISK_CORRECTIONS:
            raise CalibrationError(f"--risk-correction: expected one of {RISK_CORRECTIONS}, got {self.risk_correction!r}")
        if self.score not in CONFORMITY_SCORES:
            raise CalibrationError(f"--score: expected one of {', '.join(CONFORMITY_SCORES)}, got {self.score!r}")


@torch.no_grad()
def features_and_logits(net: Classifier, x: np.ndarray | torch.Tensor, device: torch.device,
                        batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``[N, D]`` and logits ``[N, K]`` in eval mode, on ``device``."""
    net.eval()
    x = torch.as_tensor(x)
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        f = net.forward_features(x[start : start + batch_size].to(device))
        feats.append(f)
        logits.append(net.forward_head(f))
    return torch.cat(feats), torch.cat(logits)


def fit_calibration(net: Classifier, dataset: Dataset, settings: CalibrationSettings,
                    device: torch.device | str = "cpu") -> Calibration:
    """Fit a :class:`Calibration` for ``net`` on ``dataset``'s train/val/cal splits (see module docstring)."""
    settings.check()
    device = torch.device(device)
    net = net.to(device).eval()
    k = dataset.num_classes
    x_tr, y_tr, _ = dataset.split("train")
    x_val, y_val, _ = dataset.split("val")
    x_cal, y_cal, y_cal_clean = dataset.split("cal")
    n_cal = len(y_cal)

    audit_index = np.empty(0, dtype=np.int64)
    if settings.audit:
        if y_cal_clean is None:
            raise CalibrationError("--audit needs trusted labels: the dataset has no y_clean")
        if settings.audit >= n_cal:
            raise CalibrationError(f"--audit: {settings.audit} audited items need a larger calibration split (n={n_cal})")
        audit_index = np.sort(np.random.default_rng(settings.seed).choice(n_cal, settings.audit, replace=False))
    audit_labels = None if y_cal_clean is None else y_cal_clean[audit_index]

    # OOD: bank on the training features, gate on the held-out calibration scores (no labels involved)
    f_tr, z_tr = features_and_logits(net, x_tr, device)
    scorer = build_ood_scorer(settings.ood_scorer, **settings.ood_params).fit(
        f_tr, z_tr, torch.as_tensor(y_tr, device=device), head=(net.head.weight.detach(), net.head.bias.detach()))
    f_cal, z_cal = features_and_logits(net, x_cal, device)
    gate = OODGate(scorer.score(f_cal, z_cal), alpha_ood=settings.ood_alpha)

    probs_cal = torch.softmax(z_cal, dim=1)
    probs_np = probs_cal.double().cpu().numpy()
    pred_cal = probs_np.argmax(1)

    noise, eps_lower, assumptions = _noise_rate(settings, dataset, pred_cal, y_cal, audit_index, audit_labels, probs_np)
    eps_uniform = flip_rate_to_uniform(eps_lower, k)

    # MAPIE's convention: randomized scores at calibration, include-last-label sets at serving, so that
    # at eps = 0 our sets are exactly MAPIE's SplitConformalClassifier sets.
    convention = MAPIE_CONVENTION[settings.score]
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    calibration_params = {**convention["calibration"], **({"generator": generator} if convention["calibration"] else {})}
    scores = CONFORMITY_SCORES[settings.score](probs_cal.double(), **calibration_params).cpu().numpy()
    if len(audit_index):
        threshold = audit_rectified_threshold(scores, y_cal, audit_index, audit_labels, settings.alpha,
                                              conditional=settings.conformal == "finite-sample")
        assumptions.append(f"prediction sets: audit-rectified threshold from {len(audit_index)} audited items "
                           "(no noise model assumed)")
    else:
        threshold = nacp_threshold(scores, y_cal, settings.alpha, eps_uniform,
                                   delta=settings.delta if settings.conformal == "finite-sample" else None)
        assumptions.append(f"prediction sets: NACP assumes uniform label noise at rate eps={eps_uniform:.4f} "
                           "(uniform convention) on the calibration labels; non-uniform (instance-dependent) noise "
                           "can make the sets under-cover: audit some labels (--audit) to remove the assumption")

    # Confidence function tuned on the validation split; certification on the calibration split.
    f_val, z_val = features_and_logits(net, x_val, device)
    p = select_pnorm(z_val, (z_val.argmax(1).cpu().numpy() == y_val))
    confidence_name, confidence_params = ("msp", {}) if p is None else ("maxlogit_pnorm", {"p": int(p)})
    conf_cal = confidence_fn(z_cal, confidence_name, **confidence_params).double().cpu().numpy()
    if len(audit_index):
        errors = pred_cal[audit_index] != audit_labels
        cert_conf, noise_eps = conf_cal[audit_index], None
        assumptions.append(f"abstention: certified on {len(audit_index)} audited (trusted) labels")
    else:
        errors = pred_cal != y_cal
        cert_conf = conf_cal
        correction = settings.risk_correction
        if correction == "auto":
            correction = "symmetric" if noise.get("method") == "known" and noise.get("kind") == "symmetric" else "none"
        noise_eps = eps_uniform if correction == "symmetric" and eps_lower > 0 else None
        assumptions.append(
            "abstention: certified on noisy labels with the symmetric-noise correction at "
            f"eps={eps_uniform:.4f} (valid only if the noise is symmetric)" if noise_eps is not None else
            "abstention: certified on noisy labels without correction (conservative: noisy labels over-estimate risk)")
    min_accepted = min_accepted_for(len(cert_conf), settings.risk, settings.risk_delta)
    certified = certify_threshold(cert_conf, errors, settings.risk, settings.risk_delta, min_accepted=min_accepted,
                                  noise_eps=noise_eps, num_classes=k if noise_eps is not None else None)

    return Calibration(
        class_names=list(dataset.class_names), ood_scorer=scorer, ood_gate=gate,
        conformity_score=settings.score, conformity_params=dict(convention["serving"]), threshold=threshold,
        noise=noise,
        confidence_name=confidence_name, confidence_params=confidence_params, certified=certified,
        cl_thresholds=[float(t) for t in per_class_thresholds(probs_np, y_cal, k)],
        settings={**settings.__dict__, "n_calibration": n_cal, "n_audited": int(len(audit_index)),
                  "min_accepted": min_accepted},
        assumptions=assumptions,
    )


def min_accepted_for(n: int, risk: float, delta: float) -> int:
    """Where the fixed-sequence test starts: the first grid point with at least this many accepted items.

    A first test point that fails by chance ends the sequence with nothing certified, and the first
    points are the weakest: with noisy labels even the most confident items show an error floor near
    the noise rate, and on clean labels a single early error among a few dozen items fails the test.
    Starting at half of the certification data, fixed before looking at it, avoids that; never below
    the n at which zero errors can certify, (1 - r*)^n <= delta. Validity does not depend on this
    choice (it only removes a prefix of the sequence), only power does. On the demo model with noisy
    labels (benchmarks/selective.py, 200 splits) starting at n/4, n/3 and n/2 certified in 38%, 54% and
    65% of splits (mean accepted share 0.27, 0.40, 0.53), with clean labels 100% (0.92) for all three.
    """
    zero_error_n = math.ceil(math.log(delta) / math.log(1.0 - risk))
    return max(zero_error_n, n // 2)


def _noise_rate(settings, dataset, pred_cal, y_cal, audit_index, audit_labels, probs_np):
    """The calibration labels' noise rate: ``(record, flip-rate lower bound, assumptions)``."""
    k = dataset.num_classes
    if settings.noise_rate != "auto":
        rate = float(settings.noise_rate)
        return ({"method": "given", "flip_rate": rate, "lower": rate, "upper": rate, "convention": "flip"},
                rate, [f"calibration labels: flip noise rate {rate} given by the user"])
    if len(audit_index):
        ordinary = np.setdiff1d(np.arange(len(y_cal)), audit_index)
        est = noise_rate_from_audit(pred_cal[audit_index], audit_labels, pred_cal[ordinary], y_cal[ordinary], k)
        return est.flip_record(), est.flip_interval[0], [f"calibration labels: noise rate estimated from "
                                                             f"{len(audit_index)} audited items"]
    spec = dataset.lineage.get("noise", "none")
    kind, _, rate_text = spec.partition(":")
    if kind != "none" or dataset.name in BUILTIN_DATASETS:  # user labels without injection: rate unknown
        rate = float(rate_text or 0.0)
        note = [f"calibration labels: noise {spec} known by construction (synthetic injection)"]
        if kind in ("pair", "instance"):
            note.append(f"calibration labels: {kind} noise is not uniform, so NACP's noise model is wrong here")
        return ({"method": "known", "kind": kind, "flip_rate": rate, "lower": rate, "upper": rate,
                 "convention": "flip"}, rate, note)
    est = noise_rate_confident_learning(y_cal, probs_np)
    return (est.flip_record(), est.flip_interval[0],
            ["calibration labels: noise rate from the confident-learning heuristic (no audit, not known)"])

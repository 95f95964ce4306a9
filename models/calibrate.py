"""Fit everything a served prediction needs besides the weights: the :class:`Calibration`.

One calibration = an OOD scorer fitted on the training features with a conformal gate over held-out
calibration scores, a conformal threshold, a certified abstention threshold with its certified
risk-coverage frontier, and the per-class confident-learning thresholds used to flag suspicious feedback.
It is stored as ``calibration.json`` (validated fields) + ``calibration.safetensors`` (tensors) beside the
weights.

A guarantee is stated only when its assumption is checked, and each one says its kind
(:data:`GUARANTEE_KINDS`): ``valid`` (the assumption is removed by trusted labels or known by construction),
``conservative`` (valid under a stated noise condition that nothing checked) or ``none``.

Which labels are used where:

- OOD bank: features of the train split (no labels). OOD gate: scores of the calibration split.
- Confidence function (MSP or MaxLogit-pNorm): chosen on the validation split (noisy labels; tuning
  needs no guarantee and keeps the calibration split whole for certification).
- Conformal threshold, in order of trust: the audit-rectified threshold when some calibration items carry
  trusted labels (valid); NACP where its uniform noise model holds by construction (symmetric injection) or
  the user asserts it with a rate (``--noise-model uniform``); otherwise plain split conformal on the
  observed labels, conservative when label errors are dispersive. NACP with an estimated or wrong noise model
  under-covers badly on human annotation noise, so it is never the default for labels of unknown origin.
- Certified abstention: on audited labels when they exist (valid); with the symmetric-noise correction when
  the noise is symmetric by construction; with the worst-case bound (every wrong label a hidden error) when
  only the rate is known; otherwise on the observed labels, stated as valid only when label errors do not
  agree with the model's mistakes.
- Noise rates are flip rates (share of wrong labels), one convention per record; a heuristic estimate is
  shown but never feeds a guarantee.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# The document checks live in a module without torch: the server's pre-start check runs them too.
from noisewise.models.calibration_doc import (  # noqa: F401 - CALIBRATION_FORMAT, GUARANTEE_KINDS: part of the API
    CALIBRATION_FORMAT,
    GUARANTEE_KINDS,
    CalibrationError,
)
from noisewise.models.calibration_doc import check_document as _check_document
from noisewise.models.choices import OOD_INDEXES
from noisewise.models.data import BUILTIN_DATASETS, Dataset
from noisewise.models.uncertainty.conformal import (
    CONFORMITY_SCORES,
    MAPIE_CONVENTION,
    ConformalThreshold,
    audit_rectified_threshold,
    nacp_threshold,
    split_threshold,
)
from noisewise.models.uncertainty.labelnoise import (
    flip_rate_to_uniform,
    noise_rate_confident_learning,
    noise_rate_direct,
    per_class_thresholds,
)
from noisewise.models.uncertainty.selective import (
    CertifiedThreshold,
    FrontierPoint,
    certified_frontier,
    certify_threshold,
    frontier_sentence,
    select_pnorm,
    wrong_label_bound,
)
from noisewise.models.uncertainty.selective import confidence as confidence_fn

log = logging.getLogger(__name__)

# torch, safetensors.torch, the networks and the OOD scorers are imported by the functions that use them: reading
# a calibration's document (`Calibration.load(..., tensors=False)`, what `noisewise monitor` needs) loads none.
if TYPE_CHECKING:
    import torch

    from noisewise.models.nets import Classifier
    from noisewise.models.uncertainty.ood import OODGate, OODScorer

CONFORMAL_MODES = ("plugin", "finite-sample")
RISK_CORRECTIONS = ("auto", "none", "symmetric", "worst-case")
NOISE_MODELS = ("auto", "uniform")

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
    #: part (prediction_set, abstention, ood) -> {"kind": one of GUARANTEE_KINDS, "condition": plain words}
    guarantees: dict = field(default_factory=dict)
    #: the certified risk-coverage frontier (FrontierPoint dicts), every row valid at once
    frontier: list = field(default_factory=list)

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
        kinds = {part: self.guarantees.get(part) or _UNRECORDED for part in ("prediction_set", "abstention", "ood")}
        return {
            "prediction_set": {
                "kind": kinds["prediction_set"]["kind"], "condition": kinds["prediction_set"]["condition"],
                "target_coverage": 1 - t.alpha, "alpha": t.alpha, "method": t.method, "score": self.conformity_score,
                "q": t.q, "tau": t.tau, "n": t.n, "eps": t.eps, "delta": t.delta, "Delta": t.Delta,
                "full_sets": t.full_sets, "note": t.note,
            },
            "abstention": {
                "kind": kinds["abstention"]["kind"], "condition": kinds["abstention"]["condition"],
                "risk_target": c.risk, "delta": c.delta, "certified": c.certified, "threshold": c.threshold,
                "risk_ucb": c.risk_ucb, "coverage": c.coverage, "confidence": self.confidence_name,
                "confidence_params": self.confidence_params, "noise_correction_eps": c.noise_eps, "reason": c.reason,
                "frontier": self.frontier,
                # what the frontier allows, said when r* itself could not be certified
                "can_certify": frontier_sentence([FrontierPoint.from_dict(p) for p in self.frontier], c.risk)
                if self.frontier and not c.certified else None,
            },
            "ood": {"kind": kinds["ood"]["kind"], "condition": kinds["ood"]["condition"],
                    "scorer": self.ood_scorer.name, "alpha_ood": self.ood_gate.alpha_ood, "n_calibration": self.ood_gate.n},
            "noise": self.noise,
            "assumptions": self.assumptions,
        }

    # --- storage: JSON + safetensors, never pickle -------------------------------------------------
    def save(self, directory: Path) -> list[Path]:
        from safetensors.torch import save_file

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
            "guarantees": self.guarantees,
            "frontier": self.frontier,
        }
        json_path, tensor_path = directory / "calibration.json", directory / "calibration.safetensors"
        json_path.write_text(json.dumps(document, indent=2, default=_json_default))
        save_file(tensors, str(tensor_path))
        return [json_path, tensor_path]

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu", *, tensors: bool = True) -> "Calibration":
        """Read ``calibration.json`` and ``calibration.safetensors`` from ``directory``, with every check.

        ``tensors=False`` reads the document alone (its checks included): ``ood_scorer`` and ``ood_gate`` are
        None, so the result describes the calibration (classes, thresholds, targets, noise) but cannot score
        inputs. :class:`CalibrationError` names what is missing or malformed.
        """
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
        if not tensors:
            return cls._from_document(doc, None, None)
        from safetensors.torch import load_file

        from noisewise.models.uncertainty.ood import OODGate, OODScorer

        try:
            state = load_file(str(tensor_path), device=str(device))
        except Exception as err:  # safetensors raises its own types for truncated/tampered files
            raise CalibrationError(f"cannot read {tensor_path.name}: {err}") from None
        try:
            scorer = OODScorer.from_state(doc["ood_scorer"], _prefixed(state, "ood_scorer."))
            gate = OODGate.from_state(doc["ood_gate"], _prefixed(state, "ood_gate."))
            threshold = ConformalThreshold.from_dict(doc["threshold"])
            certified = CertifiedThreshold.from_dict(doc["certified"])
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"calibration artifacts are inconsistent: {err}") from None
        _check_document(doc, threshold, certified)
        _check_ood_state(scorer, len(doc["class_names"]))
        return cls._from_document(doc, scorer.to(device), gate.to(device), threshold, certified)

    @classmethod
    def _from_document(cls, doc: dict, scorer: OODScorer | None, gate: OODGate | None,
                       threshold: ConformalThreshold | None = None,
                       certified: CertifiedThreshold | None = None) -> "Calibration":
        if threshold is None or certified is None:  # the document alone: parse and check it here
            try:
                threshold = ConformalThreshold.from_dict(doc["threshold"])
                certified = CertifiedThreshold.from_dict(doc["certified"])
            except (KeyError, TypeError, ValueError) as err:
                raise CalibrationError(f"calibration artifacts are inconsistent: {err}") from None
            _check_document(doc, threshold, certified)
        return cls(
            class_names=list(doc["class_names"]), ood_scorer=scorer, ood_gate=gate,
            conformity_score=doc["conformity_score"], conformity_params=dict(doc.get("conformity_params") or {}),
            threshold=threshold, noise=dict(doc.get("noise") or {}), confidence_name=doc["confidence_name"],
            confidence_params=dict(doc.get("confidence_params") or {}), certified=certified,
            cl_thresholds=[float(t) for t in doc["cl_thresholds"]], settings=dict(doc.get("settings") or {}),
            assumptions=list(doc.get("assumptions") or []), guarantees=dict(doc.get("guarantees") or {}),
            frontier=list(doc.get("frontier") or []),
        )


_UNRECORDED = {"kind": "none", "condition": "calibrated before guarantee kinds were recorded: recalibrate to state one"}


def _check_ood_state(scorer: OODScorer, num_classes: int) -> None:
    """The fitted OOD scorer against its tensors: finite state, ``k`` at most the bank size of the KNN scorer,
    and the recorded sizes (``bank_size``, ``feature_dim``) equal to the tensors' (a mismatch would fail or
    score nonsense at the first request)."""
    import torch

    def fail(message: str):
        raise CalibrationError(f"calibration.json: ood_scorer: {message}")

    state, meta = scorer.state_dict(), scorer.config()
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            fail(f"calibration.safetensors holds NaN or inf in {key!r}")
    if "bank" in state:
        bank = state["bank"]
        if bank.ndim != 2 or bank.shape[0] == 0:
            fail(f"the KNN bank must be a non-empty [N, D] tensor, got shape {list(bank.shape)}")
        if "bank_size" in meta and meta["bank_size"] != bank.shape[0]:
            fail(f"bank_size={meta['bank_size']!r} but the bank holds {bank.shape[0]} rows")
        _check_knn_bank(scorer, meta, state, fail)
    # the axis of each fitted tensor that runs over the feature dimension D
    feature_axes = {"bank": 1, "list_centroids": 1, "means": 1, "cholesky": 0, "origin": 0, "residual_basis": 0,
                    "weight": 1}
    dims = {key: state[key].shape[axis] for key, axis in feature_axes.items()
            if key in state and state[key].ndim > axis}
    if "feature_dim" in meta and any(d != meta["feature_dim"] for d in dims.values()):
        fail(f"feature_dim={meta['feature_dim']!r} does not match the fitted tensors ({dims})")
    if "weight" in state and (state["weight"].shape[0] != num_classes or state["bias"].shape != (num_classes,)):
        fail(f"the head in the state must have {num_classes} rows (one per class), got weight "
             f"{list(state['weight'].shape)} and bias {list(state['bias'].shape)}")


def _check_knn_bank(scorer: OODScorer, meta: dict, state: dict, fail) -> None:
    """The KNN bank against the index it records: an exact or ivf bank holds every training row, a reduced
    one at most ``budget`` rows, a subsample reads a neighbour rank ``k_used`` it holds, k-means cluster sizes
    are one positive count per centroid summing to the training rows (at least ``k``), and ivf lists are
    non-empty, consecutive and cover the bank."""
    rows = state["bank"].shape[0]
    index = meta.get("index_used", "exact")
    if index not in ("exact", "subsample", "kmeans", "ivf"):
        fail(f"index_used must be exact, subsample, kmeans or ivf, got {index!r}")
    source = meta.get("source_rows", rows)
    if isinstance(source, bool) or not isinstance(source, int) or source < rows:
        fail(f"source_rows={source!r} must be a whole number >= the bank size ({rows} rows)")
    budget = getattr(scorer, "budget", None)
    if index in ("exact", "ivf") and source != rows:
        fail(f"an {index} bank holds every training row, but source_rows={source} and the bank holds {rows}")
    if index in ("subsample", "kmeans") and budget is not None and rows > budget:
        fail(f"a {index} bank holds at most params.budget={budget} rows, got {rows}")
    k = getattr(scorer, "k", None)
    if k is not None and k > source:
        fail(f"params.k={k} exceeds the bank size ({source} training features)")
    if index == "subsample":
        k_used = meta.get("k_used")
        if isinstance(k_used, bool) or not isinstance(k_used, int) or not 1 <= k_used <= rows:
            fail(f"k_used={k_used!r} must be a whole number in [1, {rows}] (the rows of the subsample)")
    counts = state.get("bank_counts")
    if (index == "kmeans") != (counts is not None):
        fail(f"bank_counts (cluster sizes) belong to a kmeans bank exactly; index_used is {index!r}")
    if counts is not None and (counts.shape != (rows,) or counts.is_floating_point() or bool((counts < 1).any())
                               or int(counts.sum()) != source):
        fail(f"bank_counts must hold one positive whole count per bank row ({rows}) summing to source_rows "
             f"({source})")
    _check_ivf_lists(meta, state, index == "ivf", fail)


def _check_ivf_lists(meta: dict, state: dict, is_ivf: bool, fail) -> None:
    centroids, offsets = state.get("list_centroids"), state.get("list_offsets")
    if is_ivf != (centroids is not None) or is_ivf != (offsets is not None):
        fail(f"list_centroids and list_offsets belong to an ivf bank exactly; index_used is "
             f"{meta.get('index_used', 'exact')!r}")
    if not is_ivf:
        return
    lists, rows = centroids.shape[0] if centroids.ndim == 2 else -1, state["bank"].shape[0]
    if (offsets.shape != (lists + 1,) or offsets.is_floating_point() or int(offsets[0]) != 0
            or int(offsets[-1]) != rows or bool((offsets[1:] <= offsets[:-1]).any())):
        fail(f"list_offsets must be {lists + 1} increasing whole numbers from 0 to the bank size ({rows}), one "
             f"list per row of list_centroids {list(centroids.shape)}")
    probes = meta.get("probes")
    if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= lists:
        fail(f"probes={probes!r} must be a whole number in [1, {lists}] (the lists of the bank)")
    rows = meta.get("probe_rows")  # absent or null: every query scores exactly `probes` lists
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        fail(f"probe_rows={rows!r} must be a positive whole number of rows, or null")


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@dataclass(frozen=True)
class CalibrationSettings:
    """User-facing knobs of `noisewise calibrate` (flip-rate convention for ``noise_rate``).

    ``noise_model``: ``auto`` uses NACP's uniform noise model only where it holds by construction
    (synthetic symmetric injection); ``uniform`` asserts it for the user's labels (needs a rate that
    is not a heuristic). ``noise_rate``: a flip rate the user vouches for, or ``auto``.
    """

    noise_rate: float | str = "auto"
    noise_model: str = "auto"
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
    #: the KNN bank (``noisewise.models.uncertainty.ood.KNN_INDEXES``): ``auto`` keeps every training row up
    #: to ``OOD_BANK_BUDGET`` rows and an inverted file (ivf) above, so serving cost stops growing with the
    #: training set
    ood_index: str = "auto"
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
        if self.noise_model not in NOISE_MODELS:
            raise CalibrationError(f"--noise-model: expected one of {NOISE_MODELS}, got {self.noise_model!r}")
        if self.audit < 0:
            raise CalibrationError(f"--audit: must be >= 0, got {self.audit}")
        if self.conformal not in CONFORMAL_MODES:
            raise CalibrationError(f"--conformal: expected one of {CONFORMAL_MODES}, got {self.conformal!r}")
        if self.risk_correction not in RISK_CORRECTIONS:
            raise CalibrationError(f"--risk-correction: expected one of {RISK_CORRECTIONS}, got {self.risk_correction!r}")
        if self.ood_index not in OOD_INDEXES:  # the names of ood.KNN_INDEXES (a test holds them equal)
            raise CalibrationError(f"--ood-index: expected one of {', '.join(OOD_INDEXES)}, got {self.ood_index!r}")
        if self.ood_index not in ("exact", "auto") and self.ood_scorer != "knn":
            raise CalibrationError(f"--ood-index {self.ood_index}: a reduced bank applies to the knn scorer only, "
                                   f"not to --ood-scorer {self.ood_scorer}")
        if self.score not in CONFORMITY_SCORES:
            raise CalibrationError(f"--score: expected one of {', '.join(CONFORMITY_SCORES)}, got {self.score!r}")


def features_and_logits(net: Classifier, x: np.ndarray | torch.Tensor, device: torch.device,
                        batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``[N, D]`` and logits ``[N, K]`` in eval mode, on ``device``."""
    import torch

    net.eval()
    x = torch.as_tensor(x)
    feats, logits = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            f = net.forward_features(x[start : start + batch_size].to(device))
            feats.append(f)
            logits.append(net.forward_head(f))
        return torch.cat(feats), torch.cat(logits)


def fit_calibration(net: Classifier, dataset: Dataset, settings: CalibrationSettings,
                    device: torch.device | str = "cpu", base: Calibration | None = None) -> Calibration:
    """Fit a :class:`Calibration` for ``net`` on ``dataset`` (see the module docstring).

    With ``base`` (an existing calibration of the same network), its OOD bank and confidence function are
    kept and only the ``cal`` split is used: this is how a version is calibrated on other labelled data.
    """
    import torch

    from noisewise.models.uncertainty.ood import OODGate, build_ood_scorer

    settings.check()
    device = torch.device(device)
    net = net.to(device).eval()
    x_cal, y_cal, _ = dataset.split("cal")
    n_cal = len(y_cal)
    if n_cal == 0:
        raise CalibrationError("the calibration split is empty")
    audit_index, audit_labels, audit_note = _audit(settings, dataset)
    knowledge = noise_knowledge(settings, dataset)

    # OOD: bank on the training features, gate on the held-out calibration scores (no labels involved)
    if base is None:
        scorer = build_ood_scorer(settings.ood_scorer, **_ood_params(settings))
        head = _ood_head(net, scorer)  # before any forward pass: a scorer the model cannot feed fails at once
        x_tr, y_tr, _ = dataset.split("train")
        f_tr, z_tr = features_and_logits(net, x_tr, device)
        # a large knn bank takes minutes to file into lists: say so before, and how long it took after
        log.info("fitting the %s OOD scorer on %d training items", scorer.name, len(y_tr))
        started = time.perf_counter()
        scorer.fit(f_tr, z_tr, torch.as_tensor(y_tr, device=device), head=head)
        log.info("OOD scorer fitted in %.1f s (bank: %s)", time.perf_counter() - started,
                 scorer.config().get("index_used", "none"))
    else:
        scorer = base.ood_scorer.to(device)
    f_cal, z_cal = features_and_logits(net, x_cal, device)
    gate = OODGate(scorer.score(f_cal, z_cal), alpha_ood=settings.ood_alpha)

    if base is None:
        # Confidence function tuned on the validation split; certification on the calibration split.
        x_val, y_val, _ = dataset.split("val")
        _, z_val = features_and_logits(net, x_val, device)
        p = select_pnorm(z_val, (z_val.argmax(1).cpu().numpy() == y_val))
        confidence_name, confidence_params = ("msp", {}) if p is None else ("maxlogit_pnorm", {"p": int(p)})
    else:
        confidence_name, confidence_params = base.confidence_name, dict(base.confidence_params)
    conf_cal = confidence_fn(z_cal, confidence_name, **confidence_params).double().cpu().numpy()
    ood_guarantee = _ood_guarantee(net, scorer)
    return assemble_calibration(
        settings, knowledge, class_names=list(dataset.class_names), scorer=scorer, gate=gate,
        probs_cal=torch.softmax(z_cal, dim=1), conf_cal=conf_cal, y_cal=y_cal, audit_index=audit_index,
        audit_labels=audit_labels, confidence_name=confidence_name, confidence_params=confidence_params,
        ood_guarantee=ood_guarantee, notes=audit_note,
        ood_note=ood_guarantee["condition"] if getattr(net, "logits_only", False) else None)


def assemble_calibration(settings: CalibrationSettings, knowledge: NoiseKnowledge, *, class_names: list[str],
                         scorer: OODScorer, gate: OODGate, probs_cal: torch.Tensor, conf_cal: np.ndarray,
                         y_cal: np.ndarray, audit_index: np.ndarray, audit_labels: np.ndarray,
                         confidence_name: str, confidence_params: dict, ood_guarantee: dict,
                         notes: list[str] = (), ood_note: str | None = None,
                         extra_settings: dict | None = None) -> Calibration:
    """The calibration-split half of :func:`fit_calibration`, on arrays: noise record, conformal threshold,
    certified abstention and frontier, guarantees and assumptions, assembled into a :class:`Calibration`.

    Shared by :func:`fit_calibration` and the array API (``noisewise.models.arrays``), so both state the same
    guarantees for the same outputs.

    Parameters
    ----------
    probs_cal : Tensor [n, K]
        Class probabilities of the calibration items.
    conf_cal : float array [n]
        Their confidences (the served confidence function).
    y_cal : int array [n]
        Observed labels. ``audit_index``, ``audit_labels``: int arrays [m], audited rows and trusted labels.
    notes : list of str
        Assumption lines that come first (e.g. where the audit came from).
    ood_note : str, optional
        An OOD statement to add to the assumptions (e.g. that a model is logits-only).
    """
    k = len(class_names)
    probs_np = probs_cal.double().cpu().numpy()
    pred_cal = probs_np.argmax(1)
    noise, assumptions = noise_record(settings, knowledge, y_cal, audit_index, audit_labels, probs_np, k)
    assumptions = list(notes) + assumptions

    import torch

    # MAPIE's convention: randomized scores at calibration, include-last-label sets at serving, so that
    # at eps = 0 our sets are exactly MAPIE's SplitConformalClassifier sets.
    convention = MAPIE_CONVENTION[settings.score]
    generator = torch.Generator(device=probs_cal.device).manual_seed(settings.seed)
    calibration_params = {**convention["calibration"], **({"generator": generator} if convention["calibration"] else {})}
    scores = CONFORMITY_SCORES[settings.score](probs_cal.double(), **calibration_params).cpu().numpy()
    threshold, set_guarantee = fit_set_threshold(settings, knowledge, scores, y_cal, audit_index, audit_labels, k)
    certified, frontier, abstention_guarantee, min_accepted = fit_abstention(
        settings, knowledge, conf_cal, pred_cal, y_cal, audit_index, audit_labels, k)

    guarantees = {"prediction_set": set_guarantee, "abstention": abstention_guarantee, "ood": ood_guarantee}
    assumptions += [f"{part.replace('_', ' ')}: {g['kind']}: {g['condition']}" for part, g in guarantees.items()
                    if part != "ood"]
    if ood_note:
        assumptions.append(f"ood: {ood_note}")
    if not certified.certified:
        assumptions.append("abstention: " + frontier_sentence(frontier, settings.risk))
    return Calibration(
        class_names=list(class_names), ood_scorer=scorer, ood_gate=gate,
        conformity_score=settings.score, conformity_params=dict(convention["serving"]), threshold=threshold,
        noise=noise,
        confidence_name=confidence_name, confidence_params=confidence_params, certified=certified,
        cl_thresholds=[float(t) for t in per_class_thresholds(probs_np, y_cal, k)],
        settings={**settings.__dict__, "n_calibration": len(y_cal), "n_audited": int(len(audit_index)),
                  "min_accepted": min_accepted, **(extra_settings or {})},
        assumptions=assumptions, guarantees=guarantees, frontier=[point.to_dict() for point in frontier],
    )


#: Most rows of the KNN bank that ``--ood-index auto`` keeps whole, above which it builds an ivf bank (and the
#: rows of a subsample or k-means bank). Chosen by measurement (docs/ood.md, docs/overhead.md): an exact scan of
#: 10,000 rows costs a ResNet-18 on one CPU 1.25x the bare forward at batch 1; an ivf bank scores about 1,250
#: rows per query and stays within 0.003 AUROC of the exact bank from 20,000 to 1,000,000 rows of real features.
OOD_BANK_BUDGET = 10000


def _ood_params(settings: CalibrationSettings) -> dict:
    """The scorer's parameters: ``ood_params`` plus, for knn, the bank index of ``--ood-index`` (a
    ``budget`` or ``index`` given in ``ood_params`` wins)."""
    if settings.ood_scorer != "knn":
        return dict(settings.ood_params)
    return {"index": settings.ood_index, "budget": OOD_BANK_BUDGET, "seed": settings.seed, **settings.ood_params}


def _logit_scorers() -> list[str]:
    from noisewise.models.uncertainty.ood import OOD_SCORERS

    return sorted(name for name, cls in OOD_SCORERS.items() if "features" not in cls.uses and not cls.requires_fit)


def _ood_head(net: Classifier, scorer: OODScorer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The final linear layer ``(weight [K, D], bias [K])`` for the scorers that need it (ViM, ReAct), or None.

    A network that exposes no features (``logits_only``, an imported model without ``forward_features``) gets
    only the logit scorers; one whose head is not a linear layer (``linear_head()`` says None) cannot use ViM or
    ReAct, which assume ``z = W f + b``.
    """
    if getattr(net, "logits_only", False) and (scorer.requires_fit or "features" in scorer.uses):
        raise CalibrationError(f"--ood-scorer {scorer.name}: this model is logits-only (it exposes no penultimate "
                               "features), so feature-space scorers are not available; use one of "
                               f"{', '.join(_logit_scorers())}")
    linear_head = getattr(net, "linear_head", None)
    if callable(linear_head):
        head = linear_head()
    else:
        import torch

        layer = getattr(net, "head", None)
        head = (layer.weight.detach(), layer.bias.detach()) if isinstance(layer, torch.nn.Linear) else None
    if scorer.needs_head and head is None:
        raise CalibrationError(f"--ood-scorer {scorer.name} needs the network's final linear layer (logits = W f + b), "
                               "which this model does not expose; use knn or mahalanobis (features) or one of "
                               f"{', '.join(_logit_scorers())}")
    return head


def _ood_guarantee(net: Classifier, scorer: OODScorer) -> dict:
    """The OOD gate's guarantee: it holds for any scorer; a logits-only model says which score it rests on."""
    exchangeable = ("served in-distribution inputs are exchangeable with the calibration inputs (no labels involved, "
                    "so label noise cannot bias it)")
    if not getattr(net, "logits_only", False):
        return {"kind": "valid", "condition": exchangeable}
    return {"kind": "valid", "condition": f"{scorer.name} score of the logits: this model is logits-only (no features "
            "available), so feature-space scorers (knn, mahalanobis, vim, react) cannot be used and, under label "
            "noise, a logit score tells OOD inputs apart less well (the false-OOD rate bound still holds); "
            + exchangeable}


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


@dataclass(frozen=True)
class NoiseKnowledge:
    """What is known about the calibration labels' noise before looking at them.

    ``source``: ``known`` (injected by noisewise, or clean built-in data), ``given`` (``--noise-rate``) or
    ``unknown``. ``kind``: the injected kind (``none``, ``symmetric``, ``pair``, ``instance``, ``confusion``),
    ``uniform`` when the user asserted it, else ``unknown``. ``flip_rate``: None when unknown.
    """

    source: str
    kind: str
    flip_rate: float | None

    @property
    def clean(self) -> bool:
        return self.source == "known" and self.flip_rate == 0.0

    @property
    def uniform(self) -> bool:
        """NACP's noise model holds: symmetric injection, or the user said so."""
        return self.kind in ("symmetric", "uniform") and bool(self.flip_rate)


def noise_knowledge(settings: CalibrationSettings, dataset: Dataset) -> NoiseKnowledge:
    spec = dataset.lineage.get("noise", "none")
    kind, _, rate_text = spec.partition(":")
    rate = float(rate_text or 0.0)
    if settings.noise_rate != "auto":
        return NoiseKnowledge("given", "uniform" if settings.noise_model == "uniform" else "unknown",
                              float(settings.noise_rate))
    if kind != "none" and rate > 0:
        return NoiseKnowledge("known", kind, rate)
    if dataset.name in BUILTIN_DATASETS:  # labels that ship with the package, no injection: clean
        return NoiseKnowledge("known", "none", 0.0)
    return NoiseKnowledge("unknown", "uniform" if settings.noise_model == "uniform" else "unknown", None)


def _audit(settings: CalibrationSettings, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Audited calibration items: ``(positions in the cal split, trusted labels, assumption lines)``.

    ``--audit N`` draws N items whose reference label (``y_clean``) is known; otherwise the trusted labels the
    dataset carries for part of its items (a partial ``y_clean`` or a trusted-labels file) are the audit.
    """
    _, _, y_cal_clean = dataset.split("cal")
    if settings.audit:
        if y_cal_clean is None:
            raise CalibrationError("--audit needs trusted labels: the dataset has no y_clean")
        known = np.flatnonzero(y_cal_clean >= 0)
        if settings.audit > len(known) or settings.audit >= len(y_cal_clean):
            raise CalibrationError(f"--audit: {settings.audit} audited items need a larger calibration split "
                                   f"({len(known)} of {len(y_cal_clean)} calibration items have a trusted label)")
        index = np.sort(np.random.default_rng(settings.seed).choice(known, settings.audit, replace=False))
        return index, y_cal_clean[index], [f"audit: {settings.audit} calibration items drawn at random and "
                                           "given their trusted labels (--audit)"]
    if dataset.trusted is not None:
        index, labels = dataset.trusted_split("cal")
        if len(index):
            return (np.asarray(index, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                    [f"audit: {len(index)} calibration items carry trusted labels from the data; they are assumed "
                     "to be a random sample of the calibration items"])
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), []


def noise_record(settings, knowledge: NoiseKnowledge, y_cal, audit_index, audit_labels, probs_np, k):
    """The calibration labels' noise rate as one flip-convention record, and what it rests on."""
    if knowledge.source == "given":
        r = knowledge.flip_rate
        return ({"method": "given", "flip_rate": r, "lower": r, "upper": r, "convention": "flip",
                 "heuristic": False}, [f"calibration labels: flip rate {r} given by the user (--noise-rate)"])
    if len(audit_index):
        est = noise_rate_direct(y_cal[audit_index], audit_labels, k)
        return est.to_dict(), [f"calibration labels: flip rate {est.flip_rate:.3f} [{est.lower:.3f}, {est.upper:.3f}] "
                               f"counted on {len(audit_index)} audited items (share of observed labels that differ "
                               "from the trusted ones, Clopper-Pearson interval)"]
    if knowledge.source == "known":
        r = knowledge.flip_rate
        notes = [f"calibration labels: noise {knowledge.kind}:{r:g} known by construction (synthetic injection)"
                 if r else "calibration labels: clean (built-in data, no noise injected)"]
        return ({"method": "known", "kind": knowledge.kind, "flip_rate": r, "lower": r, "upper": r,
                 "convention": "flip", "heuristic": False}, notes)
    est = noise_rate_confident_learning(y_cal, probs_np)
    return ({**est.to_dict(), "used_for_guarantees": False},
            [f"calibration labels: noise rate unknown; the confident-learning heuristic says {est.flip_rate:.3f} "
             "(it counts the model's own mistakes as label noise, so it is shown, never used in a guarantee)"])


_DISPERSIVE = ("the sets cover the observed labels; they cover the true label at least as often if label errors are "
               "dispersive (spread over classes that score no better than the true one). Where annotators err "
               "towards the classes the model confuses they can fall short by about a point: audit some labels "
               "(noisewise audit) to make the guarantee valid")
_AGREEING = ("certified on observed labels: valid only if label errors do not agree with the model's mistakes (for "
             "example uniform noise). Where annotators err on the items the model also finds ambiguous, the model "
             "agrees with the wrong labels and the certified risk is too low: audit some labels (noisewise audit) "
             "to make it valid")


def fit_set_threshold(settings: CalibrationSettings, knowledge: NoiseKnowledge, scores: np.ndarray,
                      y_cal: np.ndarray, audit_index: np.ndarray, audit_labels: np.ndarray,
                      k: int) -> tuple[ConformalThreshold, dict]:
    """The conformal threshold and the kind of its guarantee (see :data:`GUARANTEE_KINDS`).

    Parameters
    ----------
    settings : CalibrationSettings
    knowledge : NoiseKnowledge
        From :func:`noise_knowledge`.
    scores : array [n, K]
        Calibration-phase conformity scores of every label of every calibration item.
    y_cal : int array [n]
        Observed labels.
    audit_index, audit_labels : int arrays [m]
        Audited rows of ``scores`` and their trusted labels (empty: no audit).
    k : int
        Number of classes.

    Returns
    -------
    (ConformalThreshold, {"kind": ..., "condition": ...})
    """
    finite = settings.conformal == "finite-sample"
    form = "with probability >= 1 - delta over the calibration draw" if finite else "on average over calibration draws"
    if len(audit_index):
        threshold = audit_rectified_threshold(scores, y_cal, audit_index, audit_labels, settings.alpha,
                                              conditional=finite)
        return threshold, {"kind": "valid", "condition": f"coverage of the true label {form}, corrected by "
                           f"{len(audit_index)} audited items (a random sample of the calibration items); no noise "
                           "model assumed"}
    if settings.noise_model == "uniform" and knowledge.flip_rate is None:
        raise CalibrationError("--noise-model uniform needs a noise rate that is not a heuristic: give --noise-rate R "
                               "or audited labels (the confident-learning estimate never feeds a guarantee)")
    if knowledge.uniform:
        eps = flip_rate_to_uniform(knowledge.flip_rate, k)
        threshold = nacp_threshold(scores, y_cal, settings.alpha, eps, delta=settings.delta if finite else None)
        if knowledge.source == "known":
            return threshold, {"kind": "valid", "condition": f"coverage of the true label {form}; NACP with the "
                               f"uniform noise rate eps={eps:.4f}, known by construction (symmetric injection)"}
        return threshold, {"kind": "conservative", "condition": f"coverage of the true label {form} if the label "
                           f"noise is uniform (independent of the input) with a flip rate of at least "
                           f"{knowledge.flip_rate:g}; over-stating the rate or non-uniform noise makes NACP under-cover"}
    threshold = split_threshold(scores, y_cal, settings.alpha, delta=settings.delta if finite else None)
    if knowledge.clean:
        return threshold, {"kind": "valid", "condition": f"coverage of the true label {form} (clean labels)"}
    return threshold, {"kind": "conservative", "condition": f"split conformal on the observed labels, {form}: "
                       + _DISPERSIVE}


def fit_abstention(settings: CalibrationSettings, knowledge: NoiseKnowledge, conf_cal: np.ndarray,
                   pred_cal: np.ndarray, y_cal: np.ndarray, audit_index: np.ndarray, audit_labels: np.ndarray,
                   k: int) -> tuple[CertifiedThreshold, list[FrontierPoint], dict, int]:
    """Certified threshold, certified frontier and guarantee kind of the accept/abstain decision.

    Parameters
    ----------
    conf_cal : float array [n]
        Confidence of every calibration item. ``pred_cal``: int array [n], the model's predictions.
    y_cal, audit_index, audit_labels, k
        As in :func:`fit_set_threshold`.

    Returns
    -------
    (CertifiedThreshold, frontier rows, {"kind": ..., "condition": ...}, min_accepted)
    """
    if len(audit_index):
        conf, errors = conf_cal[audit_index], pred_cal[audit_index] != audit_labels
        correction, guarantee = "none", {"kind": "valid", "condition": f"certified on {len(audit_index)} audited "
                                         "(trusted) labels, a random sample of the calibration items"}
    else:
        conf, errors = conf_cal, pred_cal != y_cal
        correction = settings.risk_correction
        if correction == "auto":
            if knowledge.clean:
                correction = "none"
            elif knowledge.uniform:
                correction = "symmetric"
            elif knowledge.flip_rate is not None:
                correction = "worst-case"
            else:
                correction = "none"
        if correction in ("symmetric", "worst-case") and not knowledge.flip_rate:
            raise CalibrationError(f"--risk-correction {correction} needs a known or given noise rate (--noise-rate R)")
        by_construction = knowledge.source == "known"
        if correction == "symmetric":
            guarantee = ({"kind": "valid", "condition": "symmetric-noise correction at the rate known by construction"}
                         if by_construction and knowledge.kind == "symmetric" else
                         {"kind": "conservative", "condition": "symmetric-noise correction: valid if the label noise is "
                          f"uniform over the other classes, independent of the input, with flip rate >= "
                          f"{knowledge.flip_rate:g}"})
        elif correction == "worst-case":
            guarantee = {"kind": "valid" if by_construction else "conservative",
                         "condition": "worst case over where the wrong labels fall: every wrong calibration label is "
                         f"counted as a hidden error among accepted items (flip rate {knowledge.flip_rate:g} "
                         + ("known by construction)" if by_construction else "given; valid if the true rate is at most "
                            "that)")}
        elif knowledge.clean:
            guarantee = {"kind": "valid", "condition": "certified on clean labels"}
        else:
            guarantee = {"kind": "conservative", "condition": _AGREEING}
    n = len(conf)
    delta = settings.risk_delta
    kwargs: dict[str, Any] = {}
    if correction == "symmetric":
        kwargs = {"noise_eps": flip_rate_to_uniform(knowledge.flip_rate, k), "num_classes": k}
    elif correction == "worst-case":
        # half of delta bounds the number of wrong labels, half goes to the test (union bound)
        delta = delta / 2
        kwargs = {"max_wrong_labels": wrong_label_bound(n, knowledge.flip_rate, delta)}
    min_accepted = min_accepted_for(n, settings.risk, delta)
    certified = certify_threshold(conf, errors, settings.risk, delta, min_accepted=min_accepted, **kwargs)
    frontier = _two_start_frontier(conf, errors, delta, min_accepted, kwargs)
    return certified, frontier, guarantee, min_accepted


def _two_start_frontier(conf: np.ndarray, errors: np.ndarray, delta: float, min_accepted: int,
                        kwargs: dict) -> list[FrontierPoint]:
    """The certified frontier, each row tested from two starts fixed in advance, at half its level each.

    A row must reach low coverage (what a weak model CAN promise), so one start is a tenth of the data; but with
    noisy labels the first small tests fail on the error floor and would end the sequence, so the other start is
    r*'s. Each start's fixed sequence runs at ``delta_row / 2`` (Bonferroni), and a row keeps the wider certified
    coverage: still valid for every row at once, and consistent with the r* certificate.
    """
    early = min(min_accepted, max(50, len(conf) // 10))
    starts = sorted({early, min_accepted})
    runs = [certified_frontier(conf, errors, delta=delta / len(starts), min_accepted=start, **kwargs)
            for start in starts]
    rows = []
    for points in zip(*runs):
        best = max(points, key=lambda p: (p.certified, p.coverage))
        rows.append(dataclasses.replace(best, delta_row=sum(p.delta_row for p in points)))
    return rows

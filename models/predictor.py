"""Network + Calibration -> predictions with uncertainty, in one batched pass on the model's device.

:meth:`Predictor.forward` is the hot path, in two stages that a server may run on two threads so that one
batch's uncertainty overlaps the next batch's network pass: :meth:`Predictor.forward_network`
(``forward_features`` / ``forward_head``), then :meth:`Predictor.forward_uncertainty` (the OOD score and
conformal p-value, the conformal set, the confidence and the decision), all as batched torch on the device.
:meth:`Predictor.predictions` makes the single host copy and builds :class:`Prediction` objects;
:meth:`Predictor.predict` is all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from noisewise.models.calibrate import Calibration
from noisewise.models.nets import Classifier, pick_device
from noisewise.models.uncertainty.conformal import CONFORMITY_SCORES, prediction_sets
from noisewise.models.uncertainty.selective import confidence as confidence_fn

REASON_NONE, REASON_OOD, REASON_LOW_CONFIDENCE = 0, 1, 2
REASONS = {REASON_NONE: None, REASON_OOD: "ood", REASON_LOW_CONFIDENCE: "low_confidence"}


@dataclass
class BatchOutput:
    """Everything computed for a batch of N inputs; tensors on the model's device."""

    probs: torch.Tensor        # [N, K]
    label: torch.Tensor        # [N] argmax class
    confidence: torch.Tensor   # [N] calibration's confidence function (higher = more confident)
    sets: torch.Tensor         # [N, K] bool, conformal prediction sets
    ood_score: torch.Tensor    # [N] higher = more OOD
    ood_p_value: torch.Tensor  # [N]
    is_ood: torch.Tensor       # [N] bool
    accept: torch.Tensor       # [N] bool
    reason: torch.Tensor       # [N] int8: REASON_*
    features: torch.Tensor     # [N, D]
    logits: torch.Tensor       # [N, K]


@dataclass
class Prediction:
    """One answer: the label, how far to trust it, and why."""

    label: int
    class_name: str
    confidence: float
    top_k: list[dict]
    prediction_set: list[str]
    ood_score: float
    ood_p_value: float
    is_ood: bool
    decision: str
    reason: str | None
    probs: np.ndarray = field(repr=False, default=None)  # float32 [K], a row of the batch's host copy
    set_indices: list[int] = field(repr=False, default_factory=list)  # prediction_set as class indices

    def to_dict(self) -> dict:
        return {
            "label": self.label, "class_name": self.class_name, "confidence": self.confidence, "top_k": self.top_k,
            "prediction_set": self.prediction_set,
            "ood": {"score": self.ood_score, "p_value": self.ood_p_value, "is_ood": self.is_ood},
            "decision": self.decision, "reason": self.reason,
        }


class Predictor:
    """Serve a network with its calibration. Inputs are float tensors ``[N, *input_shape]`` in [0, 1]."""

    def __init__(self, net: Classifier, calibration: Calibration, device: str | torch.device = "auto",
                 top_k: int = 3):
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        self.net = net.to(self.device).eval()
        self.calibration = calibration.to(self.device)
        self.class_names = list(calibration.class_names)
        self.top_k = min(top_k, len(self.class_names))
        if len(self.class_names) != net.num_classes:
            raise ValueError(f"calibration has {len(self.class_names)} classes but the network {net.num_classes}")
        self._score_fn = CONFORMITY_SCORES[calibration.conformity_score]
        self._accept_threshold = float(calibration.certified.threshold)  # +inf when nothing certified

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.net.input_shape

    def forward(self, x: torch.Tensor) -> BatchOutput:
        """The whole path for a batch ``x`` ``[N, *input_shape]``: :meth:`forward_network`, then
        :meth:`forward_uncertainty`."""
        return self.forward_uncertainty(*self.forward_network(x))

    @torch.no_grad()
    def forward_network(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's pass over a batch ``x`` ``[N, *input_shape]``: features ``[N, D]`` and logits ``[N, K]``,
        on the model's device."""
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        features = self.net.forward_features(x)
        return features, self.net.forward_head(features)

    @torch.no_grad()  # grad mode is per thread: a server may call this on another thread than forward_network
    def forward_uncertainty(self, features: torch.Tensor, logits: torch.Tensor) -> BatchOutput:
        """Everything after the network's pass, from its ``features`` ``[N, D]`` and ``logits`` ``[N, K]``."""
        cal = self.calibration
        probs = torch.softmax(logits.float(), dim=1)
        ood_score = cal.ood_scorer.score(features, logits)
        p_value = cal.ood_gate.p_value(ood_score)
        is_ood = p_value <= cal.ood_gate.alpha_ood
        sets = prediction_sets(self._score_fn(probs, **cal.conformity_params), cal.threshold.q)
        conf = confidence_fn(logits, cal.confidence_name, **cal.confidence_params)
        confident = conf >= self._accept_threshold
        # the OOD gate comes first: an OOD input abstains with reason "ood" whatever its confidence
        reason = torch.where(is_ood, REASON_OOD, torch.where(confident, REASON_NONE, REASON_LOW_CONFIDENCE))
        return BatchOutput(probs, probs.argmax(dim=1), conf, sets, ood_score, p_value, is_ood,
                           reason == REASON_NONE, reason.to(torch.int8), features, logits)

    def predict(self, x: torch.Tensor | np.ndarray) -> list[Prediction]:
        """:meth:`forward`, then :meth:`predictions`."""
        return self.predictions(self.forward(x))

    def predictions(self, out: BatchOutput) -> list[Prediction]:
        """One copy of a batch's outputs to the host, then one :class:`Prediction` per input."""
        top_p, top_i = out.probs.topk(self.top_k, dim=1)
        host = {name: t.cpu().numpy() for name, t in {
            "probs": out.probs, "label": out.label, "confidence": out.confidence, "sets": out.sets,
            "ood_score": out.ood_score, "p": out.ood_p_value, "is_ood": out.is_ood, "reason": out.reason,
            "top_p": top_p, "top_i": top_i}.items()}
        names = self.class_names
        members = [np.flatnonzero(row) for row in host["sets"]]
        return [
            Prediction(
                label=int(host["label"][i]), class_name=names[host["label"][i]],
                confidence=float(host["confidence"][i]),
                top_k=[{"label": int(j), "class_name": names[j], "probability": float(p)}
                       for j, p in zip(host["top_i"][i], host["top_p"][i])],
                prediction_set=[names[j] for j in members[i]],
                ood_score=float(host["ood_score"][i]), ood_p_value=float(host["p"][i]),
                is_ood=bool(host["is_ood"][i]), decision="accept" if host["reason"][i] == REASON_NONE else "abstain",
                reason=REASONS[int(host["reason"][i])], probs=host["probs"][i], set_indices=members[i].tolist(),
            )
            for i in range(len(host["label"]))
        ]

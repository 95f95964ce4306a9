"""The checks of a stored ``calibration.json``, in a module that imports neither torch nor scipy.

:meth:`noisewise.models.calibrate.Calibration.load` runs them on every load; the server's pre-start check
(``noisewise.services.service.check_artifacts``) runs them on the document alone, before any worker starts,
and must not spend seconds importing torch to do so. The fields that the checks read from the stored
threshold, certified threshold and frontier rows are parsed here as their ``from_dict`` methods parse them
(``noisewise.models.uncertainty.conformal.ConformalThreshold``, ``...selective.CertifiedThreshold`` and
``...selective.FrontierPoint``, which import torch); a test checks the field names and the parsing against
those classes, so a field added there fails the tests instead of slipping past the pre-start check.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Mapping

CALIBRATION_FORMAT = "noisewise-calibration/1"
#: Kinds of guarantee, from strongest to weakest: ``valid`` (its assumption is removed by trusted labels or
#: known by construction), ``conservative`` (valid under the stated noise condition, which nothing checked),
#: ``none`` (nothing is promised).
GUARANTEE_KINDS = ("valid", "conservative", "none")
#: Fields every calibration.json has.
REQUIRED_FIELDS = frozenset({"class_names", "ood_scorer", "ood_gate", "conformity_score", "threshold", "certified",
                             "confidence_name", "cl_thresholds"})
#: ``noisewise.models.uncertainty.conformal.CONFORMITY_SCORES``.
CONFORMITY_SCORES = ("lac", "aps", "raps")
#: Parameters of each confidence function of ``noisewise.models.uncertainty.selective.CONFIDENCE_FUNCTIONS``.
CONFIDENCE_PARAMETERS: dict[str, frozenset[str]] = {
    "msp": frozenset({"logits"}),
    "maxlogit_pnorm": frozenset({"logits", "p"}),
}
#: Fields of ``ConformalThreshold`` with their defaults (``...`` where the field has none).
THRESHOLD_FIELDS: dict[str, Any] = {"q": ..., "method": ..., "alpha": ..., "tau": ..., "n": ..., "eps": None,
                                    "delta": None, "Delta": None, "full_sets": False, "note": "", "m": None,
                                    "z": None}
#: Fields of ``CertifiedThreshold`` and how ``from_dict`` reads each one.
CERTIFIED_FIELDS: dict[str, str] = {
    "threshold": "float", "certified": "bool", "risk": "float", "delta": "float", "effective_risk": "float",
    "risk_ucb": "float", "observed_risk": "float", "coverage": "float", "n_accepted": "int", "n_errors": "int",
    "n_calibration": "int", "n_tested": "int", "min_accepted": "int", "noise_eps": "optional float",
    "num_classes": "optional int", "reason": "any", "max_wrong_labels": "optional int"}
#: Fields of ``FrontierPoint``.
FRONTIER_FIELDS = ("risk", "certified", "coverage", "threshold", "risk_ucb", "n_accepted", "delta_row")


class CalibrationError(ValueError):
    """Bad calibration settings, or calibration artifacts that are missing or malformed."""


def parse_threshold(data: Mapping[str, Any]) -> SimpleNamespace:
    """The stored conformal threshold as ``ConformalThreshold.from_dict`` reads it (same errors), as a namespace.

    Raises
    ------
    ValueError
        Unknown or missing keys; TypeError or ValueError for values that are not numbers where one is needed.
    """
    names = set(THRESHOLD_FIELDS)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"data has unknown keys {sorted(unknown)}; expected keys among {sorted(names)}")
    missing = {"q", "method", "alpha", "tau", "n"} - set(data)
    if missing:
        raise ValueError(f"data is missing keys {sorted(missing)}")
    values = {**{k: v for k, v in THRESHOLD_FIELDS.items() if v is not ...}, **data}
    for key in ("q", "tau"):
        values[key] = math.inf if values[key] is None else float(values[key])
    return SimpleNamespace(**values)


def parse_certified(d: Mapping[str, Any]) -> SimpleNamespace:
    """The stored certified threshold as ``CertifiedThreshold.from_dict`` reads it (same errors)."""
    optional = {"max_wrong_labels"}  # added later: results stored before it lack the key
    missing = set(CERTIFIED_FIELDS) - optional - set(d)
    if missing:
        raise ValueError(f"CertifiedThreshold.from_dict: missing keys {sorted(missing)}.")
    readers = {"float": float, "int": int, "bool": bool, "any": lambda v: v,
               "optional float": lambda v: None if v is None else float(v),
               "optional int": lambda v: None if v is None else int(v)}
    return SimpleNamespace(**{k: readers[kind](d.get(k)) for k, kind in CERTIFIED_FIELDS.items()})


def parse_frontier_point(d: Mapping[str, Any]) -> SimpleNamespace:
    """A stored frontier row as ``FrontierPoint.from_dict`` reads it (same errors)."""
    missing = set(FRONTIER_FIELDS) - set(d)
    if missing:
        raise ValueError(f"FrontierPoint.from_dict: missing keys {sorted(missing)}.")
    return SimpleNamespace(risk=float(d["risk"]), certified=bool(d["certified"]), coverage=float(d["coverage"]),
                           threshold=float(d["threshold"]), risk_ucb=float(d["risk_ucb"]),
                           n_accepted=int(d["n_accepted"]), delta_row=float(d["delta_row"]))


def check_calibration_document(doc: Any, class_names: list[str] | None = None) -> None:
    """Every check :meth:`~noisewise.models.calibrate.Calibration.load` makes on ``calibration.json``, without
    its tensors (and so without torch).

    Parameters
    ----------
    doc
        The parsed ``calibration.json``.
    class_names
        The class names of ``model.json``; the calibration's must equal them. None skips that comparison.

    Raises
    ------
    CalibrationError
        One line naming the field.
    """
    check_header(doc)
    try:
        threshold = parse_threshold(doc["threshold"])
        certified = parse_certified(doc["certified"])
    except (KeyError, TypeError, ValueError) as err:
        raise CalibrationError(f"calibration artifacts are inconsistent: {err}") from None
    check_document(doc, threshold, certified)
    if class_names is not None and list(doc["class_names"]) != list(class_names):
        raise CalibrationError("calibration.json: class_names differ from model.json")


def check_header(doc: Any) -> None:
    """Format, required fields, conformity score and one CL threshold per class: what is checked before the
    document's parts are parsed."""
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"calibration.json: expected format {CALIBRATION_FORMAT!r}")
    missing = REQUIRED_FIELDS - set(doc)
    if missing:
        raise CalibrationError(f"calibration.json: missing fields {sorted(missing)}")
    if doc["conformity_score"] not in CONFORMITY_SCORES:
        raise CalibrationError(f"calibration.json: unknown conformity score {doc['conformity_score']!r}")
    if not isinstance(doc["cl_thresholds"], list) or len(doc["cl_thresholds"]) != len(doc["class_names"]):
        raise CalibrationError("calibration.json: cl_thresholds must have one value per class")


def check_document(doc: dict, threshold: Any, certified: Any) -> None:
    """Field types and ranges of a loaded calibration.json: a tampered value is refused here, not served as
    empty or full sets (a NaN threshold, alpha outside (0, 1), thresholds outside [0, 1], ...).

    ``threshold`` and ``certified`` are the parsed ``threshold`` and ``certified`` parts (the classes of
    ``noisewise.models.uncertainty`` or the namespaces of :func:`parse_threshold` and :func:`parse_certified`).
    """

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
    if threshold.full_sets is not math.isinf(threshold.q):  # an infinite q serves every class in every set
        fail(f"threshold.full_sets must be true exactly when threshold.q is null (full sets), got full_sets="
             f"{threshold.full_sets!r} with q={threshold.q}")
    if isinstance(threshold.n, bool) or not isinstance(threshold.n, int) or threshold.n < 1:
        fail(f"threshold.n must be a whole number >= 1 (calibration items), got {threshold.n!r}")
    for name, lowest, closed in (("eps", 0.0, True), ("delta", 0.0, False)):
        value = getattr(threshold, name)
        if value is not None and not (real(value) and (lowest <= value if closed else lowest < value) and value < 1):
            fail(f"threshold.{name} must be null or a number in {'[' if closed else '('}0, 1), got {value!r}")
    raw = doc["certified"].get("certified") if isinstance(doc["certified"], dict) else None
    if not isinstance(raw, bool):  # from_dict would coerce "yes" to True
        fail(f"certified.certified must be true or false, got {raw!r}")
    for name in ("threshold", "risk", "delta"):
        value = getattr(certified, name)
        if not real(value) or math.isnan(value):
            fail(f"certified.{name} must be a number, got {value!r}")
    if not (0 < certified.risk < 1 and 0 < certified.delta < 1):
        fail(f"certified.risk and certified.delta must be in (0, 1), got {certified.risk}, {certified.delta}")
    # serving accepts an input iff its confidence >= certified.threshold: +inf abstains on every input, so a
    # version that certified nothing must keep it, and a certified one needs a finite threshold
    if certified.certified == math.isinf(certified.threshold) or certified.threshold == -math.inf:
        fail(f"certified.threshold must be finite when certified is true and +inf (abstain on every input) when "
             f"false, got threshold={certified.threshold} with certified={certified.certified}")
    if not (0 <= certified.coverage <= 1):
        fail(f"certified.coverage must be in [0, 1], got {certified.coverage}")
    if certified.noise_eps is not None and not (0 <= certified.noise_eps < 1):
        fail(f"certified.noise_eps must be null or a noise rate in [0, 1), got {certified.noise_eps}")
    cl = doc["cl_thresholds"]
    if not isinstance(cl, list) or not all(real(t) and 0 <= t <= 1 for t in cl):
        fail("cl_thresholds must be a list of numbers in [0, 1]")
    name, params = doc["confidence_name"], doc.get("confidence_params") or {}
    if name not in CONFIDENCE_PARAMETERS:
        fail(f"unknown confidence function {name!r}; expected one of {sorted(CONFIDENCE_PARAMETERS)}")
    if not isinstance(params, dict) or not set(params) <= CONFIDENCE_PARAMETERS[name]:
        fail(f"confidence_params {params!r} do not fit {name!r}")
    for key, kind in (("conformity_params", dict), ("noise", dict), ("settings", dict), ("assumptions", list)):
        if doc.get(key) is not None and not isinstance(doc[key], kind):
            fail(f"{key} must be a JSON {'object' if kind is dict else 'array'}")
    check_noise(doc.get("noise") or {})
    if not all(isinstance(a, str) for a in doc.get("assumptions") or []):
        fail("assumptions must be strings")
    guarantees = doc.get("guarantees") or {}
    if not isinstance(guarantees, dict):
        fail("guarantees must be a JSON object")
    for part, g in guarantees.items():
        if (part not in ("prediction_set", "abstention", "ood") or not isinstance(g, dict)
                or g.get("kind") not in GUARANTEE_KINDS or not isinstance(g.get("condition"), str)):
            fail(f"guarantees.{part} must be {{kind: one of {GUARANTEE_KINDS}, condition: text}}")
    frontier = doc.get("frontier") or []
    if not isinstance(frontier, list):
        fail("frontier must be a JSON array")
    try:
        points = [parse_frontier_point(p) for p in frontier]
    except (KeyError, TypeError, ValueError) as err:
        fail(f"frontier: {err}")
    if any(not (0 < p.risk < 1 and 0 <= p.coverage <= 1) for p in points):
        fail("frontier rows need risk in (0, 1) and coverage in [0, 1]")


#: Noise-rate fields of a ``noise`` record (flip rates): ``lower`` and the rate a guarantee assumes stay below 1
#: (a rate of 1 leaves no correct label to calibrate on); the interval's ``upper`` end may reach 1.
_NOISE_RATES = {"flip_rate": False, "lower": False, "upper": True}


def check_noise(noise: dict, where: str = "noise") -> None:
    """The rates of a calibration's noise record (and of the feedback estimates a recalibration keeps in it):
    each null or a finite flip rate in [0, 1) (``upper`` in [0, 1]), with ``lower <= flip_rate <= upper``.
    The monitor compares feedback against ``noise.lower``; a NaN there would never alert."""

    def fail(message: str):
        raise CalibrationError(f"calibration.json: {message}")

    values = {}
    for name, may_be_one in _NOISE_RATES.items():
        value = noise.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or value > 1 or (value == 1 and not may_be_one)):
            fail(f"{where}.{name} must be null or a flip rate in [0, {'1]' if may_be_one else '1)'}, got {value!r}")
        values[name] = float(value)
    ordered = [values[name] for name in ("lower", "flip_rate", "upper") if name in values]
    if ordered != sorted(ordered):
        fail(f"{where}: need lower <= flip_rate <= upper, got {values}")
    estimates = noise.get("estimates")
    if estimates is not None:
        if not isinstance(estimates, dict) or not all(isinstance(e, dict) for e in estimates.values()):
            fail(f"{where}.estimates must be a JSON object of noise records")
        for method, estimate in estimates.items():
            check_noise(estimate, f"{where}.estimates.{method}")

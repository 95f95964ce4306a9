"""The torch-free checks of calibration.json (``models/calibration_doc.py``, run by the server's pre-start check)
refuse what ``Calibration.load`` refuses, with the same message, and parse the stored parts as the classes of
``noisewise.models.uncertainty`` do."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import subprocess
import sys

import pytest

from noisewise.models import calibration_doc
from noisewise.models.calibrate import Calibration, CalibrationError
from noisewise.models.uncertainty.conformal import CONFORMITY_SCORES, ConformalThreshold
from noisewise.models.uncertainty.selective import CONFIDENCE_FUNCTIONS, CertifiedThreshold, FrontierPoint
from tests.unit.test_calibration_digest import OUT_OF_RANGE, _calibration, _edit, _set


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("knn")
    _calibration("knn", {"k": 10}).save(directory)
    return directory


@pytest.fixture
def knn(saved, tmp_path):
    """A fresh copy of a saved KNN calibration (k=10 over 120 training features)."""
    directory = tmp_path / "calibration"
    shutil.copytree(saved, directory)
    return directory


def test_field_tables_match_the_classes():
    defaults = {f.name: (... if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(ConformalThreshold)}
    assert calibration_doc.THRESHOLD_FIELDS == defaults
    assert set(calibration_doc.CERTIFIED_FIELDS) == {f.name for f in dataclasses.fields(CertifiedThreshold)}
    assert calibration_doc.FRONTIER_FIELDS == tuple(f.name for f in dataclasses.fields(FrontierPoint))
    assert calibration_doc.CONFIDENCE_PARAMETERS == {name: frozenset(inspect.signature(fn).parameters)
                                                     for name, fn in CONFIDENCE_FUNCTIONS.items()}
    assert calibration_doc.CONFORMITY_SCORES == tuple(CONFORMITY_SCORES)
    assert calibration_doc.CalibrationError is CalibrationError


def _doc(directory) -> dict:
    return json.loads((directory / "calibration.json").read_text())


def test_the_stored_parts_parse_as_the_classes_parse_them(knn):
    doc = _doc(knn)
    assert vars(calibration_doc.parse_threshold(doc["threshold"])) == dataclasses.asdict(
        ConformalThreshold.from_dict(doc["threshold"]))
    assert vars(calibration_doc.parse_certified(doc["certified"])) == dataclasses.asdict(
        CertifiedThreshold.from_dict(doc["certified"]))
    assert len(doc["frontier"]) >= 3
    for row in doc["frontier"]:
        parsed, real = vars(calibration_doc.parse_frontier_point(row)), dataclasses.asdict(FrontierPoint.from_dict(row))
        assert parsed.keys() == real.keys()
        assert all(parsed[k] == real[k] or (math.isnan(parsed[k]) and math.isnan(real[k])) for k in real)
    calibration_doc.check_calibration_document(doc, doc["class_names"])  # a fitted calibration passes


STRUCTURE = {
    "format": _set("format", "noisewise-calibration/0"),
    "missing certified": lambda d: d.pop("certified"),
    "unknown threshold key": _set("threshold", "colour", 1),
    "threshold without alpha": lambda d: d["threshold"].pop("alpha"),
    "certified without risk": lambda d: d["certified"].pop("risk"),
    "certified risk a word": _set("certified", "risk", "high"),
    "frontier row without risk": lambda d: d["frontier"][0].pop("risk"),
    "frontier risk 0": _set("frontier", 0, "risk", 0.0),
    "unknown conformity score": _set("conformity_score", "hinge"),
    "unknown confidence": _set("confidence_name", "entropy"),
    "confidence params": _set("confidence_params", {"q": 2}),
    "cl thresholds short": _set("cl_thresholds", [0.5]),
    "cl threshold 2": _set("cl_thresholds", [2.0, 0.5, 0.5]),
    "guarantee kind": _set("guarantees", {"ood": {"kind": "strong", "condition": "x"}}),
    "assumptions": _set("assumptions", [1]),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE) + sorted(STRUCTURE))
def test_the_document_checks_refuse_what_load_refuses(knn, case):
    change = STRUCTURE[case] if case in STRUCTURE else OUT_OF_RANGE[case][0]
    _edit(knn, change)
    with pytest.raises(CalibrationError) as loading:
        Calibration.load(knn)
    doc = _doc(knn)
    if "ood_scorer:" in str(loading.value):  # checked against the tensors: the worker's load refuses it
        calibration_doc.check_calibration_document(doc)
        return
    with pytest.raises(CalibrationError) as checking:
        calibration_doc.check_calibration_document(doc)
    assert str(checking.value) == str(loading.value)


def test_loading_the_document_alone_skips_the_tensors(knn):
    full, light = Calibration.load(knn), Calibration.load(knn, tensors=False)
    assert light.ood_scorer is None and light.ood_gate is None
    assert (light.class_names, light.threshold, light.certified, light.cl_thresholds, light.noise) == (
        full.class_names, full.threshold, full.certified, full.cl_thresholds, full.noise)
    _edit(knn, _set("threshold", "n", 0))
    with pytest.raises(CalibrationError, match="threshold.n must be"):
        Calibration.load(knn, tensors=False)


def test_the_document_checks_import_no_torch():
    probe = ("import sys, noisewise.models.calibration_doc, noisewise.models.registry; "
             "print(sorted(m for m in ('torch', 'scipy', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"

"""Calibration fitted on a real (small) trained model: storage, predictor semantics, CLI."""

import json

import numpy as np
import pytest
import torch

from models.calibrate import Calibration, CalibrationError, CalibrationSettings, fit_calibration
from models.data import load_dataset, load_ood
from models.evaluation import evaluate
from models.predictor import REASON_LOW_CONFIDENCE, REASON_NONE, REASON_OOD, Predictor
from models.train import load_recipe, train
from tests.integration.test_cli import run_cli


@pytest.fixture(scope="module")
def model():
    ds = load_dataset("digits", "symmetric:0.2", seed=0)
    result = train(ds, load_recipe("ce", epochs=20), seed=0, progress=False)
    return ds, result.net


@pytest.fixture(scope="module")
def calibration(model):
    ds, net = model
    return fit_calibration(net, ds, CalibrationSettings())


def test_summary_states_guarantees_and_assumptions(model, calibration):
    ds, _ = model
    s = calibration.summary()
    assert s["prediction_set"]["method"] == "nacp" and s["prediction_set"]["target_coverage"] == pytest.approx(0.9)
    # symmetric:0.2 is known by construction; NACP takes it in the uniform convention 0.2 * 10 / 9
    assert s["prediction_set"]["eps"] == pytest.approx(0.2 * 10 / 9)
    assert s["noise"]["method"] == "known"
    assert any("uniform label noise" in a for a in s["assumptions"])
    assert s["ood"]["scorer"] == "knn" and s["ood"]["n_calibration"] == len(ds.splits["cal"])


def test_save_load_roundtrip_gives_identical_predictions(tmp_path, model, calibration):
    ds, net = model
    calibration.save(tmp_path)
    loaded = Calibration.load(tmp_path)
    x = torch.as_tensor(ds.split("test")[0])
    a, b = Predictor(net, calibration, "cpu").forward(x), Predictor(net, loaded, "cpu").forward(x)
    for field in ["probs", "sets", "ood_score", "ood_p_value", "accept", "reason", "confidence"]:
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("damage", ["truncate_tensors", "bad_json", "wrong_format", "missing_field"])
def test_damaged_calibration_is_refused(tmp_path, calibration, damage):
    calibration.save(tmp_path)
    doc = json.loads((tmp_path / "calibration.json").read_text())
    if damage == "truncate_tensors":
        path = tmp_path / "calibration.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "bad_json":
        (tmp_path / "calibration.json").write_text("{")
    elif damage == "wrong_format":
        doc["format"] = "pickle"
        (tmp_path / "calibration.json").write_text(json.dumps(doc))
    else:
        del doc["threshold"]
        (tmp_path / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(CalibrationError):
        Calibration.load(tmp_path)


def test_ood_gate_comes_first_and_decisions_are_consistent(model, calibration):
    ds, net = model
    predictor = Predictor(net, calibration, "cpu")
    x_test = ds.split("test")[0]
    photos = load_ood("photos", ds.input_shape, n=200, seed=0)
    out = predictor.forward(torch.as_tensor(np.concatenate([x_test, photos])))
    reason = out.reason.long()
    assert torch.equal(reason == REASON_OOD, out.is_ood)  # every OOD input abstains for "ood"...
    assert torch.equal(out.accept, reason == REASON_NONE)
    low = reason == REASON_LOW_CONFIDENCE
    assert torch.all(out.confidence[low] < calibration.certified.threshold)  # ...the rest by confidence
    assert torch.all(out.confidence[out.accept] >= calibration.certified.threshold)
    assert out.is_ood[len(x_test):].float().mean() > 0.9  # far-OOD photo patches are flagged
    assert out.is_ood[: len(x_test)].float().mean() < 0.15  # ID false-OOD rate near alpha_ood = 0.05
    assert torch.all((out.ood_p_value > 0) & (out.ood_p_value <= 1))


def test_predictions_are_batch_invariant_and_complete(model, calibration):
    ds, net = model
    predictor = Predictor(net, calibration, "cpu")
    x = ds.split("test")[0][:6]
    together = predictor.predict(x)
    alone = [predictor.predict(x[i : i + 1])[0] for i in range(6)]
    for a, b in zip(together, alone):
        assert a.label == b.label and a.prediction_set == b.prediction_set and a.decision == b.decision
        assert a.ood_p_value == pytest.approx(b.ood_p_value) and a.confidence == pytest.approx(b.confidence, abs=1e-6)
    d = together[0].to_dict()
    assert set(d) == {"label", "class_name", "confidence", "top_k", "prediction_set", "ood", "decision", "reason"}
    assert len(d["top_k"]) == 3 and d["top_k"][0]["label"] == d["label"]
    assert sum(together[0].probs) == pytest.approx(1.0, abs=1e-5)


def test_audit_switches_to_the_rectified_threshold(model):
    ds, net = model
    cal = fit_calibration(net, ds, CalibrationSettings(audit=150))
    assert cal.threshold.method.startswith("audit_rectified")
    assert cal.noise["method"] == "audit"
    assert any("audited" in a for a in cal.assumptions)


def test_evaluate_reports_guarantee_figures(model, calibration):
    ds, net = model
    r = evaluate(Predictor(net, calibration, "cpu"), ds, ood_sets=("photos",))
    for key in ["coverage", "mean_set_size", "target_coverage", "selective_risk", "selective_coverage", "risk_target",
                "ood_auroc", "assumptions"]:
        assert key in r
    assert r["ood_auroc"]["photos"] > 0.9
    assert r["assumptions"]["eps"] == pytest.approx(0.2 * 10 / 9)


@pytest.mark.parametrize("settings, message", [
    (dict(alpha=1.5), "--alpha"), (dict(noise_rate=1.0), "--noise-rate"), (dict(score="softmax"), "--score"),
    (dict(conformal="exact"), "--conformal"), (dict(audit=10_000), "larger calibration split"),
])
def test_bad_settings_are_explained(model, settings, message):
    ds, net = model
    with pytest.raises(CalibrationError, match=message):
        fit_calibration(net, ds, CalibrationSettings(**settings))


def test_cli_calibrate_creates_a_new_version_and_evaluate_reads_it(tmp_path):
    trained = run_cli("train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs", "10",
                      "--register", "calib", "--promote", "--no-calibrate", "--json", home=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "calibration" not in json.loads(trained.stdout)
    uncalibrated = run_cli("evaluate", "--model", "calib@champion", home=tmp_path)
    assert uncalibrated.returncode == 2 and "has no calibration" in uncalibrated.stderr
    calibrated = run_cli("calibrate", "--model", "calib@champion", "--audit", "100", "--promote", "--json",
                         home=tmp_path)
    assert calibrated.returncode == 0, calibrated.stderr
    out = json.loads(calibrated.stdout)
    assert out["model_version"] == "2" and out["calibrated_from"] == "1" and out["promoted"] is True
    assert out["calibration"]["sets"]["method"] == "audit_rectified"
    evaluated = run_cli("evaluate", "--model", "calib@champion", "--json", home=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    for key in ["coverage", "mean_set_size", "target_coverage", "selective_risk", "selective_coverage",
                "risk_target", "ood_auroc", "assumptions"]:
        assert key in result
    assert set(result["ood_auroc"]) == {"photos", "other-digits", "inverted"}

"""Calibration fitted on a real (small) trained model: storage, predictor semantics, CLI."""

import json

import numpy as np
import pytest
import torch

from noisewise.models.calibrate import Calibration, CalibrationError, CalibrationSettings, fit_calibration
from noisewise.models.data import load_dataset, load_ood
from noisewise.models.evaluation import evaluate
from noisewise.models.predictor import REASON_LOW_CONFIDENCE, REASON_NONE, REASON_OOD, Predictor
from noisewise.models.train import load_recipe, train
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
    # uniform noise known by construction: NACP's assumption holds, so both guarantees are valid
    assert s["prediction_set"]["kind"] == "valid" and "known by construction" in s["prediction_set"]["condition"]
    assert s["abstention"]["kind"] == "valid" and s["ood"]["kind"] == "valid"
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
    assert r["labels"].startswith("reference") and r["guarantees"]["prediction_set"]["kind"] == "valid"
    # the test split's realized flip rate, counted against the reference labels
    _, y_obs, y_ref = ds.split("test")
    assert r["realized_noise_rate"] == pytest.approx(float((y_obs != y_ref).mean()))


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
    assert out["calibration"]["sets"]["kind"] == "valid" and out["calibration"]["abstention"]["kind"] == "valid"
    evaluated = run_cli("evaluate", "--model", "calib@champion", "--json", home=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    for key in ["coverage", "mean_set_size", "target_coverage", "selective_risk", "selective_coverage",
                "risk_target", "ood_auroc", "assumptions"]:
        assert key in result
    assert set(result["ood_auroc"]) == {"photos", "other-digits", "inverted"}


# --- which guarantee is stated, and of which kind, depends on what is known about the labels -----------------

@pytest.fixture(scope="module")
def confusion_model():
    ds = load_dataset("digits", "confusion:0.2", seed=0)
    result = train(ds, load_recipe("ce", epochs=15), seed=0, progress=False)
    return ds, result.net


def test_human_like_noise_gets_split_conformal_and_a_worst_case_certificate(confusion_model):
    ds, net = confusion_model
    cal = fit_calibration(net, ds, CalibrationSettings())
    s = cal.summary()
    # non-uniform noise: NACP's model is wrong here, so the sets are split conformal on the observed labels
    assert s["prediction_set"]["method"] == "split" and s["prediction_set"]["kind"] == "conservative"
    assert "dispersive" in s["prediction_set"]["condition"]
    # the rate is known by construction but not where the wrong labels fall: every wrong label counts as a
    # hidden error, which holds whatever the noise does (valid), at the price of power
    assert cal.certified.max_wrong_labels is not None and cal.certified.max_wrong_labels >= 0.2 * len(ds.splits["cal"])
    assert s["abstention"]["kind"] == "valid" and "worst case" in s["abstention"]["condition"]
    assert len(cal.frontier) == 8 and all(0 <= p["coverage"] <= 1 for p in cal.frontier)
    if not cal.certified.certified:
        assert "certify" in s["abstention"]["can_certify"]


def _user_npz(tmp_path, ds, y_clean=None):
    path = tmp_path / "user.npz"
    arrays = {"x": ds.x, "y": ds.y, "class_names": np.array(ds.class_names)}
    if y_clean is not None:
        arrays["y_clean"] = y_clean
    np.savez(path, **arrays)
    return path


def test_labels_of_unknown_origin_get_conservative_guarantees_and_a_heuristic_rate_only(tmp_path, confusion_model):
    ds, net = confusion_model
    user = load_dataset(str(_user_npz(tmp_path, ds)), "none", seed=0)  # the noisy labels as a user's file
    cal = fit_calibration(net, user, CalibrationSettings())
    s = cal.summary()
    assert s["prediction_set"]["method"] == "split" and s["prediction_set"]["kind"] == "conservative"
    assert s["abstention"]["kind"] == "conservative" and "do not agree with the model's mistakes" in s["abstention"]["condition"]
    assert cal.certified.max_wrong_labels is None and cal.certified.noise_eps is None
    # the confident-learning rate is shown, marked, and fed into nothing
    assert s["noise"]["method"] == "confident_learning" and s["noise"]["heuristic"] is True
    assert s["noise"]["used_for_guarantees"] is False and s["noise"]["lower"] <= s["noise"]["flip_rate"] <= s["noise"]["upper"]
    with pytest.raises(CalibrationError, match="not a heuristic"):
        fit_calibration(net, user, CalibrationSettings(noise_model="uniform"))
    stated = fit_calibration(net, user, CalibrationSettings(noise_model="uniform", noise_rate=0.2)).summary()
    assert stated["prediction_set"]["method"] == "nacp" and stated["prediction_set"]["kind"] == "conservative"
    assert "at least 0.2" in stated["prediction_set"]["condition"]


def test_trusted_labels_for_some_items_are_the_audit(tmp_path, confusion_model):
    ds, net = confusion_model
    partial = np.full(len(ds.y), -1)
    audited = np.random.default_rng(0).choice(len(ds.y), 600, replace=False)
    partial[audited] = ds.y_clean[audited]
    user = load_dataset(str(_user_npz(tmp_path, ds, partial)), "none", seed=0)
    cal = fit_calibration(net, user, CalibrationSettings())
    positions, _ = user.trusted_split("cal")
    assert cal.threshold.method == "audit_rectified" and cal.threshold.m == len(positions) > 100
    s = cal.summary()
    assert s["prediction_set"]["kind"] == "valid" and s["abstention"]["kind"] == "valid"
    # the noise rate is the share of audited items whose observed label differs from the trusted one
    _, y_obs, _ = user.split("cal")
    pos, trusted = user.trusted_split("cal")
    assert s["noise"]["method"] == "audit" and s["noise"]["flip_rate"] == pytest.approx(float((y_obs[pos] != trusted).mean()))
    assert s["noise"]["lower"] <= s["noise"]["flip_rate"] <= s["noise"]["upper"]


def test_old_calibrations_say_they_state_no_kind_and_tampered_kinds_are_refused(tmp_path, calibration):
    calibration.save(tmp_path)
    doc = json.loads((tmp_path / "calibration.json").read_text())
    for key in ("guarantees", "frontier"):
        del doc[key]
    (tmp_path / "calibration.json").write_text(json.dumps(doc))
    old = Calibration.load(tmp_path).summary()
    assert old["prediction_set"]["kind"] == "none" and old["abstention"]["can_certify"] is None
    calibration.save(tmp_path)
    doc = json.loads((tmp_path / "calibration.json").read_text())
    doc["guarantees"]["prediction_set"]["kind"] = "guaranteed"
    (tmp_path / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="guarantees.prediction_set"):
        Calibration.load(tmp_path)


def test_cli_calibrates_and_evaluates_on_another_labelled_file(tmp_path, confusion_model):
    ds, _ = confusion_model
    trained = run_cli("train", "--dataset", "digits", "--noise", "confusion:0.2", "--recipe", "ce", "--epochs", "10",
                      "--register", "other", "--json", home=tmp_path)
    assert trained.returncode == 0, trained.stderr
    first = json.loads(trained.stdout)
    assert first["calibration"]["sets"]["method"] == "split"
    rows = np.random.default_rng(1).choice(len(ds.y), 900, replace=False)
    other = tmp_path / "other.npz"
    np.savez(other, x=ds.x[rows], y=ds.y[rows], y_clean=ds.y_clean[rows], class_names=np.array(ds.class_names))
    evaluated = run_cli("evaluate", "--model", "other/1", "--dataset", str(other), "--json", home=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    # every item of the file is scored, against its reference labels, and the file's realized rate is reported
    assert result["n_test"] == 900 and result["items"] == "every item of the file"
    assert result["labels"].startswith("reference")
    assert result["realized_noise_rate"] == pytest.approx(float((ds.y[rows] != ds.y_clean[rows]).mean()), abs=1e-4)
    recal = run_cli("calibrate", "--model", "other/1", "--dataset", str(other), "--json", home=tmp_path)
    assert recal.returncode == 0, recal.stderr
    out = json.loads(recal.stdout)
    assert out["model_version"] == "2" and out["n_calibration"] == 900
    # a complete y_clean in a file is evaluation ground truth, not an audit: no oracle calibration by accident
    assert out["calibration"]["sets"]["method"] == "split"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=ds.x[rows, :, :4], y=ds.y[rows])
    refused = run_cli("calibrate", "--model", "other/1", "--dataset", str(wrong), home=tmp_path)
    assert refused.returncode == 2 and "the model takes" in refused.stderr

"""`noisewise flags | monitor | recalibrate` on a real registry and a real SQLite store filled the way the
service fills it (predictions with the model's own probabilities, feedback scored at ingestion)."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest

from tests.integration.serving_model import run_in_process as run

from noisewise.monitoring.feedback import score_feedback
from noisewise.monitoring.store import FeedbackRow, PredictionRow, Store

pytestmark = pytest.mark.slow

NAME = "cli-feedback-test"
REF = f"{NAME}@champion"


@pytest.fixture(scope="module")
def model():
    from noisewise.models.registry import has_alias, load_model

    if not has_alias(NAME):
        status, out, _ = run("train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs",
                             "6", "--risk", "0.25", "--seed", "1", "--register", NAME, "--promote", "--json", "--quiet")
        assert status == 0, out
    return load_model(REF)


@pytest.fixture(scope="module")
def store_env(model, tmp_path_factory):
    """A store with 600 served digits (the model's real outputs), feedback from two annotators (20% symmetric
    errors at known places) on all of them, and an auditor (true labels) on 150."""
    from sklearn.datasets import load_digits

    from noisewise.models.predictor import Predictor

    url = f"sqlite:///{tmp_path_factory.mktemp('cli-store') / 'store.db'}"
    bunch = load_digits()
    x = (bunch.images[:600] / 16.0).astype("float32")[:, None]
    y = bunch.target[:600]
    outputs = Predictor(model.net, model.calibration, device="cpu").predict(x)
    store = Store(url)
    ids = [str(uuid.uuid4()) for _ in outputs]
    store.add_predictions([
        PredictionRow(id=i, model_name=model.name, model_version=model.version, weights=model.weights,
                      predicted=o.label, confidence=o.confidence,
                      prediction_set=o.set_indices, is_ood=o.is_ood, ood_score=o.ood_score,
                      ood_p_value=o.ood_p_value, decision=o.decision, reason=o.reason,
                      probs=np.asarray(o.probs, dtype=np.float32))
        for i, o in zip(ids, outputs)])
    rng = np.random.default_rng(0)
    probs = np.stack([np.asarray(o.probs, dtype=np.float32) for o in outputs])
    thresholds = np.asarray(model.calibration.cl_thresholds, dtype=np.float32)
    flips = {}
    for annotator in ("a", "b"):
        flip = rng.random(len(y)) < 0.2
        labels = np.where(flip, (y + rng.integers(1, 10, len(y))) % 10, y)
        flips[annotator] = flip
        scores = score_feedback(probs, labels, thresholds)
        store.add_feedback([
            FeedbackRow(prediction_id=i, label=int(lb), annotator=annotator, audited=False, quality=float(q),
                        suspect=bool(s), proposed=int(p), in_set=int(lb) in o.set_indices)
            for i, lb, q, s, p, o in zip(ids, labels, scores.quality, scores.suspect, scores.proposed, outputs)])
    audited = rng.choice(len(y), 150, replace=False)
    scores = score_feedback(probs[audited], y[audited], thresholds)
    store.add_feedback([
        FeedbackRow(prediction_id=ids[j], label=int(y[j]), annotator="auditor", audited=True, quality=float(q),
                    suspect=bool(s), proposed=int(p), in_set=int(y[j]) in outputs[j].set_indices)
        for j, q, s, p in zip(audited, scores.quality, scores.suspect, scores.proposed)])
    store.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOISEWISE_STORE_URL", url)
        yield {"url": url, "ids": ids, "flips": flips}


def test_flags_lists_ranked_suspects_and_writes_csv(store_env, tmp_path):
    target = tmp_path / "suspects.csv"
    status, out, err = run("flags", "--model", REF, "--limit", "1000", "--csv", str(target), "--json")
    assert status == 0, err
    result = json.loads(out)
    suspects = result["suspects"]
    assert result["n_suspects"] == len(suspects) > 20
    qualities = [s["quality"] for s in suspects]
    assert qualities == sorted(qualities)
    flipped = {(store_env["ids"][i], a) for a in ("a", "b") for i in np.flatnonzero(store_env["flips"][a])}
    precision = np.mean([(s["prediction_id"], s["annotator"]) in flipped for s in suspects if s["annotator"] != "auditor"])
    assert precision > 0.6, precision  # 20% base rate; a weak model (~75% accurate) still flags mostly errors
    with target.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["prediction_id"] for r in rows] == [s["prediction_id"] for s in suspects]
    status, out, _ = run("flags", "--model", REF, "--class", "3", "--json")
    assert status == 0 and all(s["label"] == "3" for s in json.loads(out)["suspects"])
    status, _, err = run("flags", "--model", REF, "--class", "cat")
    assert status == 2 and "--class" in err and "cat" in err


def test_monitor_reports_noise_rate_coverage_and_drift(store_env, tmp_path):
    status, out, err = run("monitor", "--model", REF, "--workspace", str(tmp_path / "ws"), "--json")
    assert status == 0, err
    report = json.loads(out)
    noise = report["feedback"]["noise"]
    assert {"duplicates", "audit"} <= set(noise)
    for method in ("duplicates", "audit"):  # both annotators flip 20%: each interval should hold it
        assert noise[method]["lower"] <= 0.2 + 0.02 and noise[method]["upper"] >= 0.2 - 0.02, noise[method]
    for record in noise.values():  # one convention per record: the flip rate, point inside its interval
        assert record["convention"] == "flip" and record["lower"] <= record["flip_rate"] <= record["upper"]
        assert record["heuristic"] == (record["method"] == "confident_learning")
    m = noise["audit"]["n"]  # the 150 audited predictions less those the gate flagged OOD
    assert 100 <= m <= 150 and len(noise["audit"]["per_class"]) == 10
    assert report["feedback"]["best"] == "audit"  # the estimate used for guarantees: never a heuristic
    coverage = report["feedback"]["coverage"]
    assert coverage["n"] > 400 and coverage["corrected"] > coverage["raw"]
    assert coverage["noise_method"] == "audit" and coverage["audited"]["n"] == m
    status, text, err = run("monitor", "--model", REF, "--workspace", str(tmp_path / "ws"))
    assert status == 0, err
    assert f"noise rate (audit, n={m}): flip rate" in text and "used for guarantees" in text
    if "confident_learning" in noise:
        assert "HEURISTIC, shown only, never used for guarantees" in text
    assert f"realized coverage on audited labels (n={m}, no assumption)" in text
    drift = report["drift"]
    assert drift["label_drift"]["stattest"] == "chi2_two_sample" and "detected" in drift["label_drift"]
    assert (tmp_path / "ws").is_dir() and drift["html"] and drift["html"].endswith(".html")
    store = Store(store_env["url"])
    latest = store.latest_report("monitor")
    store.close()
    assert latest["model"]["version"] == report["model"]["version"]


def test_recalibrate_refuses_with_too_little_feedback_then_moves_the_alias(store_env, model):
    from noisewise.models import registry

    status, _, err = run("recalibrate", "--model", REF, "--window", "50")
    assert status == 1 and "recalibration refused" in err and "items" in err
    assert registry.resolve_version(REF)[1] == model.version  # nothing moved

    status, _, err = run("recalibrate", "--model", REF, "--noise-rate", "0.2")
    assert status == 2 and "--assume-uniform-noise" in err  # NACP only with an explicit noise model

    status, out, err = run("recalibrate", "--model", REF, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["method"] == "audit" and result["n_audited"] >= 50
    assert result["guarantee_kind"] == "valid" and result["threshold"]["method"] == "audit_rectified"
    assert result["recalibrated_from"] == model.version and result["alias"] == "champion"
    _, version, _ = registry.resolve_version(REF)
    assert version == result["model_version"] != model.version
    loaded = registry.load_model(REF)
    assert loaded.weights == model.weights  # same network, new calibration
    assert loaded.calibration.threshold.q == pytest.approx(result["threshold"]["q"], abs=1e-4)  # JSON rounds to 4 digits
    assert loaded.calibration.settings["recalibrated_from"] == f"{NAME}/{model.version}"
    assert any("audit" in a for a in loaded.calibration.assumptions)
    assert loaded.calibration.guarantees["prediction_set"]["kind"] == "valid"
    assert loaded.calibration.noise["method"] == "audit" and loaded.calibration.noise["convention"] == "flip"
    registry.set_alias(NAME, model.version)  # leave the module's model as it was

"""monitoring/drift.py against real Evidently: drift tests, quality, suspect shares, workspace, `evidently ui`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from evidently.ui.workspace import Workspace
from scipy import stats
from sklearn.metrics import f1_score, precision_score, recall_score

from tests.integration.evidently_ui import evidently_ui

from noisewise.monitoring.drift import chi2_two_sample, drift_report, value_drift
from noisewise.monitoring.metrics import drift_gauge_values

NAMES = ["cat", "dog", "bird", "fish"]
K = len(NAMES)
UNIFORM = np.full(K, 1 / K)


def _reference(rng: np.random.Generator, n: int = 4000, p=UNIFORM, accuracy: float = 0.8) -> pd.DataFrame:
    label = rng.choice(K, n, p=p)
    predicted = np.where(rng.random(n) < accuracy, label, rng.integers(0, K, n))
    return pd.DataFrame({"label": label, "predicted": predicted})


def _predictions(rng: np.random.Generator, n: int = 400, p=UNIFORM) -> pd.DataFrame:
    return pd.DataFrame({"prediction_id": [f"p{i}" for i in range(n)], "predicted": rng.choice(K, n, p=p)})


def _feedback(rng: np.random.Generator, n: int = 300, p=UNIFORM, accuracy: float = 0.8, ood: float = 0.0,
              annotators=("", "ann1", "ann2")) -> pd.DataFrame:
    label = rng.choice(K, n, p=p)
    predicted = np.where(rng.random(n) < accuracy, label, rng.integers(0, K, n))
    return pd.DataFrame({
        "feedback_id": np.arange(n), "prediction_id": [f"p{i}" for i in range(n)],
        "annotator": rng.choice(list(annotators), n), "label": label, "audited": False,
        "received_at": pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), "s"),
        "predicted": predicted, "is_ood": rng.random(n) < ood, "suspect": rng.random(n) < 0.15,
    })


def _two_sample_p(reference: np.ndarray, current: np.ndarray) -> float:
    """The test computed independently: scipy's chi-square test of homogeneity of the 2 x K table (every
    expected count is far above 5 in these tables, so no Monte Carlo p-value)."""
    keys = np.union1d(reference, current)
    table = np.array([[(sample == k).sum() for k in keys] for sample in (reference, current)])
    result = stats.chi2_contingency(table, correction=False)
    assert result.expected_freq.min() >= 5
    return float(result.pvalue)


def _counts(values, k: int = K) -> np.ndarray:
    return np.bincount(np.asarray(values), minlength=k)


def test_same_distribution_not_detected_and_score_is_the_two_sample_p_value(tmp_path):
    rng = np.random.default_rng(0)
    reference, predictions, feedback = _reference(rng), _predictions(rng), _feedback(rng)
    result = drift_report(reference, predictions, feedback, NAMES, tmp_path)
    label, prediction = result["label_drift"], result["prediction_drift"]
    assert label["stattest"] == prediction["stattest"] == "chi2_two_sample"
    assert label["score_kind"] == "p_value" and label["threshold"] == 0.05
    assert not label["detected"] and not prediction["detected"]
    assert (label["n_reference"], label["n_current"], prediction["n_current"]) == (4000, 300, 400)
    assert label["score"] == pytest.approx(_two_sample_p(reference["label"].to_numpy(),
                                                         feedback["label"].to_numpy()), rel=1e-9)
    assert prediction["score"] == pytest.approx(_two_sample_p(reference["predicted"].to_numpy(),
                                                              predictions["predicted"].to_numpy()), rel=1e-9)
    # The test is set explicitly in the stored report: 4000 reference rows would make Evidently's own
    # default Jensen-Shannon.
    drift_configs = [m["config"] for m in json.loads(Path(result["json"]).read_text())["evidently"]["metrics"]
                     if m["config"]["type"].endswith("ValueDrift")]
    assert [(c["column"], c["method"], c["threshold"]) for c in drift_configs] == [
        ("label", "chi2_two_sample", 0.05), ("served_prediction", "chi2_two_sample", 0.05)]


def test_false_detection_rate_is_the_nominal_level():
    """No drift, through the Evidently report: detections ~ Binomial(draws, alpha); the accepted band is
    the central 99.9% of Binomial(draws, alpha). (The 300-draw level checks of the test itself, rare class
    included, are in tests/unit/test_drift_level.py.)"""
    rng = np.random.default_rng(1)
    draws, alpha, p = 200, 0.05, np.array([0.4, 0.3, 0.2, 0.1])
    detected = sum(value_drift(rng.choice(K, 5000, p=p), rng.choice(K, 200, p=p), NAMES,
                               threshold=alpha)["detected"] for _ in range(draws))
    low, high = stats.binom.ppf(0.0005, draws, alpha), stats.binom.isf(0.0005, draws, alpha)
    assert low <= detected <= high, (detected, low, high)


def test_evidently_reports_the_same_p_value_as_the_pure_test(tmp_path):
    """Evidently runs chi2_two_sample itself: the same p-value in value_drift, in drift_report's result and in
    the stored snapshot, on both the chi-square and the Monte Carlo path (a class almost never predicted)."""
    rng = np.random.default_rng(12)
    names = [f"c{k}" for k in range(10)]
    rare = np.r_[np.full(9, (1 - 0.002) / 9), 0.002]
    methods = set()
    for _ in range(3):
        reference, current = rng.choice(10, 1250, p=rare), rng.choice(10, 300, p=rare)
        expected = chi2_two_sample(_counts(reference, 10), _counts(current, 10))
        methods.add(expected["method"])
        assert value_drift(reference, current, names)["score"] == expected["p_value"]
    assert methods == {"monte_carlo"}

    # Class 9 predicted 3 times on the calibration inputs and once in serving: expected counts below 5.
    reference = pd.DataFrame({"label": rng.choice(10, 1250), "predicted": np.r_[[9] * 3, rng.choice(9, 1247)]})
    predictions = pd.DataFrame({"predicted": np.r_[9, rng.choice(9, 299)]})
    feedback = _feedback(rng, n=300).assign(label=rng.choice(10, 300), predicted=rng.choice(10, 300))
    result = drift_report(reference, predictions, feedback, names, tmp_path)
    tests = {"label_drift": chi2_two_sample(_counts(reference["label"], 10), _counts(feedback["label"], 10)),
             "prediction_drift": chi2_two_sample(_counts(reference["predicted"], 10),
                                                 _counts(predictions["predicted"], 10))}
    assert {part: test["method"] for part, test in tests.items()} == {
        "label_drift": "chi2", "prediction_drift": "monte_carlo"}
    stored = json.loads(Path(result["json"]).read_text())["evidently"]["metrics"]
    snapshot_scores = {m["config"]["column"]: m["value"] for m in stored if m["config"]["type"].endswith("ValueDrift")}
    for part, column in (("label_drift", "label"), ("prediction_drift", "served_prediction")):
        assert result[part]["score"] == snapshot_scores[column] == tests[part]["p_value"]
        assert result[part]["detected"] == (tests[part]["p_value"] < 0.05)


def test_label_shift_detected_and_prediction_drift_not(tmp_path):
    rng = np.random.default_rng(2)
    shifted = np.array([0.55, 0.15, 0.15, 0.15])
    result = drift_report(_reference(rng), _predictions(rng), _feedback(rng, p=shifted), NAMES, tmp_path)
    assert result["label_drift"]["detected"] and result["label_drift"]["score"] < 1e-6
    assert not result["prediction_drift"]["detected"]
    assert drift_gauge_values(result) == {
        "label": (result["label_drift"]["score"], True),
        "prediction": (result["prediction_drift"]["score"], False)}


def test_distance_test_detects_when_at_or_above_threshold(tmp_path):
    rng = np.random.default_rng(3)
    reference = rng.choice(K, 3000)
    same = value_drift(reference, rng.choice(K, 500), NAMES, stattest="jensenshannon", threshold=0.1)
    shifted = value_drift(reference, rng.choice(K, 500, p=[0.7, 0.1, 0.1, 0.1]), NAMES,
                          stattest="jensenshannon", threshold=0.1)
    assert same["score_kind"] == shifted["score_kind"] == "distance"
    assert same["score"] < 0.1 and not same["detected"]
    assert shifted["score"] >= 0.1 and shifted["detected"]


def test_quality_on_one_label_per_in_distribution_input(tmp_path):
    rng = np.random.default_rng(4)
    feedback = _feedback(rng, n=400, ood=0.2)
    # A second, audited label for the first 30 inputs: the audited one is the input's label.
    second = feedback.iloc[:30].copy()
    second["feedback_id"] += 1000
    second["annotator"], second["audited"] = "auditor", True
    second["label"] = (second["label"] + 1) % K
    second["received_at"] += pd.Timedelta(days=1)
    feedback = pd.concat([feedback, second], ignore_index=True)
    reference = _reference(rng)
    result = drift_report(reference, _predictions(rng), feedback, NAMES, tmp_path)

    kept = pd.concat([feedback.iloc[30:400], second])
    kept = kept.loc[~kept["is_ood"]]
    y, y_hat = kept["label"].to_numpy(), kept["predicted"].to_numpy()
    quality = result["quality"]
    assert quality["n"] == result["label_drift"]["n_current"] == len(kept)
    assert quality["accuracy"] == pytest.approx((y == y_hat).mean(), abs=1e-12)
    assert quality["precision_macro"] == pytest.approx(precision_score(y, y_hat, average="macro"), abs=1e-12)
    assert quality["recall_macro"] == pytest.approx(recall_score(y, y_hat, average="macro"), abs=1e-12)
    assert quality["f1_macro"] == pytest.approx(f1_score(y, y_hat, average="macro"), abs=1e-12)
    per_class_recall = recall_score(y, y_hat, average=None, labels=range(K))
    assert {k: v["recall"] for k, v in quality["per_class"].items()} == pytest.approx(
        dict(zip(NAMES, per_class_recall)), abs=1e-12)
    assert quality["reference_accuracy"] == pytest.approx((reference["label"] == reference["predicted"]).mean())
    assert result["label_drift"]["score"] == pytest.approx(_two_sample_p(reference["label"].to_numpy(), y), rel=1e-9)
    assert result["suspects"]["n_ood"] == int(feedback["is_ood"].sum())


def test_suspect_shares_equal_pandas_and_the_report(tmp_path):
    rng = np.random.default_rng(5)
    feedback = _feedback(rng, n=500, ood=0.1)
    result = drift_report(_reference(rng), _predictions(rng), feedback, NAMES, tmp_path)
    in_dist = feedback.loc[~feedback["is_ood"]].assign(name=lambda f: np.asarray(NAMES)[f["label"]])
    suspects = result["suspects"]
    assert suspects["share"] == pytest.approx(in_dist["suspect"].mean(), abs=1e-12)
    assert suspects["n"] == len(in_dist) and suspects["n_suspect"] == int(in_dist["suspect"].sum())
    by_class = in_dist.groupby("name")["suspect"].agg(["mean", "size"])
    assert suspects["per_class"] == {k: {"share": pytest.approx(r["mean"], abs=1e-12), "n": r["size"]}
                                     for k, r in by_class.iterrows()}
    by_annotator = in_dist.loc[in_dist["annotator"] != ""].groupby("annotator")["suspect"].agg(["mean", "size"])
    assert set(suspects["per_annotator"]) == {"ann1", "ann2"}
    assert suspects["per_annotator"] == {k: {"share": pytest.approx(r["mean"], abs=1e-12), "n": r["size"]}
                                         for k, r in by_annotator.iterrows()}
    # The Evidently report shows the same shares.
    metrics = json.loads(Path(result["json"]).read_text())["evidently"]["metrics"]
    grouped = {(m["config"]["column_name"], m["config"]["label"]): m["value"] for m in metrics
               if m["config"]["type"].endswith("GroupByMetric")}
    overall = [m["value"] for m in metrics if m["config"]["type"].endswith("MeanValue")]
    assert overall == [pytest.approx(suspects["share"], abs=1e-12)]
    assert grouped == pytest.approx(
        {**{("suspect_given_label", k): v["share"] for k, v in suspects["per_class"].items()},
         **{("suspect_annotator", k): v["share"] for k, v in suspects["per_annotator"].items()}}, abs=1e-12)


def test_no_annotators_gives_no_per_annotator_shares(tmp_path):
    rng = np.random.default_rng(6)
    result = drift_report(_reference(rng), _predictions(rng), _feedback(rng, annotators=("",)), NAMES, tmp_path)
    assert result["suspects"]["per_annotator"] == {} and result["suspects"]["n"] == 300


def test_workspace_holds_project_and_snapshots_when_reopened(tmp_path):
    rng = np.random.default_rng(7)
    reference = _reference(rng)
    first = drift_report(reference, _predictions(rng), _feedback(rng), NAMES, tmp_path, model="demo v1")
    second = drift_report(reference, _predictions(rng), _feedback(rng), NAMES, tmp_path, model="demo v1")
    assert first["project_id"] == second["project_id"] and first["snapshot_id"] != second["snapshot_id"]
    for result in (first, second):
        html, js = Path(result["html"]), Path(result["json"])
        assert html.parent == js.parent == tmp_path / "reports"
        assert html.stat().st_size > 10_000 and "<html" in html.read_text()[:2000].lower()
        assert json.loads(js.read_text())["noisewise"]["label_drift"] == result["label_drift"]

    workspace = Workspace(str(tmp_path))
    projects = workspace.search_project("noisewise")
    assert [str(p.id) for p in projects] == [first["project_id"]]
    runs = {str(s) for s in workspace.list_runs(projects[0].id)}
    assert runs == {first["snapshot_id"], second["snapshot_id"]}
    stored = workspace.get_run(projects[0].id, second["snapshot_id"])
    assert stored.metadata["model"] == "demo v1" and stored.metadata["stattest"] == "chi2_two_sample"
    drift_values = sorted(r.value for r in stored.metric_results.values() if type(r).__name__ == "SingleValue"
                          and r.display_name.startswith("Value drift"))
    assert drift_values == pytest.approx(
        sorted([second["label_drift"]["score"], second["prediction_drift"]["score"]]), rel=1e-12)


def test_the_workspace_keeps_the_newest_snapshots_and_every_report_file(tmp_path):
    """Opening the workspace reads every snapshot: the project keeps its newest ``keep_snapshots`` (the reports'
    HTML and JSON files all stay), so the cost of the next run does not grow with the number of runs."""
    rng = np.random.default_rng(11)
    reference = _reference(rng, n=400)
    results = [drift_report(reference, _predictions(rng, n=60), _feedback(rng, n=60), NAMES, tmp_path,
                            keep_snapshots=2) for _ in range(4)]
    assert [r["snapshots_deleted"] for r in results] == [0, 0, 1, 1]
    workspace = Workspace(str(tmp_path))
    project = workspace.search_project("noisewise")[0]
    assert {str(s) for s in workspace.list_runs(project.id)} == {r["snapshot_id"] for r in results[-2:]}
    assert all(Path(r["json"]).exists() and Path(r["html"]).exists() for r in results)
    unbounded = drift_report(reference, _predictions(rng, n=60), _feedback(rng, n=60), NAMES, tmp_path,
                             keep_snapshots=None)
    assert unbounded["snapshots_deleted"] == 0 and len(workspace.list_runs(project.id)) == 3


def test_empty_and_small_feedback(tmp_path):
    rng = np.random.default_rng(8)
    reference, predictions = _reference(rng), _predictions(rng)
    empty = _feedback(rng).iloc[:0]
    result = drift_report(reference, predictions, empty, NAMES, tmp_path)
    assert result["label_drift"]["status"] == "no data" and result["quality"] == {"status": "no data", "n": 0}
    assert result["suspects"]["status"] == "no data" and result["suspects"]["share"] is None
    assert "score" in result["prediction_drift"] and result["snapshot_id"] is not None
    label_gauge, prediction_gauge = drift_gauge_values(result)["label"], drift_gauge_values(result)["prediction"]
    assert math.isnan(label_gauge[0]) and label_gauge[1] is False and not math.isnan(prediction_gauge[0])

    small = drift_report(reference, predictions, _feedback(rng, n=8), NAMES, tmp_path)
    assert small["label_drift"] == {"status": "too few rows", "n_reference": 4000, "n_current": 8,
                                    "min_rows": 5 * K}
    assert small["quality"]["n"] == 8 and 0 <= small["quality"]["accuracy"] <= 1

    nothing = drift_report(reference, predictions.iloc[:0], empty, NAMES, tmp_path)
    assert nothing["prediction_drift"]["status"] == "no data" and nothing["snapshot_id"] is None
    assert nothing["html"] is None and json.loads(Path(nothing["json"]).read_text())["evidently"] is None
    json.dumps(nothing), json.dumps(small), json.dumps(result)  # plain JSON-serializable


@pytest.mark.parametrize("change, message", [
    (lambda r, p, f: (r, p, f.assign(label=f["label"] + K)), r"feedback\['label'\].*outside \[0, 4\)"),
    (lambda r, p, f: (r.drop(columns="predicted"), p, f), r"reference lacks column\(s\) \['predicted'\]"),
    (lambda r, p, f: (r.iloc[:0], p, f), r"reference must hold"),
    (lambda r, p, f: (r, p.assign(predicted=p["predicted"] + 0.5), f), r"current_predictions\['predicted'\]"),
])
def test_invalid_input_names_the_argument(tmp_path, change, message):
    rng = np.random.default_rng(9)
    reference, predictions, feedback = change(_reference(rng), _predictions(rng), _feedback(rng))
    with pytest.raises(ValueError, match=message):
        drift_report(reference, predictions, feedback, NAMES, tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"stattest": "ks"}, "stattest must be one of"), ({"threshold": 1.5}, "threshold must be in"),
    ({"stattest": "chisquare"}, r"'chisquare' is a goodness-of-fit test.*Use 'chi2_two_sample'"),
    ({"stattest": "g_test"}, "stattest must be one of"), ({"stattest": "TVD"}, "stattest must be one of"),
    ({"min_rows": 0}, "min_rows must be"), ({"class_names": ["a"]}, "class_names must hold"),
    ({"keep_snapshots": 0}, "keep_snapshots must be"), ({"keep_snapshots": 2.5}, "keep_snapshots must be")])
def test_invalid_options(tmp_path, kwargs, message):
    rng = np.random.default_rng(10)
    arguments = {"class_names": NAMES, **kwargs}
    with pytest.raises(ValueError, match=message):
        drift_report(_reference(rng), _predictions(rng), _feedback(rng), workspace=tmp_path, **arguments)


@pytest.mark.slow
def test_evidently_ui_serves_the_workspace(tmp_path):
    rng = np.random.default_rng(11)
    result = drift_report(_reference(rng), _predictions(rng), _feedback(rng), NAMES, tmp_path)
    with evidently_ui(tmp_path, tmp_path / "ui.log", timeout_s=60) as base:
        projects = httpx.get(f"{base}/api/projects", timeout=10)
        assert projects.status_code == 200
        assert [(p["id"], p["name"]) for p in projects.json()] == [(result["project_id"], "noisewise")]
        api = f"{base}/api/projects"
        snapshots = httpx.get(f"{api}/{result['project_id']}/snapshots", timeout=10).json()
        assert [s["id"] for s in snapshots] == [result["snapshot_id"]]
        data = httpx.get(f"{api}/{result['project_id']}/{result['snapshot_id']}/data", timeout=30)
        assert data.status_code == 200 and len(data.json()["widgets"]) > 0

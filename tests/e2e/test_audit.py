"""`noisewise audit` end to end against a real `bentoml serve` on a free loopback port with a private store:
predictions, ordinary feedback with known injected errors, an audit planned, filled in from the clean labels
and submitted over HTTP, the noise rate counted on it, `audit status`, and a recalibration that takes the
audit-rectified threshold. Then the calibration route: a worklist of calibration rows becomes a trusted-labels
file. The server is stopped by PID afterwards."""

from __future__ import annotations

import csv
import json

import httpx
import numpy as np
import pytest
from scipy import stats

from tests.e2e.test_server import bentoml_serve, server_env
from tests.integration.serving_model import digits, ensure_model, run_in_process as run

pytestmark = pytest.mark.slow

NAME = "audit-e2e"  # a copy of the serving-test model: recalibrate moves its alias
N_PREDICTIONS = 400
FLIP_RATE = 0.2
N_AUDIT = 60


@pytest.fixture(scope="module")
def ref():
    return ensure_model(NAME)


@pytest.fixture(scope="module")
def server(ref, tmp_path_factory):
    """The service and this process share a private store (NOISEWISE_STORE_URL), as on one machine."""
    tmp = tmp_path_factory.mktemp("audit-e2e")
    store_url = f"sqlite:///{tmp / 'store.db'}"
    env = server_env(NOISEWISE_MODEL=ref, NOISEWISE_STORE_URL=store_url, NOISEWISE_RELOAD_INTERVAL_S="3600",
                     NOISEWISE_MONITOR_INTERVAL_S="3600")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOISEWISE_STORE_URL", store_url)
        with bentoml_serve("noisewise.services.service:Noisewise", env, tmp / "serve.log") as url:
            yield url


def feedback_count() -> int:
    from noisewise.monitoring.store import Store

    store = Store()
    try:
        return store.count("feedback")
    finally:
        store.close()


def read_csv(path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_production_audit_counts_the_noise_rate_and_rectifies_recalibration(server, ref, tmp_path):
    from noisewise.models import registry

    worklist = tmp_path / "worklist.csv"
    # nothing to audit before any feedback: a one-line refusal, exit 1, no worklist
    status, out, err = run("audit", "plan", "--model", ref, "--n", str(N_AUDIT), "--out", str(worklist))
    assert status == 1 and "no prediction to audit" in err and "Traceback" not in err and not worklist.exists()

    with httpx.Client(base_url=server, timeout=60) as client:
        names = client.post("/model").json()["classes"]
        x, y = digits(N_PREDICTIONS, start=300)
        predictions = []
        for start in range(0, N_PREDICTIONS, 100):
            response = client.post("/predict", json={"inputs": x[start:start + 100].reshape(-1, 64).tolist()})
            assert response.status_code == 200, response.text
            predictions += response.json()["predictions"]
        rng = np.random.default_rng(7)
        flip = rng.random(N_PREDICTIONS) < FLIP_RATE
        observed = np.where(flip, (y + rng.integers(1, 10, N_PREDICTIONS)) % 10, y)
        items = [{"prediction_id": p["id"], "label": names[int(lb)], "annotator": "annotator-a"}
                 for p, lb in zip(predictions, observed)]
        response = client.post("/feedback", json={"items": items})
        assert response.status_code == 200 and response.json()["stored"] == N_PREDICTIONS, response.text
    by_id = {p["id"]: i for i, p in enumerate(predictions)}
    in_dist = [i for i, p in enumerate(predictions) if not p["ood"]["is_ood"]]

    status, out, err = run("audit", "plan", "--model", ref, "--n", str(N_AUDIT), "--seed", "3", "--out",
                           str(worklist), "--json")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["n"] == N_AUDIT and plan["eligible"] == len(in_dist) and plan["already_audited"] == 0
    rows = read_csv(worklist)
    assert list(rows[0]) == ["prediction_id", "observed_label", "annotator", "predicted_label", "trusted_label"]
    picked = [by_id[r["prediction_id"]] for r in rows]
    assert len(set(picked)) == N_AUDIT and set(picked) <= set(in_dist)
    for r, i in zip(rows, picked):
        assert r["observed_label"] == names[observed[i]] and r["annotator"] == "annotator-a"
        assert r["predicted_label"] == names[predictions[i]["label"]] and r["trusted_label"] == ""
    status, _, err = run("audit", "plan", "--model", ref, "--out", str(worklist))
    assert status == 2 and "exists" in err  # a worklist being filled in is never overwritten silently

    # a typo in one class name: every bad row named, nothing sent
    for r, i in zip(rows, picked):
        r["trusted_label"] = names[y[i]]
    bad = [dict(r) for r in rows]
    bad[4]["trusted_label"] = "seven"
    write_csv(tmp_path / "bad.csv", bad)
    before = feedback_count()
    status, _, err = run("audit", "submit", str(tmp_path / "bad.csv"), "--url", server)
    assert status == 1 and "line 6: unknown class 'seven'" in err and "nothing was sent" in err
    assert feedback_count() == before

    rows[-1]["trusted_label"] = ""  # an unfinished row is skipped and counted
    write_csv(worklist, rows)
    status, out, err = run("audit", "submit", str(worklist), "--url", server, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert (result["sent"], result["stored"], result["rejected"], result["skipped_empty"]) == (N_AUDIT - 1,
                                                                                               N_AUDIT - 1, 0, 1)
    audited = picked[:-1]
    flips = int(flip[audited].sum())
    noise = result["noise"]
    assert noise["n"] == N_AUDIT - 1 and noise["method"] == "audit" and not noise["heuristic"]
    assert noise["flip_rate"] == pytest.approx(flips / (N_AUDIT - 1), abs=1e-4)  # the count itself
    exact = stats.binomtest(flips, N_AUDIT - 1).proportion_ci(0.95, method="exact")
    assert (noise["lower"], noise["upper"]) == pytest.approx((exact.low, exact.high), abs=1e-4)
    # what the audit samples: its 95% interval misses it in 5% of draws (the draw changes with the prediction
    # ids), so this single draw is held to the 99.99% interval; coverage itself is tested over many splits
    population = float(flip[in_dist].mean())
    wide = stats.binomtest(flips, N_AUDIT - 1).proportion_ci(0.9999, method="exact")
    assert wide.low <= population <= wide.high, (noise, population)
    assert result["recalibrate"]["rectified"] and result["recalibrate"]["n_audited"] == N_AUDIT - 1

    status, out, err = run("audit", "submit", str(worklist), "--url", server, "--json")
    assert status == 0 and json.loads(out)["duplicate"] == N_AUDIT - 1  # submitting again is harmless

    status, out, err = run("audit", "status", "--model", ref, "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["n_audited"] == report["n_audited_paired"] == report["n_audited_served_weights"] == N_AUDIT - 1
    assert report["noise"]["flip_rate"] == noise["flip_rate"] and report["rectified"]["ready"]
    assert report["n_ordinary"] == len(in_dist)
    table = report["plan"]["table"]
    assert [row["m"] for row in table] == sorted(row["m"] for row in table) and table[0]["m"] > N_AUDIT - 1
    assert all(row["coverage_margin"] > 0 for row in table)
    status, out, _ = run("audit", "status", "--model", ref)
    assert status == 0 and f"noise rate counted on {N_AUDIT - 1} audited items" in out

    _, before_version, _ = registry.resolve_version(ref)
    status, out, err = run("recalibrate", "--model", ref, "--url", server, "--json")
    assert status == 0, err
    recal = json.loads(out)
    assert recal["method"].startswith("audit") and recal["n_audited"] == N_AUDIT - 1
    assert recal["model_version"] != before_version and "serving version" in recal["service_reloaded"]
    served = httpx.post(f"{server}/model", timeout=30).json()
    assert served["version"] == recal["model_version"]
    assert served["calibration"]["prediction_set"]["method"].startswith("audit_rectified")


def test_calibration_audit_becomes_a_trusted_labels_file(ref, tmp_path):
    from noisewise.models import registry
    from noisewise.models.data import load_from_lineage

    dataset = load_from_lineage(registry.load_model(ref).spec.lineage)
    cal = {int(i) for i in dataset.splits["cal"]}
    worklist = tmp_path / "cal.json"
    status, out, err = run("audit", "plan", "--from", "calibration", "--model", ref, "--n", "40", "--out",
                           str(worklist), "--json")
    assert status == 0, err
    assert json.loads(out)["n"] == 40
    doc = json.loads(worklist.read_text())
    assert doc["kind"] == "calibration" and doc["model"] == ref
    index = [int(item["index"]) for item in doc["items"]]
    assert len(set(index)) == 40 and set(index) <= cal
    for item in doc["items"]:
        assert item["observed_label"] == dataset.class_names[dataset.y[int(item["index"])]]
        item["trusted_label"] = dataset.class_names[dataset.y_clean[int(item["index"])]]
    worklist.write_text(json.dumps(doc))
    status, out, err = run("audit", "submit", str(worklist), "--json")
    assert status == 0, err
    result = json.loads(out)
    trusted = tmp_path / "trusted.csv"
    assert result["trusted_file"] == str(trusted) and result["written"] == 40
    assert result["next"] == f"noisewise calibrate --model {ref} --trusted {trusted}"
    rows = read_csv(trusted)
    assert [int(r["index"]) for r in rows] == index
    assert [r["label"] for r in rows] == [dataset.class_names[dataset.y_clean[i]] for i in index]
    flips = int(np.sum(dataset.y[index] != dataset.y_clean[index]))
    assert result["noise"]["flip_rate"] == pytest.approx(flips / 40, abs=1e-4) and result["noise"]["n"] == 40

    status, out, err = run("calibrate", "--model", ref, "--trusted", str(trusted), "--json")  # the printed next step
    assert status == 0, err
    calibration = json.loads(out)["calibration"]
    assert calibration["sets"]["method"].startswith("audit_rectified") and calibration["sets"]["kind"] == "valid"
    assert calibration["noise"]["method"] == "audit" and calibration["noise"]["n"] == 40
    assert calibration["noise"]["flip_rate"] == pytest.approx(flips / 40, abs=1e-4)

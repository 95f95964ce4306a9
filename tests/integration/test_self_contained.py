"""A registered version carries what serving, monitoring and evaluation need: train on a user .npz, delete the
file, and `evaluate`, `monitor` (on feedback sent through the service), the service start-up and the example
request still work, with the same numbers as from the data; the commands that truly need the data say so in
one line."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pytest
from noisewise.models import registry
from noisewise.models.data import load_dataset

from tests.integration.serving_model import serve, run_in_process as run

pytestmark = pytest.mark.slow

NAME = "self-contained-test"
REF = f"{NAME}@champion"
NOISE = "symmetric:0.2"


def digits_npz(path, start: int = 0, stop: int | None = None) -> None:
    """sklearn's digits as a user file: 8-bit pixels (the loader scales them to k / 255) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images[start:stop] * (255 / 16)).astype(np.uint8)
    np.savez(path, x=pixels, y=bunch.target[start:stop])


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Train and register on a user .npz, record what the data says, then delete the file."""
    folder = tmp_path_factory.mktemp("user-data")
    path = folder / "digits.npz"
    digits_npz(path)
    status, _, err = run("train", "--dataset", str(path), "--noise", NOISE, "--recipe", "ce", "--epochs", "3",
                           "--risk", "0.25", "--register", NAME, "--json", "--quiet")
    assert status == 0, err
    registry.set_alias(NAME, "1")  # whether or not 3 epochs certify: these tests are about the stored data
    dataset = load_dataset(str(path), NOISE, seed=0)
    x_test, y_test, y_clean_test = dataset.split("test")
    # the test split as a plain file, to evaluate with --dataset after the training data is gone
    test_file = folder / "test-split.npz"
    np.savez(test_file, x=x_test, y=y_test, y_clean=y_clean_test)
    loaded = registry.load_model(REF)
    x_cal, y_cal, _ = dataset.split("cal")
    with_data = {"cal_labels": y_cal, "cal_predicted": registry._predicted_classes(loaded.net, x_cal),
                 "x_test": x_test, "y_test": y_test, "y_clean_test": y_clean_test}
    path.unlink()
    return {"path": path, "test_file": test_file, "with_data": with_data, "loaded": loaded}


def test_version_stores_its_reference_and_test_split(moved):
    data = moved["with_data"]
    reference = registry.load_reference(moved["loaded"], test=True)
    assert reference is not None and reference.info["format"] == registry.REFERENCE_FORMAT
    np.testing.assert_array_equal(reference.cal_labels, data["cal_labels"])
    np.testing.assert_array_equal(reference.cal_predicted, data["cal_predicted"])
    # digits' test split (15% of 1797) is far below the cap: all of it is stored, bit for bit (8-bit pixels
    # are stored as bytes and decoded to the same float32 values)
    assert reference.info["test"]["n_split"] == reference.info["test"]["n_stored"] == len(data["x_test"]) == 269
    assert reference.info["test"]["x_encoding"] == "uint8/255"
    np.testing.assert_array_equal(reference.test_x, data["x_test"])
    np.testing.assert_array_equal(reference.test_y, data["y_test"])
    np.testing.assert_array_equal(reference.test_y_clean, data["y_clean_test"])
    np.testing.assert_array_equal(reference.example, data["x_test"][:1])


def test_evaluate_uses_the_stored_test_split(moved):
    status, out, err = run("evaluate", "--model", REF, "--json")
    assert status == 0, err
    stored = json.loads(out)
    assert stored["items"] == "the test split (stored with the version)" and stored["n_test"] == len(moved["with_data"]["x_test"])
    status, out, err = run("evaluate", "--model", REF, "--dataset", str(moved["test_file"]), "--json")
    assert status == 0, err
    from_file = json.loads(out)
    for key in ("n_test", "accuracy", "coverage", "mean_set_size", "selective_coverage", "selective_risk",
                "realized_noise_rate", "labels"):
        assert stored[key] == from_file[key], key
    assert 0.1 < stored["realized_noise_rate"] < 0.3  # observed vs reference labels of the test split


def test_example_request_and_service_start_without_the_data(moved, tmp_path):
    from noisewise.services.service import check_artifacts, write_example_request

    body = json.loads(write_example_request(check_artifacts(REF), tmp_path / "example.json").read_text())
    first = moved["with_data"]["x_test"][0].ravel()
    assert len(body["inputs"]) == 1 and np.abs(np.asarray(body["inputs"][0]) - first).max() <= 5e-5
    with serve({"NOISEWISE_MODEL": REF, "NOISEWISE_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}"}) as client:
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 1


def test_monitor_compares_feedback_with_the_stored_reference(moved, tmp_path, monkeypatch):
    """Traffic and feedback through the service (the store fills as in production), then `noisewise monitor`."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("NOISEWISE_STORE_URL", url)
    data = moved["with_data"]
    x, y = data["x_test"], data["y_clean_test"]
    rng = np.random.default_rng(0)
    with serve({"NOISEWISE_MODEL": REF, "NOISEWISE_STORE_URL": url}) as client:
        ids = []
        for start in range(0, len(x), 64):
            response = client.post("/predict", json={"inputs": x[start:start + 64].reshape(-1, 64).tolist()})
            assert response.status_code == 200, response.text
            ids += [p["id"] for p in response.json()["predictions"]]
        labels = np.where(rng.random(len(y)) < 0.1, (y + rng.integers(1, 10, len(y))) % 10, y)
        items = [{"prediction_id": i, "label": int(lb), "annotator": "a"} for i, lb in zip(ids, labels)]
        response = client.post("/feedback", json={"items": items})
        assert response.status_code == 200 and response.json()["stored"] == len(items), response.text
    status, out, err = run("monitor", "--model", REF, "--workspace", str(tmp_path / "ws"), "--json")
    assert status == 0, err
    report = json.loads(out)
    n_cal = len(data["cal_labels"])
    assert report["n_predictions"] == report["n_feedback"] == len(x)
    for part in ("label_drift", "prediction_drift"):
        assert report["drift"][part]["n_reference"] == n_cal and report["drift"][part]["n_current"] > 100, part
    # the reference accuracy is the stored calibration labels against the stored predicted classes
    expected = float(np.mean(data["cal_labels"] == data["cal_predicted"]))
    assert report["drift"]["quality"]["reference_accuracy"] == pytest.approx(expected, abs=1e-4)


def test_demo_sends_the_stored_test_inputs(moved, tmp_path, monkeypatch):
    """`noisewise demo` against the in-process service (its HTTP client is the test client): the whole loop,
    traffic, feedback, monitor and recalibration, runs on what the version stores."""
    import httpx

    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("NOISEWISE_STORE_URL", url)
    with serve({"NOISEWISE_MODEL": REF, "NOISEWISE_STORE_URL": url}) as client:
        monkeypatch.setattr(httpx, "Client", lambda **_: contextlib.nullcontext(client))
        monkeypatch.setattr(httpx, "post", lambda target, **kw: client.post(target.replace("http://testserver", ""), **kw))
        status, out, err = run("demo", "--url", "http://testserver", "--model", REF, "--n", "120", "--json")
    assert status == 0, err
    payload = json.loads(out)
    ind = payload["streams"]["id"]
    assert ind["sent"] == 120 and 0.5 < ind["set_coverage_of_clean_labels"] <= 1.0
    assert payload["feedback"]["counts"]["stored"] > 120
    assert payload["feedback"]["monitor"]["drift"]["label_drift"]["n_reference"] == len(moved["with_data"]["cal_labels"])
    recalibrated = payload["feedback"]["recalibration"]
    assert "model_version" in recalibrated, recalibrated
    # the recalibrated version (same network) carries the drift reference and the test sample forward
    reference = registry.load_reference(registry.load_model(f"{NAME}/{recalibrated['model_version']}"), test=True)
    np.testing.assert_array_equal(reference.cal_labels, moved["with_data"]["cal_labels"])
    np.testing.assert_array_equal(reference.test_x, moved["with_data"]["x_test"])


def test_commands_that_need_the_data_say_so_in_one_line(moved, tmp_path):
    path = str(moved["path"])
    status, out, err = run("calibrate", "--model", REF)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert path in err and "--dataset" in err and "no longer exists" in err
    status, out, err = run("audit", "plan", "--from", "calibration", "--model", REF, "--out", str(tmp_path / "w.csv"))
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert path in err and "--from predictions" in err and "--dataset" in err


def test_a_version_without_stored_reference_falls_back_to_the_data(moved, tmp_path, monkeypatch):
    """A version that stores no reference (as older versions): the commands read the data on disk, and say in
    one line what to do when it is gone."""
    from noisewise.services.service import check_artifacts, write_example_request

    loaded = moved["loaded"]
    logged = registry.log_training_run(loaded.net, loaded.spec, {}, [], {}, register_as=f"{NAME}-legacy",
                                       calibration=loaded.calibration)
    ref = f"{NAME}-legacy/{logged.version}"
    assert registry.load_reference(registry.load_model(ref)) is None
    status, out, err = run("evaluate", "--model", ref)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert str(moved["path"]) in err and "--dataset" in err
    monkeypatch.setenv("NOISEWISE_STORE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    status, _, err = run("monitor", "--model", ref, "--workspace", str(tmp_path / "ws"))
    assert status == 2 and str(moved["path"]) in err and len(err.strip().splitlines()) == 1
    body = json.loads(write_example_request(check_artifacts(ref), tmp_path / "example.json").read_text())
    # a blank input of the right size, still a valid request
    assert body["inputs"] == [[0.0] * 64]


def test_calibrating_on_other_data_keeps_the_test_sample(moved, tmp_path):
    """`calibrate --dataset` (every item calibrates): the new version's drift reference comes from that file,
    its example and test sample from the version it was calibrated from."""
    other = tmp_path / "more-digits.npz"
    digits_npz(other, 0, 400)
    status, out, err = run("calibrate", "--model", REF, "--dataset", str(other), "--risk", "0.25", "--json")
    assert status == 0, err
    version = json.loads(out)["model_version"]
    loaded = registry.load_model(f"{NAME}/{version}")
    reference = registry.load_reference(loaded, test=True)
    assert len(reference.cal_labels) == 400 and reference.info["cal_from"] == "more-digits.npz"
    np.testing.assert_array_equal(reference.test_x, moved["with_data"]["x_test"])
    status, out, err = run("evaluate", "--model", f"{NAME}/{version}", "--json")
    assert status == 0 and json.loads(out)["n_test"] == len(moved["with_data"]["x_test"]), err


# --- the size caps of the stored test sample (synthetic data, no training) -----------------------------------


def synthetic(n: int, shape: tuple[int, ...], quantized: bool):
    from noisewise.models.data import Dataset, NoiseReport

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(n, *shape)).astype(np.float32) / 255 if quantized else \
        rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 3, n)
    empty = np.empty(0, dtype=np.int64)
    return Dataset("synthetic", x, y, None, ["a", "b", "c"],
                   {"train": empty, "val": empty, "cal": empty, "test": np.arange(n)}, NoiseReport("none", 0.0, 0, n))


def test_test_sample_is_a_uniform_sample_within_the_caps(monkeypatch):
    dataset = synthetic(5000, (4,), quantized=False)
    dataset.x[:, 0] = np.arange(5000)  # each input carries its row
    arrays, info = registry._test_sample(dataset)
    rows = arrays["test_x"][:, 0].astype(np.int64)
    assert info["n_stored"] == registry.TEST_SAMPLE_MAX_ITEMS == len(rows) and info["n_split"] == 5000
    assert np.all(np.diff(rows) > 0)  # distinct rows, stored in dataset order, each with its own label
    np.testing.assert_array_equal(arrays["test_y"], dataset.y[rows])
    # a uniform draw, not the first rows: the mean row of 2000 of 5000 is 2499.5 within 3 standard errors
    # (uniform on 0..4999 without replacement: variance (N^2 - 1) / 12, finite-population correction)
    se = np.sqrt((5000**2 - 1) / 12 / 2000 * (5000 - 2000) / 4999)
    assert abs(rows.mean() - 2499.5) < 3 * se
    assert np.std(rows) > 0.9 * 5000 / np.sqrt(12)

    monkeypatch.setattr(registry, "TEST_SAMPLE_MAX_BYTES", 300 * 16)  # room for 300 float32 rows of 4 values
    arrays, info = registry._test_sample(synthetic(1000, (4,), quantized=False))
    assert info["n_stored"] == 300 and arrays["test_x"].dtype == np.float32
    arrays, info = registry._test_sample(synthetic(1000, (4,), quantized=True))  # bytes: 4 x more rows fit
    assert info["n_stored"] == 1000 and arrays["test_x"].dtype == np.uint8 and info["x_encoding"] == "uint8/255"
    monkeypatch.setattr(registry, "TEST_SAMPLE_MAX_BYTES", 50 * 16)  # 50 rows < the 100 a useful sample needs
    arrays, info = registry._test_sample(synthetic(1000, (4,), quantized=False))
    assert arrays == {} and info["n_stored"] == 0 and "fewer than 100" in info["reason"]
    arrays, info = registry._test_sample(synthetic(40, (4,), quantized=False))  # a small split is stored whole
    assert info["n_stored"] == 40


def test_saved_reference_round_trips_and_is_checked(tmp_path):
    dataset = synthetic(300, (1, 2, 2), quantized=True)
    _, info = registry._test_sample(dataset)
    reference = registry.VersionReference(example=dataset.x[:1], cal_labels=np.array([0, 1, 2]),
                                          cal_predicted=np.array([0, 2, 2]), test_x=dataset.x,
                                          test_y=dataset.y, test_y_clean=None,
                                          info={"class_names": ["a", "b", "c"], "input_shape": [1, 2, 2], "test": info})
    registry.save_reference(reference, tmp_path)
    back = registry.read_reference(tmp_path)
    np.testing.assert_array_equal(back.test_x, dataset.x)
    np.testing.assert_array_equal(back.cal_predicted, [0, 2, 2])
    assert back.test_y_clean is None and back.info["test"]["n_stored"] == 300
    spec = registry.ModelSpec(arch="mlp", input_shape=[1, 2, 2], class_names=["a", "b", "d"])
    with pytest.raises(registry.RegistryError, match="class names or input shape"):
        registry.read_reference(tmp_path, spec)
    bad = dataclasses.replace(reference, cal_labels=np.array([0, 1, 5]))
    registry.save_reference(bad, tmp_path)
    with pytest.raises(registry.RegistryError, match="cal_labels"):
        registry.read_reference(tmp_path)

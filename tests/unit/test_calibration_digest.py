"""A calibration is refused when it was edited: by the sha256 recorded at registration for the files of a
registered version, and by the range checks of ``Calibration.load`` for values that could never have been
fitted (a KNN ``k`` above the bank size, NaN noise rates, a threshold that contradicts its certificate, ...)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from noisewise.models.arrays import NoiseAwareClassifier
from noisewise.models.calibrate import Calibration, CalibrationError

K, D, N_TRAIN = 3, 8, 120


def _draw(rng: np.random.Generator, centers: np.ndarray, n: int):
    y = rng.integers(0, K, n)
    features = centers[y] + rng.normal(size=(n, D))
    return features.astype(np.float32), (features @ centers.T / 4).astype(np.float32), y


def _calibration(scorer: str, params: dict | None = None) -> Calibration:
    """A calibration fitted on separable synthetic classes (clean labels, so abstention certifies)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, size=(K, D))
    f_train, z_train, y_train = _draw(rng, centers, N_TRAIN)
    f_cal, z_cal, y_cal = _draw(rng, centers, 600)
    head = (centers / 4, np.zeros(K)) if scorer in ("vim", "react") else None
    clf = NoiseAwareClassifier(known_noise="none", ood_scorer=scorer, ood_params=params or {})
    clf.fit(f_train, z_train, y_train, head=head).conformalize(z_cal, y_cal, features=f_cal)
    return clf.calibration_


@pytest.fixture(scope="module")
def saved_knn(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("knn")
    _calibration("knn", {"k": 10}).save(directory)
    return directory


@pytest.fixture
def knn(saved_knn, tmp_path) -> Path:
    """A fresh copy of the saved KNN calibration, which loads as it is."""
    directory = tmp_path / "calibration"
    shutil.copytree(saved_knn, directory)
    loaded = Calibration.load(directory)
    assert loaded.ood_scorer.k == 10 and loaded.certified.certified
    return directory


def _edit(directory: Path, change) -> None:
    path = directory / "calibration.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))  # NaN and Infinity as JSON's non-standard literals, which json.loads reads


def _refused(directory: Path, *needles: str) -> str:
    with pytest.raises(CalibrationError) as err:
        Calibration.load(directory)
    message = str(err.value)
    assert message.startswith("calibration.json"), message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _set(*path_and_value):
    *path, value = path_and_value

    def change(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


# values of the right JSON type that pass the type checks and would still be served silently before
OUT_OF_RANGE = {
    "k far above the bank": (_set("ood_scorer", "params", "k", 10**9), "exceeds the bank size (120"),
    "k one above the bank": (_set("ood_scorer", "params", "k", N_TRAIN + 1), "params.k=121"),
    "bank size": (_set("ood_scorer", "bank_size", 5), "bank_size=5"),
    "feature dim": (_set("ood_scorer", "feature_dim", D + 1), "feature_dim=9"),
    "flip rate NaN": (_set("noise", "flip_rate", math.nan), "noise.flip_rate"),
    "flip rate inf": (_set("noise", "flip_rate", math.inf), "noise.flip_rate"),
    "flip rate 1": (_set("noise", "flip_rate", 1.0), "noise.flip_rate"),
    "flip rate negative": (_set("noise", "flip_rate", -0.1), "noise.flip_rate"),
    "flip rate a string": (_set("noise", "flip_rate", "0.2"), "noise.flip_rate"),
    "lower NaN": (_set("noise", "lower", math.nan), "noise.lower"),
    "upper above 1": (_set("noise", "upper", 1.5), "noise.upper"),
    "lower above the rate": (lambda d: d["noise"].update(lower=0.3, flip_rate=0.1, upper=0.4), "lower <= flip_rate"),
    "feedback estimate NaN": (_set("noise", "estimates", {"direct": {"flip_rate": 0.1, "lower": math.nan}}),
                              "noise.estimates.direct.lower"),
    "certified with an infinite threshold": (_set("certified", "threshold", "inf"), "certified.threshold"),
    "uncertified with a finite threshold": (_set("certified", "certified", False), "certified.threshold"),
    "threshold minus infinity": (_set("certified", "threshold", "-inf"), "certified.threshold"),
    "coverage above 1": (_set("certified", "coverage", 3.0), "certified.coverage"),
    "noise correction 1": (_set("certified", "noise_eps", 1.0), "certified.noise_eps"),
    "q null without full sets": (_set("threshold", "q", None), "threshold.full_sets"),
    "full sets with a finite q": (_set("threshold", "full_sets", True), "threshold.full_sets"),
    "n zero": (_set("threshold", "n", 0), "threshold.n"),
    "eps 1.5": (_set("threshold", "eps", 1.5), "threshold.eps"),
    "delta 0": (_set("threshold", "delta", 0), "threshold.delta"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_values_are_refused(knn, case):
    change, needle = OUT_OF_RANGE[case]
    _edit(knn, change)
    _refused(knn, needle)


@pytest.mark.parametrize("change", [
    _set("ood_scorer", "params", "k", N_TRAIN),  # every training feature a neighbour: allowed, if pointless
    lambda d: d["noise"].update(flip_rate=0.2, lower=0.1, upper=1.0),  # an interval may reach 1
    lambda d: d["noise"].update(flip_rate=None, lower=None, upper=None),  # no estimate
], ids=["k equal to the bank", "upper 1", "no rates"])
def test_values_at_the_edges_of_the_ranges_load(knn, change):
    _edit(knn, change)
    loaded = Calibration.load(knn)
    assert loaded.ood_scorer.k <= N_TRAIN


def test_a_nan_in_the_bank_is_refused(knn):
    from safetensors.torch import load_file, save_file

    path = knn / "calibration.safetensors"
    tensors = load_file(str(path))
    tensors["ood_scorer.bank"][3, 2] = math.nan
    save_file(tensors, str(path))
    with pytest.raises(CalibrationError, match="NaN or inf in 'bank'"):
        Calibration.load(knn)


@pytest.mark.parametrize("scorer", ["mahalanobis", "vim", "react"])
def test_feature_dim_of_each_fitted_scorer_is_checked(tmp_path, scorer):
    _calibration(scorer).save(tmp_path)
    assert Calibration.load(tmp_path).ood_scorer.name == scorer  # intact: loads
    _edit(tmp_path, _set("ood_scorer", "feature_dim", D * 2))
    _refused(tmp_path, "feature_dim=16")


# --- digests of a version's files -------------------------------------------------------------------------


def _folder(tmp_path: Path, names: dict[str, bytes]) -> Path:
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _digest_tags(directory: Path, *names: str) -> dict[str, str]:
    from noisewise.models.registry import DIGEST_TAG, _sha256

    return {f"{DIGEST_TAG}{name}": _sha256(directory / name) for name in names}


def test_files_matching_their_digests_pass_and_undigested_ones_are_listed(tmp_path):
    from noisewise.models.registry import DIGEST_TAG, verify_digests

    directory = _folder(tmp_path, {"weights.safetensors": b"w", "model.json": b"{}", "calibration.json": b"{}",
                                   "calibration.safetensors": b"c"})
    tags = {**_digest_tags(directory, "weights.safetensors", "calibration.safetensors"),
            f"{DIGEST_TAG}reference/reference.json": "0" * 64,  # checked where the reference is read
            "noisewise.arch": "mlp"}
    assert verify_digests(directory, tags, "m/1") == ("model.json", "calibration.json")
    tags.update(_digest_tags(directory, "model.json", "calibration.json"))
    assert verify_digests(directory, tags, "m/1") == ()


def test_an_edited_file_is_refused_by_name(tmp_path):
    from noisewise.models.registry import RegistryError, verify_digests

    directory = _folder(tmp_path, {"weights.safetensors": b"w", "calibration.json": b'{"k": 50}'})
    tags = _digest_tags(directory, "weights.safetensors", "calibration.json")
    (directory / "calibration.json").write_bytes(b'{"k": 10}')
    with pytest.raises(RegistryError, match=r"^m/1: calibration\.json does not match the sha256"):
        verify_digests(directory, tags, "m/1")


def test_a_deleted_file_with_a_digest_is_refused(tmp_path):
    from noisewise.models.registry import RegistryError, verify_digests

    directory = _folder(tmp_path, {"weights.safetensors": b"w", "calibration.json": b"{}"})
    tags = _digest_tags(directory, "weights.safetensors", "calibration.json")
    (directory / "calibration.json").unlink()
    with pytest.raises(RegistryError, match=r"calibration\.json is missing"):
        verify_digests(directory, tags, "m/1")


# --- a registered version, edited in the artifact store ---------------------------------------------------


@pytest.fixture(scope="module")
def registered() -> str:
    """``NAME/1``: a digits model trained for one epoch and registered through the CLI."""
    from noisewise.services.cli import main

    name = "digest-test"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "--dataset", "digits", "--recipe", "ce", "--epochs", "1", "--register", name,
                     "--quiet"]) == 0
    return f"{name}/1"


def _stored(ref: str, file_name: str) -> Path:
    """The file of the registered version in the artifact store (the one load_model downloads)."""
    from tests.integration.serving_model import stored_artifacts

    (path,) = stored_artifacts(ref, file_name)
    return path


@contextlib.contextmanager
def _edited(path: Path, change):
    original = path.read_text()
    doc = json.loads(original)
    change(doc)
    path.write_text(json.dumps(doc, indent=2))
    try:
        yield
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_training_records_a_digest_of_every_file_it_registers(registered):
    from noisewise.models import registry

    _, _, run_id = registry.resolve_version(registered)
    tags = registry._mlflow().MlflowClient().get_run(run_id).data.tags
    digested = {tag[len(registry.DIGEST_TAG):] for tag in tags if tag.startswith(registry.DIGEST_TAG)}
    assert {"weights.safetensors", "model.json", "calibration.json", "calibration.safetensors"} <= digested
    loaded = registry.load_model(registered)
    assert loaded.unverified == () and loaded.calibration is not None


@pytest.mark.slow
@pytest.mark.parametrize("change", [
    _set("ood_scorer", "params", "k", 10),  # in range: only the digest can tell
    _set("ood_gate", "alpha_ood", 0.5),
    _set("cl_thresholds", [0.5] * 10),
], ids=["k 10", "alpha_ood 0.5", "cl thresholds"])
def test_an_edited_calibration_json_in_the_store_is_refused(registered, change):
    from noisewise.models import registry

    with _edited(_stored(registered, "calibration.json"), change), pytest.raises(registry.RegistryError) as err:
        registry.load_model(registered)
    assert str(err.value) == (f"{registered}: calibration.json does not match the sha256 recorded when it was "
                              "registered (tampered or corrupted artifact)")
    assert registry.load_model(registered).calibration is not None  # restored: loads again


@pytest.mark.slow
def test_a_refused_calibration_stops_the_service_check_with_status_3(registered, monkeypatch, capsys):
    from noisewise.services.service import EXIT_MODEL, check_model_here

    monkeypatch.setenv("NOISEWISE_MODEL", registered)
    with _edited(_stored(registered, "calibration.json"), _set("ood_scorer", "params", "k", 10)):
        assert check_model_here() == EXIT_MODEL == 3
    err = capsys.readouterr().err
    assert "calibration.json does not match the sha256" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_version_registered_without_a_calibration_digest_loads_with_a_warning(registered, capsys):
    """Versions registered before calibration.json carried a digest: accepted, said once on stderr, and still
    range-checked."""
    from noisewise.models import registry

    _, _, run_id = registry.resolve_version(registered)
    client = registry._mlflow().MlflowClient()
    removed = {name: client.get_run(run_id).data.tags[f"{registry.DIGEST_TAG}{name}"]
               for name in ("model.json", "calibration.json")}
    for name in removed:
        client.delete_tag(run_id, f"{registry.DIGEST_TAG}{name}")
    registry._WARNED_UNVERIFIED.discard(tuple(registered.split("/")))
    try:
        path = _stored(registered, "calibration.json")
        with _edited(path, _set("ood_scorer", "params", "k", 10)):
            loaded = registry.load_model(registered)
            assert loaded.unverified == ("model.json", "calibration.json")
            assert loaded.calibration.ood_scorer.k == 10  # an in-range edit goes through: nothing to compare with
            registry.load_model(registered)
        err = capsys.readouterr().err
        assert err.count("noisewise: warning:") == 1, err  # once per process
        assert f"{registered} was registered before noisewise recorded the sha256 of model.json, calibration.json" in err
        too_many = pytest.raises(registry.RegistryError, match=r"params\.k=1000000000 exceeds the bank size")
        with _edited(path, _set("ood_scorer", "params", "k", 10**9)), too_many:
            registry.load_model(registered)
        not_a_rate = pytest.raises(registry.RegistryError, match=r"noise\.flip_rate")
        with _edited(path, _set("noise", "flip_rate", math.nan)), not_a_rate:
            registry.load_model(registered)
    finally:
        for name, digest in removed.items():
            client.set_tag(run_id, f"{registry.DIGEST_TAG}{name}", digest)

"""MLflow round trip against a real SQLite tracking store under a temporary NOISEWISE_HOME."""

import numpy as np
import pytest
import torch

from noisewise.models import registry
from noisewise.models.data import load_dataset
from noisewise.models.train import load_recipe, train


@pytest.fixture(scope="module")
def store(tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("home")
    monkeypatch_module.setenv("NOISEWISE_HOME", str(home))
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def trained():
    ds = load_dataset("digits", "symmetric:0.2", seed=0)
    result = train(ds, load_recipe("gce", epochs=3), seed=0, progress=False)
    return ds, result


def _log(ds, result, **kwargs):
    spec = registry.spec_from_training(result.net, ds, result.recipe, result.arch_kwargs)
    return registry.log_training_run(result.net, spec, {"seed": 0, "recipe": "gce"}, result.history,
                                     result.metrics, **kwargs)


def test_register_promote_and_load_give_identical_predictions(store, trained):
    ds, result = trained
    logged = _log(ds, result, register_as="roundtrip", promote=True)
    assert (store / "mlflow.db").is_file() and registry.tracking_uri().startswith("sqlite:///")
    # all state under NOISEWISE_HOME: artifacts too, never ./mlruns in the working directory
    assert any((store / "artifacts").rglob("weights.safetensors"))
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ
    x = torch.as_tensor(ds.split("test")[0])
    with torch.no_grad():
        before = result.net.eval()(x)
    for ref in ["roundtrip@champion", f"roundtrip/{logged.version}", "roundtrip", f"models:/roundtrip/{logged.version}"]:
        loaded = registry.load_model(ref)
        with torch.no_grad():
            after = loaded.net(x)
        assert torch.equal(before, after), ref
        assert loaded.version == logged.version and loaded.run_id == logged.run_id
    assert loaded.spec.class_names == ds.class_names and loaded.spec.input_shape == [1, 8, 8]
    assert loaded.spec.lineage["source"] == "sklearn.datasets.load_digits"


def test_alias_moves_only_when_promoted(store, trained):
    ds, result = trained
    first = _log(ds, result, register_as="aliasing", promote=True)
    second = _log(ds, result, register_as="aliasing", promote=False)
    assert int(second.version) == int(first.version) + 1
    assert registry.resolve_version("aliasing@champion")[1] == first.version
    third = _log(ds, result, register_as="aliasing", promote=True)
    assert registry.resolve_version("aliasing@champion")[1] == third.version


def test_run_logs_params_per_epoch_and_final_metrics(store, trained):
    import mlflow

    ds, result = trained
    logged = _log(ds, result)
    assert logged.version is None
    client = mlflow.MlflowClient()
    run = client.get_run(logged.run_id)
    assert run.data.params["recipe"] == "gce"
    assert run.data.metrics["final_val_noisy_accuracy"] == pytest.approx(result.metrics["val_noisy_accuracy"])
    epochs = client.get_metric_history(logged.run_id, "val_noisy_accuracy")
    assert [m.step for m in epochs] == list(range(len(result.history)))


def test_pyfunc_loads_without_pickle_and_agrees(store, trained):
    import mlflow

    ds, result = trained
    logged = _log(ds, result, register_as="pyfunc")
    model = mlflow.pyfunc.load_model(f"models:/pyfunc/{logged.version}")
    x = ds.split("test")[0][:16]
    probs = np.asarray(model.predict(x))  # [16, 1, 8, 8] float32, as the logged signature says
    with torch.no_grad():
        expected = torch.softmax(result.net(torch.as_tensor(x)), 1).numpy()
    assert np.allclose(probs, expected, atol=1e-6)


def test_unknown_references_are_explained(store):
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.load_model("no-such-model@champion")
    assert not registry.has_alias("no-such-model")


def test_tampered_and_truncated_weights_are_refused(tmp_path, trained):
    ds, result = trained
    spec = registry.spec_from_training(result.net, ds, result.recipe)
    registry.save_model_dir(result.net, spec, tmp_path)
    assert torch.equal(registry.load_model_dir(tmp_path).net.head.weight, result.net.head.weight)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(registry.RegistryError, match="cannot load weights"):
        registry.load_model_dir(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        registry.load_model_dir(tmp_path)

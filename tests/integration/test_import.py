"""`noisewise import` of models noisewise did not train: a small CNN trained here in plain torch, saved as
TorchScript (with and without forward_features/forward_head) and as torch.export programs, imported through the
CLI into a real MLflow store; torchvision/timm through fake modules; and the refusals (pickles, missing extras,
wrong input shapes, tampered archives, pickled records inside a .pt2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from noisewise.models import imported, registry
from noisewise.models.data import load_dataset

#: The CNN is trained on (x - MEAN) / STD: importing it needs --mean/--std, which the version must apply.
MEAN, STD = 0.3, 0.4
PREPROCESS = ["--mean", str(MEAN), "--std", str(STD)]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits that noisewise never saw, with the timm-style split exported to TorchScript."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.jit.export
    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_cnn() -> DigitsCNN:
    """60 full-batch Adam steps on the digits train split (the split `import` uses for the OOD bank only), so
    the calibration and test items stay unseen: about 92% test accuracy."""
    x, y, _ = load_dataset("digits", "none", seed=0).split("train")
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, labels = (torch.as_tensor(x) - MEAN) / STD, torch.as_tensor(y)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval()


def save_models(model: DigitsCNN, directory: Path) -> dict[str, Path]:
    """The model in every form `import` takes (and one it refuses)."""
    example = torch.rand(3, 1, 8, 8)
    paths = {name: directory / file for name, file in {
        "features": "cnn_features.pt", "logits": "cnn_logits.pt", "program": "cnn.pt2",
        "static_program": "cnn_static.pt2", "state_dict": "cnn_state.pt"}.items()}
    torch.jit.save(torch.jit.script(model), paths["features"])
    # a trace of forward only: no forward_features/forward_head, i.e. logits-only
    torch.jit.save(torch.jit.trace(nn.Sequential(model.body, model.head).eval(), example), paths["logits"])
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      paths["program"])
    torch.export.save(torch.export.export(model, (example,)), paths["static_program"])  # batch size fixed at 3
    torch.save(model.state_dict(), paths["state_dict"])
    return paths


def reference_logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model((torch.as_tensor(x) - MEAN) / STD)


def run_main(*args: str) -> tuple[int, str, str]:
    """`noisewise ARGS` in this process (the real parser and handlers): ``(status, stdout, stderr)``."""
    from noisewise.services.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The CLI's one-line error (MLflow may log before it)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("noisewise: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class Evil:
    """Unpickling it creates ``path``: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def home():
    """The session's store (tests/conftest.py): created once for every test that registers models."""
    return registry.home_dir()


@pytest.fixture(scope="module")
def cnn():
    return train_cnn()


@pytest.fixture(scope="module")
def files(cnn, tmp_path_factory):
    return save_models(cnn, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def digits_test():
    x, _, y_clean = load_dataset("digits", "none", seed=0).split("test")
    return x, y_clean


@pytest.fixture(scope="module")
def features_version(home, files):
    status, out, err = run_main("import", str(files["features"]), "--dataset", "digits", "--register", "imp-features",
                                "--promote", *PREPROCESS, "--json")
    assert status == 0, err
    return json.loads(out)


def test_torchscript_with_features_serves_its_own_outputs_with_feature_ood(features_version, files, cnn, digits_test):
    out = features_version
    assert out["arch"] == "torchscript" and out["logits_only"] is False
    assert out["features"] == "forward_features/forward_head (linear head)"
    assert out["model_version"] == "1" and out["promoted"] is True
    assert out["calibration"]["ood"]["scorer"] == "knn" and "logits-only" not in out["calibration"]["ood"]["condition"]
    assert any("not trained on the calibration and test items" in a for a in out["calibration"]["assumptions"])
    # 92% on 269 test items: more than 3 standard errors (1.7 points each) above 0.85
    assert out["evaluation"]["accuracy"] > 0.85
    assert abs(out["evaluation"]["coverage"] - 0.9) < 3 * np.sqrt(0.09 / 269) + 0.03

    loaded = registry.load_model("imp-features@champion")
    assert isinstance(loaded.net, imported.ScriptModel) and loaded.spec.arch == "torchscript"
    assert loaded.spec.preprocess == {"input_shape": [1, 8, 8], "resize": None, "mean": [MEAN], "std": [STD]}
    assert loaded.spec.arch_kwargs["sha256"] == imported.sha256_bytes(files["features"].read_bytes())
    tags = registry._mlflow().MlflowClient().get_run(loaded.run_id).data.tags
    assert tags[f"{registry.DIGEST_TAG}model.torchscript"] == loaded.spec.arch_kwargs["sha256"]
    x, _ = digits_test
    expected = reference_logits(cnn, x)
    with torch.no_grad():
        assert torch.allclose(loaded.net(torch.as_tensor(x)), expected, atol=1e-5)
        features = loaded.net.forward_features(torch.as_tensor(x))
    assert features.shape == (len(x), 32)  # the penultimate features, not the logits

    from noisewise.models.predictor import Predictor

    predictions = Predictor(loaded.net, loaded.calibration, device="cpu").predict(x)
    assert [p.label for p in predictions] == expected.argmax(1).tolist()


def test_recalibrating_an_imported_version_keeps_its_archive(features_version, cnn, digits_test):
    # vim reads the head's weight: accepted only because forward_head was checked to be that linear layer
    status, out, err = run_main("calibrate", "--model", "imp-features@champion", "--ood-scorer", "vim", "--json")
    assert status == 0, err
    version = json.loads(out)["model_version"]
    assert version == "2"
    loaded = registry.load_model(f"imp-features/{version}")
    assert loaded.calibration.ood_scorer.name == "vim" and isinstance(loaded.net, imported.ScriptModel)
    x, _ = digits_test
    with torch.no_grad():
        assert torch.allclose(loaded.net(torch.as_tensor(x)), reference_logits(cnn, x), atol=1e-5)
    # the same archive and weights: the same outputs, so feedback on either version counts for both
    assert loaded.weights == registry.load_model("imp-features/1").weights


def test_tampered_archive_is_refused(features_version, files, home, tmp_path):
    original = files["features"].read_bytes()
    # every stored copy of this archive (versions 1 and 2), not other tests' archives in the session's store
    stored = [path for path in sorted(home.rglob("model.torchscript")) if path.read_bytes() == original]
    assert stored
    try:
        for path in stored:
            data = bytearray(original)
            data[len(data) // 2] ^= 0x01  # one bit in the middle of the archive
            path.write_bytes(bytes(data))
        with pytest.raises(registry.RegistryError, match="model.torchscript does not match the sha256 recorded"):
            registry.load_model("imp-features/1")
        # without the run's tags (a copied folder, the pyfunc flavour): model.json's sha256 refuses it too
        folder = tmp_path / "copy"
        shutil.copytree(stored[0].parent, folder)
        with pytest.raises(registry.RegistryError, match="sha256 recorded in model.json"):
            registry.load_model_dir(folder)
    finally:
        for path in stored:
            path.write_bytes(original)
    assert registry.load_model("imp-features/1").spec.arch == "torchscript"


def test_logits_only_program_gets_a_logit_ood_score_and_says_so(home, files, cnn, digits_test):
    program = str(files["program"])
    for scorer in ("knn", "vim"):
        status, _, err = run_main("import", program, "--dataset", "digits", "--register", "imp-program",
                                  *PREPROCESS, "--ood-scorer", scorer)
        assert status == 2
        assert f"--ood-scorer {scorer}: this model is logits-only" in error_line(err)
        assert "energy, maxlogit, msp" in err
    status, out, err = run_main("import", program, "--dataset", "digits", "--register", "imp-program", *PREPROCESS,
                                "--json")
    assert status == 0, err
    out = json.loads(out)
    assert out["arch"] == "export" and out["logits_only"] is True and out["features"].startswith("none: logits-only")
    ood = out["calibration"]["ood"]
    assert ood["scorer"] == "energy" and ood["kind"] == "valid"
    assert "logits-only (no features available)" in ood["condition"]
    assert any(a.startswith("ood: energy score of the logits") for a in out["calibration"]["assumptions"])

    loaded = registry.load_model("imp-program/1")
    assert loaded.net.logits_only and loaded.net.static_batch is None
    x, _ = digits_test
    with torch.no_grad():
        assert torch.allclose(loaded.net(torch.as_tensor(x)), reference_logits(cnn, x), atol=1e-5)
    assert loaded.calibration.summary()["ood"]["scorer"] == "energy"


def test_program_with_a_fixed_batch_size_runs_in_chunks(files, cnn, digits_test):
    net = imported.build("export", (1, 8, 8), 10, imported.Preprocess((1, 8, 8), mean=(MEAN,), std=(STD,)),
                         archive=files["static_program"].read_bytes())
    assert net.static_batch == 3
    x = digits_test[0][:7]
    with torch.no_grad():  # 7 items: chunks of 3, 3 and 1 padded to 3
        assert torch.allclose(net(torch.as_tensor(x)), reference_logits(cnn, x), atol=1e-5)


@pytest.mark.parametrize("form", ["raw", "torch.save"])
def test_pickles_are_refused_and_never_unpickled(home, tmp_path, form):
    sentinel = tmp_path / "unpickled"
    evil = tmp_path / "model.pt"
    if form == "raw":
        evil.write_bytes(pickle.dumps(Evil(sentinel)))
    else:
        torch.save(Evil(sentinel), evil)
    weights = tmp_path / "weights.pth"
    shutil.copy(evil, weights)
    for args in ([str(evil)], ["--arch", "torchvision:resnet18", "--weights", str(weights)]):
        status, _, err = run_main("import", *args, "--dataset", "digits", "--register", "never")
        assert status == 2
        line = error_line(err)
        assert "it is a pickle" in line and "would run arbitrary code" in line and "safetensors" in line
    assert not sentinel.exists()
    assert not registry.has_alias("never")


def test_missing_extras_name_the_extra(home, tmp_path, monkeypatch):
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    for name in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, whether or not it is installed
    for arch, extra in (("torchvision:resnet18", "noisewise[torchvision]"), ("timm:resnet18", "noisewise[timm]")):
        status, _, err = run_main("import", "--arch", arch, "--weights", str(weights), "--dataset", "digits",
                                  "--register", "never")
        assert status == 2
        assert error_line(err) == (f"noisewise: error: --arch {arch}: {arch.split(':')[0]} is not installed; install "
                                   f"the extra: pip install '{extra}'")


def test_missing_torchvision_in_a_real_process(home, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    env = {**os.environ, "NOISEWISE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "import", "--arch", "torchvision:resnet18",
                           "--weights", str(weights), "--dataset", "digits", "--register", "never"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [(
        "noisewise: error: --arch torchvision:resnet18: torchvision is not installed; install the extra: pip install "
        "'noisewise[torchvision]'")]


@pytest.mark.parametrize("options, message", [
    (["--input-shape", "3,8,8"], "does not run on inputs shaped [3, 8, 8]"),
    (["--input-shape", "2,8,8"], "1 input channels cannot become 2"),
    (["--input-shape", "64"], "does not fit the dataset's items, shaped [1, 8, 8]"),
    (["--mean", "0.1,0.2"], "--mean: give 1 or 1 values"),
    (["--std", "0"], "--std: values must be > 0"),
    (["--resize", "4"], "--resize: 4 is smaller than the crop 8x8"),
])
def test_wrong_input_shapes_and_preprocessing_are_refused(home, files, options, message):
    status, _, err = run_main("import", str(files["features"]), "--dataset", "digits", "--register", "never",
                              *options)
    assert status == 2 and message in error_line(err)


def test_wrong_number_of_classes_is_refused(home, files, tmp_path):
    x, y, _ = load_dataset("digits", "none", seed=0).split("train")
    keep = y < 5
    data = tmp_path / "five.npz"
    np.savez(data, x=x[keep], y=y[keep])
    status, _, err = run_main("import", str(files["features"]), "--dataset", str(data), "--register", "never")
    assert status == 2 and "expected logits [4, 5] (one per class of the dataset)" in error_line(err)


def _rewrite_program(source: Path, target: Path, change) -> None:
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(source)) as reader:
        records = {name: reader.read_bytes(name) for name in reader.get_file_names() if not name.startswith(".data/")}
    change(records)
    with PT2ArchiveWriter(str(target)) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)


def test_program_records_are_checked_and_example_inputs_never_unpickled(home, files, tmp_path):
    sentinel = tmp_path / "unpickled"
    trap = tmp_path / "trap.pt2"  # example inputs that fail weights_only loading: torch would unpickle them fully
    payload = io.BytesIO()
    torch.save(Evil(sentinel), payload)
    _rewrite_program(files["program"], trap, lambda r: r.update({"data/sample_inputs/model.pt": payload.getvalue()}))
    net = imported.build("export", (1, 8, 8), 10, imported.Preprocess((1, 8, 8)), archive=trap.read_bytes())
    assert net(torch.rand(5, 1, 8, 8)).shape == (5, 10) and net.static_batch is None
    assert not sentinel.exists()
    with contextlib.suppress(Exception):  # what noisewise avoids: plain torch.export.load runs the pickle
        torch.export.load(str(trap))
    assert sentinel.exists()

    opaque = tmp_path / "opaque.pt2"
    _rewrite_program(files["program"], opaque, lambda r: r.update({"data/constants/opaque_obj_0": b"x"}))
    status, _, err = run_main("import", str(opaque), "--dataset", "digits", "--register", "never")
    assert status == 2 and "holds 'data/constants/opaque_obj_0', which noisewise does not load" in error_line(err)

    def pickled_weight(records):
        config = json.loads(records["data/weights/model_weights_config.json"])
        next(iter(config["config"].values()))["use_pickle"] = True
        records["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    pickled = tmp_path / "pickled.pt2"
    _rewrite_program(files["program"], pickled, pickled_weight)
    with pytest.raises(imported.ImportedModelError, match="stores 'body.0.weight' as a pickle"):
        imported.build("export", (1, 8, 8), 10, imported.Preprocess((1, 8, 8)), archive=pickled.read_bytes())


# --- torchvision / timm through fake modules: the extras are not installed (they would replace the pinned torch)
class TinyResNet(nn.Module):
    """The attributes torchvision's ResNet.forward uses, at toy size."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Conv2d(4, 6, 3, padding=1)
        self.layer2 = nn.ReLU()
        self.layer3 = nn.Conv2d(6, 6, 1)
        self.layer4 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):  # torchvision's order
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _fake_torchvision(monkeypatch) -> None:
    package = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.resnet18 = lambda weights=None, num_classes=1000: TinyResNet(num_classes)
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_torchvision_resnet_is_split_at_avgpool_and_fc(home, tmp_path, monkeypatch, digits_test):
    _fake_torchvision(monkeypatch)
    torch.manual_seed(1)
    source = TinyResNet(10).eval()
    weights = tmp_path / "resnet.safetensors"
    save_file(source.state_dict(), str(weights))
    status, out, err = run_main("import", "--arch", "torchvision:resnet18", "--weights", str(weights), "--dataset",
                                "digits", "--register", "imp-resnet", "--ood-scorer", "vim", "--json")
    assert status == 0, err
    out = json.loads(out)
    assert out["arch"] == "torchvision:resnet18" and out["features"] == "forward_features/forward_head (linear head)"
    # 3 channels from conv1 (grey digits repeated), ImageNet statistics by default
    assert out["input"]["preprocess"] == {"input_shape": [3, 8, 8], "resize": None,
                                          "mean": list(imported.IMAGENET_MEAN), "std": list(imported.IMAGENET_STD)}
    loaded = registry.load_model("imp-resnet/1")
    assert loaded.calibration.ood_scorer.name == "vim"
    x = torch.as_tensor(digits_test[0][:16])
    z = (x.expand(-1, 3, -1, -1) - torch.tensor(imported.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        imported.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = source.avgpool(source.layer4(source.layer3(source.layer2(source.layer1(source.maxpool(source.relu(
            source.bn1(source.conv1(z)))))))))
        assert torch.allclose(loaded.net.forward_features(x), torch.flatten(pooled, 1), atol=1e-6)
        assert torch.allclose(loaded.net(x), source(z), atol=1e-6)
    assert loaded.net.linear_head()[0].shape == (10, 6)
    assert {"model.fc.weight", "input_mean"} <= set(loaded.net.state_dict())  # stored in weights.safetensors


def test_timm_model_is_split_at_pre_logits(monkeypatch, tmp_path, digits_test):
    class TinyTimm(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.pretrained_cfg = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
            self.stem = nn.Conv2d(3, 5, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(5, num_classes)

        def forward_features(self, x):
            return self.stem(x)

        def forward_head(self, x, pre_logits: bool = False):
            x = self.pool(x).flatten(1)
            return x if pre_logits else self.head(x)

        def get_classifier(self):
            return self.head

    timm = types.ModuleType("timm")
    timm.create_model = lambda name, pretrained=False, num_classes=1000: TinyTimm(num_classes)
    monkeypatch.setitem(sys.modules, "timm", timm)
    torch.manual_seed(2)
    weights = tmp_path / "timm.safetensors"
    save_file(TinyTimm(10).state_dict(), str(weights))
    source = imported.check_source(arch="timm:tiny", weights=weights)
    x = torch.as_tensor(digits_test[0][:6])
    net = imported.import_model(source, (1, 8, 8), 10, resize=8, probe=x)
    # the model's own channels and statistics; the network sees 8x8 (the dataset's size), center-cropped
    assert net.preprocess == imported.Preprocess((3, 8, 8), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    z = (x.expand(-1, 3, -1, -1) - 0.5) / 0.25
    with torch.no_grad():
        features = net.forward_features(x)
        assert torch.allclose(features, net.model.forward_head(net.model.forward_features(z), pre_logits=True))
        assert features.shape == (6, 5) and torch.allclose(net.forward_head(features), net.model.head(features))
    state = {k: v for k, v in net.state_dict().items()}
    folder = tmp_path / "version"
    spec = registry.ModelSpec(arch=net.arch, input_shape=[1, 8, 8], class_names=[str(i) for i in range(10)],
                              arch_kwargs=net.arch_kwargs(), preprocess=net.preprocess.to_dict())
    registry.save_model_dir(net, spec, folder)
    again = registry.load_model_dir(folder)
    assert isinstance(again.net, imported.TimmModel)
    assert all(torch.equal(again.net.state_dict()[k], v) for k, v in state.items())


def test_preprocessing_converts_channels_and_sizes():
    """Grey -> RGB repeats the channel; RGB -> grey is the luma; Resize(S) + CenterCrop matches the arithmetic."""
    rgb = torch.rand(2, 3, 10, 6)

    class Identity(imported.ImportedModel):
        def _features(self, z):
            return z.flatten(1)

        def forward_head(self, f):
            return f

    grey = Identity((3, 10, 6), 1, imported.Preprocess((1, 10, 6))).prepare(rgb)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(grey[:, 0], luma, atol=1e-6)
    crop = Identity((3, 10, 6), 1, imported.Preprocess((3, 4, 4), resize=6)).prepare(rgb)
    # shorter side 6 -> 6: no resize, a 4x4 crop centred in 10x6: rows 3..6, columns 1..4
    assert torch.equal(crop, rgb[:, :, 3:7, 1:5])
    up = Identity((1, 4, 4), 1, imported.Preprocess((3, 8, 8), mean=(0.5,), std=(2.0,))).prepare(torch.ones(1, 1, 4, 4))
    assert up.shape == (1, 3, 8, 8) and torch.allclose(up, torch.full_like(up, 0.25))
    vectors = Identity((4,), 1, imported.Preprocess((4,), mean=(1.0, 2.0, 3.0, 4.0), std=(2.0,))).prepare(torch.ones(2, 4))
    assert torch.equal(vectors, torch.tensor([[0.0, -0.5, -1.0, -1.5]] * 2))
    with pytest.raises(imported.ImportedModelError, match="only images"):
        imported.Preprocess((3,)).check((4,))

"""Safe loading of registered artifacts: nothing from the registry is unpickled, and a truncated or tampered
``weights.safetensors``, ``calibration.safetensors`` or ``calibration.json`` is refused with a clear error.
The artifacts are the registered serving-test model's, written to a folder with ``save_model_dir`` and then
damaged, one way per case."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch

from noisewise.models.registry import RegistryError, load_model, load_model_dir, save_model_dir
from tests.integration.serving_model import ensure_model, stored_artifacts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TENSOR_FILES = ("weights.safetensors", "calibration.safetensors")


@pytest.fixture(scope="module")
def registered():
    return load_model(ensure_model())


@pytest.fixture
def artifacts(tmp_path, registered):
    save_model_dir(registered.net, registered.spec, tmp_path, registered.calibration)
    assert load_model_dir(tmp_path).weights == registered.weights  # intact: loads, same weights
    return tmp_path


class Payload:
    """A pickle that creates ``marker`` when unpickled: proof that no loader executes pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def refused(directory: Path, *needles: str) -> str:
    with pytest.raises(RegistryError) as err:
        load_model_dir(directory)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    return message


def rewrite_header(path: Path, change) -> None:
    """Apply ``change`` to the JSON header of a safetensors file, keeping its data (the 8-byte length prefix
    follows the new header)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def first_tensor(header: dict) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


@pytest.mark.parametrize("name", TENSOR_FILES)
@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1], ids=lambda k: f"keep {k}")
def test_truncated_tensor_file_is_refused(artifacts, name, keep):
    path = artifacts / name
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:cut])
    refused(artifacts, name)


@pytest.mark.parametrize("name", TENSOR_FILES)
@pytest.mark.parametrize("damage", ["appended bytes", "dtype", "shape", "offsets past the end", "renamed tensor",
                                    "dropped tensor", "header length"])
def test_tampered_tensor_file_is_refused(artifacts, name, damage):
    path = artifacts / name
    if damage == "appended bytes":
        path.write_bytes(path.read_bytes() + b"\0" * 64)
    elif damage == "dtype":
        rewrite_header(path, lambda h: first_tensor(h).update(dtype="F64" if first_tensor(h)["dtype"] != "F64" else "F32"))
    elif damage == "shape":
        rewrite_header(path, lambda h: first_tensor(h).update(shape=[*first_tensor(h)["shape"], 2]))
    elif damage == "offsets past the end":
        rewrite_header(path, lambda h: first_tensor(h).update(data_offsets=[0, 10**12]))
    elif damage == "renamed tensor":
        def rename(h):
            key = next(k for k in sorted(h) if k != "__metadata__")
            h["evil." + key] = h.pop(key)
        rewrite_header(path, rename)
    elif damage == "dropped tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        tensors.pop(max(tensors))
        save_file(tensors, str(path))
    else:
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    refused(artifacts)


@pytest.mark.parametrize("name", TENSOR_FILES)
@pytest.mark.parametrize("form", ["raw pickle", "torch.save zip"])
def test_a_pickle_in_place_of_a_tensor_file_is_refused_without_running_it(artifacts, tmp_path_factory, name, form):
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    path = artifacts / name
    if form == "raw pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"head.weight": Payload(marker)}, str(path))
    refused(artifacts, name)
    assert not marker.exists()


CALIBRATION_DAMAGE = {
    "truncated": (lambda text: text[: len(text) // 2], "not valid JSON"),
    "empty": (lambda text: "", "not valid JSON"),
    "a pickle": (lambda text: pickle.dumps(0).decode("latin-1"), "not valid JSON"),
    "a list": (lambda text: "[]", "expected format"),
    "format": (lambda text: text.replace('"noisewise-calibration/', '"pickle/'), "expected format"),
    "missing threshold": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "threshold"}),
                          "missing fields ['threshold']"),
    "unknown score": (lambda text: json.dumps({**json.loads(text), "conformity_score": "eval"}),
                      "unknown conformity score"),
    "one threshold short": (lambda text: json.dumps({**json.loads(text),
                                                     "cl_thresholds": json.loads(text)["cl_thresholds"][1:]}),
                            "one value per class"),
    "class names": (lambda text: json.dumps({**json.loads(text), "class_names": list("abcdefghij")}),
                    "class_names differ"),
    "q not a number": (lambda text: json.dumps(_set(json.loads(text), ("threshold", "q"), "abc")), "inconsistent"),
    "OOD scorer by import path": (lambda text: json.dumps(_set(json.loads(text), ("ood_scorer", "name"),
                                                              "os.system")), "must be one of"),
    "OOD scorer arguments": (lambda text: json.dumps(_set(json.loads(text), ("ood_scorer", "params"),
                                                         {"__class__": "x"})), "inconsistent"),
    "OOD alpha": (lambda text: json.dumps(_set(json.loads(text), ("ood_gate", "alpha_ood"), 5.0)), "alpha_ood"),
    "OOD n": (lambda text: json.dumps(_set(json.loads(text), ("ood_gate", "n"), 3)), "calibration scores"),
}


def _top(key: str, value):
    def change(text: str) -> str:
        doc = json.loads(text)
        doc[key] = value
        return json.dumps(doc)
    return change


def _nested(path: tuple, value):
    return lambda text: json.dumps(_set(json.loads(text), path, value))


# values of the right JSON type that would still serve nonsense (empty or full sets, never-accepting
# abstention): refused by the range checks of Calibration.load
CALIBRATION_DAMAGE.update({
    "q NaN": (_nested(("threshold", "q"), float("nan")), "threshold.q"),
    "q negative": (_nested(("threshold", "q"), -1.0), "threshold.q"),
    "alpha above 1": (_nested(("threshold", "alpha"), 2.0), "threshold.alpha"),
    "alpha negative": (_nested(("threshold", "alpha"), -1.0), "threshold.alpha"),
    "certified not a bool": (_nested(("certified", "certified"), "yes"), "certified.certified"),
    "risk above 1": (_nested(("certified", "risk"), 5.0), "certified.risk"),
    "cl thresholds above 1": (lambda text: json.dumps({**json.loads(text), "cl_thresholds":
                                                       [2.0] * len(json.loads(text)["cl_thresholds"])}), "cl_thresholds"),
    "cl thresholds a dict": (_top("cl_thresholds", {"a": 1}), "cl_thresholds"),
    "unknown confidence function": (_top("confidence_name", "os.system"), "confidence function"),
    "confidence params": (_top("confidence_params", {"__class__": 1}), "confidence_params"),
    "noise a string": (_top("noise", "lots"), "noise"),
    "assumptions a number": (_top("assumptions", 3), "assumptions"),
})


def _set(doc: dict, path: tuple, value) -> dict:
    doc[path[0]][path[1]] = value
    return doc


@pytest.mark.parametrize("damage", sorted(CALIBRATION_DAMAGE))
def test_tampered_calibration_json_is_refused(artifacts, damage):
    change, needle = CALIBRATION_DAMAGE[damage]
    path = artifacts / "calibration.json"
    path.write_text(change(path.read_text()))
    message = refused(artifacts, needle)
    assert "\n" not in message.strip()


@pytest.mark.parametrize("name", ["model.json", "weights.safetensors", "calibration.safetensors"])
def test_missing_artifact_is_refused(artifacts, name):
    (artifacts / name).unlink()
    refused(artifacts)


def test_registered_artifacts_hold_no_pickle(registered):
    """Every file of the registered version, as MLflow stores it: none is a pickle (MLflow's model is logged
    from code, the weights and calibration are safetensors + JSON)."""
    import mlflow

    from noisewise.models.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered.name}/{registered.version}"))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"weights.safetensors", "calibration.safetensors", "calibration.json", "model.json"} <= {p.name for p in files}
    for path in files:
        head = path.read_bytes()[:2]
        assert path.suffix not in {".pkl", ".pickle", ".pt", ".pth", ".joblib"}, path
        assert not (len(head) == 2 and head[0] == 0x80 and head[1] <= 5), f"{path} is a pickle"


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\b"), "cloudpickle"),
    (re.compile(r"\bjoblib\.load\("), "joblib.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\bdill\b"), "dill"),
]


def test_no_code_path_unpickles():
    """torch.load only with weights_only=True; no pickle, cloudpickle, joblib or allow_pickle anywhere in the
    shipped code."""
    problems = []
    for folder in ("models", "services", "monitoring", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start():text.find(")", match.start()) + 1]
                if "weights_only=True" not in call:
                    problems.append(f"{path.relative_to(ROOT)}: {call}")
            problems += [f"{path.relative_to(ROOT)}: {what}" for pattern, what in UNSAFE if pattern.search(text)]
    assert problems == []


@pytest.mark.parametrize("name", TENSOR_FILES)
def test_a_flipped_byte_in_registered_tensor_data_is_refused(name):
    """safetensors cannot see a changed byte inside tensor data; the sha256 recorded at registration can."""
    import contextlib
    import io

    from noisewise.models import registry
    from noisewise.services.cli import main

    model = f"tamper-test-{name.split('.')[0]}"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--dataset", "digits", "--recipe", "ce", "--epochs", "4", "--risk", "0.25",
                     "--register", model, "--promote", "--quiet"]) == 0
    registry.load_model(f"{model}@champion")  # intact: loads
    _, _, run_id = registry.resolve_version(f"{model}@champion")
    expected = registry._mlflow().MlflowClient().get_run(run_id).data.tags[f"{registry.DIGEST_TAG}{name}"]
    stored = [p for p in stored_artifacts(f"{model}@champion", name) if registry._sha256(p) == expected]
    assert stored, "the registered artifact was not found in the store"
    for path in stored:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # last byte of the last tensor: still a valid safetensors file
        path.write_bytes(bytes(data))
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.load_model(f"{model}@champion")

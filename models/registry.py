"""The only MLflow code in noisewise: tracking location, logging a run, registering, aliasing, loading.

A registered model version holds ``weights.safetensors`` (no pickle, so loading executes no code from
the store) and ``model.json`` (architecture, input spec, class names, data lineage, recipe), logged as an
MLflow pyfunc "model from code" (``models/pyfunc_model.py``), so ``mlflow.pyfunc.load_model`` works too.
noisewise itself loads versions with :func:`load_model`, which only reads those two files.

Tracking store: ``MLFLOW_TRACKING_URI`` when set, otherwise a SQLite file under ``NOISEWISE_HOME``
(default ``./.noisewise``), with artifacts beside it. Promotion moves the alias ``champion``; registry
stages are deprecated in MLflow and are not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from noisewise.models.nets import Classifier, arch_name, build_net

if TYPE_CHECKING:
    from noisewise.models.calibrate import Calibration

EXPERIMENT = "noisewise"
CHAMPION = "champion"
MODEL_FORMAT = "noisewise-model/1"
DIGEST_TAG = "noisewise.sha256."
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class RegistryError(RuntimeError):
    """A model reference that does not resolve, or artifacts that are missing or malformed."""


def home_dir() -> Path:
    """``NOISEWISE_HOME`` (default ``./.noisewise``), created on first use."""
    home = Path(os.environ.get("NOISEWISE_HOME", ".noisewise")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _default_uri() -> str:
    return f"sqlite:///{home_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def _mlflow():
    """Import MLflow quietly and point it at noisewise's store."""
    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(name, "true")
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    exported = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow exports the URIs to the environment; undo that so NOISEWISE_HOME stays the source of truth
    for key, value in exported.items():
        if value is None:
            os.environ.pop(key, None)
    return mlflow


def _experiment_id(mlflow) -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri() == _default_uri():  # a user-chosen store or server decides its own artifact location
        location = (home_dir() / "artifacts").as_uri()
    return mlflow.create_experiment(EXPERIMENT, artifact_location=location)


@dataclass
class ModelSpec:
    """Everything besides the weights needed to rebuild and describe a network (``model.json``)."""

    arch: str
    input_shape: list[int]
    class_names: list[str]
    arch_kwargs: dict = field(default_factory=dict)
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    lineage: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    format: str = MODEL_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RegistryError(f"model.json is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise RegistryError(f"model.json: expected format {MODEL_FORMAT!r}")
        missing = {"arch", "input_shape", "class_names"} - set(data)
        if missing:
            raise RegistryError(f"model.json: missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class LoadedModel:
    """A network in eval mode with its spec and where it came from."""

    net: Classifier
    spec: ModelSpec
    calibration: "Calibration | None" = None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    uri: str | None = None
    weights: str | None = None  # sha256 of weights.safetensors: versions with equal weights give equal outputs


@dataclass(frozen=True)
class RegisteredVersion:
    run_id: str
    name: str | None
    version: str | None
    promoted: bool


def save_model_dir(net: Classifier, spec: ModelSpec, directory: Path,
                   calibration: "Calibration | None" = None) -> dict[str, str]:
    """Write ``weights.safetensors``, ``model.json`` and the calibration files; returns MLflow's
    artifacts mapping (name -> path)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / "weights.safetensors"))
    (directory / "model.json").write_text(spec.to_json())
    artifacts = {"weights": str(directory / "weights.safetensors"), "spec": str(directory / "model.json")}
    if calibration is not None:
        for path in calibration.save(directory):
            artifacts[path.name.replace(".", "_")] = str(path)
    return artifacts


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network from a folder holding ``weights.safetensors`` and ``model.json``."""
    directory = Path(directory)
    spec_file, weights_file = directory / "model.json", directory / "weights.safetensors"
    for f in (spec_file, weights_file):
        if not f.is_file():
            raise RegistryError(f"model artifacts in {directory} lack {f.name}")
    spec = ModelSpec.from_json(spec_file.read_text())
    net = build_net(spec.arch, tuple(spec.input_shape), spec.num_classes, **spec.arch_kwargs)
    try:
        state = load_file(str(weights_file), device=str(device))
        net.load_state_dict(state, strict=True)
    except Exception as err:  # safetensors raises its own error types for truncated/tampered files
        raise RegistryError(f"cannot load weights from {weights_file}: {err}") from None
    calibration = None
    if (directory / "calibration.json").exists() or (directory / "calibration.safetensors").exists():
        from noisewise.models.calibrate import Calibration, CalibrationError

        try:
            calibration = Calibration.load(directory, device=device)
        except CalibrationError as err:
            raise RegistryError(str(err)) from None
        if calibration.class_names != spec.class_names:
            raise RegistryError("calibration.json: class_names differ from model.json")
    return LoadedModel(net.to(device).eval(), spec, calibration, weights=_sha256(weights_file))


def log_training_run(
    net: Classifier,
    spec: ModelSpec,
    params: dict,
    history: list[dict],
    metrics: dict,
    register_as: str | None = None,
    promote: bool = False,
    calibration: "Calibration | None" = None,
    tags: dict | None = None,
) -> RegisteredVersion:
    """Log params, per-epoch metrics, final metrics, the model and its calibration; optionally register
    and promote. A recalibration logs a new run (and version) with the same weights: versions are
    immutable, and the service follows the alias."""
    mlflow = _mlflow()
    from mlflow.entities import Metric

    experiment_id = _experiment_id(mlflow)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        mlflow.set_tags({"noisewise.arch": spec.arch, "noisewise.dataset": spec.lineage.get("source", ""),
                         "noisewise.calibrated": str(calibration is not None).lower(), **(tags or {})})
        now = int(time.time() * 1000)
        per_epoch = [
            Metric(key, float(value), now, int(record["epoch"]))
            for record in history
            for key, value in record.items()
            if key != "epoch" and value is not None
        ]
        client = mlflow.MlflowClient()
        for start in range(0, len(per_epoch), 1000):  # MLflow caps a batch at 1000 metrics
            client.log_batch(run.info.run_id, metrics=per_epoch[start : start + 1000])
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if v is not None})
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = save_model_dir(net, spec, Path(tmp), calibration)
            # digests of the tensor files, checked at load: safetensors cannot tell a flipped byte in tensor data
            mlflow.set_tags({f"{DIGEST_TAG}{Path(path).name}": _sha256(Path(path)) for path in artifacts.values()
                             if path.endswith(".safetensors")})
            from mlflow.models.signature import ModelSignature
            from mlflow.types.schema import Schema, TensorSpec
            import numpy as np

            signature = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec.input_shape))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                signature=signature,
                python_model=str(_PYFUNC_CODE),
                artifacts=artifacts,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "noisewise"],
                registered_model_name=register_as,
            )
    version = None
    if register_as:
        version = str(info.registered_model_version)
        if promote:
            set_alias(register_as, version, CHAMPION)
    return RegisteredVersion(run.info.run_id, register_as, version, bool(register_as and promote))


def _param_value(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)
    return text[:6000]  # MLflow's param value limit


def set_alias(name: str, version: str, alias: str = CHAMPION) -> None:
    _mlflow().MlflowClient().set_registered_model_alias(name, alias, str(version))


def parse_model_ref(ref: str) -> str:
    """``NAME@ALIAS``, ``NAME/VERSION``, ``NAME`` (= ``NAME@champion``) or a ``models:/`` or ``runs:/`` URI."""
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if not ref or ref.strip() != ref:
        raise RegistryError(f"--model: expected NAME@ALIAS or NAME/VERSION, got {ref!r}")
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    return f"models:/{ref}@{CHAMPION}"


def resolve_version(ref: str) -> tuple[str, str, str]:
    """``(name, version, run_id)`` of a registered model reference."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    uri = parse_model_ref(ref)
    body = uri[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = body.split("/", 1)
            mv = client.get_model_version(name, version)
    except Exception as err:
        raise RegistryError(f"model {ref!r} not found in {tracking_uri()}: {_first_line(err)}") from None
    return mv.name, str(mv.version), mv.run_id


def has_alias(name: str, alias: str = CHAMPION) -> bool:
    try:
        resolve_version(f"{name}@{alias}")
        return True
    except RegistryError:
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model(ref: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a registered version (``NAME@ALIAS`` or ``NAME/VERSION``) onto ``device``; tensor files whose
    sha256 differs from the one recorded when the version was logged are refused."""
    mlflow = _mlflow()
    name, version, run_id = resolve_version(ref)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        except Exception as err:
            raise RegistryError(f"cannot download artifacts of {name}/{version}: {_first_line(err)}") from None
        directory = Path(local) / "artifacts"
        for tag, expected in tags.items():
            if tag.startswith(DIGEST_TAG):
                path = directory / tag[len(DIGEST_TAG):]
                if path.is_file() and _sha256(path) != expected:
                    raise RegistryError(f"{name}/{version}: {path.name} does not match the sha256 recorded when it "
                                        "was registered (tampered or corrupted artifact)")
        loaded = load_model_dir(directory, device=device)
    loaded.name, loaded.version, loaded.run_id, loaded.uri = name, version, run_id, f"models:/{name}/{version}"
    return loaded


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def spec_from_training(net: Classifier, dataset, recipe, arch_kwargs: dict | None = None) -> ModelSpec:
    from dataclasses import asdict

    return ModelSpec(
        arch=arch_name(net),
        input_shape=list(dataset.input_shape),
        arch_kwargs=dict(arch_kwargs or {}),
        class_names=list(dataset.class_names),
        lineage={**dataset.lineage, "dataset": dataset.name, "realized_noise_rate": dataset.noise.realized_rate},
        recipe=asdict(recipe),
    )

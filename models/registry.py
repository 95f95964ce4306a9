"""The only MLflow code in noisewise: tracking location, logging a run, registering, aliasing, loading.

A registered model version holds ``weights.safetensors`` (no pickle, so loading executes no code from
the store) and ``model.json`` (architecture, input spec, class names, data lineage, recipe), logged as an
MLflow pyfunc "model from code" (``models/pyfunc_model.py``), so ``mlflow.pyfunc.load_model`` works too.
noisewise itself loads versions with :func:`load_model`, which only reads those files and the calibration
files beside them, each checked against the sha256 recorded as a run tag when the version was logged.

Tracking store: ``MLFLOW_TRACKING_URI`` when set, otherwise a SQLite file under ``NOISEWISE_HOME``
(default ``./.noisewise``), with artifacts beside it; processes that first open a fresh SQLite store together
create its tables one at a time (:func:`first_use_lock`). Promotion moves the alias ``champion``; registry
stages are deprecated in MLflow and are not used. Each version carries tags and a description saying how it
was made and what it promises (:func:`version_facts`); an alias moves only to a version that decides
(:func:`promote_version`), and each move is recorded so that :func:`rollback` can undo it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from noisewise.models.choices import CHAMPION

# torch, safetensors.torch, the networks and MLflow are imported by the functions that use them: resolving a
# version and checking its digests and documents (the server's pre-start check, `noisewise monitor`) needs none
# of torch, which takes seconds to import.
if TYPE_CHECKING:
    import torch

    from noisewise.models.nets import Classifier
    from noisewise.models.calibrate import Calibration
    from noisewise.models.data import Dataset

EXPERIMENT = "noisewise"
MODEL_FORMAT = "noisewise-model/1"
DIGEST_TAG = "noisewise.sha256."
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class RegistryError(RuntimeError):
    """A model reference that does not resolve, or artifacts that are missing or malformed."""


def home_dir() -> Path:
    """``NOISEWISE_HOME`` (default ``./.noisewise``), created on first use."""
    from noisewise.services.settings import ensure_home  # here, not at the top: registry loads before services

    return ensure_home()


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
    _prepare_store(mlflow, uri)
    return mlflow


#: Tracking URIs whose store this process has already opened once (see :func:`_prepare_store`).
_PREPARED_STORES: set[str] = set()


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI; ``None`` for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def first_use_lock(path: Path):
    """Hold an exclusive lock on the file ``path`` (created when missing) between processes for the block.

    Used around the first opening of a store that creates its schema on first use: processes that start
    together on a fresh ``NOISEWISE_HOME`` would otherwise each create the same tables, and all but one fail.
    Where the lock file cannot be created (a read-only folder) the block runs unlocked: nothing can create a
    schema there either.
    """
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_store(mlflow, uri: str) -> None:
    """Open the store at ``uri`` once per process, under :func:`first_use_lock` when it is a SQLite file.

    MLflow creates (and migrates) the tables of a SQLite store when a client first opens it, without a lock:
    two processes opening a fresh store together both create them, and one fails with ``table ... already
    exists``. Reading one experiment and one registered model under a file lock beside the database makes the
    first process create the schema while the others wait, and then find it.
    """
    if uri in _PREPARED_STORES:
        return
    database = _sqlite_file(uri)
    if database is not None:
        with first_use_lock(database.parent / f".{database.name}.init.lock"):
            try:
                client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
            except Exception as err:  # a corrupt or unwritable database: one line, not MLflow's traceback
                raise RegistryError(f"cannot open the MLflow store {uri}: {_first_line(err)}") from None
    _PREPARED_STORES.add(uri)


def _experiment_id(mlflow) -> str:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri() == _default_uri():  # a user-chosen store or server decides its own artifact location
        location = (home_dir() / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception as err:
        # another process created it since the lookup above (two first runs on a fresh store)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            raise RegistryError(f"cannot create the experiment {EXPERIMENT!r} in {tracking_uri()}: "
                                f"{_first_line(err)}") from None
        return experiment.experiment_id


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
    #: imported models: what turns an input shaped ``input_shape`` into what the network takes (network
    #: ``input_shape``, ``resize``, ``mean``, ``std``: noisewise.models.imported.Preprocess); {} for noisewise's
    #: own networks, which standardize their inputs themselves (absent from older model.json files)
    preprocess: dict = field(default_factory=dict)
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
    #: files loaded without a recorded sha256 (a version registered before noisewise recorded it): see load_model
    unverified: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegisteredVersion:
    """What :func:`log_training_run` did. ``promotion_refused``: why ``promote`` did not move the alias (the
    version states a guarantee of kind none, or abstains on every input); empty when it moved or was not asked."""

    run_id: str
    name: str | None
    version: str | None
    promoted: bool
    promotion_refused: tuple[str, ...] = ()
    description: str | None = None

    @property
    def refusal_note(self) -> str:
        """``"; NOT promoted to NAME@champion: REASONS (...)"`` when the promotion was refused, else ``""``."""
        if not self.promotion_refused:
            return ""
        return (f"; NOT promoted to {self.name}@{CHAMPION}: {'; '.join(self.promotion_refused)} "
                f"(`noisewise promote {self.name} {self.version} --force` moves it anyway)")


def save_model_dir(net: Classifier, spec: ModelSpec, directory: Path,
                   calibration: "Calibration | None" = None) -> dict[str, str]:
    """Write ``weights.safetensors``, ``model.json`` and the calibration files (and an imported model's
    original archive); returns MLflow's artifacts mapping (name -> path)."""
    from safetensors.torch import save_file

    from noisewise.models import imported

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / "weights.safetensors"))
    (directory / "model.json").write_text(spec.to_json())
    artifacts = {"weights": str(directory / "weights.safetensors"), "spec": str(directory / "model.json")}
    if isinstance(net, imported.ImportedModel):
        artifacts.update(net.save_artifacts(directory))
    if calibration is not None:
        for path in calibration.save(directory):
            artifacts[path.name.replace(".", "_")] = str(path)
    return artifacts


def load_model_dir(directory: Path, device: str | torch.device = "cpu", *, network: bool = True) -> LoadedModel:
    """Rebuild the network from a folder holding ``weights.safetensors`` and ``model.json``.

    With ``network=False``, only ``model.json`` and the calibration document are read (with their checks):
    no network is built, no tensor is loaded and torch is not imported (unless the caller already has);
    ``net``, ``weights`` and the calibration's OOD scorer and gate are None. For what needs the class names,
    thresholds and targets alone (``noisewise monitor``).
    """
    directory = Path(directory)
    spec_file, weights_file = directory / "model.json", directory / "weights.safetensors"
    for f in (spec_file, weights_file):
        if not f.is_file():
            raise RegistryError(f"model artifacts in {directory} lack {f.name}")
    spec = ModelSpec.from_json(spec_file.read_text())
    if not network:
        return LoadedModel(None, spec, _calibration_document(directory, spec))  # type: ignore[arg-type]
    from safetensors.torch import load_file

    from noisewise.models import imported
    from noisewise.models.nets import build_net

    if imported.is_imported(spec.arch):
        try:  # checks the archive against the sha256 in model.json; never unpickles
            net = imported.load_imported(spec, directory)
        except imported.ImportedModelError as err:
            raise RegistryError(str(err)) from None
    else:
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
    weights = _sha256(weights_file)
    if isinstance(net, imported.ImportedModel):  # the archive and the preprocessing compute the outputs too
        weights = net.version_digest(weights)
    return LoadedModel(net.to(device).eval(), spec, calibration, weights=weights)


def _calibration_document(directory: Path, spec: ModelSpec) -> "Calibration | None":
    """The calibration of a version's folder without its tensors (None when it has none)."""
    if not (directory / "calibration.json").exists() and not (directory / "calibration.safetensors").exists():
        return None
    from noisewise.models.calibrate import Calibration, CalibrationError

    try:
        calibration = Calibration.load(directory, tensors=False)
    except CalibrationError as err:
        raise RegistryError(str(err)) from None
    if calibration.class_names != spec.class_names:
        raise RegistryError("calibration.json: class_names differ from model.json")
    return calibration


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
    *,
    dataset: "Dataset | None" = None,
    reference: "VersionReference | None" = None,
) -> RegisteredVersion:
    """Log params, per-epoch metrics, final metrics, the model and its calibration; optionally register
    and promote. A recalibration logs a new run (and version) with the same weights: versions are
    immutable, and the service follows the alias.

    What serving, monitoring and evaluation read instead of the training data (:class:`VersionReference`) is
    stored under ``reference/``: computed from ``dataset`` (its calibration and test splits), with the parts it
    lacks taken from ``reference`` (the stored reference of the version this one derives from, loaded with
    ``load_reference(..., test=True)``); ``reference`` alone is stored as it is. With neither, the version
    stores no reference and those commands need the data (or ``--dataset``).
    """
    from noisewise.models import imported

    if dataset is not None:
        reference = reference_from_dataset(net, dataset, base=reference)
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
            # a digest of every file load_model reads (weights, model.json, calibration.json and .safetensors, an
            # imported model's archive), checked at load: safetensors cannot tell a flipped byte in tensor data,
            # and an edited calibration.json can hold values that pass every range check yet serve nonsense
            mlflow.set_tags({f"{DIGEST_TAG}{Path(path).name}": _sha256(Path(path)) for path in artifacts.values()})
            # what LoadedModel.weights will say: equal digests, equal outputs (a recalibration keeps its source's)
            weights_sha256 = _sha256(Path(artifacts["weights"]))
            if isinstance(net, imported.ImportedModel):
                weights_sha256 = net.version_digest(weights_sha256)
            if reference is not None:
                written = save_reference(reference, Path(tmp) / REFERENCE_DIR)
                mlflow.log_artifacts(str(Path(tmp) / REFERENCE_DIR), artifact_path=REFERENCE_DIR)
                mlflow.set_tags({f"{DIGEST_TAG}{REFERENCE_DIR}/{path.name}": _sha256(path) for path in written})
            from mlflow.models.signature import ModelSignature
            from mlflow.types.schema import Schema, TensorSpec

            signature = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec.input_shape))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                signature=signature,
                python_model=str(_PYFUNC_CODE),
                artifacts=artifacts,
                # noisewise is on no package index: its loader code travels in the model (code/noisewise), and
                # the requirements are its dependencies, which an index serves
                code_paths=[str(_model_code(Path(tmp) / "code"))],
                pip_requirements=pip_requirements(extras=_arch_extras(spec.arch)),
                registered_model_name=register_as,
            )
    version, refused, promoted = None, (), False
    facts = version_facts(spec, params, calibration, tags, dataset=dataset, weights_sha256=weights_sha256)
    description = describe_version(facts)
    if register_as:
        version = str(info.registered_model_version)
        record_version_facts(register_as, version, facts, description)
        if promote:  # the same check as `noisewise promote`, without --force
            try:
                promote_version(register_as, version, CHAMPION, facts=facts)
                promoted = True
            except PromotionRefused as err:
                refused = tuple(err.reasons)
    return RegisteredVersion(run.info.run_id, register_as, version, promoted, refused, description)


def pip_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """The pip requirements of a logged MLflow model: noisewise's runtime dependencies as its installed metadata
    lists them (``[project] dependencies`` of pyproject.toml, plus those of the optional ``extras``), each pinned
    to the version installed when the model is logged (torch without its local ``+cpu`` tag, which no index
    serves).

    Why this list: it is the one pyproject.toml declares (no second list to keep in sync), every name on it is
    served by PyPI, and exact pins rebuild the environment the version was logged and tested in (MLflow's own
    convention for inferred requirements). ``noisewise`` itself is not on it, since no package index serves it:
    the model carries its loader code instead (``code/noisewise``: the package's ``__init__`` and
    ``noisewise.models``, all that the pyfunc loader imports), which MLflow puts on ``sys.path`` when it loads
    the model.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = requires("noisewise") or []
    except PackageNotFoundError:  # a source tree that was never installed: what noisewise.models imports
        declared = ["torch", "numpy", "safetensors", "scipy", "scikit-learn", "pyyaml", "mlflow"]
    pinned = set()
    for line in declared:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "noisewise":
            continue  # an extra that names another extra of noisewise
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": extra})
                                                      for extra in ("", *extras)):
            continue
        try:
            installed = version(requirement.name).split("+")[0]
        except PackageNotFoundError:
            pinned.add(str(requirement).split(";")[0].strip())
            continue
        extras_text = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pinned.add(f"{requirement.name}{extras_text}=={installed}")
    return sorted(pinned, key=str.lower)


def _arch_extras(arch: str) -> tuple[str, ...]:
    """The optional extras of noisewise an architecture needs at load time (``torchvision:NAME``, ``timm:NAME``)."""
    kind = arch.split(":", 1)[0]
    return (kind,) if kind in ("torchvision", "timm") else ()


def _model_code(directory: Path) -> Path:
    """``directory/noisewise``: the package's ``__init__`` and ``noisewise.models`` laid out as installed, for
    MLflow's ``code_paths`` (the pyfunc loader imports nothing else of noisewise)."""
    import shutil

    import noisewise
    import noisewise.models

    target = directory / "noisewise"
    target.mkdir(parents=True)
    shutil.copy2(Path(noisewise.__file__), target / "__init__.py")
    shutil.copytree(Path(noisewise.models.__file__).parent, target / "models",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _param_value(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)
    return text[:6000]  # MLflow's param value limit


# --- What each version says about itself, and moving aliases only to versions that decide ---------------------
# Versions of one model can share their weights (a calibration or recalibration logs the same network again), so
# each one carries, as MLflow model-version tags and a description, how it was made and what it promises; the
# same facts decide whether an alias may move to it.

#: Model-version tag: trained | imported | calibrated | recalibrated.
ORIGIN_TAG = "noisewise.origin"
#: Registered-model tag ``noisewise.alias_history.ALIAS``: JSON list of the versions the alias pointed to before
#: each move, the latest last; rollback returns to the last one and drops it.
ALIAS_HISTORY_TAG = "noisewise.alias_history."
#: Entries of an alias history kept (older moves are forgotten; the tag stays small).
ALIAS_HISTORY_KEPT = 100
#: Model-version tag set when an alias was moved to the version with --force: the reasons it overrode.
FORCED_TAG = "noisewise.forced."
_GUARANTEE_PARTS = (("sets", "prediction sets"), ("abstention", "abstention"), ("ood", "OOD"))


class PromotionRefused(RegistryError):
    """An alias was not moved to a version that states a guarantee of kind ``none`` or abstains on every input.

    Attributes
    ----------
    reasons : list of str
        Each reason in a few words (no trailing period).
    """

    def __init__(self, name: str, version: str, alias: str, reasons: list[str]):
        self.name, self.version, self.alias, self.reasons = name, str(version), alias, list(reasons)
        super().__init__(f"{name}@{alias} not moved to version {version}: " + "; ".join(reasons))


@dataclass(frozen=True)
class AliasMove:
    """An alias move: ``name@alias`` now points to ``version``, and pointed to ``previous`` before (``None``: it
    was new). ``overridden``: the reasons a forced promotion overrode."""

    name: str
    alias: str
    version: str
    previous: str | None
    overridden: tuple[str, ...] = ()


def guarantee_facts(calibration: "Calibration | None") -> dict[str, str]:
    """The tags that say what a version promises: per guarantee (``sets``, ``abstention``, ``ood``) its
    ``kind`` and ``method``; ``noisewise.certified``; ``noisewise.accept_rate``, the share of the calibration
    data the certified threshold accepts (0 when nothing is certified: the version abstains on every input)."""
    if calibration is None:
        return {"noisewise.calibrated": "false"}
    summary = calibration.summary()
    sets, abstention, ood = summary["prediction_set"], summary["abstention"], summary["ood"]
    certified = calibration.certified
    accept = float(certified.coverage) if certified.certified else 0.0
    if not np.isfinite(accept):
        accept = 0.0
    return {
        "noisewise.calibrated": "true",
        "noisewise.sets.kind": str(sets["kind"]), "noisewise.sets.method": str(sets["method"]),
        "noisewise.sets.coverage": f"{sets['target_coverage']:g}",
        "noisewise.abstention.kind": str(abstention["kind"]),
        "noisewise.abstention.method": _abstention_method(calibration),
        "noisewise.abstention.risk": f"{certified.risk:g}", "noisewise.abstention.delta": f"{certified.delta:g}",
        "noisewise.certified": str(bool(certified.certified)).lower(),
        "noisewise.accept_rate": f"{accept:.4f}",
        "noisewise.ood.kind": str(ood["kind"]), "noisewise.ood.method": f"{ood['scorer']} p-value",
        "noisewise.ood.alpha": f"{ood['alpha_ood']:g}",
    }


def _abstention_method(calibration: "Calibration") -> str:
    """Which labels the abstention threshold was certified on, and with which correction."""
    certified = calibration.certified
    if int(calibration.settings.get("n_audited") or 0) > 0:
        return "audited-labels"
    if certified.noise_eps is not None:
        return "symmetric-correction"
    if certified.max_wrong_labels is not None:
        return "worst-case-correction"
    return "observed-labels"


def version_facts(spec: ModelSpec, params: dict, calibration: "Calibration | None" = None,
                  tags: dict | None = None, *, dataset: "Dataset | None" = None,
                  weights_sha256: str | None = None) -> dict[str, str]:
    """The model-version tags of a version about to be registered: how it was made (:data:`ORIGIN_TAG` and its
    details) and :func:`guarantee_facts`.

    The origin is read from the run tags the commands set: ``noisewise.recalibrated_from`` (recalibrated on
    feedback labels), ``noisewise.calibrated_from`` (calibrated), ``noisewise.imported``; otherwise trained.
    """
    tags = tags or {}
    settings = calibration.settings if calibration is not None else {}
    lineage, recipe = spec.lineage or {}, spec.recipe or {}
    facts: dict[str, object]
    if tags.get("noisewise.recalibrated_from"):
        facts = {ORIGIN_TAG: "recalibrated", "noisewise.derived_from": tags["noisewise.recalibrated_from"],
                 "noisewise.feedback_labels": settings.get("recalibration_n", params.get("recalibration.n")),
                 "noisewise.audited_labels": settings.get("recalibration_n_audited",
                                                          params.get("recalibration.n_audited")),
                 "noisewise.recalibration_method": settings.get("recalibration_method",
                                                                params.get("recalibration.method"))}
    elif tags.get("noisewise.calibrated_from"):
        facts = {ORIGIN_TAG: "calibrated", "noisewise.derived_from": tags["noisewise.calibrated_from"],
                 "noisewise.calibration_data": dataset.name if dataset is not None else lineage.get("dataset"),
                 "noisewise.calibration_items": settings.get("n_calibration")}
    elif tags.get("noisewise.imported") or recipe.get("name") == "imported":
        facts = {ORIGIN_TAG: "imported", "noisewise.source": recipe.get("source") or params.get("imported_from"),
                 "noisewise.arch": spec.arch, "noisewise.trained_on": lineage.get("dataset")}
    else:
        facts = {ORIGIN_TAG: "trained", "noisewise.recipe": recipe.get("name"), "noisewise.epochs": recipe.get("epochs"),
                 "noisewise.sam": str(bool(recipe.get("sam"))).lower() if recipe else None,
                 "noisewise.arch": spec.arch, "noisewise.trained_on": lineage.get("dataset"),
                 "noisewise.noise": lineage.get("noise"),
                 "noisewise.realized_noise_rate": (f"{lineage['realized_noise_rate']:.4f}"
                                                   if isinstance(lineage.get("realized_noise_rate"), (int, float))
                                                   else None)}
    if calibration is not None and facts[ORIGIN_TAG] in ("trained", "imported"):  # calibrated at registration
        facts["noisewise.calibration_items"] = settings.get("n_calibration")
    facts["noisewise.weights_sha256"] = weights_sha256
    facts.update(guarantee_facts(calibration))
    return {key: str(value) for key, value in facts.items() if value is not None and value != ""}


def _short_ref(ref: str | None, name: str | None) -> str:
    """``NAME/3`` as ``version 3`` within model ``NAME``, else as it is."""
    if ref and name and ref.startswith(f"{name}/"):
        return f"version {ref[len(name) + 1:]}"
    return ref or "an unknown version"


def describe_version(facts: dict, name: str | None = None) -> str:
    """The description of a version, in sentences, from its :func:`version_facts`."""
    origin = facts.get(ORIGIN_TAG)
    derived = facts.get("noisewise.derived_from")
    source = _short_ref(derived, name or (derived.split("/", 1)[0] if derived and "/" in derived else None))
    if origin == "recalibrated":
        audited = facts.get("noisewise.audited_labels")
        lines = [f"Recalibrated: the weights of {source}, conformal threshold recalibrated on "
                 f"{facts.get('noisewise.feedback_labels', '?')} feedback labels"
                 + (f" ({audited} audited)" if audited and audited != "0" else "")
                 + (f" by {facts['noisewise.recalibration_method']}" if facts.get("noisewise.recalibration_method") else "")
                 + "; abstention and OOD gate as in the source."]
    elif origin == "calibrated":
        items = facts.get("noisewise.calibration_items")
        lines = [f"Calibrated: the weights of {source}, calibrated on {facts.get('noisewise.calibration_data', '?')}"
                 + (f" ({items} calibration items)." if items else ".")]
    elif origin == "imported":
        lines = [f"Imported from {facts.get('noisewise.source', '?')} ({facts.get('noisewise.arch', '?')}), "
                 f"calibrated on {facts.get('noisewise.trained_on', '?')}"
                 + (f" ({facts['noisewise.calibration_items']} calibration items)."
                    if facts.get("noisewise.calibration_items") else ".")]
    elif origin == "trained":
        sam = " + SAM" if facts.get("noisewise.sam") == "true" else ""
        realized = (f" (realized flip rate {facts['noisewise.realized_noise_rate']})"
                    if facts.get("noisewise.realized_noise_rate") else "")
        lines = [f"Trained: recipe {facts.get('noisewise.recipe', '?')}{sam}, {facts.get('noisewise.epochs', '?')} "
                 f"epochs, {facts.get('noisewise.arch', '?')} on {facts.get('noisewise.trained_on', '?')}, label noise "
                 f"{facts.get('noisewise.noise', '?')}{realized}."]
    else:
        lines = ["Registered without a record of how it was made."]
    if facts.get("noisewise.weights_sha256"):
        lines.append(f"Weights sha256 {facts['noisewise.weights_sha256'][:12]} (equal digests give equal outputs).")
    lines += guarantee_sentences(facts)
    return "\n".join(lines)


def guarantee_sentences(facts: dict) -> list[str]:
    """One sentence per guarantee, and whether the version abstains on every input."""
    if facts.get("noisewise.calibrated") != "true":
        return ["Not calibrated: states no guarantee (the service refuses it until `noisewise calibrate`)."]
    lines = [f"Prediction sets: {_percent(facts.get('noisewise.sets.coverage'))} coverage, "
             f"{facts.get('noisewise.sets.method', '?')} [{facts.get('noisewise.sets.kind', 'none')}]."]
    risk, accept = facts.get("noisewise.abstention.risk", "?"), _float(facts.get("noisewise.accept_rate"))
    if facts.get("noisewise.certified") == "true" and accept:
        lines.append(f"Abstention: certified at risk {risk} (delta {facts.get('noisewise.abstention.delta', '?')}, "
                     f"{facts.get('noisewise.abstention.method', '?')}) "
                     f"[{facts.get('noisewise.abstention.kind', 'none')}]; accepts {accept:.1%} of the calibration data.")
    else:
        lines.append(f"Abstention: NOTHING CERTIFIED at risk {risk}: abstains on every input.")
    lines.append(f"OOD: {facts.get('noisewise.ood.method', '?')} gate at alpha {facts.get('noisewise.ood.alpha', '?')} "
                 f"[{facts.get('noisewise.ood.kind', 'none')}].")
    return lines


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _percent(text: str | None) -> str:
    value = _float(text)
    return "?" if value is None else f"{value:.0%}" if round(value * 100, 6).is_integer() else f"{value:.1%}"


def promotion_blockers(facts: dict) -> list[str]:
    """Why an alias should not move to a version with these :func:`version_facts`: a guarantee of kind
    ``none``, or an abstention threshold that accepts nothing. Empty for an uncalibrated version, which states
    no guarantee at all and which the service refuses to serve (it cannot silently abstain)."""
    if facts.get("noisewise.calibrated") != "true":
        return []
    reasons = [f"its {label} guarantee is of kind none" for part, label in _GUARANTEE_PARTS
               if facts.get(f"noisewise.{part}.kind", "none") == "none"]
    if facts.get("noisewise.certified") != "true" or not _float(facts.get("noisewise.accept_rate")):
        reasons.append(f"it abstains on every input (nothing certified at risk "
                       f"{facts.get('noisewise.abstention.risk', '?')}; accepts 0% of the calibration data)")
    return reasons


def record_version_facts(name: str, version: str, facts: dict, description: str | None = None) -> None:
    """Set ``facts`` as tags of ``name/version`` and ``description`` (default: :func:`describe_version`) as
    its description."""
    client = _mlflow().MlflowClient()
    try:
        client.update_model_version(name, str(version), description=description or describe_version(facts, name))
        for key, value in facts.items():
            client.set_model_version_tag(name, str(version), key, value)
    except Exception as err:
        raise RegistryError(f"cannot tag {name}/{version}: {_first_line(err)}") from None


def stored_facts(name: str, version: str) -> dict[str, str]:
    """The facts of a registered version: its tags, or, for a version registered before versions carried
    them, computed from its calibration (the version is loaded)."""
    client = _mlflow().MlflowClient()
    try:
        tags = dict(client.get_model_version(name, str(version)).tags)
    except Exception as err:
        raise RegistryError(f"model {name}/{version} not found in {tracking_uri()}: {_first_line(err)}") from None
    if "noisewise.calibrated" in tags:
        return tags
    return {**tags, **guarantee_facts(load_model(f"{name}/{version}").calibration)}


def alias_target(name: str, alias: str = CHAMPION) -> str | None:
    """The version ``name@alias`` points to, or ``None``."""
    client = _mlflow().MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases
    except Exception as err:
        raise RegistryError(f"no model named {name!r} in {tracking_uri()}: {_first_line(err)}") from None
    target = aliases.get(alias)
    return None if target is None else str(target)


def alias_history(name: str, alias: str = CHAMPION) -> list[str]:
    """The versions ``name@alias`` pointed to before each move, the latest last."""
    client = _mlflow().MlflowClient()
    try:
        text = client.get_registered_model(name).tags.get(f"{ALIAS_HISTORY_TAG}{alias}")
    except Exception as err:
        raise RegistryError(f"no model named {name!r} in {tracking_uri()}: {_first_line(err)}") from None
    try:
        history = json.loads(text) if text else []
    except json.JSONDecodeError:
        raise RegistryError(f"{name}: tag {ALIAS_HISTORY_TAG}{alias} is not a JSON list of versions") from None
    if not isinstance(history, list):
        raise RegistryError(f"{name}: tag {ALIAS_HISTORY_TAG}{alias} is not a JSON list of versions")
    return [str(v) for v in history]


def _write_history(name: str, alias: str, history: list[str]) -> None:
    _mlflow().MlflowClient().set_registered_model_tag(name, f"{ALIAS_HISTORY_TAG}{alias}",
                                                      json.dumps(history[-ALIAS_HISTORY_KEPT:]))


def set_alias(name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Point ``name@alias`` to ``version`` with no check, and push its previous target on the alias history
    (what :func:`rollback` returns to); returns that previous target (``None``: the alias is new)."""
    previous = alias_target(name, alias)
    if previous == str(version):
        return previous
    try:
        _mlflow().MlflowClient().set_registered_model_alias(name, alias, str(version))
    except Exception as err:  # an alias MLflow refuses ("latest", "v3", odd characters) or a missing version
        raise RegistryError(f"cannot point {name}@{alias} to version {version}: {_first_line(err)}") from None
    if previous is not None:  # after the move: a failed move leaves no entry that was never the alias's target
        _write_history(name, alias, [*alias_history(name, alias), previous])
    return previous


def promote_version(name: str, version: str, alias: str = CHAMPION, *, force: bool = False,
                    facts: dict | None = None) -> AliasMove:
    """Move ``name@alias`` to ``version`` if the version decides: refused (:class:`PromotionRefused`) when one
    of its guarantees is of kind ``none`` or it abstains on every input (:func:`promotion_blockers`), unless
    ``force``. A forced move records the reasons it overrode as the version's tag ``noisewise.forced.ALIAS``.

    ``facts``: the version's :func:`version_facts` when the caller has them (default: read from the store).
    """
    version = str(version)
    reasons = promotion_blockers(facts if facts is not None else stored_facts(name, version))
    if reasons and not force:
        raise PromotionRefused(name, version, alias, reasons)
    previous = set_alias(name, version, alias)
    if reasons:
        _mlflow().MlflowClient().set_model_version_tag(name, version, f"{FORCED_TAG}{alias}", "; ".join(reasons))
    return AliasMove(name, alias, version, previous, tuple(reasons))


def rollback(name: str, alias: str = CHAMPION) -> AliasMove:
    """Move ``name@alias`` back to the version it pointed to before its last move, and drop that entry from the
    alias history (a second rollback goes one further back)."""
    history = alias_history(name, alias)
    current = alias_target(name, alias)
    if not history:
        now = f"it points to version {current}" if current else "it is not set"
        raise RegistryError(f"{name}@{alias} has no earlier version to roll back to ({now}, and no move of it was "
                            "recorded)")
    target = history[-1]
    client = _mlflow().MlflowClient()
    try:
        client.get_model_version(name, target)
    except Exception:
        raise RegistryError(f"{name}@{alias} pointed to version {target} before, which no longer exists: "
                            f"promote a version instead (noisewise promote {name} VERSION)") from None
    client.set_registered_model_alias(name, alias, target)
    _write_history(name, alias, history[:-1])
    return AliasMove(name, alias, target, current)


def list_models(name: str | None = None) -> list[dict]:
    """Registered models (all, or ``name``), each with its aliases, alias histories and versions (newest first):
    version, aliases, created (ISO 8601, UTC), description, noisewise tags, run id and the promotion blockers."""
    from datetime import datetime, timezone

    client = _mlflow().MlflowClient()
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except Exception:
            raise RegistryError(f"no model named {name!r} in {tracking_uri()} (`noisewise models` lists them)") from None
    else:
        models, token = [], None
        while True:
            page = client.search_registered_models(max_results=100, page_token=token)
            models += list(page)
            token = page.token
            if not token:
                break
    listed = []
    for model in sorted(models, key=lambda m: m.name):
        quote = '"' if '"' not in model.name else "'"
        found = client.search_model_versions(f"name={quote}{model.name}{quote}")
        aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
        versions = []
        for mv in sorted((v for v in found if v.name == model.name), key=lambda v: -int(v.version)):
            tags = {k: v for k, v in (mv.tags or {}).items() if k.startswith("noisewise.")}
            versions.append({
                "version": str(mv.version),
                "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat(
                    timespec="seconds"),
                "description": mv.description or None,
                "tags": tags,
                "blockers": promotion_blockers(tags) if "noisewise.calibrated" in tags else None,
                "run_id": mv.run_id,
            })
        histories = {key[len(ALIAS_HISTORY_TAG):]: alias_history(model.name, key[len(ALIAS_HISTORY_TAG):])
                     for key in (model.tags or {}) if key.startswith(ALIAS_HISTORY_TAG)}
        listed.append({"name": model.name, "description": model.description or None, "aliases": aliases,
                       "alias_history": histories, "versions": versions})
    return listed


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


def load_model(ref: str, device: str | torch.device = "cpu", *, network: bool = True) -> LoadedModel:
    """Load a registered version (``NAME@ALIAS`` or ``NAME/VERSION``) onto ``device``.

    ``network=False`` reads the spec and the calibration document only (see :func:`load_model_dir`), after
    the same digest checks.

    Every file whose sha256 was recorded when the version was logged must be there and match it, or the
    version is refused (:class:`RegistryError` naming the file). A version registered before noisewise
    recorded the digest of a file it reads (``calibration.json`` and ``model.json`` before they were covered)
    loads with a warning on stderr, once per process, and lists the file in ``LoadedModel.unverified``: the
    checks of :func:`load_model_dir` still refuse malformed or out-of-range values, and a recalibration or
    ``noisewise calibrate`` registers a version with every digest.
    """
    mlflow = _mlflow()
    name, version, run_id = resolve_version(ref)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        except Exception as err:
            raise RegistryError(f"cannot download artifacts of {name}/{version}: {_first_line(err)}") from None
        directory = Path(local) / "artifacts"
        unverified = verify_digests(directory, tags, f"{name}/{version}")
        loaded = load_model_dir(directory, device=device, network=network)
    loaded.name, loaded.version, loaded.run_id, loaded.uri = name, version, run_id, f"models:/{name}/{version}"
    loaded.unverified = unverified
    if unverified and (name, version) not in _WARNED_UNVERIFIED:
        _WARNED_UNVERIFIED.add((name, version))
        print(f"noisewise: warning: {name}/{version} was registered before noisewise recorded the sha256 of "
              f"{', '.join(unverified)}: loaded with only the range checks, so an edit of those files would go "
              f"unnoticed (`noisewise calibrate --model {name}/{version}` registers a version with every digest)",
              file=sys.stderr, flush=True)
    return loaded


#: Files of a version's folder that :func:`load_model_dir` reads: each one has a recorded digest in a version
#: registered by this noisewise.
_LOADED_FILES = ("weights.safetensors", "model.json", "calibration.json", "calibration.safetensors",
                 "model.torchscript", "program.pt2")  # the last two: noisewise.models.imported.ARCHIVE_FILES
#: ``(name, version)`` pairs already warned about in this process (the service reloads a version often).
_WARNED_UNVERIFIED: set[tuple[str, str]] = set()


def verify_digests(directory: Path, tags: dict[str, str], label: str) -> tuple[str, ...]:
    """Check the files of a version's folder against the sha256 digests recorded as run tags.

    Parameters
    ----------
    directory
        The folder of ``weights.safetensors``, ``model.json`` and the calibration files.
    tags
        The run's tags; ``noisewise.sha256.FILE`` holds the digest of ``FILE`` (``FILE`` with a ``/`` lies in a
        sub-folder and is checked where it is read, e.g. :func:`load_reference`).
    label
        ``NAME/VERSION``, for the messages.

    Returns
    -------
    tuple of str
        The files present that :func:`load_model_dir` reads and for which no digest was recorded (a version
        registered before noisewise recorded it).

    Raises
    ------
    RegistryError
        A file with a recorded digest is missing, or its sha256 differs from the recorded one.
    """
    recorded = {tag[len(DIGEST_TAG):]: expected for tag, expected in tags.items()
                if tag.startswith(DIGEST_TAG) and "/" not in tag[len(DIGEST_TAG):]}
    for file_name, expected in sorted(recorded.items()):
        path = directory / file_name
        if not path.is_file():
            raise RegistryError(f"{label}: {file_name} is missing, but its sha256 was recorded when the version was "
                                "registered (deleted or corrupted artifact)")
        if _sha256(path) != expected:
            raise RegistryError(f"{label}: {file_name} does not match the sha256 recorded when it was registered "
                                "(tampered or corrupted artifact)")
    return tuple(f for f in _LOADED_FILES if f not in recorded and (directory / f).is_file())


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def spec_from_training(net: Classifier, dataset, recipe, arch_kwargs: dict | None = None) -> ModelSpec:
    from dataclasses import asdict

    from noisewise.models.nets import arch_name

    return ModelSpec(
        arch=arch_name(net),
        input_shape=list(dataset.input_shape),
        arch_kwargs=dict(arch_kwargs or {}),
        class_names=list(dataset.class_names),
        lineage={**dataset.lineage, "dataset": dataset.name, "realized_noise_rate": dataset.noise.realized_rate},
        recipe=asdict(recipe),
    )


# --- What a version carries besides the network ---------------------------------------------------------------
# Serving, monitoring and evaluation must keep working when the training data is moved or deleted, so a version
# stores, as artifacts of its run under ``reference/`` (JSON + safetensors: loading executes no code), an example
# input, the drift reference and a held-out test sample. They are kept out of the pyfunc model folder so that
# loading a model (service start-up, every reload) does not download the test sample.

REFERENCE_DIR = "reference"
REFERENCE_FORMAT = "noisewise-reference/1"
#: Test items stored with a version: a uniform random sample of the test split of at most this many items.
#: Coverage near 0.9 measured on m items has a standard error of sqrt(0.09 / m): 0.0067 at m = 2000, i.e.
#: +-1.3 points at two standard errors, below the spread of the conformal threshold over calibration draws
#: (sqrt(alpha (1 - alpha) / n_cal) = 0.0085 for mnist5k's 1250 calibration items); more items buy little.
TEST_SAMPLE_MAX_ITEMS = 2000
#: ... and at most this many bytes of inputs (a large-input model stores fewer items; 3 x 224 x 224 images
#: quantized to 1/255 take 150 KB each, so about 220 of them fit).
TEST_SAMPLE_MAX_BYTES = 32 * 2**20
#: Fewer items than this give a coverage estimate with a standard error above 3 points: such a sample is not
#: stored, and ``noisewise evaluate`` asks for ``--dataset`` instead of printing numbers that mislead.
TEST_SAMPLE_MIN_ITEMS = 100
_TEST_SAMPLE_SEED = 0


@dataclass
class VersionReference:
    """What a version stores so that serving, monitoring and evaluation need no training data.

    Attributes
    ----------
    example : float32 ndarray of shape (1, *input_shape)
        One test input: the example request that ``noisewise serve`` prints.
    cal_labels : int64 ndarray of shape (n_cal,)
        The observed calibration labels: the reference of the label drift test.
    cal_predicted : int64 ndarray of shape (n_cal,)
        The network's class on each calibration input: the reference of the prediction drift test.
    test_x : float32 ndarray of shape (m, *input_shape) or None
        A uniform random sample of the test split (``None``: not stored, or not loaded).
    test_y : int64 ndarray of shape (m,) or None
        Their observed labels.
    test_y_clean : int64 ndarray of shape (m,) or None
        Their reference labels, ``-1`` where unknown; ``None`` when the data has none.
    info : dict
        ``reference.json``: where the arrays come from (``dataset``, ``source``, ``sha256``), ``n_cal`` and
        ``test`` (``n_split``: items of the test split; ``n_stored``; ``reason`` when nothing is stored).
    """

    example: np.ndarray
    cal_labels: np.ndarray
    cal_predicted: np.ndarray
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    test_y_clean: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def test_stored(self) -> bool:
        """Whether the version holds a test sample (loaded or not)."""
        return int(self.info.get("test", {}).get("n_stored", 0)) > 0

    def test_dataset(self, spec: ModelSpec) -> "Dataset":
        """The stored test sample as a :class:`~noisewise.models.data.Dataset` whose only split is ``test``."""
        from noisewise.models.data import Dataset, NoiseReport

        if self.test_x is None:
            raise RegistryError("the test sample was not loaded (load_reference(..., test=True)) or not stored")
        n = len(self.test_x)
        flipped, known = 0, 0
        if self.test_y_clean is not None:
            mask = self.test_y_clean >= 0
            known, flipped = int(mask.sum()), int((self.test_y[mask] != self.test_y_clean[mask]).sum())
        empty = np.empty(0, dtype=np.int64)
        return Dataset(
            name=str(self.info.get("dataset") or spec.lineage.get("dataset") or "stored test sample"),
            x=self.test_x, y=self.test_y, y_clean=self.test_y_clean, class_names=list(spec.class_names),
            splits={"train": empty, "val": empty, "cal": empty, "test": np.arange(n, dtype=np.int64)},
            noise=NoiseReport(str(spec.lineage.get("noise", "none")), flipped / max(known, 1), flipped, known),
            lineage=dict(spec.lineage))


def _predicted_classes(net: Classifier, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The network's class ``[N]`` on ``x`` ``[N, *input_shape]``, in eval mode on the network's device."""
    import torch

    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            parts = [net(torch.as_tensor(x[i : i + batch_size]).to(device)).argmax(1).cpu()
                     for i in range(0, len(x), batch_size)]
    finally:
        net.train(training)
    return torch.cat(parts).numpy().astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def _quantized_255(x: np.ndarray) -> np.ndarray | None:
    """``x`` as uint8 when every value is exactly ``k / 255`` as float32 (pixels read from 8-bit images),
    else ``None``; lossless, and a quarter of the float32 size."""
    scaled = np.rint(x.astype(np.float64) * 255.0)
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        return None
    as_uint8 = scaled.astype(np.uint8)
    return as_uint8 if np.array_equal((as_uint8 / 255.0).astype(np.float32), x) else None


def _test_sample(dataset: "Dataset") -> tuple[dict[str, np.ndarray], dict]:
    """A seeded uniform random sample of the test split within the size caps, and its ``info`` record."""
    idx = np.asarray(dataset.splits.get("test", np.empty(0, dtype=np.int64)), dtype=np.int64)
    info: dict = {"n_split": int(len(idx)), "n_stored": 0, "seed": _TEST_SAMPLE_SEED}
    if len(idx) == 0:
        info["reason"] = "the data had no test split"
        return {}, info
    size = int(np.prod(dataset.x.shape[1:], dtype=np.int64))
    # at most as many candidates as fit when quantized to bytes: bounds the float32 copy at 4 x the byte cap
    n_candidates = min(len(idx), TEST_SAMPLE_MAX_ITEMS, TEST_SAMPLE_MAX_BYTES // max(size, 1))
    order = np.random.default_rng(_TEST_SAMPLE_SEED).permutation(len(idx))[:n_candidates]
    x = np.ascontiguousarray(dataset.x[idx[order]], dtype=np.float32)
    encoded = _quantized_255(x)
    stored_x = encoded if encoded is not None else x
    item_bytes = size * stored_x.itemsize
    m = min(len(order), TEST_SAMPLE_MAX_BYTES // max(item_bytes, 1))
    if m < min(len(idx), TEST_SAMPLE_MIN_ITEMS):
        info["reason"] = (f"{item_bytes} bytes per input: only {m} test items fit in {TEST_SAMPLE_MAX_BYTES // 2**20} MB, "
                          f"fewer than {TEST_SAMPLE_MIN_ITEMS}")
        return {}, info
    # the first m of a uniform permutation are a uniform sample; stored in dataset order
    in_order = np.argsort(order[:m], kind="stable")
    chosen = order[:m][in_order]
    arrays = {"test_x": np.ascontiguousarray(stored_x[:m][in_order]),
              "test_y": np.ascontiguousarray(dataset.y[idx[chosen]], dtype=np.int64)}
    if dataset.y_clean is not None:
        arrays["test_y_clean"] = np.ascontiguousarray(dataset.y_clean[idx[chosen]], dtype=np.int64)
    info.update({"n_stored": int(m), "x_encoding": "uint8/255" if encoded is not None else "float32",
                 "bytes": int(sum(a.nbytes for a in arrays.values()))})
    return arrays, info


def reference_from_dataset(net: Classifier, dataset: "Dataset",
                           base: VersionReference | None = None) -> VersionReference:
    """The :class:`VersionReference` of ``net`` on ``dataset``: the calibration split gives the drift reference
    (observed labels and the network's classes), the test split the example and the test sample.

    A part the dataset lacks (no calibration or no test split, as when a version is calibrated on a file whose
    every item calibrates) is taken from ``base``, the reference of the version it derives from.
    """
    info: dict = {"format": REFERENCE_FORMAT, "dataset": dataset.name, "source": dataset.lineage.get("source"),
                  "sha256": dataset.lineage.get("sha256"), "class_names": list(dataset.class_names),
                  "input_shape": list(dataset.input_shape)}
    x_cal, y_cal, _ = dataset.split("cal")
    if len(y_cal):
        cal_labels, cal_predicted = np.asarray(y_cal, dtype=np.int64), _predicted_classes(net, x_cal)
        info["cal_from"] = dataset.name
    elif base is not None:
        cal_labels, cal_predicted = base.cal_labels, base.cal_predicted
        info["cal_from"] = base.info.get("cal_from", base.info.get("dataset"))
    else:
        cal_labels = cal_predicted = np.empty(0, dtype=np.int64)
    arrays, test_info = _test_sample(dataset)
    x_test = dataset.split("test")[0]
    if len(x_test):
        example = np.ascontiguousarray(x_test[:1], dtype=np.float32)
    elif base is not None:
        example, test_info = base.example, dict(base.info.get("test", {}))
        arrays = {} if base.test_x is None else {
            "test_x": base.test_x, "test_y": base.test_y,
            **({} if base.test_y_clean is None else {"test_y_clean": base.test_y_clean})}
        if base.test_x is None:
            test_info.update(n_stored=0, reason=test_info.get("reason") or "the base version's test sample was not loaded")
        info["test_from"] = base.info.get("test_from", base.info.get("dataset"))
    else:
        example = np.ascontiguousarray(x_cal[:1], dtype=np.float32)
    info.update(n_cal=int(len(cal_labels)), test=test_info)
    info.setdefault("test_from", dataset.name if test_info.get("n_stored") else None)
    return VersionReference(example=example, cal_labels=cal_labels, cal_predicted=cal_predicted,
                            test_x=arrays.get("test_x"), test_y=arrays.get("test_y"),
                            test_y_clean=arrays.get("test_y_clean"), info=info)


def save_reference(reference: VersionReference, directory: Path) -> list[Path]:
    """Write ``reference.json``, ``reference.safetensors`` and, when a test sample is held,
    ``test.safetensors`` into ``directory``; returns the paths written."""
    from safetensors.numpy import save_file as save_arrays

    directory.mkdir(parents=True, exist_ok=True)
    info = dict(reference.info, format=REFERENCE_FORMAT)
    paths = [directory / "reference.json", directory / "reference.safetensors"]
    save_arrays({"example": np.ascontiguousarray(reference.example, dtype=np.float32),
                 "cal_labels": np.ascontiguousarray(reference.cal_labels, dtype=np.int64),
                 "cal_predicted": np.ascontiguousarray(reference.cal_predicted, dtype=np.int64)}, str(paths[1]))
    test = dict(info.get("test", {}))
    if reference.test_x is not None:
        x = reference.test_x
        encoded = x if x.dtype == np.uint8 else _quantized_255(x)
        arrays = {"test_x": np.ascontiguousarray(encoded if encoded is not None else x),
                  "test_y": np.ascontiguousarray(reference.test_y, dtype=np.int64)}
        if reference.test_y_clean is not None:
            arrays["test_y_clean"] = np.ascontiguousarray(reference.test_y_clean, dtype=np.int64)
        save_arrays(arrays, str(directory / "test.safetensors"))
        paths.append(directory / "test.safetensors")
        test.update(n_stored=int(len(x)), x_encoding="uint8/255" if encoded is not None else "float32",
                    bytes=int(sum(a.nbytes for a in arrays.values())))
    else:
        test.update(n_stored=0)
    info["test"] = test
    paths[0].write_text(json.dumps(info, indent=1, sort_keys=True))
    return paths


def read_reference(directory: Path, spec: ModelSpec | None = None, test: bool = True) -> VersionReference:
    """Read what :func:`save_reference` wrote (the test sample only with ``test``), checked against ``spec``."""
    from safetensors.numpy import load_file as load_arrays

    directory = Path(directory)
    try:
        info = json.loads((directory / "reference.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"reference.json: cannot read it ({err})") from None
    if not isinstance(info, dict) or info.get("format") != REFERENCE_FORMAT:
        raise RegistryError(f"reference.json: expected format {REFERENCE_FORMAT!r}")
    names = list(info.get("class_names") or (spec.class_names if spec else []))
    shape = list(info.get("input_shape") or (spec.input_shape if spec else []))
    if spec is not None and (names != list(spec.class_names) or shape != list(spec.input_shape)):
        raise RegistryError("reference.json: class names or input shape differ from model.json")
    k = len(names)

    def load(name: str) -> dict[str, np.ndarray]:
        try:
            return load_arrays(str(directory / name))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise RegistryError(f"{name}: cannot read it ({err})") from None

    def labels(array: np.ndarray | None, what: str, lowest: int = 0) -> np.ndarray | None:
        if array is None:
            return None
        if array.ndim != 1 or array.dtype != np.int64 or (array.size and (array.min() < lowest or array.max() >= k)):
            raise RegistryError(f"{what}: expected int64 class indices in [{lowest}, {k}), shape (n,)")
        return array

    arrays = load("reference.safetensors")
    example = arrays.get("example")
    if example is None or example.dtype != np.float32 or list(example.shape) != [1, *shape]:
        raise RegistryError(f"reference.safetensors: 'example' must be float32 of shape {[1, *shape]}")
    cal_labels = labels(arrays.get("cal_labels"), "reference.safetensors: 'cal_labels'")
    cal_predicted = labels(arrays.get("cal_predicted"), "reference.safetensors: 'cal_predicted'")
    if cal_labels is None or cal_predicted is None or len(cal_labels) != len(cal_predicted):
        raise RegistryError("reference.safetensors: 'cal_labels' and 'cal_predicted' must be of equal length")
    reference = VersionReference(example=example, cal_labels=cal_labels, cal_predicted=cal_predicted, info=info)
    if test and int(info.get("test", {}).get("n_stored", 0)) > 0:
        sample = load("test.safetensors")
        x = sample.get("test_x")
        if x is None or list(x.shape[1:]) != shape or x.dtype not in (np.uint8, np.float32):
            raise RegistryError(f"test.safetensors: 'test_x' must be uint8 or float32 of shape [m, {', '.join(map(str, shape))}]")
        reference.test_x = (x / 255.0).astype(np.float32) if x.dtype == np.uint8 else x
        reference.test_y = labels(sample.get("test_y"), "test.safetensors: 'test_y'")
        reference.test_y_clean = labels(sample.get("test_y_clean"), "test.safetensors: 'test_y_clean'", lowest=-1)
        if reference.test_y is None or len(reference.test_y) != len(x) or (
                reference.test_y_clean is not None and len(reference.test_y_clean) != len(x)):
            raise RegistryError("test.safetensors: 'test_y' (and 'test_y_clean') must have one label per input")
    return reference


def load_reference(loaded: LoadedModel, *, test: bool = False) -> VersionReference | None:
    """The :class:`VersionReference` stored with a registered version (its test sample only with ``test``), or
    ``None`` for a version that stores none (registered by an older noisewise, or without data). Files whose
    sha256 differs from the one recorded at registration are refused."""
    if loaded.run_id is None:
        return None
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    try:
        present = {Path(a.path).name for a in client.list_artifacts(loaded.run_id, REFERENCE_DIR)}
    except Exception as err:
        raise RegistryError(f"cannot list the artifacts of {loaded.name}/{loaded.version}: {_first_line(err)}") from None
    if "reference.json" not in present:
        return None
    wanted = ["reference.json", "reference.safetensors"] + (["test.safetensors"] if test and "test.safetensors" in present
                                                              else [])
    tags = client.get_run(loaded.run_id).data.tags
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            try:  # each file by itself (the test sample only when asked for), into one folder
                local = Path(mlflow.artifacts.download_artifacts(
                    run_id=loaded.run_id, artifact_path=f"{REFERENCE_DIR}/{name}", dst_path=tmp)).replace(
                    Path(tmp) / name)
            except Exception as err:
                raise RegistryError(f"cannot download {REFERENCE_DIR}/{name} of {loaded.name}/{loaded.version}: "
                                    f"{_first_line(err)}") from None
            expected = tags.get(f"{DIGEST_TAG}{REFERENCE_DIR}/{name}")
            if expected is not None and _sha256(local) != expected:
                raise RegistryError(f"{loaded.name}/{loaded.version}: {REFERENCE_DIR}/{name} does not match the sha256 "
                                    "recorded when it was registered (tampered or corrupted artifact)")
        return read_reference(Path(tmp), loaded.spec, test=test)


def training_data(loaded: LoadedModel, *, needed_by: str, alternative: str, trusted: str | Path | None = None):
    """The dataset ``loaded`` was trained on, rebuilt from its lineage (:func:`~noisewise.models.data.load_from_lineage`).

    Raises
    ------
    DataError
        In one line, when the data (or the trusted-labels file it recorded) is no longer where it was: what needs
        it (``needed_by``), the path, and ``alternative`` (what to do instead, e.g. pass ``--dataset``).
    """
    from noisewise.models.data import BUILTIN_DATASETS, DataError, load_from_lineage

    lineage = loaded.spec.lineage
    which = f"{loaded.name}/{loaded.version}" if loaded.name else "the model"
    if lineage.get("dataset") not in BUILTIN_DATASETS:
        source = lineage.get("source")
        if not source:
            raise DataError(f"{needed_by} needs the training data of {which}, and its lineage names none; {alternative}")
        gone = [("training data", source)] if not Path(source).exists() else []
        if trusted is None and lineage.get("trusted") and not Path(lineage["trusted"]).exists():
            gone.append(("trusted labels", lineage["trusted"]))
        if gone:
            what, path = gone[0]
            raise DataError(f"{needed_by} needs the {what} of {which}, but {path} no longer exists (moved or deleted): "
                            f"restore it there, or {alternative}")
    return load_from_lineage(lineage, trusted=trusted)

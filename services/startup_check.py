"""The server's pre-start check: whether the configured model can be served and the store opened.

``bentoml serve noisewise.services.service:Noisewise`` runs :func:`check_model_here` once before any worker
starts (the service's ``on_deployment`` hook, :func:`wait_for_check`): a model that cannot be served stops the
server with one line and exit status 3. The check verifies the version's artifacts against their recorded
digests and its calibration document without building the network, so it imports neither torch nor BentoML;
nor does this module, so that the ``bentoml serve`` process can fork the check as soon as it starts importing
the service (:func:`start_check_early`): the check then runs while that process goes on loading the service
and BentoML's server, and the hook only waits for its status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_MODEL = 3


class StartupError(RuntimeError):
    """The configured model cannot be served (one line, ready to show)."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_store():
    """The store of NOISEWISE_STORE_URL (:class:`noisewise.monitoring.store.Store`), or :class:`StartupError`
    saying why it cannot be opened."""
    from noisewise.monitoring.store import Store, StoreError

    try:
        return Store()
    except StoreError as err:
        raise StartupError(f"{err} (set NOISEWISE_STORE_URL, or NOISEWISE_STORE=0 to serve without storing "
                           "predictions and feedback)") from None


#: A file that the start-up check writes the example request of the served version into (a JSON body for
#: ``/predict``): ``noisewise serve`` sets it and prints a curl that sends it.
EXAMPLE_REQUEST_ENV = "NOISEWISE_EXAMPLE_REQUEST"


@dataclass(frozen=True)
class CheckedVersion:
    """A registered version that :func:`check_artifacts` found servable."""

    name: str
    version: str
    run_id: str
    spec: Any  # models.registry.ModelSpec


def check_artifacts(ref: str) -> CheckedVersion:
    """Check a registered version as serving it would, without building its network.

    The version must resolve, every file with a sha256 recorded at registration must match it, the version
    must be calibrated, and ``calibration.json`` must pass the document checks of
    :meth:`noisewise.models.calibrate.Calibration.load`. The tensors (weights, OOD bank) are covered by their
    digests, so they are not loaded here: the worker loads them once. A version with files that carry no
    recorded digest (registered by an older noisewise) is loaded in full instead, as the digests cannot vouch
    for it.

    Raises
    ------
    StartupError
        One line saying why the version cannot be served.
    """
    import json
    import tempfile

    from noisewise.models import registry

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        mlflow = registry._mlflow()
        name, version, run_id = registry.resolve_version(ref)
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
        label = f"{name}/{version}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{label}", dst_path=tmp)
            except Exception as err:
                raise registry.RegistryError(f"cannot download artifacts of {label}: {_one_line(err)}") from None
            directory = Path(local) / "artifacts"
            if registry.verify_digests(directory, tags, label):  # some file no digest covers: the full checks
                loaded = registry.load_model_dir(directory)
                spec, calibrated = loaded.spec, loaded.calibration is not None
            else:
                spec = registry.ModelSpec.from_json(_read(directory / "model.json"))
                calibrated = (directory / "calibration.json").is_file()
                if calibrated:
                    _check_calibration_document(json.loads(_read(directory / "calibration.json")), spec)
    except (registry.RegistryError, ValueError) as err:
        raise StartupError(f"cannot serve model {ref!r}: {_one_line(err)}") from None
    except StartupError:
        raise
    except Exception as err:  # a corrupt store, or an artifact this version of noisewise cannot read
        raise StartupError(f"cannot load model {ref!r}: {type(err).__name__}: {_one_line(err)}") from None
    if not calibrated:
        raise StartupError(f"model {ref!r} ({label}) has no calibration: run `noisewise calibrate --model {ref}` "
                           "and serve the calibrated version")
    return CheckedVersion(name, version, run_id, spec)


def _read(path: Path) -> str:
    from noisewise.models.registry import RegistryError

    if not path.is_file():
        raise RegistryError(f"model artifacts lack {path.name}")
    return path.read_text()


def _check_calibration_document(doc: Any, spec: Any) -> None:
    """``calibration.json`` as :meth:`Calibration.load` checks it, without its tensors and without torch; a
    ValueError (:class:`~noisewise.models.calibration_doc.CalibrationError`) naming the field otherwise."""
    from noisewise.models.calibration_doc import check_calibration_document

    check_calibration_document(doc, list(spec.class_names))


def write_example_request(checked: CheckedVersion, path: Path) -> Path:
    """Write the example input stored with the ``checked`` version (a test input of its data) to ``path`` as a
    ``/predict`` body, without loading the network; a version that stores none gets a blank input (the
    lowest value of its input range). :class:`noisewise.models.registry.RegistryError` if the stored example
    does not match its recorded digest."""
    import json

    import numpy as np

    from noisewise.models import registry

    spec = checked.spec
    described = registry.LoadedModel(net=None, spec=spec, name=checked.name,  # type: ignore[arg-type]
                                     version=checked.version, run_id=checked.run_id)  # no network needed
    reference = registry.load_reference(described)
    if reference is not None:
        x = reference.example
    else:
        x = np.full((1, *spec.input_shape), float(spec.input_range[0]), dtype=np.float32)
    path.write_text(json.dumps({"inputs": [[round(float(v), 4) for v in x[0].ravel()]]}))
    return path


def check_model_here() -> int:
    """The start-up check: 0 if NOISEWISE_MODEL can be served and the store opened, else one line on stderr
    and EXIT_MODEL (a worker that failed instead would be restarted again and again, and the server would only
    be reported as never ready). With NOISEWISE_EXAMPLE_REQUEST set, also writes the version's example request
    there. Also ``python -m noisewise.services.startup_check``."""
    from noisewise.services.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
        if settings.device not in ("auto", "cpu"):  # those two always resolve: no need to import torch to ask
            from noisewise.models.nets import pick_device

            try:
                pick_device(settings.device)
            except ValueError as err:
                raise StartupError(f"NOISEWISE_DEVICE: {err}") from None
        checked = check_artifacts(settings.model)
        example = os.environ.get(EXAMPLE_REQUEST_ENV)
        if example:
            try:
                write_example_request(checked, Path(example))
            except Exception as err:  # a tampered stored example, or an unwritable file
                raise StartupError(f"cannot serve model {settings.model!r}: {_one_line(err)}") from None
        if settings.store:
            open_store().close()
    except (SettingsError, StartupError) as err:
        print(f"noisewise: error: {err}", file=sys.stderr, flush=True)
        return EXIT_MODEL
    return 0


def run_check_forked() -> int:
    """:func:`check_model_here` in a forked child of this process: its exit status. The child imports MLflow
    and exits, so this process does not keep it; forking skips a second interpreter start-up. Where there is
    no fork, a child interpreter runs it instead."""
    pid = _fork_check()
    if pid is None:
        root = str(Path(__file__).resolve().parents[1])  # where the `services` package lives, also in a Bento
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        return subprocess.run([sys.executable, "-m", "noisewise.services.startup_check"],
                              env={**os.environ, "PYTHONPATH": path}, check=False).returncode
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def _fork_check() -> int | None:
    """Fork a child that runs :func:`check_model_here` and exits with its status; the child's pid (None where
    there is no fork)."""
    if not hasattr(os, "fork"):
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into BentoML's code
        status = 1
        try:
            status = check_model_here()
        except BaseException as err:  # noqa: BLE001 - reported as a crash by the parent
            print(f"noisewise: error: the model check failed: {type(err).__name__}: {_one_line(err)}",
                  file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return pid


#: The pid of the check forked by :func:`start_check_early` in this process, until :func:`wait_for_check` reaps it.
_early_check: int | None = None
#: Its exit status, when it was found already finished.
_early_status: int | None = None
#: Set by ``noisewise serve`` for the server it execs: the pid of the check it forked just before the exec.
CHECK_PID_ENV = "_NOISEWISE_CHECK_PID"


def fork_check_for_exec() -> None:
    """Fork the check now, in ``noisewise serve``, just before it execs ``bentoml serve``: the check then
    overlaps the whole start-up of the server (its interpreter, BentoML's command line), which is the same
    process after the exec and so the check's parent; :func:`start_check_early` adopts it there."""
    pid = _fork_check()
    if pid is not None:
        os.environ[CHECK_PID_ENV] = str(pid)


def _adopt(value: str | None) -> int | None:
    """The pid in ``value`` if it is a child of this process (the check ``noisewise serve`` forked), else None."""
    global _early_status
    try:
        pid = int(value or "")
        done, wait_status = os.waitpid(pid, os.WNOHANG)
    except (ValueError, ChildProcessError):  # none, or not ours (a stale variable): check here instead
        return None
    if done:
        _early_status = os.waitstatus_to_exitcode(wait_status)
    return pid


def _serving_process() -> bool:
    """Whether this process is ``bentoml serve`` itself (the process that runs the deployment hooks and then
    starts the workers), not a worker, a test or another command that imports the service."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    launched_by_bentoml = program.name == "bentoml" or program.parent.name == "bentoml"  # script or `-m bentoml`
    return launched_by_bentoml and sys.argv[1:2] == ["serve"]


def start_check_early() -> None:
    """In the ``bentoml serve`` process, fork the check now; elsewhere, do nothing.

    Called first thing when the service module is imported: the check then overlaps the rest of that import
    and BentoML's own start-up instead of running after them. Its guarantee is unchanged: the deployment hook
    (:func:`wait_for_check`) waits for its status before any worker starts.
    """
    global _early_check
    inherited = os.environ.pop(CHECK_PID_ENV, None)  # for this process only, never for the workers it starts
    if _early_check is None and _serving_process():
        _early_check = _adopt(inherited) or _fork_check()


def wait_for_check() -> int:
    """The status of the pre-start check: the one :func:`start_check_early` forked, or a check run now."""
    global _early_check, _early_status
    pid, _early_check = _early_check, None
    status, _early_status = _early_status, None
    if pid is None:
        return run_check_forked()
    if status is not None:  # it had finished when it was adopted
        return status
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


if __name__ == "__main__":
    raise SystemExit(check_model_here())

"""noisewise: serve and monitor classifiers trained on noisy labels.

Every prediction carries an OOD score with a p-value, a conformal prediction set whose coverage survives noisy
calibration labels and a certified accept/abstain decision, each guarantee with its kind (valid, conservative or
none). Subpackages: ``noisewise.models`` (data, networks, training, calibration, registry and the pure
algorithms in ``noisewise.models.uncertainty``), ``noisewise.services`` (CLI and BentoML service) and
``noisewise.monitoring`` (feedback store, label quality, drift, metrics).

The public API below is imported lazily, so ``import noisewise`` (and the CLI) stays fast::

    from noisewise import load_model, Predictor
    model = load_model("noisewise-demo@champion")
    predictions = Predictor(model.net, model.calibration).predict(x)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("noisewise")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: public name -> module it lives in
_PUBLIC = {
    "load_model": "noisewise.models.registry",
    "LoadedModel": "noisewise.models.registry",
    "load_dataset": "noisewise.models.data",
    "Dataset": "noisewise.models.data",
    "Calibration": "noisewise.models.calibrate",
    "CalibrationSettings": "noisewise.models.calibrate",
    "fit_calibration": "noisewise.models.calibrate",
    "GUARANTEE_KINDS": "noisewise.models.calibrate",
    "Predictor": "noisewise.models.predictor",
    "evaluate": "noisewise.models.evaluation",
    "NoiseAwareClassifier": "noisewise.models.arrays",
    "NotConformalizedError": "noisewise.models.arrays",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisewise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # names for type checkers and IDEs; at run time __getattr__ imports them
    from noisewise.models.calibrate import GUARANTEE_KINDS, Calibration, CalibrationSettings, fit_calibration  # noqa: F401
    from noisewise.models.arrays import NoiseAwareClassifier, NotConformalizedError  # noqa: F401
    from noisewise.models.data import Dataset, load_dataset  # noqa: F401
    from noisewise.models.evaluation import evaluate  # noqa: F401
    from noisewise.models.predictor import Predictor  # noqa: F401
    from noisewise.models.registry import LoadedModel, load_model  # noqa: F401

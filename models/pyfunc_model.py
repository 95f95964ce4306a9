"""MLflow "model from code" for noisewise versions, so ``mlflow.pyfunc.load_model`` works too.

MLflow runs this file at load time (it is our own code, copied into the version); the weights are read
with safetensors, never unpickled. ``predict`` takes float32 inputs ``[N, *input_shape]`` in [0, 1] (the logged signature) and returns
class probabilities ``[N, K]``.
"""

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class NoisewisePyfunc(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from noisewise.models.registry import load_model_dir

        self.loaded = load_model_dir(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        x = x.reshape(len(x), *self.loaded.spec.input_shape)
        with torch.no_grad():
            return torch.softmax(self.loaded.net(x), dim=1).numpy()


set_model(NoisewisePyfunc())

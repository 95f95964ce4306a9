"""The baseline for benchmarks/serving.py: the same registered network behind a plain BentoML service.

No uncertainty, no validation beyond BentoML's own parsing: the standard BentoML way, one batchable API
(``@bentoml.api(batchable=True)``, BentoML's adaptive batching) that returns the softmax probabilities
and their argmax. Same registry loader as noisewise (models.registry.load_model), same device, same batch
cap (``NOISEWISE_BATCH_MAX_SIZE``, default 256) and queue budget (``NOISEWISE_BATCH_MAX_LATENCY_MS``,
default 10000), one worker.

    NOISEWISE_HOME=... NOISEWISE_MODEL=bench-mlp@champion \
        bentoml serve benchmarks.plain_service:Plain --host 127.0.0.1 --port 3001

    curl -s -X POST localhost:3001/predict -H 'content-type: application/json' \
        -d '{"inputs": [[0.0, ...]]}'      # one input (flat or shaped) -> {"label": [..], "probs": [[..]]}
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

MAX_BATCH = int(os.environ.get("NOISEWISE_BATCH_MAX_SIZE", "256") or 256)
MAX_LATENCY_MS = int(os.environ.get("NOISEWISE_BATCH_MAX_LATENCY_MS", "10000") or 10_000)


@bentoml.service(traffic={"timeout": 60}, workers=1)
class Plain:
    """argmax + softmax of a registered noisewise network, nothing else."""

    def __init__(self) -> None:
        import torch

        from noisewise.models.nets import pick_device
        from noisewise.models.registry import load_model

        self.torch = torch
        self.device = pick_device(os.environ.get("NOISEWISE_DEVICE", "auto"))
        loaded = load_model(os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion"), device=self.device)
        self.net = loaded.net.eval()
        self.shape = tuple(int(d) for d in loaded.spec.input_shape)
        self.predict(np.zeros((2, *self.shape), dtype=np.float32))  # warm up, as noisewise does

    @bentoml.api(batchable=True, max_batch_size=max(2, MAX_BATCH), max_latency_ms=MAX_LATENCY_MS)
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """``inputs`` [N, *input_shape] (or [N, size]) -> [N, 1 + K]: the argmax, then the K probabilities."""
        torch = self.torch
        x = torch.as_tensor(np.asarray(inputs, dtype=np.float32).reshape(-1, *self.shape), device=self.device)
        with torch.no_grad():
            probs = torch.softmax(self.net(x).float(), dim=1)
        return torch.cat([probs.argmax(dim=1, keepdim=True).float(), probs], dim=1).cpu().numpy()

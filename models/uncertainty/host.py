"""Host (numpy) views of array-likes, without importing torch.

The uncertainty modules accept torch tensors and numpy arrays alike. Checking ``isinstance(x, torch.Tensor)``
would import torch, seconds on a cold start, in processes that never see a tensor (``noisewise monitor``). A
tensor can only exist once torch is imported, so the check reads ``sys.modules`` instead.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def as_numpy(x: Any, name: str = "input") -> np.ndarray:
    """``x`` as a numpy array, without copying when possible: a torch tensor is detached and copied to the host,
    anything else (numpy, JAX, TensorFlow, lists) goes through ``np.asarray``.

    Raises
    ------
    ValueError
        Naming ``name`` when ``x`` cannot be converted.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # any conversion failure is the caller's input
        raise ValueError(f"`{name}` must be array-like (numpy, torch, lists, ...), got {type(x).__name__}") from err

"""Host (numpy) views of array-likes, without importing torch, and the checks of the probabilities and class
labels that the label-noise and feedback functions take.

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


def check_probs(probs: Any, name: str = "probs", allow_empty: bool = False,
                dtype: type | None = np.float64) -> np.ndarray:
    """``probs`` as an array ``[N, K]`` of softmax rows (``K >= 2``; ``N >= 1`` unless ``allow_empty``) in
    ``dtype`` (None: the floating dtype it came in, so that results match libraries that compute in it).

    Rows must be finite, in [0, 1] and sum to 1 within 1e-2: stored probabilities may have been rounded
    or kept in float16. Raises ValueError naming ``name`` and the first offending row.
    """
    p = as_numpy(probs, name)
    if p.ndim != 2 or p.shape[1] < 2 or (p.shape[0] == 0 and not allow_empty):
        rows = "N" if allow_empty else "N >= 1"
        raise ValueError(f"`{name}` must have shape [N, K] with {rows} rows and K >= 2 classes, got shape {p.shape}.")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"`{name}` must be floating-point probabilities, got dtype {p.dtype}.")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        bad = np.flatnonzero(~np.all(np.isfinite(p) & (p >= 0) & (p <= 1), axis=1))
        raise ValueError(f"`{name}` must be finite probabilities in [0, 1]; row {int(bad[0])} is not.")
    sums = p.sum(axis=1, dtype=np.float64)
    off = np.flatnonzero(np.abs(sums - 1.0) > 1e-2)
    if off.size:
        raise ValueError(f"rows of `{name}` must sum to 1 (softmax outputs); row {int(off[0])} sums to "
                         f"{sums[off[0]]:.4g}.")
    return p if dtype is None else p.astype(dtype, copy=False)


def check_labels(labels: Any, name: str, num_classes: int, n: int | None = None,
                 allow_empty: bool = False) -> np.ndarray:
    """``labels`` as an int64 array ``[N]`` of class indices in ``[0, num_classes)``; ``N == n`` when ``n``
    is given (the rows of a paired array), ``N >= 1`` unless ``allow_empty``. Whole floats are accepted.
    Raises ValueError naming ``name`` and the first offending label."""
    y = as_numpy(labels, name)
    if y.ndim != 1 or (y.shape[0] == 0 and not allow_empty):
        raise ValueError(f"`{name}` must be a {'' if allow_empty else 'non-empty '}1-D array of class indices, "
                         f"got shape {y.shape}.")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"`{name}` must have length {n} to match its paired array, got {y.shape[0]}.")
    if y.size and not np.issubdtype(y.dtype, np.integer) and not (
        np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
    ):
        raise ValueError(f"`{name}` must hold integer class indices, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        raise ValueError(f"`{name}` must hold class indices in [0, {num_classes - 1}]; item {int(bad[0])} is "
                         f"{int(y[bad[0]])} ({bad.size} label(s) out of range).")
    return y

"""``as_numpy``: the one tensor/array-to-numpy view of the uncertainty modules, naming the bad argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisewise.models.uncertainty.host import as_numpy


def test_tensors_come_to_the_host_and_arrays_are_not_copied():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    out = as_numpy(t)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]
    a = np.ones(4)
    assert as_numpy(a) is a
    assert as_numpy([1, 2, 3]).tolist() == [1, 2, 3]


def test_what_cannot_be_an_array_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`scores` must be array-like .* got list"):
        as_numpy([[1, 2], [3]], "scores")  # ragged

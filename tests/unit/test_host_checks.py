"""check_probs / check_labels: the one validation of softmax rows and class labels that the label-noise
estimators and the feedback scoring share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisewise.models.uncertainty.host import check_labels, check_probs

P = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])


@pytest.mark.parametrize("probs", [P, P.astype(np.float32), torch.tensor(P), P.tolist(), np.round(P, 3) + 0.004])
def test_probs_in_any_host_or_torch_form_come_back_as_float64(probs):
    out = check_probs(probs)
    assert out.dtype == np.float64 and out.shape == (3, 2)
    assert np.allclose(out, np.asarray(probs, dtype=np.float64))


@pytest.mark.parametrize(("probs", "message"), [
    (P[:, :1], r"shape \[N, K\] with N >= 1 rows and K >= 2 classes, got shape \(3, 1\)"),
    (P[:0], r"with N >= 1 rows"),
    (P.ravel(), r"got shape \(6,\)"),
    ((P * 10).astype(np.int64), "floating-point probabilities, got dtype int64"),
    (np.array([[0.7, 0.3], [np.nan, 1.0]]), r"finite probabilities in \[0, 1\]; row 1 is not"),
    (np.array([[0.7, 0.3], [0.5, 0.5], [1.2, -0.2]]), "row 2 is not"),
    (np.array([[0.7, 0.3], [0.6, 0.5]]), "must sum to 1 .*row 1 sums to 1.1"),
])
def test_bad_probs_are_refused_naming_the_argument_and_the_row(probs, message):
    with pytest.raises(ValueError, match=message) as err:
        check_probs(probs, name="scores")
    assert "`scores`" in str(err.value)


def test_probs_keep_their_floating_dtype_when_asked():
    assert check_probs(P.astype(np.float32), dtype=None).dtype == np.float32


def test_empty_probs_and_labels_pass_only_when_allowed():
    assert check_probs(np.zeros((0, 4)), allow_empty=True).shape == (0, 4)
    assert check_labels(np.zeros(0, dtype=np.int64), "labels", 4, n=0, allow_empty=True).shape == (0,)
    with pytest.raises(ValueError, match="non-empty 1-D array of class indices"):
        check_labels([], "labels", 4)


@pytest.mark.parametrize("labels", [[0, 2, 1], np.array([0.0, 2.0, 1.0]), torch.tensor([0, 2, 1])])
def test_labels_come_back_as_int64(labels):
    out = check_labels(labels, "labels", 3, n=3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]


@pytest.mark.parametrize(("labels", "message"), [
    ([[0, 1]], r"1-D array of class indices, got shape \(1, 2\)"),
    ([0, 1], "must have length 3 to match its paired array, got 2"),
    ([0.0, 1.5, 2.0], "integer class indices, got dtype float64"),
    ([0, 3, 4], r"`y` must hold class indices in \[0, 2\]; item 1 is 3 \(2 label\(s\) out of range\)"),
    ([-1, 0, 1], r"`y` must hold class indices in \[0, 2\]; item 0 is -1 \(1 label"),
])
def test_bad_labels_are_refused_naming_the_argument_and_the_label(labels, message):
    with pytest.raises(ValueError, match=message):
        check_labels(labels, "y", 3, n=3)

"""Noise generators (realized rates within binomial tolerance), splits and user-data loading."""

import math

import numpy as np
import pytest
from scipy import stats

from models.data import (
    DataError,
    inject_noise,
    load_dataset,
    parse_noise_spec,
    split_indices,
)

N, K = 20_000, 10


def _tolerance(rate: float, n: int) -> float:
    # the realized flip count is Binomial(n, rate) (instance noise: each item flips with prob q_i, and
    # the mean of q_i is the rate), so 4.5 standard errors make a false failure ~1e-5 per check
    return 4.5 * math.sqrt(rate * (1 - rate) / n)


@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, size=N)
    x = rng.random((N, 16)).astype(np.float32) + y[:, None] * 0.05
    return x, y


@pytest.mark.parametrize("kind", ["symmetric", "pair", "instance"])
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_realized_rate_within_binomial_tolerance(clean, kind, rate):
    x, y = clean
    noisy, report = inject_noise(y, K, f"{kind}:{rate}", seed=3, x=x)
    realized = float(np.mean(noisy != y))
    assert report.realized_rate == pytest.approx(realized)
    assert report.n_flipped == int(np.sum(noisy != y)) and report.n == N
    assert abs(realized - rate) <= _tolerance(rate, N), (kind, realized)
    assert noisy.min() >= 0 and noisy.max() < K


def test_symmetric_moves_uniformly_to_the_other_classes(clean):
    _, y = clean
    noisy, _ = inject_noise(y, K, "symmetric:0.4", seed=1)
    shift = (noisy - y)[noisy != y] % K  # 1..K-1, uniform under the spec
    counts = np.bincount(shift, minlength=K)[1:]
    assert stats.chisquare(counts).pvalue > 1e-4


def test_pair_moves_to_the_next_class(clean):
    _, y = clean
    noisy, _ = inject_noise(y, K, "pair:0.3", seed=1)
    flipped = noisy != y
    assert np.all(noisy[flipped] == (y[flipped] + 1) % K)


def test_instance_noise_depends_on_the_input(clean):
    x, y = clean
    noisy, _ = inject_noise(y, K, "instance:0.4", seed=1, x=x)
    # the flip targets for one class are far from uniform (they follow x W_y), unlike symmetric noise
    targets = noisy[(y == 0) & (noisy != 0)]
    counts = np.bincount(targets, minlength=K)[1:]
    assert stats.chisquare(counts).pvalue < 1e-6


def test_noise_is_seeded(clean):
    x, y = clean
    for spec in ["symmetric:0.2", "pair:0.2", "instance:0.2"]:
        a, _ = inject_noise(y, K, spec, seed=7, x=x)
        b, _ = inject_noise(y, K, spec, seed=7, x=x)
        c, _ = inject_noise(y, K, spec, seed=8, x=x)
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_zero_rate_and_none_keep_labels(clean):
    _, y = clean
    for spec in ["none", "symmetric:0"]:
        noisy, report = inject_noise(y, K, spec, seed=0)
        assert np.array_equal(noisy, y) and report.realized_rate == 0.0


@pytest.mark.parametrize(
    "spec, message",
    [("symmetric:1.0", "must be in \\[0, 1\\)"), ("symmetric:-0.1", "must be in"), ("uniform:0.1", "unknown kind"),
     ("symmetric", "KIND:RATE"), ("pair:abc", "KIND:RATE")],
)
def test_bad_noise_specs(spec, message):
    with pytest.raises(DataError, match=message):
        parse_noise_spec(spec)


def test_splits_are_disjoint_complete_stratified_and_seeded():
    y = np.repeat(np.arange(10), 100)
    a = split_indices(len(y), seed=0, labels=y)
    b = split_indices(len(y), seed=0, labels=y)
    c = split_indices(len(y), seed=1, labels=y)
    everything = np.concatenate(list(a.values()))
    assert len(everything) == len(y) == len(np.unique(everything))
    assert {k: len(v) for k, v in a.items()} == {"train": 500, "val": 100, "cal": 250, "test": 150}
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["train"], c["train"])
    assert np.all(np.bincount(y[a["test"]]) == 15)


@pytest.mark.parametrize("name, n, shape", [("digits", 1797, (1, 8, 8)), ("mnist5k", 5000, (1, 28, 28))])
def test_builtin_datasets(name, n, shape):
    ds = load_dataset(name, "symmetric:0.2", seed=0)
    assert ds.x.shape == (n, *shape) and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.num_classes == 10 and ds.y_clean is not None
    assert ds.noise.realized_rate == pytest.approx(np.mean(ds.y != ds.y_clean))
    assert ds.lineage["source"] and len(ds.lineage["sha256"]) == 16


def test_npz_roundtrip_with_class_names_and_clean_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=200)
    y_clean = y.copy()
    y_clean[:10] = (y_clean[:10] + 1) % 3
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["cat", "dog", "eel"]), y_clean=y_clean)
    ds = load_dataset(str(path), "none", seed=0)
    assert ds.x.shape == (200, 1, 6, 6) and ds.x.max() <= 1.0
    assert ds.class_names == ["cat", "dog", "eel"]
    assert np.array_equal(ds.y, y) and np.array_equal(ds.y_clean, y_clean)


def test_npz_without_clean_labels_has_no_clean_reference(tmp_path):
    path = tmp_path / "vectors.npz"
    np.savez(path, x=np.random.rand(50, 4).astype(np.float32), y=np.arange(50) % 2)
    ds = load_dataset(str(path), "none")
    assert ds.y_clean is None and ds.input_shape == (4,)
    noisy = load_dataset(str(path), "symmetric:0.2")
    assert np.array_equal(noisy.y_clean, np.arange(50) % 2)  # injected noise: given labels are the reference


@pytest.mark.parametrize(
    "arrays, message",
    [({"y": np.zeros(3, int)}, "no array 'x'"), ({"x": np.zeros((3, 2))}, "no array 'y'"),
     ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 0])}, "non-negative integer"),
     ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "shape \\(3,\\)"),
     ({"x": np.full((3, 2), np.nan), "y": np.array([0, 1, 0])}, "NaN"),
     ({"x": np.zeros((3, 2)), "y": np.array([0, 1, 5]), "class_names": np.array(["a", "b"])}, "only 2 class_names")],
)
def test_bad_npz_files_are_explained(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_missing_path_is_explained():
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_dataset("/definitely/not/here.npz")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ["ants", "bees"]:
        (tmp_path / name).mkdir()
        for i in range(6):
            size = (10, 12) if i else (20, 20)  # one odd size gets resized to the common one
            Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "bees" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ["ants", "bees"] and ds.x.shape == (12, 3, 12, 10)
    assert np.bincount(ds.y).tolist() == [6, 6]


def test_image_folder_with_broken_image(tmp_path):
    for name in ["a", "b"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image"):
        load_dataset(str(tmp_path))

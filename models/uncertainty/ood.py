"""Out-of-distribution scores and the conformal OOD gate.

Sign convention, everywhere in this module: **higher score = more OOD**.

Two halves:

* **Scorers (serving hot path, torch on the input's device).** ``OOD_SCORERS`` maps a name to a
  scorer class; every class has the same interface::

      scorer = build_ood_scorer("knn", k=50).fit(features, logits, labels, head=(weight, bias))
      scores = scorer.score(features, logits)          # Tensor[N], higher = more OOD

  ``features`` are the penultimate features ``f [N, D]`` and ``logits`` the head's outputs
  ``z [N, K]`` of the same rows. A scorer reads only what it needs and accepts ``None`` for the
  other (``uses`` says which); when both are given their row counts must agree. ``fit`` takes the
  same arguments on in-distribution (ID) training data, plus ``labels`` (only ``mahalanobis``
  needs them) and ``head=(weight [K, D], bias [K])``, the final linear layer (only ``vim`` and
  ``react`` need it). Every scorer accepts and ignores what it does not need, so callers can pass
  everything uniformly.

  ============  ==========  ============  ===========  ================  ===============
  name          scores      fit needs     labels       head              paper
  ============  ==========  ============  ===========  ================  ===============
  msp           logits      nothing       no           no                Hendrycks 2017
  maxlogit      logits      nothing       no           no                Hendrycks 2022
  energy        logits      nothing       no           no                Liu 2020
  knn           features    features      no           no                Sun 2022
  mahalanobis   features    features      **yes**      no                Lee 2018
  vim           both        features      no           **yes**           Wang 2022
  react         features    features      no           **yes**           Sun 2021
  ============  ==========  ============  ===========  ================  ===============

  Everything a fitted scorer needs is in ``state_dict()`` (tensors) plus ``config()`` (JSON), and
  ``OODScorer.from_state(config, state)`` rebuilds it (no pickle).

* **The conformal gate.** :class:`OODGate` holds the sorted scores ``s_1..s_n`` of a held-out ID
  calibration split and gives ``p(x) = (1 + #{i : s_i >= s(x)}) / (n + 1)``; an input is flagged OOD
  when ``p(x) <= alpha_ood``. If the calibration and test ID scores are exchangeable, the false-OOD
  rate on ID inputs is ``floor(alpha_ood (n + 1)) / (n + 1) <= alpha_ood`` (ties only lower it). No
  labels are used, so label noise cannot bias the gate.

Why ``knn`` is the default under label noise
--------------------------------------------
The "noisy elephant" study (Humblot-Renaux, Escalera and Moeslund, *A Noisy Elephant in the Room:
Is Your Out-of-Distribution Detector Robust to Label Noise?*, CVPR 2024) trained classifiers on
noisy labels and compared some twenty OOD detectors. Scores read off the logits (MSP, MaxLogit,
energy, ODIN, ...) lose most as the noise grows: the head has memorized wrong labels, so its
confidence no longer tracks whether an input looks like the training data. MSP in particular
cannot even separate the model's own mistakes on ID data from OOD inputs. Distance-based scores in
feature space, KNN first among them, hold up far better, because the geometry of the penultimate
features is learned from all of the data, not only from the labels. They also need no labels at
fit time (``knn``), so noisy labels cannot enter the score at all.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from typing import Any, ClassVar, Mapping, Self

import torch

__all__ = [
    "OOD_SCORERS",
    "OODScorer",
    "MSPScorer",
    "MaxLogitScorer",
    "EnergyScorer",
    "KNNScorer",
    "KNN_INDEXES",
    "MahalanobisScorer",
    "ViMScorer",
    "ReActScorer",
    "build_ood_scorer",
    "OODGate",
]

Head = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# validators (shape checks only on the hot path: they read metadata, never device values)
# --------------------------------------------------------------------------------------------


def _check_matrix(x: Any, name: str, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape {what}; got {type(x).__name__} "
            "(convert numpy arrays with torch.from_numpy)"
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape {what}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def _check_inputs(
    features: torch.Tensor | None, logits: torch.Tensor | None, uses: tuple[str, ...], who: str
) -> None:
    if features is not None:
        _check_matrix(features, "features", "(N, D)")
    if logits is not None:
        _check_matrix(logits, "logits", "(N, K)")
    for name, value in (("features", features), ("logits", logits)):
        if name in uses and value is None:
            raise ValueError(f"{name} is None, but the {who!r} scorer needs {name}")
    if features is not None and logits is not None and features.shape[0] != logits.shape[0]:
        raise ValueError(
            "features and logits must have the same number of rows N; got features with "
            f"{features.shape[0]} rows and logits with {logits.shape[0]}"
        )


def _check_labels(labels: Any, n: int, who: str) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"labels is None, but the {who!r} scorer needs class labels to fit")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of shape (N,); got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match features; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices; got a negative label")
    return labels


def _check_head(head: Any, d: int, who: str) -> Head:
    if head is None:
        raise ValueError(
            f"head is None, but the {who!r} scorer needs the final linear layer: pass "
            "head=(weight [K, D], bias [K]) to fit"
        )
    if not isinstance(head, (tuple, list)) or len(head) != 2:
        raise ValueError("head must be a pair (weight [K, D], bias [K])")
    weight, bias = head
    _check_matrix(weight, "head weight", "(K, D)")
    if weight.shape[1] != d:
        raise ValueError(
            f"head weight must have shape (K, {d}) to match features of dimension {d}; "
            f"got {tuple(weight.shape)}"
        )
    if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"head bias must be a tensor of shape ({weight.shape[0]},); got {got}")
    return weight.detach(), bias.detach()


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive_float(value: Any, name: str) -> float:
    if not _is_real(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def _check_state(state: Mapping[str, torch.Tensor], keys: tuple[str, ...], who: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state for the {who!r} scorer lacks {missing}; expected keys {list(keys)}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # softmax / logsumexp / distances in fp16 lose too much; float64 stays float64
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# the common interface
# --------------------------------------------------------------------------------------------


class OODScorer:
    """Base class of the OOD scorers: ``fit`` on ID data, then ``score`` (higher = more OOD).

    Class attributes
    ----------------
    name : str
        Registry key.
    uses : tuple of str
        Which of ``"features"``, ``"logits"`` ``score`` reads; the other may be ``None``.
    needs_labels, needs_head : bool
        Whether ``fit`` needs ``labels`` / ``head=(weight, bias)``.
    requires_fit : bool
        ``False`` for the stateless logit scorers (``fit`` is a no-op and they score at once).
    """

    name: ClassVar[str]
    uses: ClassVar[tuple[str, ...]]
    needs_labels: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = False
    _state_keys: ClassVar[tuple[str, ...]] = ()
    #: fitted tensors that only some fits produce (e.g. the cluster sizes of a k-means KNN bank)
    _optional_state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] = {}
        self._fitted_meta: dict[str, Any] = {}

    # --- to be provided by subclasses -------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Constructor parameters (JSON scalars): ``type(self)(**self.params())`` is an unfitted twin."""
        raise NotImplementedError

    def _fit(self, features, logits, labels, head) -> None:  # pragma: no cover - stateless
        pass

    def _score(self, features: torch.Tensor | None, logits: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return not self.requires_fit or bool(self._state)

    def fit(
        self,
        features: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        head: Head | None = None,
    ) -> Self:
        """Fit on in-distribution training data.

        Parameters
        ----------
        features : Tensor[N, D] or None
            Penultimate features of ID training items.
        logits : Tensor[N, K] or None
            Logits of the same items.
        labels : Tensor[N] of int or None
            Class labels; only ``mahalanobis`` needs them (``needs_labels``).
        head : (Tensor[K, D], Tensor[K]) or None
            Weight and bias of the final linear layer; only ``vim`` and ``react`` need it.

        Returns
        -------
        self
        """
        fit_uses = ("features",) if self.requires_fit else ()
        _check_inputs(features, logits, fit_uses, self.name)
        if self.requires_fit:
            n = features.shape[0]
            if n == 0:
                raise ValueError(f"features is empty; the {self.name!r} scorer needs ID items to fit")
            self._state, self._fitted_meta = {}, {}
            self._fit(
                features.detach(),
                None if logits is None else logits.detach(),
                _check_labels(labels, n, self.name) if self.needs_labels else labels,
                _check_head(head, features.shape[1], self.name) if self.needs_head else head,
            )
            self._after_load()
        return self

    def score(self, features: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """OOD scores of a batch, higher = more OOD.

        Parameters
        ----------
        features : Tensor[N, D] or None
        logits : Tensor[N, K] or None
            See ``uses`` for which are read; an unused one may be ``None``.

        Returns
        -------
        Tensor[N]
            On the input's device, float32 (float64 when the inputs, or for fitted scorers the
            fitting features, were float64).
        """
        _check_inputs(features, logits, self.uses, self.name)
        if not self.is_fitted:
            raise ValueError(f"the {self.name!r} scorer is not fitted: call fit(features, logits, ...) first")
        with torch.no_grad():
            return self._score(features, logits)

    __call__ = score

    def to(self, device: str | torch.device) -> Self:
        """Move the fitted state to ``device`` (in place); returns ``self``."""
        self._state = {k: v.to(device) for k, v in self._state.items()}
        self._after_load()
        return self

    @property
    def device(self) -> torch.device:
        first = next(iter(self._state.values()), None)
        return torch.device("cpu") if first is None else first.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (empty for stateless scorers)."""
        return dict(self._state)

    def config(self) -> dict[str, Any]:
        """JSON-serializable description: ``{"name", "params", "fitted", **fitted metadata}``."""
        return {"name": self.name, "params": self.params(), "fitted": self.is_fitted, **self._fitted_meta}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> "OODScorer":
        """Rebuild a scorer from ``config()`` and ``state_dict()``.

        Called on :class:`OODScorer` it dispatches on ``config["name"]``; called on a subclass the
        name must match it. The state stays on the device of the given tensors.
        """
        name = config.get("name") if isinstance(config, Mapping) else None
        if name not in OOD_SCORERS:
            raise ValueError(f"config['name'] must be one of {sorted(OOD_SCORERS)}; got {name!r}")
        target = OOD_SCORERS[name]
        if cls is not OODScorer and target is not cls:
            raise ValueError(f"config['name'] is {name!r}, but {cls.__name__} was asked to load it")
        scorer = target(**dict(config.get("params", {})))
        if target.requires_fit and config.get("fitted", False):
            _check_state(state, target._state_keys, name)
            scorer._state = {k: state[k] for k in target._state_keys}
            scorer._state.update({k: state[k] for k in target._optional_state_keys if k in state})
            scorer._fitted_meta = {k: v for k, v in config.items() if k not in ("name", "params", "fitted")}
            scorer.to(scorer.device)
        return scorer

    def _after_load(self) -> None:
        """Derive cached tensors from ``_state`` (after fit, ``to`` and ``from_state``)."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params}, fitted={self.is_fitted})"


# --------------------------------------------------------------------------------------------
# logit scorers (stateless)
# --------------------------------------------------------------------------------------------


class MSPScorer(OODScorer):
    """Negative maximum softmax probability: ``s(x) = -max_k softmax(z / T)_k``.

    Hendrycks and Gimpel, *A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks*, ICLR 2017. Stateless. Under label noise it is the weakest choice (see the
    module docstring).

    Parameters
    ----------
    temperature : float, default 1.0
        ``T``.
    """

    name = "msp"
    uses = ("logits",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = _check_positive_float(temperature, "temperature")

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _score(self, features, logits):
        return -torch.softmax(_at_least_fp32(logits) / self.temperature, dim=1).amax(dim=1)


class MaxLogitScorer(OODScorer):
    """Negative maximum logit: ``s(x) = -max_k z_k``.

    Hendrycks et al., *Scaling Out-of-Distribution Detection for Real-World Settings*, ICML 2022.
    Stateless.
    """

    name = "maxlogit"
    uses = ("logits",)

    def params(self) -> dict[str, Any]:
        return {}

    def _score(self, features, logits):
        return -_at_least_fp32(logits).amax(dim=1)


def _energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


class EnergyScorer(OODScorer):
    """Free energy: ``s(x) = -T log sum_k exp(z_k / T)``.

    Liu, Wang, Owens and Li, *Energy-based Out-of-distribution Detection*, NeurIPS 2020. Stateless.

    Parameters
    ----------
    temperature : float, default 1.0
        ``T``.
    """

    name = "energy"
    uses = ("logits",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = _check_positive_float(temperature, "temperature")

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _score(self, features, logits):
        return _energy(_at_least_fp32(logits), self.temperature)


# --------------------------------------------------------------------------------------------
# feature scorers
# --------------------------------------------------------------------------------------------


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    # the clamp keeps an all-zero feature vector finite (it then has cosine 0 to everything)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


#: How the KNN bank is built from the training features (``index``): ``exact`` keeps every row;
#: ``subsample`` a class-stratified random subset of ``budget`` rows; ``kmeans`` ``budget`` k-means
#: centroids weighted by their cluster sizes; ``ivf`` every row, grouped into inverted lists of which
#: each query scores the few nearest; ``auto`` is ``exact`` up to ``budget`` rows and ``ivf`` above (measured
#: on real features, docs/ood.md: a 10,000-row subsample loses 0.031 AUROC at 1,000,000 rows, ivf 0.003).
KNN_INDEXES = ("exact", "subsample", "kmeans", "ivf", "auto")

#: Rows an ``ivf`` query scores by default, per neighbour of ``k``: with ``k = 50``, the lists that hold
#: about 1,250 rows. Measured on 20,000 to 1,000,000 rows of real features (docs/ood.md): AUROC within
#: 0.003 of the exact bank on every OOD set; far fewer rows lose near-OOD power.
IVF_ROWS_PER_NEIGHBOUR = 25
#: The most lists an ``ivf`` query probes under its row budget, as a multiple of the lists that hold the
#: budget on average: where the nearest lists are small, the query reads fewer rows rather than many lists.
IVF_PROBE_CAP = 4


def _stratified_rows(labels: torch.Tensor | None, n: int, budget: int, seed: int) -> torch.Tensor:
    """``budget`` row indices out of ``n``, drawn without replacement, sorted.

    With labels each class keeps its share of the rows (largest remainders), so a rare class is not
    left out of the bank by chance; without labels the draw is uniform.
    """
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        return torch.randperm(n, generator=generator)[:budget].sort().values
    labels = labels.cpu()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    share = counts.double() * budget / n
    quota = share.floor().long()
    short = budget - int(quota.sum())
    if short:
        quota[(share - quota).argsort(descending=True)[:short]] += 1
    order = torch.randperm(n, generator=generator)
    rows = [order[inverse[order] == c][: int(quota[c])] for c in range(len(classes))]
    return torch.cat(rows).sort().values


def _kmeans(rows, clusters: int, seed: int, seeding: str = "k-means++"):
    """scikit-learn's MiniBatchKMeans fitted on ``rows`` (a numpy array [N, D]), at calibration only.

    k-means++ seeding costs O(clusters^2) distance passes, so above 2048 clusters the seeds are drawn at
    random instead.
    """
    from sklearn.cluster import MiniBatchKMeans  # calibration-only dependency

    return MiniBatchKMeans(
        n_clusters=clusters,
        init=seeding if clusters <= 2048 else "random",
        batch_size=max(1024, 3 * clusters),
        n_init=1,
        random_state=seed,
    ).fit(rows)


def _kmeans_bank(unit: torch.Tensor, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids [m, D], cluster sizes [m])`` of unit-norm rows; empty clusters are dropped.

    Serving reads the centroids as an ordinary (smaller) bank.
    """
    x = unit.detach().cpu().numpy()  # one host copy, for the fit and the assignment
    km = _kmeans(x, clusters, seed)
    sizes = torch.bincount(torch.from_numpy(km.predict(x)).long(), minlength=clusters)
    keep = sizes > 0
    centroids = torch.from_numpy(km.cluster_centers_).to(unit.device, torch.float32)[keep.to(unit.device)]
    return centroids, sizes[keep].to(unit.device)


def _ivf_lists(unit: torch.Tensor, lists: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverted lists of unit-norm rows: ``(row order [N], list centroids [m, D], list offsets [m + 1])``.

    The centroids are k-means centroids of a uniform sample of ``32 * lists`` rows (k-means needs a few
    dozen rows per cluster, not every row), seeded at random rows (lists need not be optimal clusters, and
    k-means++ seeding of thousands of lists takes minutes), normalized, so a row belongs to the list of
    largest cosine, as a query probes them. ``unit[order]`` holds list ``j`` in rows ``offsets[j]:offsets[j + 1]``;
    empty lists are dropped.
    """
    n = unit.shape[0]
    sample = _stratified_rows(None, n, min(n, 32 * lists), seed).to(unit.device)
    km = _kmeans(unit[sample].detach().cpu().numpy(), lists, seed, seeding="random")
    centroids = _normalize_rows(torch.from_numpy(km.cluster_centers_).to(unit.device, torch.float32))
    block = max(1, KNNScorer.BLOCK_ELEMENTS // len(centroids))  # bounds the [rows, lists] similarities
    assign = torch.cat([(rows @ centroids.T).argmax(dim=1) for rows in unit.split(block)])
    sizes = torch.bincount(assign, minlength=lists)
    keep = sizes > 0
    # sorting by list id lays the non-empty lists out in order: dropping the empty ones renumbers nothing
    order = assign.argsort(stable=True)
    offsets = torch.cat([sizes.new_zeros(1), sizes[keep].cumsum(0)])
    return order, centroids[keep], offsets


class KNNScorer(OODScorer):
    """Deep nearest neighbours: the k-th smallest cosine distance to the training features.

    Sun, Ming, Zhu and Li, *Out-of-Distribution Detection with Deep Nearest Neighbors*, ICML 2022.
    With ``b_j`` the L2-normalized training features (the bank) and ``q = f / ||f||``,

        s(x) = 1 - (k-th largest of <q, b_j>)          (k-th smallest cosine distance)

    which is the paper's Euclidean distance on normalized vectors through ``d_euc^2 = 2 s``. One
    matmul + ``topk`` on the device, in blocks of at most ``chunk_size`` bank rows and as many
    queries as keep a block under ``BLOCK_ELEMENTS`` similarities (a running top-k is merged across
    bank blocks), so memory stays bounded. Serving batches score a bank of up to ``chunk_size`` rows
    in a single matmul: one large block was 26% faster than 4096-row blocks for a batch of 64
    against 50,000 x 512 (docs/overhead.md). The bank is stored in fp16 on GPU (half the memory,
    tensor cores; cosines of unit vectors lose ~1e-3) and fp32 on CPU. Needs no labels.

    **Bank size.** Scoring time is linear in the bank rows, so a large training set makes every
    request slower. ``index`` bounds the bank at ``budget`` rows (see :data:`KNN_INDEXES`):

    * ``subsample``: a class-stratified random subset of ``m = budget`` of the ``n`` training rows
      (uniform when no labels are given), scored with ``k_used = max(1, round(k m / n))``: the
      k-th neighbour among ``n`` rows sits at about the ``k m / n``-th among a random ``m``
      (Sun et al. scale k with the sampling ratio the same way).
    * ``kmeans``: ``budget`` centroids of the unit features (MiniBatchKMeans, at fit only), each
      weighted by its cluster size; the score is the distance of the nearest centroid at which the
      cumulated cluster sizes reach ``k``, i.e. the k-th neighbour with every member of a cluster
      placed at its centroid.
    * ``ivf``: an inverted file (Jegou, Douze and Schmid, *Product Quantization for Nearest Neighbor
      Search*, TPAMI 2011, the IVF of faiss): every row is kept and filed under the nearest of
      ``lists`` k-means centroids (default ``round(4 sqrt(n))``); a query scores only the rows of its
      nearest lists and reads its k-th neighbour among them. By default it takes lists, nearest first,
      until they hold ``IVF_ROWS_PER_NEIGHBOUR * k`` rows (as faiss's ``max_codes`` bounds a search), at
      most ``IVF_PROBE_CAP`` times the lists that hold that many rows on average: k-means of features
      that crowd together leaves a few long lists and many near-empty ones, where a fixed number of
      lists would read several times the rows. With ``probes`` set, every query scores exactly that many
      lists. The cost per query follows those rows, not ``n``, and the bank keeps growing with the
      data, so near-OOD power is not lost to a fixed sample.
      Where the probed lists hold fewer than ``k`` rows, the missing neighbours count at cosine -1
      (the score can only overstate the exact one).
    * ``auto``: ``exact`` when ``n <= budget``, otherwise ``ivf``.

    With ``n <= budget`` every index keeps the exact bank (nothing to reduce). A reduced bank gives
    different scores, so the conformal gate must be fitted on this scorer's scores of held-out ID
    items (as ``fit_calibration`` does): the false-OOD bound then holds for what is served.

    Parameters
    ----------
    k : int, default 50
        The paper's choice for ~10 classes (200 for ~100, 1000 at ImageNet scale).
    chunk_size : int, default 65536
        Most bank rows per block of the similarity matmul.
    index : {"exact", "subsample", "kmeans", "ivf", "auto"}, default "exact"
    budget : int, default 10000
        Most bank rows of a reduced bank (and the ``auto`` threshold).
    seed : int, default 0
        Seed of the subsample draw or of k-means.
    lists, probes : int or None, default None
        ``ivf`` only: the number of inverted lists (None: ``round(4 sqrt(n))``) and the number of lists
        every query scores (None: the nearest lists that hold ``IVF_ROWS_PER_NEIGHBOUR * k`` rows, as
        above).
    """

    BLOCK_ELEMENTS = 1 << 24  # similarities per block: 64 MiB in fp32

    name = "knn"
    uses = ("features",)
    requires_fit = True
    _state_keys = ("bank",)
    _optional_state_keys = ("bank_counts", "list_centroids", "list_offsets")

    def __init__(self, k: int = 50, chunk_size: int = 65536, index: str = "exact", budget: int = 10000,
                 seed: int = 0, lists: int | None = None, probes: int | None = None):
        super().__init__()
        self.k = _check_positive_int(k, "k")
        self.chunk_size = _check_positive_int(chunk_size, "chunk_size")
        if index not in KNN_INDEXES:
            raise ValueError(f"index must be one of {list(KNN_INDEXES)}; got {index!r}")
        self.index = index
        self.budget = _check_positive_int(budget, "budget")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        self.seed = seed
        self.lists = None if lists is None else _check_positive_int(lists, "lists")
        self.probes = None if probes is None else _check_positive_int(probes, "probes")

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "chunk_size": self.chunk_size, "index": self.index, "budget": self.budget,
                "seed": self.seed, "lists": self.lists, "probes": self.probes}

    def index_for(self, n: int) -> str:
        """The bank that ``fit`` builds from ``n`` training rows: ``exact``, ``subsample``, ``kmeans`` or ``ivf``."""
        if n <= self.budget:
            return "exact"
        return "ivf" if self.index == "auto" else self.index

    def _fit(self, features, logits, labels, head):
        n, d = features.shape
        if n < self.k:
            raise ValueError(
                f"k={self.k} exceeds the number of training features ({n}); "
                "lower k or fit on more items"
            )
        if labels is not None:
            labels = _check_labels(labels, n, self.name)
        unit = _normalize_rows(features.to(torch.float32))
        index = self.index_for(n)
        k_used = self.k
        if index == "exact":
            self._state = {"bank": unit}
        elif index == "subsample":
            rows = _stratified_rows(labels, n, self.budget, self.seed).to(unit.device)
            self._state = {"bank": unit[rows]}
            k_used = max(1, round(self.k * self.budget / n))
        elif index == "kmeans":
            centroids, sizes = _kmeans_bank(unit, self.budget, self.seed)
            self._state = {"bank": _normalize_rows(centroids), "bank_counts": sizes.long()}
        else:
            order, centroids, offsets = _ivf_lists(unit, self.lists or max(1, round(4 * math.sqrt(n))), self.seed)
            self._state = {"bank": unit[order], "list_centroids": centroids, "list_offsets": offsets}
            probe_rows = None if self.probes else IVF_ROWS_PER_NEIGHBOUR * self.k
            probes = self.probes or IVF_PROBE_CAP * math.ceil(IVF_ROWS_PER_NEIGHBOUR * self.k * len(centroids) / n)
        self._fitted_meta = {
            "bank_size": int(self._state["bank"].shape[0]),
            "feature_dim": int(d),
            "index_used": index,
            "source_rows": int(n),
        }
        if index == "subsample":
            self._fitted_meta["k_used"] = int(k_used)
        if index == "ivf":
            self._fitted_meta["probes"] = min(int(probes), len(centroids))
            self._fitted_meta["probe_rows"] = probe_rows

    @property
    def index_used(self) -> str:
        """The bank that was built (calibrations saved before reduced banks existed hold the exact one)."""
        return self._fitted_meta.get("index_used", "exact")

    @property
    def k_used(self) -> int:
        """The neighbour rank read from the bank: ``k``, scaled to the rows of a subsample."""
        return int(self._fitted_meta["k_used"]) if self.index_used == "subsample" else self.k

    @property
    def probes_used(self) -> int | None:
        """The most lists an ``ivf`` query scores (None for the other banks)."""
        return int(self._fitted_meta["probes"]) if self.index_used == "ivf" else None

    @property
    def probe_rows_used(self) -> int | None:
        """The rows after which an ``ivf`` query stops probing further lists (None: it scores exactly
        ``probes_used`` lists, as calibrations saved before the row budget do)."""
        rows = self._fitted_meta.get("probe_rows") if self.index_used == "ivf" else None
        return None if rows is None else int(rows)

    def _after_load(self):
        bank = self._state["bank"]
        dtype = torch.float32 if bank.device.type == "cpu" else torch.float16
        self._state["bank"] = bank.to(dtype).contiguous()
        if self.index_used == "kmeans" and "bank_counts" not in self._state:
            raise ValueError("a k-means KNN bank needs its cluster sizes 'bank_counts' in the state")
        if "bank_counts" in self._state:
            # whole counts stay whole: a float tensor here is refused by the load checks, not rounded
            self._state["bank_counts"] = self._state["bank_counts"].to(bank.device)
        if self.index_used == "ivf":
            if "list_centroids" not in self._state or "list_offsets" not in self._state:
                raise ValueError("an ivf KNN bank needs 'list_centroids' and 'list_offsets' in the state")
            self._state["list_centroids"] = self._state["list_centroids"].to(dtype).contiguous()
            # host copies: the lists are sliced in Python, and reading offsets off a GPU would sync per list
            offsets = self._state["list_offsets"].cpu()
            if offsets.ndim != 1 or offsets.shape[0] < 2:
                raise ValueError(f"list_offsets must be a 1-D tensor of at least 2 offsets, got {list(offsets.shape)}")
            sizes = offsets[1:] - offsets[:-1]
            self._list_rows = int(sizes.max())
            self._list_sizes = sizes.to(bank.device)
            self._view_lists()

    def _view_lists(self) -> None:
        """One transposed view of the bank per ivf list, made once (again whenever the bank tensor is replaced):
        slicing per list and per request cost more than the matmul."""
        offsets = self._state["list_offsets"].tolist()
        self._list_banks = [self._state["bank"][lo:hi].T for lo, hi in itertools.pairwise(offsets)]

    def _score(self, features, logits):
        bank = self._state["bank"]
        counts = self._state.get("bank_counts")
        query = _normalize_rows(features.float()).to(bank.dtype)
        if query.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=features.device)
        if self.index_used == "ivf":
            return 1.0 - torch.cat([self._ivf_kth(q) for q in query.split(self._ivf_queries())]).float()
        k = self.k if counts is not None else self.k_used
        bank_rows = min(self.chunk_size, bank.shape[0])
        query_rows = max(1, self.BLOCK_ELEMENTS // bank_rows)
        kth = []
        for q in query.split(query_rows):
            best, best_counts = None, None
            for start in range(0, bank.shape[0], bank_rows):
                b = bank[start : start + bank_rows]
                # unsorted top-k: only the set of the k largest matters, its minimum is the k-th largest
                # (with cluster sizes, k centroids always hold at least k members)
                top = (q @ b.T).topk(min(k, b.shape[0]), dim=1, sorted=False)
                values = top.values
                sizes = None if counts is None else counts[start + top.indices]
                if best is not None:
                    values = torch.cat([best, values], dim=1)
                    if sizes is not None:
                        sizes = torch.cat([best_counts, sizes], dim=1)
                    keep = values.topk(min(k, values.shape[1]), dim=1, sorted=False)
                    values = keep.values
                    if sizes is not None:
                        sizes = sizes.gather(1, keep.indices)
                best, best_counts = values, sizes
            if best_counts is None:
                kth.append(best.amin(dim=1))
            else:
                # nearest centroid first; the k-th neighbour is at the first centroid whose cumulated
                # cluster size reaches k
                order = best.argsort(dim=1, descending=True)
                reached = best_counts.gather(1, order).cumsum(dim=1) < k
                first = reached.sum(dim=1, keepdim=True).clamp_max(order.shape[1] - 1)
                kth.append(best.gather(1, order.gather(1, first)).squeeze(1))
        return 1.0 - torch.cat(kth).float()

    def _ivf_queries(self) -> int:
        """Queries per block, so the block's [queries * probes, longest list] similarities stay bounded."""
        return max(1, self.BLOCK_ELEMENTS // (self.probes_used * self._list_rows))

    def _ivf_kth(self, query: torch.Tensor) -> torch.Tensor:
        """k-th largest cosine of each query ``[B, D]`` among the rows of the lists it probes.

        A query probes its nearest lists, nearest first: ``probes_used`` of them, or, with a row budget
        (``probe_rows_used``), only as many as it takes to hold that many rows (at most ``probes_used``).
        The budget keeps the rows read per query near ``IVF_ROWS_PER_NEIGHBOUR * k`` when the lists are
        unequal (k-means of features that crowd together leaves a few large lists and many near-empty
        ones: on the 50,000 ResNet-18 features of random images of ``benchmarks/serving.py``, 23 fixed
        lists held about 5,200 rows per query, the budget about 1,400).

        One pass over the distinct lists the block probes: each list's rows are read once, against every
        query that probes it (a single matmul per list: its rows are contiguous). The similarities land in
        a table with one row per (query, probe) pair, grouped by list, padded with -1; one gather lays it
        out per query and one ``topk`` reads the k-th largest.
        """
        probes, budget = self.probes_used, self.probe_rows_used
        b = query.shape[0]
        nearest = (query @ self._state["list_centroids"].T).topk(probes, dim=1).indices  # [B, probes], nearest first
        if budget is None:
            keep = torch.ones_like(nearest, dtype=torch.bool)
        else:
            sizes = self._list_sizes[nearest]
            keep = sizes.cumsum(dim=1) - sizes < budget  # the nearer lists hold fewer rows than the budget
        width = int(keep.sum(dim=1).max())  # a prefix of each row is kept: the most lists one query probes
        keep = keep[:, :width]
        probed = nearest[:, :width][keep]  # the kept (query, probe) pairs, query-major
        order = probed.argsort()  # grouped by list
        lists, counts = torch.unique_consecutive(probed[order], return_counts=True)
        owners = keep.nonzero()[:, 0]
        queries = query[owners[order]]
        pairs = probed.shape[0]
        sims = query.new_full((pairs + 1, self._list_rows), -1.0)  # the last row pads the probes not taken
        start = 0
        for lst, count in zip(lists.tolist(), counts.tolist()):
            rows = self._list_banks[lst]
            end = start + count
            sims[start:end, : rows.shape[1]] = queries[start:end] @ rows
            start = end
        slot = torch.full((b, width), pairs, dtype=torch.long, device=query.device)
        slot[keep] = order.argsort()  # each kept pair's row in the table
        sims = sims[slot.view(-1)].view(b, -1)
        if sims.shape[1] < self.k:  # the probed lists cannot hold k rows: the k-th neighbour is missing
            return sims.new_full((b,), -1.0)
        return sims.topk(self.k, dim=1, sorted=False).values.amin(dim=1)


def _ledoit_wolf_shrinkage(x: torch.Tensor) -> float:
    """Ledoit-Wolf shrinkage of the covariance of already-centred rows ``x [n, p]`` (float64).

    Ledoit and Wolf, *A well-conditioned estimator for large-dimensional covariance matrices*,
    J. Multivariate Anal. 2004; the same estimate as ``sklearn.covariance.ledoit_wolf_shrinkage(x,
    assume_centered=True)``. Target ``mu I`` with ``mu = tr(S) / p``.
    """
    n, p = x.shape
    x2 = x * x
    emp_trace = x2.sum(dim=0) / n
    mu = emp_trace.sum() / p
    delta_ = (x.T @ x).pow(2).sum() / n**2
    beta_ = (x2.T @ x2).sum()
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * emp_trace.sum() + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    return 0.0 if float(beta) == 0.0 else float(beta / delta)


class MahalanobisScorer(OODScorer):
    """Minimum squared Mahalanobis distance to the class means under a tied covariance.

    Lee, Lee, Lee and Shin, *A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks*, NeurIPS 2018 (without input preprocessing or layer ensembles):

        s(x) = min_c (f - mu_c)^T Sigma^-1 (f - mu_c)

    ``mu_c`` are the class means of the training features and ``Sigma`` the pooled within-class
    covariance (divided by N), shrunk towards ``(tr Sigma / D) I``:
    ``Sigma_s = (1 - lambda) Sigma + lambda (tr Sigma / D) I`` with ``lambda`` from Ledoit-Wolf or
    fixed. Shrinkage keeps the inverse stable when D is large against N. With the Cholesky factor
    ``Sigma_s = L L^T``, scoring solves ``L w = f - m`` (triangular solve, ``m`` the mean of the class
    means, subtracted to limit cancellation) and uses ``||w||^2 - 2 w.v_c + ||v_c||^2`` with the
    precomputed ``v_c = L^-1 (mu_c - m)``: one solve and one matmul for all classes, no loop.
    **Needs labels** to fit; only classes present in ``labels`` get a mean (with noisy labels the
    means are pulled towards each other, which the ``min`` tolerates). The paper's score is
    ``-s/2``; pytorch-ood's is ``s / (2 N)`` with its un-normalized covariance.

    Parameters
    ----------
    shrinkage : "ledoit-wolf" or float in [0, 1], default "ledoit-wolf"
    """

    name = "mahalanobis"
    uses = ("features",)
    needs_labels = True
    requires_fit = True
    _state_keys = ("means", "cholesky")

    def __init__(self, shrinkage: str | float = "ledoit-wolf"):
        super().__init__()
        if isinstance(shrinkage, str):
            if shrinkage != "ledoit-wolf":
                raise ValueError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1]; got {shrinkage!r}")
        elif not _is_real(shrinkage) or not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1]; got {shrinkage!r}")
        else:
            shrinkage = float(shrinkage)
        self.shrinkage = shrinkage

    def params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage}

    def _fit(self, features, logits, labels, head):
        x = features.to(torch.float64)
        labels = labels.to(x.device)
        classes, index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        means = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device)
        means.index_add_(0, index, x)
        means /= counts.unsqueeze(1).to(x.dtype)
        resid = x - means[index]
        cov = resid.T @ resid / x.shape[0]
        lam = _ledoit_wolf_shrinkage(resid) if self.shrinkage == "ledoit-wolf" else self.shrinkage
        d = cov.shape[0]
        target = torch.eye(d, dtype=x.dtype, device=x.device) * (cov.diagonal().sum() / d)
        cov = (1.0 - lam) * cov + lam * target
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError(
                f"the pooled covariance of features is singular (D={d}, N={x.shape[0]}, "
                f"shrinkage={lam:g}); use shrinkage='ledoit-wolf' or a shrinkage > 0"
            )
        dtype = _stat_dtype(features)
        self._state = {"means": means.to(dtype), "cholesky": chol.to(dtype)}
        self._fitted_meta = {
            "classes": [int(c) for c in classes.tolist()],
            "shrinkage_used": float(lam),
            "feature_dim": int(d),
        }

    def _after_load(self):
        means, chol = self._state["means"], self._state["cholesky"]
        self._center = means.mean(dim=0)
        v = torch.linalg.solve_triangular(chol, (means - self._center).T, upper=False).T
        self._whitened_means = v
        self._whitened_means_sq = (v * v).sum(dim=1)

    def _score(self, features, logits):
        chol = self._state["cholesky"]
        x = features.to(chol.dtype) - self._center
        w = torch.linalg.solve_triangular(chol, x.T, upper=False).T
        d2 = (w * w).sum(dim=1, keepdim=True) - 2.0 * (w @ self._whitened_means.T) + self._whitened_means_sq
        return d2.amin(dim=1).clamp_min(0.0)


def _vim_default_dim(d: int) -> int:
    # the rule of the ViM reference code (github.com/haoqiwang/vim)
    return 1000 if d >= 2048 else 512 if d >= 768 else d // 2


class ViMScorer(OODScorer):
    """Virtual-logit matching: residual norm outside the principal subspace, minus the energy.

    Wang, Li, Feng and Zhang, *ViM: Out-Of-Distribution with Virtual-logit Matching*, CVPR 2022:

        s(x) = alpha ||(f - u) R|| - log sum_k exp(z_k)

    ``u = -W^+ b`` is the origin where the head's logits vanish, ``R [D, D - dim]`` spans the
    eigenvectors of the (uncentred about ``u``) training covariance ``(f - u)^T (f - u) / N`` with
    the ``D - dim`` smallest eigenvalues (the residual space), and
    ``alpha = mean_train(max_k z_k) / mean_train(||(f - u) R||)`` matches the virtual logit to the
    real ones. **Needs the head** ``(W [K, D], b [K])`` at fit; scoring reads ``features`` and
    ``logits`` (the logits must come from that head). Labels are not used.

    Parameters
    ----------
    dim : int or None, default None
        Principal-subspace dimension ``d``, ``0 < d < D``. ``None`` uses the reference code's rule:
        1000 if ``D >= 2048``, 512 if ``D >= 768``, else ``D // 2``.
    """

    name = "vim"
    uses = ("features", "logits")
    needs_head = True
    requires_fit = True
    _state_keys = ("origin", "residual_basis", "alpha")

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else _check_positive_int(dim, "dim")

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def _fit(self, features, logits, labels, head):
        n, d = features.shape
        dim = _vim_default_dim(d) if self.dim is None else self.dim
        if not 0 < dim < d:
            raise ValueError(f"dim must satisfy 0 < dim < D={d} (the feature dimension); got {dim}")
        weight, bias = (t.to(features.device, torch.float64) for t in head)
        x = features.to(torch.float64)
        if logits is None:
            logits = x @ weight.T + bias
        origin = -(torch.linalg.pinv(weight) @ bias)
        centred = x - origin
        _, vecs = torch.linalg.eigh(centred.T @ centred / n)  # eigenvalues ascending
        basis = vecs[:, : d - dim]
        alpha = logits.to(torch.float64).amax(dim=1).mean() / (centred @ basis).norm(dim=1).mean()
        dtype = _stat_dtype(features)
        self._state = {
            "origin": origin.to(dtype),
            "residual_basis": basis.contiguous().to(dtype),
            "alpha": alpha.to(dtype),
        }
        self._fitted_meta = {"dim_used": int(dim), "alpha": float(alpha), "feature_dim": int(d)}

    def _score(self, features, logits):
        origin = self._state["origin"]
        virtual = ((features.to(origin.dtype) - origin) @ self._state["residual_basis"]).norm(dim=1)
        return self._state["alpha"] * virtual - torch.logsumexp(logits.to(origin.dtype), dim=1)


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(x, 100 q)`` (linear interpolation) of all entries, on x's device.

    ``torch.quantile`` refuses inputs over 2^24 entries, which a training set's activations exceed.
    """
    flat = x.reshape(-1)
    h = q * (flat.numel() - 1)
    lo = math.floor(h)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values.to(torch.float64)
    v_hi = flat.kthvalue(hi + 1).values.to(torch.float64)
    return v_lo + (h - lo) * (v_hi - v_lo)


class ReActScorer(OODScorer):
    """Rectified activations: clip the features, recompute the logits, take the energy.

    Sun, Guo and Li, *ReAct: Out-of-distribution Detection With Rectified Activations*, NeurIPS
    2021:

        s(x) = -T log sum_k exp(z'_k / T),   z' = min(f, c) W^T + b

    with ``c`` the ``percentile`` quantile of all training activations (every entry of the training
    features; the paper's p = 90). **Needs the head** ``(W [K, D], b [K])`` at fit, kept in the state
    so that scoring recomputes the logits from the clipped features with one matmul; the ``logits``
    argument is not read. Labels are not used.

    Parameters
    ----------
    percentile : float in (0, 1], default 0.9
    temperature : float, default 1.0
        ``T`` of the energy.
    """

    name = "react"
    uses = ("features",)
    needs_head = True
    requires_fit = True
    _state_keys = ("threshold", "weight", "bias")

    def __init__(self, percentile: float = 0.9, temperature: float = 1.0):
        super().__init__()
        if not _is_real(percentile) or not 0 < percentile <= 1:
            raise ValueError(
                f"percentile must be a fraction in (0, 1] (0.9 = 90th percentile); got {percentile!r}"
            )
        self.percentile = float(percentile)
        self.temperature = _check_positive_float(temperature, "temperature")

    def params(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "temperature": self.temperature}

    def _fit(self, features, logits, labels, head):
        dtype = _stat_dtype(features)
        threshold = _percentile(features, self.percentile)
        weight, bias = (t.to(features.device, dtype) for t in head)
        self._state = {
            "threshold": threshold.to(dtype),
            "weight": weight.contiguous(),
            "bias": bias.contiguous(),
        }
        self._fitted_meta = {"threshold": float(threshold), "feature_dim": int(features.shape[1])}

    def _score(self, features, logits):
        weight = self._state["weight"]
        clipped = torch.minimum(features.to(weight.dtype), self._state["threshold"])
        return _energy(torch.addmm(self._state["bias"], clipped, weight.T), self.temperature)


OOD_SCORERS: dict[str, type[OODScorer]] = {
    cls.name: cls
    for cls in (MSPScorer, MaxLogitScorer, EnergyScorer, KNNScorer, MahalanobisScorer, ViMScorer, ReActScorer)
}


def build_ood_scorer(name: str, **params: Any) -> OODScorer:
    """An unfitted scorer from the registry, e.g. ``build_ood_scorer("knn", k=200)``.

    Raises
    ------
    ValueError
        For an unknown ``name`` (listing the valid ones) or a parameter the scorer does not take.
    """
    if name not in OOD_SCORERS:
        raise ValueError(f"unknown OOD scorer name {name!r}; valid names: {sorted(OOD_SCORERS)}")
    cls = OOD_SCORERS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for OOD scorer {name!r}; valid parameters: {valid}")
    return cls(**params)


# --------------------------------------------------------------------------------------------
# conformal gate
# --------------------------------------------------------------------------------------------


class OODGate:
    """Conformal OOD test over held-out ID calibration scores.

    ``p(s) = (1 + #{i : s_i >= s}) / (n + 1)`` and ``is_ood = p <= alpha_ood``, with ``s_1..s_n`` the
    scores of a held-out ID calibration split under the same scorer (Vovk et al. 2005;
    Bates et al., *Testing for outliers with conformal p-values*, Ann. Statist. 2023). If an ID test
    score is exchangeable with the calibration scores, ``P(p <= a) = floor(a (n + 1)) / (n + 1) <= a``
    for continuous scores (ties only make it smaller), so the false-OOD rate on ID data is at most
    ``alpha_ood``, marginally over the calibration draw. No labels are involved. The smallest
    p-value is ``1 / (n + 1)``: with ``n + 1 < 1 / alpha_ood`` nothing is ever flagged (a warning
    says so).

    Parameters
    ----------
    calibration_scores : Tensor[n]
        Finite OOD scores of ID items that were not used to fit the scorer.
    alpha_ood : float in (0, 1), default 0.05
    """

    def __init__(self, calibration_scores: torch.Tensor, alpha_ood: float = 0.05):
        if not isinstance(calibration_scores, torch.Tensor) or calibration_scores.ndim != 1:
            raise ValueError(
                "calibration_scores must be a 1-D torch.Tensor of shape (n,); got "
                f"{_describe(calibration_scores)}"
            )
        if calibration_scores.numel() == 0:
            raise ValueError("calibration_scores is empty; the gate needs held-out ID scores")
        if not calibration_scores.is_floating_point():
            calibration_scores = calibration_scores.double()
        if not bool(torch.isfinite(calibration_scores).all()):
            raise ValueError("calibration_scores must all be finite; got NaN or inf")
        if not _is_real(alpha_ood) or not 0 < alpha_ood < 1:
            raise ValueError(f"alpha_ood must be in (0, 1); got {alpha_ood!r}")
        self.alpha_ood = float(alpha_ood)
        self.calibration_scores = _at_least_fp32(calibration_scores.detach()).sort().values.contiguous()
        n = self.n
        # p <= alpha  <=>  #{s_i >= s} <= floor(alpha (n + 1)) - 1; an integer test cannot be
        # tipped by float rounding of p at p == alpha (the 1e-9 keeps alpha (n+1) = 2.0000000000000004 at 2)
        self._max_count_ge = math.floor(self.alpha_ood * (n + 1) + 1e-9) - 1
        if self._max_count_ge < 0:
            warnings.warn(
                f"OODGate: with n={n} calibration scores the smallest p-value is 1/{n + 1} > "
                f"alpha_ood={self.alpha_ood}, so no input can be flagged OOD; use at least "
                f"{math.ceil(1 / self.alpha_ood) - 1} calibration items",
                stacklevel=2,
            )

    @property
    def n(self) -> int:
        return int(self.calibration_scores.shape[0])

    def _count_ge(self, scores: torch.Tensor) -> torch.Tensor:
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
            raise ValueError(f"scores must be a 1-D torch.Tensor of shape (N,); got {_describe(scores)}")
        cal = self.calibration_scores
        if scores.device != cal.device:
            raise ValueError(
                f"scores are on {scores.device} but the gate is on {cal.device}; call gate.to(device) once"
            )
        below = torch.searchsorted(cal, scores.to(cal.dtype).contiguous(), side="left")
        return self.n - below

    def p_value(self, scores: torch.Tensor) -> torch.Tensor:
        """Conformal p-values ``(1 + #{i : s_i >= s}) / (n + 1)``, Tensor[N] on the calibration device.

        Scores must be finite (a NaN gets an arbitrary p-value).
        """
        cal = self.calibration_scores
        return (1 + self._count_ge(scores)).to(cal.dtype) / (self.n + 1)

    def is_ood(self, scores: torch.Tensor) -> torch.Tensor:
        """``p_value(scores) <= alpha_ood``, BoolTensor[N]."""
        return self._count_ge(scores) <= self._max_count_ge

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p_value, is_ood)`` from one search."""
        count = self._count_ge(scores)
        return (1 + count).to(self.calibration_scores.dtype) / (self.n + 1), count <= self._max_count_ge

    def to(self, device: str | torch.device) -> Self:
        self.calibration_scores = self.calibration_scores.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calibration_scores": self.calibration_scores}

    def config(self) -> dict[str, Any]:
        return {"alpha_ood": self.alpha_ood, "n": self.n}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> "OODGate":
        if "calibration_scores" not in state:
            raise ValueError("state must hold 'calibration_scores'")
        if "alpha_ood" not in config:
            raise ValueError("config must hold 'alpha_ood'")
        gate = cls(state["calibration_scores"], alpha_ood=config["alpha_ood"])
        if "n" in config and int(config["n"]) != gate.n:
            raise ValueError(f"config['n']={config['n']} but state holds {gate.n} calibration scores")
        return gate

    def __repr__(self) -> str:
        return f"OODGate(n={self.n}, alpha_ood={self.alpha_ood})"

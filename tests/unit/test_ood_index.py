"""Reduced KNN banks (``--ood-index``): the false-OOD bound holds for what is served, detection power stays
close to the exact bank, the choice survives save/load and is checked there, and ``auto`` picks by bank size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from noisewise.models import choices
from noisewise.models.arrays import NoiseAwareClassifier
from noisewise.models.calibrate import (
    OOD_BANK_BUDGET,
    Calibration,
    CalibrationError,
    CalibrationSettings,
    _ood_params,
)
from noisewise.models.uncertainty.ood import (
    KNN_INDEXES,
    KNNScorer,
    OODGate,
    build_ood_scorer,
)
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

K, D = 5, 16
N_TRAIN, BUDGET = 2000, 200
ALPHA = 0.1
N_CAL, N_TEST = 199, 200  # alpha (n_cal + 1) is a whole number: the false-OOD rate is alpha exactly


def _centers(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0, 3, size=(K, D))


def _draw(rng: np.random.Generator, centers: np.ndarray, n: int, shift: np.ndarray | float = 0.0):
    y = rng.integers(0, K, n)
    x = centers[y] + rng.normal(size=(n, D)) + shift
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_every_index_is_offered_on_the_command_line():
    assert choices.OOD_INDEXES == KNN_INDEXES


@pytest.mark.parametrize("index", KNN_INDEXES)
def test_false_ood_rate_stays_at_alpha_for_the_served_bank(index):
    """Gate fitted on the served scorer's scores of held-out ID items: over 4 training draws x 30 cal/test
    splits the false-OOD rate is alpha within 3 standard errors (and the gate does flag: not far below)."""
    rates = []
    for draw in range(4):
        rng = np.random.default_rng(100 + draw)
        centers = _centers(rng)
        f_train, y_train = _draw(rng, centers, N_TRAIN)
        scorer = KNNScorer(k=50, index=index, budget=BUDGET, seed=draw).fit(f_train, labels=y_train)
        assert scorer.state_dict()["bank"].shape[0] == (N_TRAIN if index in ("exact", "ivf", "auto") else BUDGET)
        for _ in range(30):
            f_cal, _ = _draw(rng, centers, N_CAL)
            f_test, _ = _draw(rng, centers, N_TEST)
            gate = OODGate(scorer.score(f_cal), alpha_ood=ALPHA)
            rates.append(float(gate.is_ood(scorer.score(f_test)).double().mean()))
    rates = np.array(rates)
    se = rates.std(ddof=1) / math.sqrt(len(rates))
    assert rates.mean() <= ALPHA + 3 * se, (rates.mean(), se)
    assert rates.mean() >= ALPHA - 3 * se, (rates.mean(), se)


@pytest.mark.parametrize("index", ["subsample", "kmeans", "ivf"])
def test_reduced_bank_detects_a_shift_as_well_as_the_exact_bank(index):
    """AUROC on ID vs shifted Gaussian features with a bank of 10% of the rows: not more than 0.02 below exact.

    k-means comes out slightly above exact here (cluster weights smooth the k-th distance), which is no loss."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        centers = _centers(rng)
        f_train, y_train = _draw(rng, centers, 3000)
        f_id, _ = _draw(rng, centers, 1000)
        direction = rng.normal(size=D)
        f_ood, _ = _draw(rng, centers, 1000, shift=4.0 * direction / np.linalg.norm(direction))
        y = np.r_[np.zeros(len(f_id)), np.ones(len(f_ood))]
        auroc = {}
        for name in ("exact", index):
            scorer = KNNScorer(k=50, index=name, budget=300).fit(f_train, labels=y_train)
            auroc[name] = roc_auc_score(y, torch.cat([scorer.score(f_id), scorer.score(f_ood)]).numpy())
        assert 0.7 < auroc["exact"] < 0.97, auroc  # a shift that is neither trivial nor invisible
        assert auroc[index] >= auroc["exact"] - 0.02, (seed, auroc)


def test_auto_keeps_the_exact_bank_up_to_the_budget_and_files_it_in_lists_above():
    rng = np.random.default_rng(0)
    centers = _centers(rng)
    f, y = _draw(rng, centers, 1000)
    at_budget = KNNScorer(k=10, index="auto", budget=1000).fit(f, labels=y)
    assert at_budget.index_used == "exact" and at_budget.state_dict()["bank"].shape[0] == 1000
    assert torch.equal(at_budget.score(f[:50]), KNNScorer(k=10).fit(f).score(f[:50]))
    above = KNNScorer(k=10, index="auto", budget=999).fit(f, labels=y)
    assert above.index_used == "ivf" and above.config()["bank_size"] == 1000
    assert above.config()["source_rows"] == 1000 and above.k_used == 10
    # the defaults calibration uses: exact up to OOD_BANK_BUDGET training rows
    assert _ood_params(CalibrationSettings())["index"] == "auto"
    assert _ood_params(CalibrationSettings())["budget"] == OOD_BANK_BUDGET
    assert KNNScorer(index="auto", budget=OOD_BANK_BUDGET).index_for(OOD_BANK_BUDGET) == "exact"
    assert KNNScorer(index="auto", budget=OOD_BANK_BUDGET).index_for(OOD_BANK_BUDGET + 1) == "ivf"


def test_subsample_keeps_each_class_share_and_scales_k():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    features = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    scorer = KNNScorer(k=50, index="subsample", budget=100, seed=3).fit(features, labels=labels)
    bank = scorer.state_dict()["bank"]
    unit = features / features.norm(dim=1, keepdim=True)
    rows = [int((unit - b).norm(dim=1).argmin()) for b in bank]
    kept = torch.bincount(labels[rows], minlength=3)
    assert kept.tolist() == [90, 9, 1]  # the rare class keeps its 1%
    assert len(set(rows)) == 100 and scorer.k_used == 5
    again = KNNScorer(k=50, index="subsample", budget=100, seed=3).fit(features, labels=labels)
    assert torch.equal(again.state_dict()["bank"], bank)  # the seed fixes the draw


def test_kmeans_bank_weighs_centroids_by_their_cluster_sizes():
    rng = np.random.default_rng(1)
    f, y = _draw(rng, _centers(rng), 600)
    scorer = KNNScorer(k=20, index="kmeans", budget=40).fit(f, labels=y)
    counts = scorer.state_dict()["bank_counts"]
    assert counts.shape[0] == scorer.state_dict()["bank"].shape[0] <= 40
    assert int(counts.sum()) == 600 and int(counts.min()) >= 1
    # one centroid holding every member: the k-th neighbour of anything is that centroid
    one = KNNScorer(k=20, index="kmeans", budget=1).fit(f)
    centroid = one.state_dict()["bank"][0]
    q = f[:30]
    expected = 1 - (q / q.norm(dim=1, keepdim=True)) @ centroid
    assert torch.allclose(one.score(q), expected, atol=1e-6)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _exact_kth(bank: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    return 1 - (_unit(query) @ _unit(bank).T).topk(k, dim=1).values[:, -1]


def test_ivf_files_every_row_once_under_its_nearest_list():
    rng = np.random.default_rng(2)
    f, y = _draw(rng, _centers(rng), 3000)
    scorer = KNNScorer(k=20, index="ivf", budget=100, lists=30).fit(f, labels=y)
    state = scorer.state_dict()
    bank, centroids, offsets = state["bank"], state["list_centroids"], state["list_offsets"]
    assert bank.shape == (3000, D) and centroids.shape[0] <= 30 and offsets.shape == (centroids.shape[0] + 1,)
    assert int(offsets[0]) == 0 and int(offsets[-1]) == 3000 and bool((offsets.diff() > 0).all())
    # a permutation of the unit rows: nothing lost, nothing repeated
    assert torch.allclose(bank.sort(dim=0).values, _unit(f).sort(dim=0).values, atol=1e-6)
    lists = torch.repeat_interleave(torch.arange(len(centroids)), offsets.diff())
    assert torch.equal((bank @ centroids.T).argmax(dim=1), lists)
    # a query probes lists until they hold 25 * k rows, at most 4 times the lists that hold that on average
    assert scorer.probe_rows_used == 25 * 20
    assert scorer.probes_used == min(len(centroids), 4 * math.ceil(25 * 20 * len(centroids) / 3000))


def test_ivf_row_budget_probes_the_nearest_lists_until_they_hold_the_budget():
    """With unequal lists (one dense cluster, scattered rows around it), each query reads its nearest lists
    up to the first that brings the rows it read to ``probe_rows``: its score is the exact k-th distance
    among exactly those rows, whatever the batch it comes in."""
    rng = np.random.default_rng(5)
    dense = torch.from_numpy(rng.normal(size=(2500, D)) * 0.3 + 4.0).float()
    scattered = torch.from_numpy(rng.normal(size=(1500, D)) * 2.0).float()
    f = torch.cat([dense, scattered])
    scorer = KNNScorer(k=10, index="ivf", budget=100, lists=60).fit(f)
    state = scorer.state_dict()
    sizes = state["list_offsets"].diff()
    q = torch.cat([dense[:20] + 0.05, scattered[:20] + 0.05])
    scores = scorer.score(q)
    assert torch.allclose(torch.cat([scorer.score(block) for block in q.split(3)]), scores, atol=1e-6)
    offsets = state["list_offsets"].tolist()
    budget, probes = scorer.probe_rows_used, scorer.probes_used
    assert budget == 250
    read, lists_taken = [], set()
    for i in range(len(q)):
        nearest = (_unit(q[i : i + 1]) @ state["list_centroids"].T).topk(probes).indices[0].tolist()
        held = np.cumsum([offsets[j + 1] - offsets[j] for j in nearest])
        taken = nearest[: int(np.searchsorted(held, budget)) + 1]  # up to the list that reaches the budget
        rows = torch.cat([state["bank"][offsets[j] : offsets[j + 1]] for j in taken])
        read.append(len(rows))
        lists_taken.add(len(taken))
        assert torch.allclose(scores[i], _exact_kth(rows, q[i : i + 1], 10)[0], atol=1e-5)
    assert min(read) >= budget and max(read) < budget + int(sizes.max())
    assert len(lists_taken) > 1  # not a fixed number of lists: as many as the budget takes


def test_ivf_score_is_the_exact_score_over_the_probed_lists():
    """Probing every list gives the exact score; fewer lists can only overstate it (a neighbour missed is
    replaced by a farther one); a query's score does not depend on the batch it comes in."""
    rng = np.random.default_rng(3)
    centers = _centers(rng)
    f, y = _draw(rng, centers, 4000)
    q = torch.cat([_draw(rng, centers, 150)[0], _draw(rng, centers, 50, shift=3.0)[0]])
    exact = _exact_kth(f, q, 30)
    every = KNNScorer(k=30, index="ivf", budget=100, lists=40, probes=40).fit(f, labels=y)
    assert torch.allclose(every.score(q), exact, atol=1e-5)
    few = KNNScorer(k=30, index="ivf", budget=100, lists=40, probes=2).fit(f, labels=y)
    scores = few.score(q)
    assert bool((scores >= exact - 1e-5).all()) and bool((scores > exact + 1e-4).any())
    one_at_a_time = torch.cat([few.score(q[i : i + 1]) for i in range(len(q))])
    in_blocks = torch.cat([few.score(block) for block in q.split(7)])
    assert torch.allclose(one_at_a_time, scores, atol=1e-6) and torch.allclose(in_blocks, scores, atol=1e-6)
    # each score is the exact k-th distance among the rows of the query's own probed lists
    state = few.state_dict()
    offsets = state["list_offsets"].tolist()
    for i in (0, 160):
        probed = (_unit(q[i : i + 1]) @ state["list_centroids"].T).topk(2).indices[0].tolist()
        rows = torch.cat([state["bank"][offsets[j] : offsets[j + 1]] for j in probed])
        assert torch.allclose(scores[i], _exact_kth(rows, q[i : i + 1], 30)[0], atol=1e-5)


def test_ivf_lists_too_small_for_k_count_the_missing_neighbours_as_farthest():
    f = torch.randn(500, D, generator=torch.Generator().manual_seed(4))
    scorer = KNNScorer(k=50, index="ivf", budget=100, lists=100, probes=1).fit(f)
    longest = int(scorer.state_dict()["list_offsets"].diff().max())
    assert longest < 50
    assert torch.equal(scorer.score(f[:20]), torch.full((20,), 2.0))  # cosine -1: the largest distance


def test_bad_index_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="index must be one of"):
        build_ood_scorer("knn", index="ivf-flat")
    with pytest.raises(ValueError, match="lists must be a positive integer"):
        build_ood_scorer("knn", index="ivf", lists=0)
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        build_ood_scorer("knn", index="ivf", probes=1.5)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        build_ood_scorer("knn", budget=0)
    with pytest.raises(CalibrationError, match="--ood-index: expected one of"):
        CalibrationSettings(ood_index="faiss").check()
    with pytest.raises(CalibrationError, match="--ood-index subsample: .*knn scorer only"):
        CalibrationSettings(ood_index="subsample", ood_scorer="mahalanobis").check()
    CalibrationSettings(ood_index="auto", ood_scorer="energy").check()  # auto is fine for any scorer


# --- save / load ----------------------------------------------------------------------------------------


def _calibration(index: str) -> Calibration:
    rng = np.random.default_rng(0)
    centers = _centers(rng)
    f_train, y_train = _draw(rng, centers, 800)
    f_cal, y_cal = _draw(rng, centers, 400)
    logits = lambda f: (f.numpy() @ centers.T / 4).astype(np.float32)
    clf = NoiseAwareClassifier(known_noise="none", ood_scorer="knn",
                               ood_params={"k": 20, "index": index, "budget": 100})
    clf.fit(f_train.numpy(), logits(f_train), y_train.numpy())
    clf.conformalize(logits(f_cal), y_cal.numpy(), features=f_cal.numpy())
    return clf.calibration_


@pytest.fixture(scope="module", params=["exact", "subsample", "kmeans", "ivf"])
def saved(request, tmp_path_factory) -> tuple[str, Calibration, Path]:
    directory = tmp_path_factory.mktemp(request.param)
    calibration = _calibration(request.param)
    calibration.save(directory)
    return request.param, calibration, directory


def test_round_trip_serves_the_same_scores_and_p_values(saved):
    index, calibration, directory = saved
    loaded = Calibration.load(directory)
    doc = json.loads((directory / "calibration.json").read_text())
    assert doc["ood_scorer"]["params"]["index"] == index
    assert doc["ood_scorer"]["index_used"] == index
    assert loaded.ood_scorer.index_used == index
    assert loaded.ood_scorer.state_dict()["bank"].shape[0] == (800 if index in ("exact", "ivf") else 100)
    q = torch.randn(64, D, generator=torch.Generator().manual_seed(5)) * 3
    before, after = calibration.ood_scorer.score(q), loaded.ood_scorer.score(q)
    assert torch.equal(before, after)
    assert torch.equal(calibration.ood_gate.p_value(before), loaded.ood_gate.p_value(after))
    # the gate is fitted on the served (reduced) scorer's scores of the calibration items
    assert loaded.ood_gate.n == 400


def _copy(directory: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "calibration"
    shutil.copytree(directory, target)
    return target


def _refused(directory: Path, needle: str) -> None:
    with pytest.raises(CalibrationError) as err:
        Calibration.load(directory)
    assert needle in str(err.value), str(err.value)


def _edit_json(directory: Path, change) -> None:
    path = directory / "calibration.json"
    doc = json.loads(path.read_text())
    change(doc["ood_scorer"])
    path.write_text(json.dumps(doc))


def _edit_tensors(directory: Path, change) -> None:
    path = directory / "calibration.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_a_reduced_bank_over_its_budget_is_refused(saved, tmp_path):
    index, _, directory = saved
    if index in ("exact", "ivf"):
        pytest.skip(f"an {index} bank keeps every row: it has no row budget")
    d = _copy(directory, tmp_path)
    _edit_json(d, lambda s: s["params"].update(budget=99))
    _refused(d, "holds at most params.budget=99 rows, got 100")


def test_recorded_training_rows_must_match_the_index(saved, tmp_path):
    index, _, directory = saved
    d = _copy(directory, tmp_path)
    if index in ("exact", "ivf"):
        _edit_json(d, lambda s: s.update(source_rows=801))
        _refused(d, f"an {index} bank holds every training row")
    else:
        _edit_json(d, lambda s: s.update(source_rows=99))
        _refused(d, "source_rows=99 must be a whole number >= the bank size")


def test_index_used_must_be_known_and_fit_the_tensors(saved, tmp_path):
    index, _, directory = saved
    d = _copy(directory, tmp_path)
    _edit_json(d, lambda s: s.update(index_used="hnsw"))
    _refused(d, "index_used must be exact, subsample, kmeans or ivf")
    if index == "subsample":
        d2 = _copy(directory, tmp_path / "k")
        _edit_json(d2, lambda s: s.update(k_used=101))
        _refused(d2, "k_used=101 must be a whole number in [1, 100]")
    if index == "kmeans":
        d3 = _copy(directory, tmp_path / "counts")
        _edit_tensors(d3, lambda t: t.update({"ood_scorer.bank_counts": t["ood_scorer.bank_counts"] + 1}))
        _refused(d3, "bank_counts must hold one positive whole count per bank row")
        d4 = _copy(directory, tmp_path / "nocounts")
        _edit_tensors(d4, lambda t: t.pop("ood_scorer.bank_counts"))
        _refused(d4, "cluster sizes")
    if index == "ivf":
        d5 = _copy(directory, tmp_path / "offsets")
        _edit_tensors(d5, lambda t: t.update({"ood_scorer.list_offsets": t["ood_scorer.list_offsets"].flip(0)}))
        _refused(d5, "list_offsets must be")
        d6 = _copy(directory, tmp_path / "probes")
        _edit_json(d6, lambda s: s.update(probes=0))
        _refused(d6, "probes=0 must be a whole number in [1, ")
        d9 = _copy(directory, tmp_path / "probe_rows")
        _edit_json(d9, lambda s: s.update(probe_rows=0.5))
        _refused(d9, "probe_rows=0.5 must be a positive whole number of rows, or null")
        d7 = _copy(directory, tmp_path / "nolists")
        _edit_tensors(d7, lambda t: t.pop("ood_scorer.list_centroids"))
        _refused(d7, "list_centroids")
    else:
        d8 = _copy(directory, tmp_path / "stray")
        _edit_tensors(d8, lambda t: t.update({"ood_scorer.list_offsets": torch.tensor([0, 1])}))
        _refused(d8, "belong to an ivf bank exactly")


@pytest.mark.parametrize("command", [["calibrate", "--model", "m@champion"], ["train"]])
def test_ood_index_option_reaches_the_calibration_settings(command):
    from noisewise.services.cli import _calibration_settings, build_parser

    parser = build_parser()
    assert _calibration_settings(parser.parse_args(command)).ood_index == "auto"
    assert _calibration_settings(parser.parse_args([*command, "--ood-index", "ivf"])).ood_index == "ivf"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--ood-index", "ivf-flat"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ivf_on_cuda_matches_cpu():
    """fp16 bank and lists on the GPU: cosines within ~1e-3 of the CPU's. A query whose two nearest lists are
    closer than fp16 can tell apart may probe another list, so a few scores may differ more."""
    rng = np.random.default_rng(6)
    centers = _centers(rng)
    f, y = _draw(rng, centers, 5000)
    q = _draw(rng, centers, 500)[0]
    scorer = KNNScorer(k=30, index="ivf", budget=100).fit(f, labels=y)
    cpu = scorer.score(q)
    scorer.to("cuda")
    assert scorer.state_dict()["bank"].dtype == torch.float16
    got = scorer.score(q.cuda())
    assert got.device.type == "cuda"
    close = (got.cpu() - cpu).abs() <= 2e-3
    assert float(close.double().mean()) >= 0.98, float(close.double().mean())
    restored = KNNScorer.from_state(scorer.config(), scorer.state_dict())
    assert torch.equal(restored.score(q.cuda()), got)

"""benchmarks/ood.py and benchmarks/overhead.py in quick mode: the reports' structure and value ranges.

Quick mode trains the mnist5k MLP for 2 epochs (ood) and times tiny banks at batches 1 and 2 with
3 repetitions (overhead); both run with one torch thread, restored afterwards. Timings are never
asserted beyond being positive (speed is measured in benchmarks, never asserted in timed tests)."""

import math
from pathlib import Path

import pytest

from tests.benchmark_loader import load_benchmark
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    return load_benchmark(name)


ood_bench = _load("ood")
overhead_bench = _load("overhead")


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ood_report(one_thread):
    return ood_bench.run_benchmark(quick=True, progress=False)


@pytest.fixture(scope="module")
def overhead_report(one_thread):
    report = overhead_bench.run_benchmark(threads=1, quick=True, progress=False)
    torch.set_num_threads(1)  # run_benchmark sets the thread count; the fixture restores the original
    return report


def test_ood_report_structure(ood_report):
    from noisewise.models.data import OOD_DATASETS
    from noisewise.models.uncertainty.ood import OOD_SCORERS

    runs = ood_report["runs"]
    quick = ood_bench.QUICK
    assert len(runs) == len(quick["recipes"]) * len(ood_bench.NOISES) * len(quick["seeds"]) * len(ood_bench.CHECKPOINTS)
    for run in runs:
        assert set(run["scorers"]) == set(OOD_SCORERS)  # every registered scorer is benchmarked
        assert run["n_ood"] == {name: quick["n_ood"] for name in OOD_DATASETS}
        assert 0 < run["n_mistakes"] < run["n_test"]
        assert 0.0 <= run["clean_test_accuracy"] <= 1.0
        for entry in run["scorers"].values():
            assert set(entry["ood"]) == set(OOD_DATASETS)
            for metrics in entry["ood"].values():
                assert 0.0 <= metrics["auroc"] <= 1.0 and 0.0 <= metrics["fpr95"] <= 1.0
            assert set(entry["mistakes_vs_ood"]) == {*OOD_DATASETS, "all"}
            assert all(0.0 <= v <= 1.0 for v in entry["mistakes_vs_ood"].values())
    # noise was injected where asked: the realized flip rate is binomial around 0.4 (n = 5000, sd 0.007)
    rates = {run["noise"]: run["realized_noise_rate"] for run in runs}
    assert rates["none"] == 0.0 and abs(rates["symmetric:0.4"] - 0.4) < 0.03


def test_ood_summary_claims_and_markdown(ood_report):
    summary = ood_report["summary"]
    assert set(summary) == {f"ce/{c}/{n}" for c in ood_bench.CHECKPOINTS for n in ood_bench.NOISES}
    claims = ood_report["claims"]
    assert [c["setting"] for c in claims] == ["ce/selected", "ce/last"]
    for claim in claims:
        assert sorted(claim["rank_noisy"]) == sorted(claim["mean_auroc_noisy"])
        for name, change in claim["change"].items():
            assert change == pytest.approx(claim["mean_auroc_noisy"][name] - claim["mean_auroc_clean"][name])
    text = ood_bench.render_markdown(ood_report, "python benchmarks/ood.py --quick", ood_bench.explain(ood_report))
    assert "Command: `python benchmarks/ood.py --quick`" in text and "QUICK smoke run" in text
    assert "## Reading: do feature-space scores hold up under label noise?" in text and "## ce, last checkpoint" in text
    assert text.count("| `knn` |") == 2 * 3  # AUROC, FPR@95 and mistakes tables per checkpoint


def test_ood_rejects_unknown_checkpoint():
    with pytest.raises(ValueError, match="unknown checkpoints"):
        ood_bench.run_benchmark(checkpoints=("best",), quick=True, progress=False)


def test_overhead_report_structure(overhead_report):
    results = overhead_report["results"]
    quick = overhead_bench.QUICK
    assert len(results) == len(overhead_bench.MODELS) * len(quick["batches"])
    for row in results:
        assert row["batch"] in quick["batches"] and row["reps"] == quick["reps"]
        assert row["bank"] == [quick["bank"], 512]
        for arm in ("bare", "full"):
            assert row[arm]["n"] == quick["reps"] and 0 < row[arm]["median_ms"] <= row[arm]["p90_ms"]
        assert row["ratio_of_medians"] > 0 and row["ratio_paired_median"] > 0
        assert row["attempts"] == 1 and row["load"]["wall_seconds"] > 0  # quick mode never re-measures
        assert row["ratio_of_medians"] == pytest.approx(row["full"]["median_ms"] / row["bare"]["median_ms"])
        assert set(row["stages"]) == set(overhead_bench.STAGES)
        assert all(s["median_ms"] > 0 for s in row["stages"].values())
        assert set(row["knn_chunk_sweep"]) == {str(c) for c in quick["chunk_sizes"]}
        bf16 = row["variants"]["bf16_bank"]
        assert bf16["ratio_of_medians"] > 0 and bf16["knn"]["median_ms"] > 0
        # bf16 keeps 8 mantissa bits: a cosine of unit vectors moves by well under 1e-2
        assert 0 <= bf16["max_abs_score_diff"] < 1e-2
        assert row["variants"]["served_again"]["ratio_of_medians"] > 0  # the A/A control arm
        # one_block exists only where the served chunk_size splits the bank
        assert ("one_block" in row["variants"]) == (row["knn_default_chunk_size"] < quick["bank"])
    meta = overhead_report["meta"]
    assert meta["threads"] == 1 and meta["cores"] >= 1 and meta["torch"] == torch.__version__
    assert meta["load"]["wall_seconds"] > 0
    # the target row (resnet18, batch 64) is not part of the quick run
    assert overhead_report["target"]["ratio"] is None


def test_overhead_one_block_variant_when_the_bank_is_split(one_thread):
    # A served chunk_size smaller than the bank makes the one-block variant a different computation with
    # the same k-th cosine up to float rounding.
    from noisewise.models.nets import build_net
    from noisewise.models.predictor import Predictor

    torch.manual_seed(0)
    net = build_net("mlp", (1, 28, 28), 10).eval()
    cal = overhead_bench.build_calibration(net.feature_dim, 600)
    cal.ood_scorer.chunk_size = 256
    row = overhead_bench.measure_batch(Predictor(net, cal, device="cpu"), net, 4, reps=2, warmup=1,
                                       chunk_sizes=(128, 256))
    one_block = row["variants"]["one_block"]
    assert one_block["chunk_size"] == 600 and one_block["max_abs_score_diff"] < 1e-5
    assert row["knn_default_chunk_size"] == 256 and cal.ood_scorer.chunk_size == 256  # restored


def test_overhead_predictor_matches_stages():
    # The timed calibration is a working Calibration: Predictor.forward returns sets, p-values and decisions
    # consistent with the stage closures the breakdown times.
    from noisewise.models.nets import build_net
    from noisewise.models.predictor import Predictor

    torch.manual_seed(0)
    net = build_net("mlp", (1, 28, 28), 10).eval()
    cal = overhead_bench.build_calibration(net.feature_dim, 300)
    predictor = Predictor(net, cal, device="cpu")
    x = torch.rand(8, 1, 28, 28)
    out = predictor.forward(x)
    stages = overhead_bench.stage_functions(predictor, x)
    accept, reason = stages["confidence"]()
    assert torch.equal(accept, out.accept) and torch.equal(reason, out.reason)
    assert torch.equal(stages["gate"](), out.is_ood)
    assert torch.equal(stages["sets"](), out.label)
    assert out.sets.any(dim=1).all()  # MAPIE's include_last_label sets are never empty
    assert math.isfinite(cal.threshold.q) and cal.certified.certified


def test_overhead_markdown_and_help(overhead_report, capsys):
    text = overhead_bench.render_markdown(overhead_report, "python benchmarks/overhead.py --quick",
                                          overhead_bench.explain(overhead_report))
    assert "Command: `python benchmarks/overhead.py --quick`" in text
    assert "| model | bank (training rows x dim -> served rows) | batch |" in text and "## Where the time goes" in text
    assert "torch.set_num_threads(1)" in text
    with pytest.raises(SystemExit) as exit_info:
        overhead_bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        ood_bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out


def test_bank_index_on_augmented_real_features(one_thread):
    """--bank-index --augment: the bank is the features of augmented train images; every reduced bank keeps
    its budget of rows and gets its own gate, whose false-OOD rate on the ID test split stays near alpha."""
    report = ood_bench.run_bank_index(seeds=(0,), budgets=(100, 400), n_ood=60, augment=2, epochs=2,
                                      indexes=("exact", "subsample", "ivf"), timing_rows=2000, timing_budget=200,
                                      timing_reps=3, ivf_probes=(None, 283))
    (run,) = report["runs"]
    assert run["bank_rows"] == 2 * 2500
    assert report["banks"] == ["exact", "subsample:100", "subsample:400", "ivf", "ivf:283"]
    assert [run["banks"][key]["bank_size"] for key in report["banks"]] == [5000, 100, 400, 5000, 5000]
    assert run["banks"]["ivf"]["lists"] == round(4 * 5000 ** 0.5) and run["banks"]["ivf"]["probes"] >= 1
    # probing every list is the exact bank: the same AUROC and the same decisions
    every = run["banks"]["ivf:283"]
    assert every["probes"] == 283 and every["same_decisions"] == 1.0
    for name, metrics in every["ood"].items():
        assert abs(metrics["auroc"] - run["banks"]["exact"]["ood"][name]["auroc"]) < 1e-6
    # mnist5k: the gate is fitted on 1,250 calibration items and read on 750 test items; both draws vary
    tolerance = 3 * (0.05 * 0.95 * (1 / 1250 + 1 / 750)) ** 0.5
    for entry in run["banks"].values():
        assert entry["false_ood"] <= 0.05 + tolerance
        assert 0.0 <= entry["same_decisions"] <= 1.0
        assert all(0.0 <= m["auroc"] <= 1.0 for m in entry["ood"].values())
    assert run["banks"]["subsample:400"]["same_decisions"] > 0.8
    text = ood_bench.render_bank_index(report, "benchmarks/ood.py --bank-index --augment 2")
    assert "5,000 features of 2 augmented copies" in text
    assert text.count("| `subsample` | 400 |") == len(ood_bench.OOD_DATASETS) + 1
    assert run["banks"]["ivf"]["probe_rows"] == 25 * 50 and every["probe_rows"] is None
    assert text.count(f"| `ivf` | 5,000 in 283 lists, the nearest holding 1,250 rows probed (at most "
                      f"{run['banks']['ivf']['probes']}) |") == len(ood_bench.OOD_DATASETS) + 1
    assert text.count("| `ivf` | 5,000 in 283 lists, 283 probed |") == len(ood_bench.OOD_DATASETS) + 1

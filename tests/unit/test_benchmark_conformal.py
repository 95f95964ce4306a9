"""benchmarks/conformal.py in quick mode: the table's structure, exact identities between its rows,
and one statistical sanity check. The synthetic K = 100 setting only (no training), a few seconds."""

import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SPLITS = 20
SCORES = ("lac", "aps")


def _load_benchmark():
    return load_benchmark("conformal")


bench = _load_benchmark()


@pytest.fixture(scope="module")
def report():
    return bench.run_benchmark(splits=SPLITS, quick=True, settings=["synthetic-k100"], scores=SCORES,
                               cache_dir=None, progress=False)


@pytest.fixture(scope="module")
def setting(report):
    (only,) = report["settings"]
    return only


def _rows(setting, score, noise):
    return {r["method"]: r for r in setting["rows"] if r["score"] == score and r["noise"] == noise}


def test_structure(report, setting):
    assert setting["name"] == "synthetic-k100" and setting["k"] == 100
    assert setting["n_cal"] + setting["n_test"] <= setting["n_pool"]
    noises = [f"symmetric:{r:g}" for r in bench.SYMMETRIC_RATES]
    assert setting["noises"] == noises
    methods = bench.method_names()
    assert len(methods) == 4 + 3 * len(bench.AUDIT_SIZES)
    assert len(setting["rows"]) == len(SCORES) * len(noises) * len(methods)
    for row in setting["rows"]:
        assert row["splits"] == SPLITS
        assert 0.0 <= row["coverage_mean"] <= 1.0 and 0.0 <= row["below_target_fraction"] <= 1.0
        assert 0.0 <= row["size_mean"] <= setting["k"]
    # the synthetic model is calibrated at the requested accuracy
    assert abs(setting["model"]["mean_top_probability"] - 0.75) < 0.02
    assert report["meta"]["splits"] == SPLITS and report["meta"]["scores"] == list(SCORES)


def test_identities_between_rows(setting):
    for score in SCORES:
        clean = _rows(setting, score, "symmetric:0")
        # Without noise naive CP is the oracle, NACP plug-in is split CP, and the audit agrees with the labels.
        for method in ("naive", "nacp", *(f"audit_rectified_{m}" for m in bench.AUDIT_SIZES)):
            assert clean[method]["coverage_mean"] == clean["oracle"]["coverage_mean"], method
            assert clean[method]["size_mean"] == clean["oracle"]["size_mean"], method
        for noise in setting["noises"]:
            rows = _rows(setting, score, noise)
            # the oracle and the split CP on the audit alone use clean labels only
            for method in ("oracle", *(f"audit_split_{m}" for m in bench.AUDIT_SIZES)):
                assert rows[method]["coverage_mean"] == clean[method]["coverage_mean"]
            delta_row = rows["nacp_delta"]
            eps_u = delta_row["eps_uniform"]
            assert eps_u == pytest.approx(delta_row["flip_rate"] * 100 / 99)
            assert delta_row["Delta"] == pytest.approx(bench.nacp_delta(setting["n_cal"], eps_u, bench.DELTA))
        # more noise, bigger naive sets
        naive_sizes = [_rows(setting, score, n)["naive"]["size_mean"] for n in setting["noises"]]
        assert naive_sizes == sorted(naive_sizes) and naive_sizes[-1] > 5 * naive_sizes[0]


def test_oracle_coverage_is_split_cp_coverage(setting):
    # LAC scores of continuous probabilities have no ties, and given the pool each split is a random
    # partition, so the per-split coverages are i.i.d. with mean exactly k/(n+1), k = ceil((n+1)(1-alpha)).
    # Per split, var <= alpha(1-alpha)(1/(n+2) + 1/n_test) (Beta(k, n+1-k) coverage of the threshold plus
    # the binomial test draw), so the mean of SPLITS splits has sd <= sqrt(var / SPLITS): allow 4 sd.
    n, n_test, alpha = setting["n_cal"], setting["n_test"], bench.ALPHA
    expected = math.ceil((n + 1) * (1 - alpha)) / (n + 1)
    sd = math.sqrt(alpha * (1 - alpha) * (1 / (n + 2) + 1 / n_test) / SPLITS)
    oracle = _rows(setting, "lac", "symmetric:0.2")["oracle"]
    assert abs(oracle["coverage_mean"] - expected) < 4 * sd
    # NACP plug-in at 20% flips lands near the target too; its spread is wider (the noisy CDF is
    # divided by 1 - eps), so use the observed split-to-split sd, plus O(1/n) for the plug-in's bias.
    nacp = _rows(setting, "lac", "symmetric:0.2")["nacp"]
    assert abs(nacp["coverage_mean"] - (1 - alpha)) < 4 * nacp["coverage_sd"] / math.sqrt(SPLITS) + 5 / n
    # and naive CP on the same noisy labels over-covers far beyond that
    assert _rows(setting, "lac", "symmetric:0.2")["naive"]["coverage_mean"] > 1 - alpha + 0.05


def test_criteria_and_markdown(report):
    ids = {c["id"] for c in report["criteria"]}
    for score in SCORES:
        assert {f"k100_nacp_delta_valid_{score}", f"k100_nacp_plugin_on_target_{score}",
                f"k100_naive_size_over_twice_nacp_{score}"} <= ids
    assert all(isinstance(c["pass"], bool) for c in report["criteria"])
    text = bench.render_markdown(report, "python benchmarks/conformal.py --quick", bench.explain(report))
    assert "Command: `python benchmarks/conformal.py --quick`" in text
    assert "| method |" in text and "## synthetic-k100, LAC (main table: noisewise's default score)" in text
    assert text.count("**PASS**") + text.count("**FAIL**") == 3  # the headline checks that apply here
    assert "flip_rate_to_uniform" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown settings"):
        bench.run_benchmark(splits=2, settings=["cifar"], progress=False)
    with pytest.raises(ValueError, match="unknown scores"):
        bench.run_benchmark(splits=2, settings=["synthetic-k100"], scores=("bogus",), progress=False)


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--splits", "--quick", "--json", "--settings"):
        assert option in out


def test_evaluate_counts_sets_and_coverage():
    # Three rows, K = 3; test rows 0 and 2. Served scores per row as given.
    served = np.array([[0.0, 0.5, 0.9], [0.0, 0.2, 0.3], [0.0, 0.7, 0.8]])
    flat = served.ravel()
    order = np.argsort(flat, kind="stable")
    tables = bench.ScoreTables(calibration=served, served_true=np.array([0.5, 0.0, 0.8]),
                               served_sorted=flat[order], served_row=(order // 3).astype(np.int32))
    coverage, size = bench.evaluate(tables, np.array([0, 2]), np.array([0.6, 0.85, np.inf, -1.0]))
    np.testing.assert_allclose(coverage, [0.5, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(size, [(2 + 1) / 2, (2 + 3) / 2, 3.0, 0.0])

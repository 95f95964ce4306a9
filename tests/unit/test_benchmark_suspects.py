"""benchmarks/suspects.py on one seed with a 2-epoch model: the report's structure, its counts
against the known flips, and the markdown it renders (a few seconds, no cache)."""

import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    return load_benchmark("suspects")


bench = _load_benchmark()


@pytest.fixture(scope="module")
def report():
    return bench.run_benchmark(seeds=(0,), epochs=2, cache_dir=None)


def test_counts_are_consistent_with_the_injected_flips(report):
    (row,) = report["per_seed"]
    assert row["n_feedback"] == 1250  # val + test splits of mnist5k
    # symmetric:0.2 flips each label with probability 0.2: the count is binomial
    assert abs(row["n_errors"] - 0.2 * 1250) < 4 * math.sqrt(1250 * 0.2 * 0.8)
    for name in bench.METHODS:
        m = row["methods"][name]
        assert 0 <= m["true_positives"] <= min(m["flagged"], row["n_errors"])
        assert m["precision"] == pytest.approx(m["true_positives"] / m["flagged"])
        assert m["recall"] == pytest.approx(m["true_positives"] / row["n_errors"])
        # even a 2-epoch model finds flips far above the 20% base rate
        assert m["precision"] > 0.5 and m["recall"] > 0.3


def test_summary_and_markdown(report):
    s = report["summary"]
    (row,) = report["per_seed"]
    ours, cl = row["methods"]["ours"], row["methods"]["cleanlab"]
    assert s["recall_ratio"]["per_seed"] == [pytest.approx(ours["recall"] / cl["recall"])]
    assert s["criterion"]["holds_on_means"] == bool(
        ours["recall"] / cl["recall"] >= 0.8 and ours["precision"] >= cl["precision"])
    md = bench.render_markdown(report, "cmd")
    assert "| ours |" in md and "| cleanlab |" in md and "Criterion" in md
    assert np.isfinite(s["table"]["ours"]["precision"]["mean"])

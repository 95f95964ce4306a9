"""The statistics and report helpers of benchmarks/serving.py (no servers started)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving import (
    ANALYSIS,
    BEGIN_INTERLEAVED,
    END_INTERLEAVED,
    parse_metric,
    percentile,
    render,
    render_interleaved,
    request_bodies,
    round_order,
    splice_interleaved,
    summarize,
)


def test_percentile_matches_order_statistics():
    values = [float(v) for v in range(1, 101)]  # 1..100: p50 interpolates to 50.5, p99 to 99.01
    assert percentile(values, 50) == 50.5
    assert math.isclose(percentile(values, 99), 99.01)
    assert math.isnan(percentile([], 50))


def test_summarize_throughput_and_milliseconds():
    out = summarize([0.010] * 99 + [0.110], window_s=2.0, errors=3)
    assert out["requests"] == 100 and out["errors"] == 3
    assert out["throughput"] == 50.0
    assert math.isclose(out["p50_ms"], 10.0)
    assert math.isclose(out["p99_ms"], 11.0)  # 0.99 of the way from the 99th (10 ms) to the 100th (110 ms)


def test_parse_metric_sums_label_sets_and_ignores_prefix_matches():
    page = "\n".join([  # noqa: FLY002 (one metric line per row reads better)
        "# HELP noisewise_batch_inputs Inputs per forward pass.",
        'noisewise_batch_inputs_sum{worker="1"} 30.0',
        'noisewise_batch_inputs_sum{worker="2"} 12.0',
        "noisewise_batch_inputs_sum_other 99",
        "noisewise_batch_inputs_count 7",
    ])
    assert parse_metric(page, "noisewise_batch_inputs_sum") == 42.0
    assert parse_metric(page, "noisewise_batch_inputs_count") == 7.0
    assert parse_metric(page, "absent_total") == 0.0


def test_render_gives_same_run_ratios():
    point = {"requests": 1, "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0, "mean_batch": 1.0,
             "server_cpu_ms_per_req": 1.0, "client_cpu": 0.1}
    per = {kind: {"startup_s": 1.0, "points": [{**point, "concurrency": 32, "throughput": tput}]}
           for kind, tput in (("noisewise", 90.0), ("plain", 100.0), ("noisewise-nobatch", 30.0))}
    meta = {"command": "x", "date": "d", "wall_s": 1.0, "machine": "m", "warmup": 1, "duration": 1,
            "banks": {"resnet18": {"scorer": "knn", "bank": [[800, 512]]}}}
    text = render({"resnet18": per}, meta)
    assert "| 32 | 0.90 | 3.00 |" in text


def test_round_order_puts_every_server_once_in_every_position_over_three_rounds():
    names = ["noisewise", "plain-A", "plain-B"]
    orders = [round_order(names, r) for r in range(3)]
    assert orders[0] == names and round_order(names, 3) == names
    for position in range(3):
        assert sorted(order[position] for order in orders) == sorted(names)


def _interleaved(throughputs: list[tuple[float, float, float]]):
    window = {"p50_ms": 1.0, "p99_ms": 2.0, "errors": 0, "mean_batch": 16.0, "server_cpu_ms_per_req": 8.0,
              "client_cpu": 0.1, "idle_cpu": 0.002}
    rounds = []
    for i, (nw, a, b) in enumerate(throughputs):
        w = {n: {**window, "throughput": t} for n, t in (("noisewise", nw), ("plain-A", a), ("plain-B", b))}
        rounds.append({"round": i + 1, "order": round_order(list(w), i), "windows": w, "ratio": nw / a,
                       "control": b / a})
    meta = {"command": "x", "date": "d", "wall_s": 1.0, "machine": "m", "warmup": 2.0, "duration": 8.0,
            "concurrency": 32, "rounds": len(rounds), "model_key": "resnet18", "load_before": (1.0, 1.0, 1.0),
            "load_after": (1.5, 1.0, 1.0), "startup_s": {"noisewise": 12.0, "plain-A": 6.0, "plain-B": 6.0},
            "bank": {"model": "bench-resnet-bank50000", "scorer": "knn", "bank": [[10000, 512]], "index": "subsample",
                     "source_rows": 50000}}
    return rounds, meta


def test_render_interleaved_gives_per_round_and_median_ratios_with_the_control():
    rounds, meta = _interleaved([(95.0, 100.0, 101.0), (120.0, 120.0, 114.0), (90.0, 100.0, 100.0)])
    text = render_interleaved(rounds, meta)
    assert text.startswith(BEGIN_INTERLEAVED) and text.endswith(END_INTERLEAVED)
    assert "| 1 | noisewise, plain-A, plain-B | 95.0 | 100.0 | 101.0 | 0.950 | 1.010 |" in text
    assert "| 2 | plain-A, plain-B, noisewise | 120.0 | 120.0 | 114.0 | 1.000 | 0.950 |" in text
    # medians of the per-round (paired) ratios: 0.95 of (0.95, 1.0, 0.9) and 1.0 of (1.01, 0.95, 1.0)
    assert "**0.950** | **1.000** |" in text
    assert "| min - max | | | | | 0.900 - 1.000 | 0.950 - 1.010 |" in text
    assert "bank fitted on 50000 training rows, index `subsample`" in text and "[[10000, 512]]" in text
    assert "the requests carry 64 different random inputs in turn" in render_interleaved(rounds, {**meta, "inputs": 64})
    assert "every request carries the same input" in text  # records written before --inputs had one input


def test_request_bodies_are_different_inputs_of_the_model_shape():
    bodies = request_bodies((3, 4, 4), 5)
    inputs = [np.asarray(json.loads(b)["inputs"]) for b in bodies]
    assert all(x.shape == (1, 3, 4, 4) and 0.0 <= x.min() and x.max() < 1.0 for x in inputs)
    assert len({x.tobytes() for x in inputs}) == 5
    assert request_bodies((3, 4, 4), 5) == bodies  # seeded: every run sends the same inputs


def test_splice_interleaved_keeps_the_tables_and_the_hand_written_analysis():
    rounds, meta = _interleaved([(95.0, 100.0, 101.0)])
    doc = "# tables\n\n| a |\n\n" + ANALYSIS + "\n\nby hand\n"
    once = splice_interleaved(doc, render_interleaved(rounds, meta))
    assert once.index("# tables") < once.index(BEGIN_INTERLEAVED) < once.index(ANALYSIS)
    assert once.endswith(ANALYSIS + "\n\nby hand\n")
    rounds2, _ = _interleaved([(50.0, 100.0, 100.0)])
    twice = splice_interleaved(once, render_interleaved(rounds2, meta))
    assert twice.count(BEGIN_INTERLEAVED) == 1 and "0.500" in twice and "| 0.950 |" not in twice
    assert twice.endswith(ANALYSIS + "\n\nby hand\n")

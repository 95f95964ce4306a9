"""The statistics and report helpers of benchmarks/serving.py (no servers started)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving import parse_metric, percentile, render, summarize


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

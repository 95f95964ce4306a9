"""benchmarks/feedback.py's report: the goal's verdict and the reading of each cell come from the numbers."""

from __future__ import annotations

import pytest

from benchmarks.feedback import GOAL_ITEMS_PER_S, render


def cell(clients: int, items_per_s: float, cpu_ms: float, cores: float, floor: bool = False) -> dict:
    return {"backend": "sqlite", "clients": clients, "items_per_request": 1, "items_per_s": items_per_s,
            "requests_per_s": items_per_s, "p50_ms": 5.0, "p99_ms": 20.0, "errors": {}, "server_cpu": cores,
            "server_cpu_ms_per_request": cpu_ms, **({"floor": True} if floor else {})}


def report(best_64: float) -> dict:
    rows = [cell(8, 5000, 0.1, 0.9, floor=True), cell(8, 990, 0.8, 0.8), cell(64, best_64, 0.4, 0.95)]
    return {"date": "2026-12-02", "model": "m@champion", "service": "svc:S", "flags": "", "duration_s": 4.0,
            "backends": ["sqlite"], "clients": [8, 64], "items_per_request": [1], "rows": rows,
            "machine": {"cpu": "cpu", "nproc": 2, "python": "3.11", "load_before": [0.2, 0.3, 0.4],
                        "load_after": [0.9, 0.5, 0.4], "sqlite_commit_ms": {"p50": 0.4, "mean": 1.0}}}


@pytest.mark.parametrize("best, verdict", [(GOAL_ITEMS_PER_S + 150, "met"), (GOAL_ITEMS_PER_S - 150, "not met")])
def test_the_verdict_follows_the_best_cell_and_the_fewest_clients_are_explained(best, verdict):
    text = render(report(best))
    assert f"from 8 or more clients: {verdict}" in text
    assert f"best {best} items/s, 64 clients" in text
    assert "With 8 clients: 990 items/s, the server using 0.80 cores" in text
    assert "0.8 ms of server CPU per request against 0.4 with 64 clients" in text
    assert "| 64 | **" in text and "The machine was shared" not in text

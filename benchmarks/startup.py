"""Start-up cost of ``noisewise serve`` against a plain BentoML service of the same network.

For each server: the seconds from launching the command to the first ``200`` from ``/readyz``, and the peak
resident memory (RSS) summed over the whole process tree (the command, BentoML's arbiter, the model check,
the worker), sampled every 0.2 s with psutil until ready. Also the RSS of the launched process itself once
ready (for ``noisewise serve``: the CLI wrapper that stays resident while serving). Runs are interleaved
(noisewise, plain, noisewise, plain, ...) so that a change in the machine's load hits both alike; the load
average is recorded with every run.

    .venv/bin/python benchmarks/startup.py --model nw-demo@champion --home DIR     # 3 runs each
    .venv/bin/python benchmarks/startup.py --model M --home DIR --runs 5 --json out.json

Servers:

* **noisewise**: ``noisewise serve --model M --port P`` (what ``make run`` starts);
* **plain**: ``bentoml serve benchmarks.plain_service:Plain --port P`` with ``NOISEWISE_MODEL=M``: the same
  registered network loaded by the same loader, softmax + argmax, no check before the worker starts.

Each server is stopped with SIGTERM on its process group once ready (SIGKILL after 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE_S = 0.2


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(server: str, model: str, port: int) -> list[str]:
    """The command line that starts ``server`` (``noisewise`` or ``plain``) on ``port``."""
    if server == "noisewise":
        return [str(BIN / "noisewise"), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if server == "plain":
        return [str(BIN / "bentoml"), "serve", "benchmarks.plain_service:Plain", "--host", "127.0.0.1", "--port",
                str(port)]
    raise ValueError(f"server: expected 'noisewise' or 'plain', got {server!r}")


def tree_rss(root: psutil.Process) -> tuple[int, int, int]:
    """``(RSS of root and all its descendants, RSS of root alone, number of processes)`` in bytes."""
    total, own, count = 0, 0, 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for process in processes:
        try:
            rss = process.memory_info().rss
        except psutil.Error:  # exited between the listing and the reading
            continue
        total, count = total + rss, count + 1
        if process.pid == root.pid:
            own = rss
    return total, own, count


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def one_run(server: str, model: str, env: dict[str, str], timeout_s: float, port: int | None = None) -> dict:
    """Start ``server`` (on ``port``, a free one when None), sample its tree until ``/readyz`` answers 200, stop
    it; the measurements."""
    port = port or free_port()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    proc = subprocess.Popen(command(server, model, port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    root = psutil.Process(proc.pid)
    peak, peak_processes, seconds = 0, 0, None
    try:
        while time.monotonic() - started < timeout_s:
            total, _, count = tree_rss(root)
            if total > peak:
                peak, peak_processes = total, count
            if proc.poll() is not None:
                raise RuntimeError(f"{server} exited with status {proc.returncode} before it was ready")
            if ready(port):
                seconds = time.monotonic() - started
                break
            time.sleep(SAMPLE_S)
        if seconds is None:
            raise RuntimeError(f"{server} was not ready within {timeout_s:g} s")
        time.sleep(1.0)  # settled: what stays resident while serving
        total, own, count = tree_rss(root)
        peak = max(peak, total)
    finally:
        stop(proc)
    return {"server": server, "ready_s": round(seconds, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "serving_rss_mb": round(total / 2**20, 1), "launcher_rss_mb": round(own / 2**20, 1),
            "processes_serving": count, "processes_at_peak": peak_processes, "load_1min": round(load_before, 2)}


def summary(runs: list[dict]) -> dict:
    """Medians per server and the noisewise / plain ratios."""
    out: dict = {}
    for server in sorted({r["server"] for r in runs}):
        mine = [r for r in runs if r["server"] == server]
        out[server] = {key: round(statistics.median(r[key] for r in mine), 2)
                       for key in ("ready_s", "peak_rss_mb", "serving_rss_mb", "launcher_rss_mb", "load_1min")}
    if {"noisewise", "plain"} <= set(out):
        out["ratio"] = {key: round(out["noisewise"][key] / out["plain"][key], 2) for key in ("ready_s", "peak_rss_mb")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registered model to serve, NAME@ALIAS or NAME/VERSION")
    parser.add_argument("--home", help="NOISEWISE_HOME that holds the model (default: the environment's)")
    parser.add_argument("--runs", type=int, default=3, help="runs per server, interleaved (default 3)")
    parser.add_argument("--servers", default="noisewise,plain", help="comma-separated: noisewise, plain")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz per run")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary to this file")
    parser.add_argument("--port", type=int, default=None,
                        help="serve every run on this port (default: a free port per run)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: expected at least 1")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    env = {**os.environ, "NOISEWISE_MODEL": args.model, "NOISEWISE_STORE": os.environ.get("NOISEWISE_STORE", "1"),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT)}
    if args.home:
        env["NOISEWISE_HOME"] = args.home
    runs = []
    for i in range(args.runs):
        for server in servers:
            result = one_run(server, args.model, env, args.timeout, args.port)
            print(json.dumps({"run": i, **result}), flush=True)
            runs.append(result)
    result = {"model": args.model, "cpus": os.cpu_count(), "runs": runs, "summary": summary(runs)}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving throughput and latency: noisewise /predict vs a plain BentoML service vs noisewise unbatched.

Closed-loop load from this process (the client) against ``bentoml serve`` subprocesses on free loopback
ports, started and stopped by PID (process group) by this script, one server at a time. One input per
request; ``C`` client tasks each send the next request as soon as the previous one is answered.

    .venv/bin/python benchmarks/serving.py                 # docs/serving.md (~10 min on 2 cores)
    .venv/bin/python benchmarks/serving.py --quick         # smoke run: MLP, noisewise + plain, c=1,8 (/tmp)
    .venv/bin/python benchmarks/serving.py --home DIR      # reuse DIR's bench-mlp / bench-resnet models

Servers, per model:

* **noisewise**: ``bentoml serve noisewise.services.service:Noisewise`` (adaptive batching on, the default);
* **plain**: ``bentoml serve benchmarks.plain_service:Plain``, the same network, softmax + argmax only,
  ``@bentoml.api(batchable=True)``;
* **noisewise-nobatch**: noisewise with ``NOISEWISE_BATCHING=0`` (one forward pass per request).

Models (registered into a temporary ``NOISEWISE_HOME`` unless ``--home`` already holds them):

* ``bench-mlp``: ``noisewise train --dataset mnist5k --noise symmetric:0.2 --recipe elr --epochs 10``;
* ``bench-resnet``: ResNet-18 at 3x32x32 trained 1 epoch on 1,000 random uint8 images with random
  labels (there is no CIFAR here; timing does not depend on the weights), calibrated by the same CLI,
  so its KNN bank is the train split's features.

Per point: throughput (requests/s over the measurement window), p50/p99 latency, errors, the client's
CPU (fraction of one core, to show it is not the bottleneck), the server process tree's CPU per request,
and the mean inputs per forward pass from /metrics (noisewise_batch_inputs for noisewise,
bentoml_service_adaptive_batch_size for the plain service).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = str(Path(sys.executable))
BENTOML = str(Path(sys.executable).with_name("bentoml"))
NOISEWISE = str(Path(sys.executable).with_name("noisewise"))
SERVERS = {
    "noisewise": ("noisewise.services.service:Noisewise", {}),
    "plain": ("benchmarks.plain_service:Plain", {}),
    "noisewise-nobatch": ("noisewise.services.service:Noisewise", {"NOISEWISE_BATCHING": "0"}),
}
ANALYSIS = "## Reading the numbers"  # docs/serving.md keeps everything from this heading on when re-run
MODELS = {"mlp": ("bench-mlp", (1, 28, 28)), "resnet18": ("bench-resnet", (3, 32, 32))}


# --- statistics ------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def summarize(latencies_s: list[float], window_s: float, errors: int) -> dict:
    """Throughput (req/s) and latency percentiles (ms) of the requests completed in a window."""
    n = len(latencies_s)
    return {"requests": n, "errors": errors, "throughput": n / window_s if window_s > 0 else float("nan"),
            "p50_ms": 1e3 * percentile(latencies_s, 50), "p99_ms": 1e3 * percentile(latencies_s, 99)}


def parse_metric(text: str, name: str) -> float:
    """Sum of every sample of metric ``name`` (all label sets) in a Prometheus text page; 0 if absent."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+|NaN)\s*$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and m.group(2) != "NaN":
            total += float(m.group(2))
    return total


# --- models ----------------------------------------------------------------------------------------------
def prepare_models(home: Path, which: list[str], env: dict) -> dict:
    """Train + calibrate + register the benchmark models that ``home`` lacks; returns their KNN bank sizes."""
    sys.path.insert(0, str(ROOT))
    os.environ["NOISEWISE_HOME"] = str(home)
    from noisewise.models.registry import has_alias, load_model

    for key in which:
        name, _ = MODELS[key]
        if has_alias(name):
            continue
        if key == "mlp":
            cmd = [NOISEWISE, "train", "--dataset", "mnist5k", "--noise", "symmetric:0.2", "--recipe", "elr",
                   "--epochs", "10", "--register", name, "--promote", "--quiet", "--device", "cpu"]
        else:
            rng = np.random.default_rng(0)
            npz = home / "synthetic-cifar.npz"
            x = rng.integers(0, 256, size=(1000, 32, 32, 3), dtype=np.uint8).transpose(0, 3, 1, 2).copy()
            np.savez(npz, x=x, y=rng.integers(0, 10, size=1000))
            cmd = [NOISEWISE, "train", "--dataset", str(npz), "--arch", "resnet18", "--epochs", "1",
                   "--register", name, "--promote", "--quiet", "--device", "cpu"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    banks = {}
    for key in which:
        cal = load_model(f"{MODELS[key][0]}@champion").calibration
        state = cal.ood_scorer.state_dict()
        banks[key] = {"scorer": cal.ood_scorer.name,
                      "bank": [list(v.shape) for v in state.values() if v.ndim == 2]}
    return banks


# --- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``bentoml serve`` subprocess in its own process group, stopped by its PID's group."""

    def __init__(self, target: str, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s; log: {self.log}")

    def cpu_seconds(self) -> float:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


# --- load ------------------------------------------------------------------------------------------------
async def closed_loop(url: str, body: bytes, concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """``concurrency`` tasks, each sending the next request when the last one is answered. Latencies of
    requests that *start* inside the measurement window and complete before it ends are kept."""
    import httpx

    # one client (one keep-alive connection) per task: a shared pool of C connections costs the client
    # O(C) work per request in httpx, which made the client the bottleneck at C >= 32
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=120) for _ in range(concurrency)]
    try:
        loop_start = time.perf_counter()
        t_start, t_end = loop_start + warmup_s, loop_start + warmup_s + duration_s

        async def worker(client):
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post(url, content=body, headers=headers)
                except httpx.TransportError:  # a dropped connection counts as an error; the client reconnects
                    r = None
                t1 = time.perf_counter()
                if t0 >= t_start and t1 <= t_end:
                    if r is not None and r.status_code == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        cpu0 = [None]

        async def mark():
            await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
            cpu0[0] = time.process_time()

        marker = asyncio.create_task(mark())
        await asyncio.gather(*(worker(client) for client in clients))
        await marker
        client_cpu = (time.process_time() - cpu0[0]) / duration_s
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    out = summarize(latencies, duration_s, errors)
    out["client_cpu"] = client_cpu
    return out


def run_point(server: Server, route: str, body: bytes, c: int, warmup: float, duration: float, kind: str) -> dict:
    import httpx

    names = (("noisewise_batch_inputs_sum", "noisewise_batch_inputs_count") if kind != "plain" else
             ("bentoml_service_adaptive_batch_size_sum", "bentoml_service_adaptive_batch_size_count"))

    def scrape():
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return [parse_metric(text, n) for n in names]

    m0, cpu0 = scrape(), server.cpu_seconds()
    res = asyncio.run(closed_loop(server.url + route, body, c, warmup, duration))
    m1, cpu1 = scrape(), server.cpu_seconds()
    passes = m1[1] - m0[1]
    res["mean_batch"] = (m1[0] - m0[0]) / passes if passes > 0 else float("nan")
    res["passes"] = passes
    total = res["requests"] + res["errors"]
    # server CPU over warm-up + window, per request answered in that span (approximate: warm-up included)
    res["server_cpu_ms_per_req"] = 1e3 * (cpu1 - cpu0) / max(1.0, (warmup + duration) / duration * total)
    res["concurrency"] = c
    return res


# --- report ----------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu or platform.processor()}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, bentoml "
            f"{__import__('bentoml').__version__}, torch threads {torch.get_num_threads()} per server; "
            "no GPU; the client and the server share the cores")


def render(results: dict, meta: dict) -> str:
    lines = [
        "# Serving benchmark: noisewise vs plain BentoML vs no batching",
        "",
        "Generated by `benchmarks/serving.py`; do not edit the tables by hand.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s",
        f"- machine: {meta['machine']}",
        (f"- load: closed loop, 1 input per request, {meta['warmup']} s warm-up then {meta['duration']} s "
         "measured per point, one server at a time, one httpx.AsyncClient (one keep-alive connection) per "
         "task, all in one client process"),
        "",
    ]
    for key, per in results.items():
        bank = meta["banks"].get(key, {})
        lines += [f"## {key} ({MODELS[key][0]}, input {'x'.join(map(str, MODELS[key][1]))})", "",
                  f"OOD scorer {bank.get('scorer')}, bank shape(s) {bank.get('bank')}; server start-up "
                  + ", ".join(f"{k} {v['startup_s']:.0f} s" for k, v in per.items()), "",
                  "| server | c | req/s | p50 ms | p99 ms | errors | inputs/pass | server CPU ms/req | client CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, info in per.items():
            for r in info["points"]:
                lines.append(f"| {kind} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
                             f"{r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch']:.1f} | "
                             f"{r['server_cpu_ms_per_req']:.1f} | {r['client_cpu']:.2f} |")
        lines += ["", "| c | noisewise / plain (req/s) | batching on / off (req/s) |", "|---:|---:|---:|"]
        nw = {r["concurrency"]: r["throughput"] for r in per.get("noisewise", {}).get("points", [])}
        pl = {r["concurrency"]: r["throughput"] for r in per.get("plain", {}).get("points", [])}
        nb = {r["concurrency"]: r["throughput"] for r in per.get("noisewise-nobatch", {}).get("points", [])}
        for c in sorted(nw):
            a = f"{nw[c] / pl[c]:.2f}" if pl.get(c) else "-"
            b = f"{nw[c] / nb[c]:.2f}" if nb.get(c) else "-"
            lines.append(f"| {c} | {a} | {b} |")
        lines.append("")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MLP, noisewise + plain, c=1,8, short points")
    ap.add_argument("--home", type=Path, help="NOISEWISE_HOME holding (or to receive) the bench models")
    ap.add_argument("--models", default=None, help="comma list of mlp,resnet18")
    ap.add_argument("--servers", default=None, help="comma list of " + ",".join(SERVERS))
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,32,64)")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default docs/serving.md)")
    args = ap.parse_args(argv)
    q = args.quick
    models = (args.models or ("mlp" if q else "mlp,resnet18")).split(",")
    servers = (args.servers or ("noisewise,plain" if q else ",".join(SERVERS))).split(",")
    levels = [int(c) for c in (args.concurrency or ("1,8" if q else "1,8,32,64")).split(",")]
    warmup = args.warmup if args.warmup is not None else (0.5 if q else 2.0)
    duration = args.duration if args.duration is not None else (2.0 if q else 8.0)
    out = args.out or (Path(tempfile.gettempdir()) / "serving-quick.md" if q else ROOT / "docs" / "serving.md")

    signal.signal(signal.SIGTERM, _terminate)  # run the `finally` blocks that stop the servers
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    t0 = time.perf_counter()
    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="noisewise-bench-")
        home = Path(tmp.name)
    else:
        home = args.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NOISEWISE_HOME": str(home), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "BENTOML_DO_NOT_TRACK": "true", "NOISEWISE_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    banks = prepare_models(home, models, env)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    results: dict = {}
    try:
        for key in models:
            name, shape = MODELS[key]
            x = np.round(rng.random(shape), 4).tolist()
            body = json.dumps({"inputs": [x]}).encode()
            results[key] = {}
            for kind in servers:
                target, extra = SERVERS[kind]
                server = Server(target, {**env, "NOISEWISE_MODEL": f"{name}@champion", **extra},
                                logs / f"{key}-{kind}.log")
                try:
                    startup = server.wait_ready()
                    points = []
                    for c in levels:
                        r = run_point(server, "/predict", body, c, warmup, duration, kind)
                        print(f"{key:8s} {kind:18s} c={c:3d} {r['throughput']:8.1f} req/s p50 {r['p50_ms']:7.1f} "
                              f"ms p99 {r['p99_ms']:7.1f} ms err {r['errors']} batch {r['mean_batch']:.1f} "
                              f"client cpu {r['client_cpu']:.2f} server {r['server_cpu_ms_per_req']:.1f} ms/req",
                              flush=True)
                        points.append(r)
                    results[key][kind] = {"startup_s": startup, "points": points}
                finally:
                    server.stop()
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta = {"command": " ".join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - t0, "machine": machine(), "warmup": warmup, "duration": duration,
            "banks": banks}
    text = render(results, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    if out.exists() and ANALYSIS in out.read_text():  # the hand-written analysis survives a re-run
        kept = "\n" + ANALYSIS + out.read_text().split(ANALYSIS, 1)[1]
    out.write_text(text + "\n" + kept)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(text)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

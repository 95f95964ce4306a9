"""Load test: concurrency 64 for 60 s of mixed-size ``/predict`` batches against a real ``bentoml serve``.

The load comes from a separate process (this script, re-run with ``--client``): 64 asyncio tasks, each with
its own keep-alive connection, each sending the next request as soon as the previous one is answered
(closed loop). Each request carries 1, 4, 16 or 64 digits images (weights 40/30/20/10%). This process starts
the server (its own store and NOISEWISE_HOME, default settings otherwise: batching on, predictions stored,
alias polled every 5 s, feedback gauges every 10 s), samples the resident memory of the server's whole
process tree (the BentoML server and its worker) every second, and stops the server by its process group.

    .venv/bin/python benchmarks/load.py                        # docs/reliability.md, load section (~2 min)
    .venv/bin/python benchmarks/load.py --quick                # 8 clients, 10 s, report to /tmp
    .venv/bin/python benchmarks/load.py --home DIR --model M   # serve an existing registered model

Pass/fail (exit status 1 otherwise): zero errors (any status but 200, or a dropped connection), and RSS at
the end at most 10% above RSS after the warm-up (``--warmup``, 10 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
SIZES, WEIGHTS = (1, 4, 16, 64), (0.4, 0.3, 0.2, 0.1)
BEGIN, END = "<!-- load:begin -->", "<!-- load:end -->"  # docs/reliability.md: the part this script rewrites
MAX_GROWTH = 0.10


# --- the client process ----------------------------------------------------------------------------------
def bodies(seed: int = 0) -> dict[int, bytes]:
    """A JSON request body per batch size: digits images as flat 64-vectors in [0, 1]."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    return {n: json.dumps({"inputs": x[rng.choice(len(x), n, replace=False)].round(4).tolist()}).encode()
            for n in SIZES}


async def closed_loop(url: str, concurrency: int, duration_s: float, seed: int) -> dict:
    import httpx

    payloads = bodies(seed)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    sizes: list[int] = []
    errors: dict[str, int] = {}
    # one connection per task: a shared pool of C connections costs httpx O(C) per request
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=120) for _ in range(concurrency)]
    t_end = time.perf_counter() + duration_s

    async def worker(k: int, client) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        while time.perf_counter() < t_end:
            n = int(rng.choice(SIZES, p=WEIGHTS))
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/predict", content=payloads[n], headers=headers)
                key = None if r.status_code == 200 else f"HTTP {r.status_code}"
            except httpx.HTTPError as err:
                key = type(err).__name__
            if key is None:
                latencies.append(time.perf_counter() - t0)
                sizes.append(n)
            else:
                errors[key] = errors.get(key, 0) + 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker(k, c) for k, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    wall = time.perf_counter() - wall0
    lat = np.asarray(latencies) * 1e3
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: float("nan"))
    return {"concurrency": concurrency, "duration_s": round(wall, 2), "requests": len(latencies),
            "errors": sum(errors.values()), "error_kinds": errors, "inputs": int(sum(sizes)),
            "requests_per_s": len(latencies) / wall, "inputs_per_s": sum(sizes) / wall,
            "p50_ms": q(50), "p90_ms": q(90), "p99_ms": q(99), "max_ms": float(lat.max()) if len(lat) else None,
            "by_size": {str(n): int(sum(s == n for s in sizes)) for n in SIZES},
            "client_cpu": (time.process_time() - cpu0) / wall}


# --- the server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bentoml serve noisewise.services.service:Noisewise`` in its own process group, stopped by that group's PID."""

    def __init__(self, env: dict, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [BENTOML, "serve", "noisewise.services.service:Noisewise", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.log = log

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s; log: {self.log}")

    def rss_bytes(self) -> tuple[int, int]:
        """(RSS summed over the server and every process under it, number of processes)."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0, 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total, len(procs)

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


def ensure_model(name: str) -> str:
    from noisewise.models.registry import has_alias
    from noisewise.services.cli import main

    if not has_alias(name):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs", "4",
                           "--risk", "0.25", "--seed", "0", "--register", name, "--promote", "--json", "--quiet"])
        if status != 0:
            raise RuntimeError(f"training {name} failed: {out.getvalue()[-2000:]}")
    return f"{name}@champion"


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "load_before": os.getloadavg()}


def run(args: argparse.Namespace, work: Path) -> dict:
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
           "PYTHONPATH": str(ROOT), "NOISEWISE_MODEL": args.model, "NOISEWISE_STORE_URL": f"sqlite:///{work / 'store.db'}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    meta = machine()
    server = Server(env, work / "bentoml-serve.log")
    try:
        server.wait_ready()
        result_path = work / "client.json"
        client = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", server.url, "--concurrency",
             str(args.concurrency), "--duration", str(args.duration), "--result", str(result_path)],
            cwd=ROOT, env=env)
        samples: list[tuple[float, int, int]] = []  # seconds since the load started, RSS bytes, processes
        t0 = time.monotonic()
        while client.poll() is None:
            rss, n = server.rss_bytes()
            samples.append((time.monotonic() - t0, rss, n))
            time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))  # one sample per second, no drift
        if client.returncode != 0:
            raise RuntimeError(f"the load client failed with status {client.returncode}")
        result = json.loads(result_path.read_text())
        rss_end, n_end = server.rss_bytes()
        samples.append((time.monotonic() - t0, rss_end, n_end))
    finally:
        server.stop()
    meta["load_after"] = os.getloadavg()
    warm = next((s for s in samples if s[0] >= args.warmup), samples[-1])
    end = samples[-1]
    result["rss"] = {"warmup_s": args.warmup, "at_warmup_mib": warm[1] / 2**20, "at_end_mib": end[1] / 2**20,
                     "max_mib": max(s[1] for s in samples) / 2**20, "min_after_warmup_mib":
                     min(s[1] for s in samples if s[0] >= warm[0]) / 2**20,
                     "growth": end[1] / warm[1] - 1, "processes": end[2], "samples": len(samples),
                     "series_mib": [(round(t, 1), round(r / 2**20, 1)) for t, r, _ in samples]}
    result["model"] = args.model
    result["machine"] = meta
    result["date"] = datetime.date.today().isoformat()
    return result


def render(r: dict) -> str:
    m, rss = r["machine"], r["rss"]
    every10 = [(t, v) for t, v in rss["series_mib"] if abs(t - 10 * round(t / 10)) < 0.6]
    verdict = "pass" if r["errors"] == 0 and rss["growth"] < MAX_GROWTH else "FAIL"
    lines = [
        BEGIN,
        (f"Run on {r['date']}: `.venv/bin/python benchmarks/load.py` ({verdict}). Server: `bentoml serve "
        f"noisewise.services.service:Noisewise`, model `{r['model']}` (digits MLP, 8x8 inputs), default settings, its own "
        "SQLite store (every prediction stored before its answer). Client: a separate process, "
        f"{r['concurrency']} closed-loop asyncio tasks (one keep-alive connection each) for {r['duration_s']:.0f} s, "
        "batches of 1/4/16/64 inputs drawn 40/30/20/10%."),
        "",
        (f"Machine: {m['cpu']}, `nproc` = {m['nproc']}, shared with other work: load average "
        f"{m['load_before'][0]:.2f} (1 min) before the run, {m['load_after'][0]:.2f} after. The client used "
        f"{r['client_cpu']:.2f} of a core, on the same 2 cores as the server: the figures are a lower bound of "
        "what the server does alone."),
        "",
        "| requests | errors | inputs | requests/s | inputs/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {r['requests']} | {r['errors']} | {r['inputs']} | {r['requests_per_s']:.1f} | {r['inputs_per_s']:.0f} | "
        f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |"),
        "",
        "Requests by batch size: " + ", ".join(f"{n}: {c}" for n, c in r["by_size"].items()) + ".",
        "",
        (f"Resident memory of the server's process tree ({rss['processes']} processes: the BentoML server and its "
        f"worker), sampled every second ({rss['samples']} samples):"),
        "",
        ("| after warm-up (t = {:.0f} s) | at the end | growth | max | min after warm-up |".format(rss["warmup_s"])),
        "|---|---|---|---|---|",
        (f"| {rss['at_warmup_mib']:.1f} MiB | {rss['at_end_mib']:.1f} MiB | {100 * rss['growth']:+.2f}% "
        f"(limit +{100 * MAX_GROWTH:.0f}%) | {rss['max_mib']:.1f} MiB | {rss['min_after_warmup_mib']:.1f} MiB |"),
        "",
        "RSS every 10 s (s: MiB): " + ", ".join(f"{t:.0f}: {v:.1f}" for t, v in every10) + ".",
        END,
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the load section of ``path`` (between the markers), or write a new document around it."""
    if path.exists() and BEGIN in path.read_text():
        text = path.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        path.write_text(head + section + tail)
    else:
        path.write_text("# Reliability\n\n## Load test\n\n" + section + "\n")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 clients for 10 s, warm-up 3 s, report to /tmp")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=None, help="RSS growth is measured from this point (s)")
    ap.add_argument("--home", type=Path, help="NOISEWISE_HOME holding the model (default: a new temporary one)")
    ap.add_argument("--model", default=None, help="registered model to serve (default: load-test@champion, "
                    "trained on first use)")
    ap.add_argument("--out", type=Path, default=None, help="markdown (default docs/reliability.md)")
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the load process itself
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.concurrency = args.concurrency or (8 if args.quick else 64)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    if args.client:
        result = asyncio.run(closed_loop(args.client, args.concurrency, args.duration, seed=0))
        args.result.write_text(json.dumps(result))
        return 0
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    out = args.out or (Path(tempfile.gettempdir()) / "reliability-quick.md" if args.quick else
                       ROOT / "docs" / "reliability.md")
    signal.signal(signal.SIGTERM, _terminate)
    for name in ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK"):
        os.environ[name] = "true"
    with tempfile.TemporaryDirectory(prefix="noisewise-load-") as tmp:
        work = Path(tmp)
        os.environ["NOISEWISE_HOME"] = str(args.home or work / "home")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        args.model = args.model or ensure_model("load-test")
        result = run(args, work)
    write_section(out, render(result))
    summary = {k: result[k] for k in ("requests", "errors", "requests_per_s", "p50_ms", "p99_ms")}
    print(json.dumps({**summary, "rss_growth": result["rss"]["growth"], "out": str(out)}))
    return 0 if result["errors"] == 0 and result["rss"]["growth"] < MAX_GROWTH else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving throughput and latency: noisewise /predict vs a plain BentoML service vs noisewise unbatched.

Closed-loop load from this process (the client) against ``bentoml serve`` subprocesses on free loopback
ports, started and stopped by PID (process group) by this script, one server at a time. One input per
request, taken in turn from ``--inputs`` different random inputs (64 by default, so that a batch holds
different inputs as real traffic does); ``C`` client tasks each send the next request as soon as the
previous one is answered.

    .venv/bin/python benchmarks/serving.py                 # docs/serving.md (~10 min on 2 cores)
    .venv/bin/python benchmarks/serving.py --quick         # smoke run: MLP, noisewise + plain, c=1,8 (/tmp)
    .venv/bin/python benchmarks/serving.py --home DIR      # reuse DIR's bench-mlp / bench-resnet models

    # ResNet-18 whose KNN bank is fitted on 50,000 rows (--ood-index auto): prepare once, untimed, then an
    # interleaved run with an A/A control (its own section of docs/serving.md, ~8 min on 2 cores)
    nice -n 19 .venv/bin/python benchmarks/serving.py --home DIR --models resnet18 --bank-rows 50000 --prepare-only
    flock /tmp/bench.lock .venv/bin/python benchmarks/serving.py --home DIR --models resnet18 --bank-rows 50000 \
        --interleave 12 --concurrency 32

Servers, per model:

* **noisewise**: ``bentoml serve noisewise.services.service:Noisewise`` (adaptive batching on, the default);
* **plain**: ``bentoml serve benchmarks.plain_service:Plain``, the same network, softmax + argmax only,
  ``@bentoml.api(batchable=True)``;
* **noisewise-nobatch**: noisewise with ``NOISEWISE_BATCHING=0`` (one forward pass per request).

Models (registered into a temporary ``NOISEWISE_HOME`` unless ``--home`` already holds them):

* ``bench-mlp``: ``noisewise train --dataset mnist5k --noise symmetric:0.2 --recipe elr --epochs 10``;
* ``bench-resnet``: ResNet-18 at 3x32x32 trained 1 epoch on 1,000 random uint8 images with random
  labels (there is no CIFAR here; timing does not depend on the weights), calibrated by the same CLI,
  so its KNN bank is the train split's features (500 rows); random labels certify nothing, so it is promoted
  with ``noisewise promote --force``;
* ``bench-resnet-bank<N>`` (``--bank-rows N``): the same network, its KNN bank fitted on N training rows
  (:func:`big_bank_model`), served instead of ``bench-resnet``.

``--interleave ROUNDS`` starts noisewise and two identical plain servers (plain-A, plain-B: the A/A control)
at once and keeps them up; each round measures each server in turn for one window at the first
``--concurrency`` (default 32) while the other two sit idle (their CPU meanwhile is reported), the order
rotating every round. It reports per-round and median ratios noisewise / plain-A and plain-B / plain-A and
rewrites only its own section of ``--out`` (the tables and the hand-written analysis are kept).

Per point: throughput (requests/s over the measurement window), p50/p99 latency, errors, the client's
CPU (fraction of one core, to show it is not the bottleneck), the server process tree's CPU per request,
and the mean inputs per forward pass from /metrics (noisewise_batch_inputs for noisewise,
bentoml_service_adaptive_batch_size for the plain service).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
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
def prepare_models(home: Path, which: list[str], env: dict, bank_rows: int = 0) -> dict:
    """Train + calibrate + register the benchmark models that ``home`` lacks; returns their KNN bank sizes.

    With ``bank_rows``, the ResNet-18 served is :func:`big_bank_model`'s (same weights as ``bench-resnet``, its
    KNN bank fitted on ``bank_rows`` training rows), prepared once and cached in ``home``."""
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
        done = subprocess.run([*cmd, "--json"], env=env, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
        if not has_alias(name):
            # random labels certify nothing, so --promote refuses; timing does not depend on the guarantees
            version = str(json.loads(done.stdout.strip().splitlines()[-1])["model_version"])
            cmd = [NOISEWISE, "promote", name, version, "--force"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    banks = {}
    for key in which:
        name = MODELS[key][0]
        if key == "resnet18" and bank_rows:
            name = big_bank_model(home, bank_rows)
        cal = load_model(f"{name}@champion").calibration
        state = cal.ood_scorer.state_dict()
        banks[key] = {"scorer": cal.ood_scorer.name, "model": name,
                      "bank": [list(v.shape) for v in state.values() if v.ndim == 2],
                      "index": cal.ood_scorer.config().get("index_used"),
                      "source_rows": cal.ood_scorer.config().get("source_rows")}
    return banks


def big_bank_name(bank_rows: int) -> str:
    return f"bench-resnet-bank{bank_rows}"


def big_bank_model(home: Path, bank_rows: int, cal_rows: int = 2000, val_rows: int = 500) -> str:
    """``bench-resnet``'s network recalibrated with a KNN bank fitted on ``bank_rows`` training rows.

    A user gets such a bank from ``noisewise train`` on a dataset whose train split has ``bank_rows`` items; training
    a ResNet-18 on them would take an hour on 2 CPU cores and the weights do not change the serving cost, so this
    runs the calibration step of that path (``fit_calibration`` with the CLI's default settings, ``--ood-index
    auto``: a bank above the budget is reduced to a class-stratified subsample) on ``bank_rows`` random uint8
    images as the train split, ``cal_rows`` as the calibration split and ``val_rows`` as the validation split, and
    registers the result as ``bench-resnet-bank<rows>@champion``. Featurizing the images takes minutes of CPU: run
    it once (``--prepare-only``, under ``nice``); later runs find the alias in ``home`` and skip it."""
    import dataclasses

    from noisewise.models.calibrate import CalibrationSettings, fit_calibration
    from noisewise.models.data import load_dataset
    from noisewise.models.registry import (
        has_alias,
        load_model,
        log_training_run,
        promote_version,
    )

    name = big_bank_name(bank_rows)
    if has_alias(name):
        return name
    source = load_model(f"{MODELS['resnet18'][0]}@champion", device="cpu")
    n = bank_rows + cal_rows + val_rows
    npz = home / f"synthetic-cifar-{n}.npz"
    if not npz.exists():
        rng = np.random.default_rng(1)
        np.savez(npz, x=rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8),
                 y=rng.integers(0, 10, size=n), class_names=np.array(source.spec.class_names))
    data = load_dataset(str(npz), "none", seed=0)
    rows = np.arange(n, dtype=np.int64)
    data = dataclasses.replace(data, splits={"train": rows[:bank_rows], "cal": rows[bank_rows:bank_rows + cal_rows],
                                             "val": rows[bank_rows + cal_rows:], "test": rows[:0]})
    settings = CalibrationSettings()  # the CLI defaults, --ood-index auto included
    t0 = time.perf_counter()
    print(f"+ fit_calibration({MODELS['resnet18'][0]}, train split {bank_rows} rows, ood_index="
          f"{settings.ood_index})", flush=True)
    calibration = fit_calibration(source.net, data, settings, device="cpu")
    print(f"  calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    params = {**{f"calibration.{k}": v for k, v in settings.__dict__.items()},
              "calibrated_from": f"{source.name}/{source.version}", "bank_rows": bank_rows}
    logged = log_training_run(source.net.cpu(), source.spec, params, history=[], metrics={}, register_as=name,
                              promote=True, calibration=calibration, dataset=data,
                              tags={"noisewise.calibrated_from": f"{source.name}/{source.version}"})
    if not logged.promoted:  # random labels certify nothing; timing does not depend on the guarantees
        promote_version(name, str(logged.version), force=True)
    return name


# --- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``bentoml serve`` subprocess in its own process group, stopped by its PID's group."""

    def __init__(self, target: str, env: dict, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.started = time.perf_counter()
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
def request_bodies(shape: tuple[int, ...], n: int, seed: int = 0) -> list[bytes]:
    """``n`` JSON bodies of one input each, shaped ``shape``, random in [0, 1) to 4 decimals, all different."""
    rng = np.random.default_rng(seed)
    return [json.dumps({"inputs": [np.round(rng.random(shape), 4).tolist()]}).encode() for _ in range(n)]


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """``concurrency`` tasks, each sending the next request when the last one is answered; the requests take
    the ``bodies`` in turn (so concurrent requests carry different inputs, as real traffic does: the OOD
    index's cost depends on how many of its lists a batch reaches). Latencies of requests that *start*
    inside the measurement window and complete before it ends are kept."""
    import httpx

    # one client (one keep-alive connection) per task: a shared pool of C connections costs the client
    # O(C) work per request in httpx, which made the client the bottleneck at C >= 32
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    turn = itertools.cycle(bodies)
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
                    r = await client.post(url, content=next(turn), headers=headers)
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


def run_point(server: Server, route: str, bodies: list[bytes], c: int, warmup: float, duration: float,
              kind: str) -> dict:
    import httpx

    names = (("noisewise_batch_inputs_sum", "noisewise_batch_inputs_count") if kind != "plain" else
             ("bentoml_service_adaptive_batch_size_sum", "bentoml_service_adaptive_batch_size_count"))

    def scrape():
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return [parse_metric(text, n) for n in names]

    m0, cpu0 = scrape(), server.cpu_seconds()
    res = asyncio.run(closed_loop(server.url + route, bodies, c, warmup, duration))
    m1, cpu1 = scrape(), server.cpu_seconds()
    passes = m1[1] - m0[1]
    res["mean_batch"] = (m1[0] - m0[0]) / passes if passes > 0 else float("nan")
    res["passes"] = passes
    total = res["requests"] + res["errors"]
    # server CPU over warm-up + window, per request answered in that span (approximate: warm-up included)
    res["server_cpu_ms_per_req"] = 1e3 * (cpu1 - cpu0) / max(1.0, (warmup + duration) / duration * total)
    res["concurrency"] = c
    return res


# --- interleaved mode ------------------------------------------------------------------------------------
#: the servers of --interleave: noisewise and two identical plain services (the second is the A/A control)
INTERLEAVED = (("noisewise", "noisewise"), ("plain-A", "plain"), ("plain-B", "plain"))
BEGIN_INTERLEAVED, END_INTERLEAVED = "<!-- interleaved:begin -->", "<!-- interleaved:end -->"


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of the windows in round ``round_index``: a rotation, so that over ``len(names)`` consecutive rounds
    every server is measured once in every position (first, after one other window, ...)."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def run_interleaved(servers: dict[str, tuple[Server, str]], route: str, bodies: list[bytes], c: int, rounds: int,
                    warmup: float, duration: float) -> list[dict]:
    """``rounds`` rounds; in each, every server gets one closed-loop window at concurrency ``c`` (its own warm-up
    first) while the others sit idle. Per window: :func:`run_point`'s figures plus the CPU the idle servers used
    meanwhile (fraction of one core), which shows whether they disturb the one measured."""
    names = list(servers)
    out = []
    for r in range(rounds):
        order = round_order(names, r)
        windows = {}
        for name in order:
            server, kind = servers[name]
            idle0 = {n: servers[n][0].cpu_seconds() for n in names if n != name}
            t0 = time.perf_counter()
            res = run_point(server, route, bodies, c, warmup, duration, kind)
            span = time.perf_counter() - t0
            res["idle_cpu"] = sum(servers[n][0].cpu_seconds() - v for n, v in idle0.items()) / span
            windows[name] = res
            print(f"round {r + 1:2d} {name:9s} {res['throughput']:7.1f} req/s p50 {res['p50_ms']:6.1f} ms p99 "
                  f"{res['p99_ms']:6.1f} ms err {res['errors']} batch {res['mean_batch']:.1f} server "
                  f"{res['server_cpu_ms_per_req']:.1f} ms/req client cpu {res['client_cpu']:.2f} idle servers cpu "
                  f"{res['idle_cpu']:.3f}", flush=True)
        base = windows["plain-A"]["throughput"] or float("nan")  # no answer in the window: no ratio
        out.append({"round": r + 1, "order": order, "windows": windows,
                    "ratio": windows["noisewise"]["throughput"] / base,
                    "control": windows["plain-B"]["throughput"] / base})
    return out


def render_interleaved(rounds: list[dict], meta: dict) -> str:
    """The --interleave section of docs/serving.md, between its markers."""
    bank = meta["bank"]
    med = lambda values: float(np.median(values))
    ratios, controls = [r["ratio"] for r in rounds], [r["control"] for r in rounds]
    names = [n for n, _ in INTERLEAVED]
    lines = [
        BEGIN_INTERLEAVED,
        f"## {meta['model_key']} with a {bank.get('source_rows') or '?'}-row bank: interleaved, with an A/A control",
        "",
        "Generated by `benchmarks/serving.py --interleave`; do not edit the tables by hand.",
        "",
        f"- command: `{meta['command']}`",
        (f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s; load average (1/5/15 min) "
         + " before, ".join("/".join(f"{v:.2f}" for v in meta[k]) for k in ("load_before", "load_after")) + " after"),
        f"- machine: {meta['machine']}",
        (f"- model `{bank.get('model')}@champion`: OOD scorer {bank.get('scorer')}, bank fitted on "
         f"{bank.get('source_rows')} training rows, index `{bank.get('index')}` (`--ood-index auto`), served bank "
         f"shape(s) {bank.get('bank')}"),
        "- servers: noisewise, plain-A and plain-B (two identical `benchmarks.plain_service:Plain`), all three "
        "started at once and kept up for the whole run (start-up "
        + ", ".join(f"{n} {meta['startup_s'][n]:.0f} s" for n in names) + ")",
        (f"- load: {meta['rounds']} rounds; in each, one window per server at c = {meta['concurrency']} "
         f"({meta['warmup']} s warm-up, then {meta['duration']} s measured), the others idle; the order rotates "
         "by one server per round; " + _inputs_text(meta.get("inputs", 1))),
        "",
        "| round | order | noisewise req/s | plain-A req/s | plain-B req/s | noisewise / plain-A | plain-B / plain-A |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        w = r["windows"]
        lines.append(f"| {r['round']} | {', '.join(r['order'])} | {w['noisewise']['throughput']:.1f} | "
                     f"{w['plain-A']['throughput']:.1f} | {w['plain-B']['throughput']:.1f} | {r['ratio']:.3f} | "
                     f"{r['control']:.3f} |")
    lines += [
        (f"| **median** | | {med([r['windows']['noisewise']['throughput'] for r in rounds]):.1f} | "
         f"{med([r['windows']['plain-A']['throughput'] for r in rounds]):.1f} | "
         f"{med([r['windows']['plain-B']['throughput'] for r in rounds]):.1f} | **{med(ratios):.3f}** | "
         f"**{med(controls):.3f}** |"),
        f"| min - max | | | | | {min(ratios):.3f} - {max(ratios):.3f} | {min(controls):.3f} - {max(controls):.3f} |",
        "",
        "Per server, medians over the rounds (errors: total):",
        "",
        "| server | req/s | p50 ms | p99 ms | errors | inputs/pass | server CPU ms/req | client CPU | idle servers' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        ws = [r["windows"][n] for r in rounds]
        lines.append(f"| {n} | {med([w['throughput'] for w in ws]):.1f} | {med([w['p50_ms'] for w in ws]):.1f} | "
                     f"{med([w['p99_ms'] for w in ws]):.1f} | {sum(w['errors'] for w in ws)} | "
                     f"{med([w['mean_batch'] for w in ws]):.1f} | {med([w['server_cpu_ms_per_req'] for w in ws]):.1f} | "
                     f"{med([w['client_cpu'] for w in ws]):.2f} | {max(w['idle_cpu'] for w in ws):.3f} (max) |")
    lines += ["", END_INTERLEAVED]
    return "\n".join(lines)


def _inputs_text(n: int) -> str:
    return ("every request carries the same input" if n == 1 else
            f"the requests carry {n} different random inputs in turn, one per request")


def splice_interleaved(text: str, section: str) -> str:
    """``text`` (docs/serving.md) with its interleaved section replaced by ``section``, or ``section`` inserted
    before the hand-written analysis (at the end when there is none); every other part is kept."""
    if BEGIN_INTERLEAVED in text and END_INTERLEAVED in text:
        head, rest = text.split(BEGIN_INTERLEAVED, 1)
        return head + section + rest.split(END_INTERLEAVED, 1)[1]
    if ANALYSIS in text:
        head, tail = text.split(ANALYSIS, 1)
        return head.rstrip("\n") + "\n\n" + section + "\n\n" + ANALYSIS + tail
    return text.rstrip("\n") + "\n\n" + section + "\n"


def main_interleaved(args, home: Path, env: dict, banks: dict, out: Path, argv, t0: float) -> int:
    """--interleave: noisewise, plain-A and plain-B up at once, ``args.interleave`` rounds of one window each."""
    models = list(banks)
    if len(models) != 1:
        raise SystemExit("--interleave measures one model: pass --models resnet18 (or mlp)")
    key = models[0]
    c = int((args.concurrency or "32").split(",")[0])
    warmup = args.warmup if args.warmup is not None else 2.0
    duration = args.duration if args.duration is not None else 8.0
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    bodies = request_bodies(MODELS[key][1], args.inputs)
    load_before = os.getloadavg()
    servers: dict[str, tuple[Server, str]] = {}
    try:
        for i, (name, kind) in enumerate(INTERLEAVED):
            target, extra = SERVERS[kind]
            port = args.port_base + i if args.port_base else None
            servers[name] = (Server(target, {**env, "NOISEWISE_MODEL": f"{banks[key]['model']}@champion", **extra},
                                    logs / f"interleaved-{key}-{name}.log", port=port), kind)
        startup = {}
        for name, (server, _) in servers.items():
            server.wait_ready()
            startup[name] = time.perf_counter() - server.started
        rounds = run_interleaved(servers, "/predict", bodies, c, args.interleave, warmup, duration)
    finally:
        for server, _ in servers.values():
            server.stop()
    meta = {"command": " ".join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - t0, "machine": machine(), "warmup": warmup, "duration": duration,
            "concurrency": c, "inputs": args.inputs, "rounds": args.interleave, "model_key": key, "bank": banks[key], "startup_s": startup,
            "load_before": load_before, "load_after": os.getloadavg()}
    section = render_interleaved(rounds, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice_interleaved(out.read_text() if out.exists() else "", section))
    record = Path(tempfile.gettempdir()) / "serving-interleaved.json"
    record.write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=1))
    print(section)
    print(f"wrote {out} and {record}", flush=True)
    return 0


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
        lines += [f"## {key} ({bank.get('model', MODELS[key][0])}, input {'x'.join(map(str, MODELS[key][1]))})", "",
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
    ap.add_argument("--bank-rows", type=int, default=0, metavar="N",
                    help="serve the ResNet-18 with a KNN bank fitted on N training rows (--ood-index auto), "
                    "prepared once into --home")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the models into --home and exit (untimed)")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="noisewise and two identical plain servers up at once; ROUNDS rounds of one window per "
                    "server at the first --concurrency (default 32); writes its own section of --out")
    ap.add_argument("--port-base", type=int, default=0, metavar="PORT",
                    help="--interleave: serve on PORT, PORT+1, PORT+2 (default: free ports)")
    ap.add_argument("--inputs", type=int, default=64, metavar="N",
                    help="N different random inputs, sent in turn one per request (default 64; 1: every "
                         "request carries the same input, as runs before 2026-12-03 did)")
    args = ap.parse_args(argv)
    if args.inputs < 1:
        ap.error("--inputs must be >= 1")
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
    banks = prepare_models(home, models, env, args.bank_rows)
    print("banks:", json.dumps(banks), flush=True)
    if args.prepare_only:
        return 0
    if args.interleave:
        try:
            return main_interleaved(args, home, env, banks, args.out or ROOT / "docs" / "serving.md", argv, t0)
        finally:
            if tmp is not None:
                tmp.cleanup()
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    results: dict = {}
    try:
        for key in models:
            name, shape = banks[key]["model"], MODELS[key][1]
            bodies = request_bodies(shape, args.inputs)
            results[key] = {}
            for kind in servers:
                target, extra = SERVERS[kind]
                server = Server(target, {**env, "NOISEWISE_MODEL": f"{name}@champion", **extra},
                                logs / f"{key}-{kind}.log")
                try:
                    startup = server.wait_ready()
                    points = []
                    for c in levels:
                        r = run_point(server, "/predict", bodies, c, warmup, duration, kind)
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
    text_out = text + "\n" + kept
    if out.exists() and BEGIN_INTERLEAVED in out.read_text():  # and so does the --interleave section
        old_text = out.read_text()
        section = BEGIN_INTERLEAVED + old_text.split(BEGIN_INTERLEAVED, 1)[1].split(END_INTERLEAVED, 1)[0] + END_INTERLEAVED
        text_out = splice_interleaved(text_out, section)
    out.write_text(text_out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(text)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

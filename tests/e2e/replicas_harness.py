"""Helpers for tests/e2e/test_replicas.py: the pieces of a multi-replica deployment, each a real process on
loopback, started and stopped by PID.

* :func:`mlflow_server`: ``mlflow server`` on a PostgreSQL backend store, serving artifacts from a local folder;
* :func:`nginx_balancer`: nginx (Debian's ``nginx-light``) round-robin in front of the replicas;
* :func:`noisewise_cli`: a ``noisewise`` command in a child process, against a given registry;
* :func:`replicas_config`: the shipped ``prometheus.yml`` with the noisewise job scraping every replica.

The replicas themselves are ``bentoml serve`` processes (:func:`tests.e2e.test_server.bentoml_serve`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.e2e.prometheus_harness import private_config
from tests.e2e.test_server import ROOT, free_port, stop

START_TIMEOUT_S = 120
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; RuntimeError with the log tail when the process exits or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child process, no telemetry, the repository importable."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONPATH": str(ROOT), **extra}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each `bentoml serve` sets up its own
    return env


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, workdir: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (one worker: the machine is small) with ``backend_store_uri`` as tracking
    and registry store and ``artifacts`` served through it (``--serve-artifacts``); yields its URL."""
    port = free_port()
    log = workdir / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri, "--serve-artifacts",
             "--artifacts-destination", str(artifacts)],
            cwd=workdir, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, f"{url}/health", log, "mlflow server")
        yield url
    finally:
        stop(proc)


def noisewise_cli(*argv: str, env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``noisewise ARGV`` in a child process with ``env`` (its own registry and home); the result, output as
    text. The child keeps MLFLOW_TRACKING_URI out of the test process."""
    program = "import sys; from noisewise.services.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)


def nginx_binary() -> str | None:
    """nginx on PATH or where Debian installs it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def nginx_config(upstreams: list[str], port: int, workdir: Path) -> str:
    """An nginx configuration for a foreground, unprivileged-files instance: round-robin over ``upstreams``
    (host:port) on 127.0.0.1:``port``, every file under ``workdir``. Nothing is retried on another replica
    (``proxy_next_upstream off``): a request one replica fails reaches the client as a failure, so that the
    test counts it."""
    servers = "\n".join(f"        server {upstream};" for upstream in upstreams)
    temp = workdir / "nginx-temp"
    # root starts workers as `nobody` unless told otherwise; they must read and write the temp folders here
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'nginx-error.log'} warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir / 'nginx-access.log'};
    client_body_temp_path {temp / 'body'};
    proxy_temp_path {temp / 'proxy'};
    fastcgi_temp_path {temp / 'fastcgi'};
    uwsgi_temp_path {temp / 'uwsgi'};
    scgi_temp_path {temp / 'scgi'};
    client_max_body_size 32m;
    upstream noisewise {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://noisewise;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream off;
            proxy_read_timeout 90s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_balancer(nginx_bin: str, upstreams: list[str], workdir: Path) -> Iterator[str]:
    """nginx in front of ``upstreams`` on a free loopback port, in the foreground; yields its URL (the health
    check goes through it to a replica's ``/readyz``)."""
    port = free_port()
    (workdir / "nginx-temp").mkdir(exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(nginx_config(upstreams, port, workdir))
    log = workdir / "nginx-error.log"
    log.touch()
    # -p: the prefix for relative paths; -e: the startup error log, before the configuration is read
    proc = subprocess.Popen([nginx_bin, "-p", str(workdir), "-c", str(config), "-e", str(log)], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, f"{url}/readyz", log, "nginx", timeout_s=30)
        yield url
    finally:
        stop(proc)


def replicas_config(targets: list[str], scrape_interval: str = "1s") -> dict:
    """The shipped ``prometheus.yml`` (:func:`tests.e2e.prometheus_harness.private_config`) with the noisewise
    job scraping every replica in ``targets`` (host:port): one ``instance`` label each, one ``job``."""
    config = private_config(targets[0], scrape_interval)
    config["scrape_configs"][0]["static_configs"] = [{"targets": list(targets)}]
    return config


@contextlib.contextmanager
def bentoml_replicas(n: int, env: dict[str, str], workdir: Path,
                     target: str = "noisewise.services.service:Noisewise") -> Iterator[list[str]]:
    """``n`` ``bentoml serve`` processes of ``target`` on free loopback ports, started together (as a rollout
    starts pods: their start-up, the store's schema migration included, overlaps), each with its own
    ``NOISEWISE_HOME`` and ``BENTOML_HOME`` under ``workdir``; yields their URLs once every one answers
    ``/readyz``. Two ``bentoml serve`` on one ``BENTOML_HOME`` share its ``prometheus_multiproc_dir``: each
    would report the sum of both replicas' counters on its ``/metrics``."""
    procs: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for i in range(n):
            port = free_port()
            log = workdir / f"replica-{i}.log"
            home = workdir / f"home-{i}"
            home.mkdir(exist_ok=True)
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                    cwd=ROOT, env={**env, "NOISEWISE_HOME": str(home), "BENTOML_HOME": str(home / "bentoml")},
                    stdout=out, stderr=subprocess.STDOUT,
                )
            procs.append((proc, f"http://127.0.0.1:{port}", log))
        for i, (proc, url, log) in enumerate(procs):
            _wait_ready(proc, f"{url}/readyz", log, f"replica {i} (bentoml serve)")
        yield [url for _, url, _ in procs]
    finally:
        for proc, _, _ in procs:
            stop(proc)

"""Two noisewise replicas behind a load balancer, for real: what running more than one copy of the service must
keep true.

The stack, every part a real process on loopback: a private PostgreSQL holding both the MLflow tracking store
and the feedback store (one database each); ``mlflow server`` on it, serving artifacts from a local folder;
a small digits model trained and registered through that server, plus a recalibrated second version; two
``bentoml serve`` replicas sharing the registry and the store; nginx round-robin in front; Prometheus
scraping each replica as its own ``instance`` of one job.

Shown: an alias move reaches every replica by its own polling while a client sends predictions through the
balancer without one failure; feedback given to one replica is seen by the other; counters summed over the
replicas equal the traffic; gauges computed from the shared store read the same on the dashboards with both
replicas as with one (no double counting).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.prometheus_harness import (
    JOB,
    dashboards,
    has_data,
    metric_selectors,
    panel_queries,
    prometheus_binaries,
    query,
    regex_escape,
    resolve_variables,
    run_prometheus,
    substitute_variables,
    values,
    wait_for_series,
)
from tests.e2e.replicas_harness import (
    bentoml_replicas,
    child_env,
    mlflow_server,
    nginx_balancer,
    nginx_binary,
    noisewise_cli,
    replicas_config,
)
from tests.e2e.test_server import free_port
from tests.integration.serving_model import digits
from tests.postgres_server import postgres_server_fixture  # noqa: F401 (session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MODEL = "replicas-test"
REPLICAS = 2
# Gauges whose value every replica computes from shared state (the store, the registry's calibration): each
# replica reports the same number, so a dashboard must not add them up over instances.
SHARED_STATE_GAUGES = {
    "noisewise_model_info", "noisewise_target_coverage", "noisewise_alpha_ood", "noisewise_calibration_noise_rate",
    "noisewise_noise_rate", "noisewise_noise_rate_lower", "noisewise_noise_rate_upper",
    "noisewise_realized_coverage", "noisewise_feedback_window_items", "noisewise_suspect_share",
    "noisewise_drift_score", "noisewise_drift_detected",
}
STORE_GAUGES = ["noisewise_feedback_window_items", "noisewise_suspect_share", "noisewise_realized_coverage"]


@dataclass
class Stack:
    balancer: str  # nginx's URL
    replicas: list[str]  # each replica's URL
    prometheus: str
    cli_env: dict[str, str]  # MLFLOW_TRACKING_URI of the stack's mlflow server, a home of the test's own
    workdir: Path
    feedback: dict = field(default_factory=dict)  # filled by the `cross_feedback` fixture

    @property
    def targets(self) -> list[str]:
        return [url.removeprefix("http://") for url in self.replicas]


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def stack(postgres_server, tmp_path_factory) -> Iterator[Stack]:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx-light; .ci/run installs it)")
    binaries = prometheus_binaries()
    if isinstance(binaries, str):
        pytest.skip(binaries)
    workdir = tmp_path_factory.mktemp("replicas")
    registry_db = postgres_server.create_database()
    store_db = postgres_server.create_database()
    # psycopg 3 is the driver the postgres extra installs; SQLAlchemy's bare postgresql:// would want psycopg2
    with mlflow_server(postgres_server.url(registry_db), workdir / "artifacts", workdir) as mlflow_url:
        cli_env = child_env(MLFLOW_TRACKING_URI=mlflow_url, NOISEWISE_HOME=str(workdir / "home-cli"),
                            OMP_NUM_THREADS="1")
        trained = noisewise_cli("train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce",
                                "--epochs", "4", "--risk", "0.25", "--seed", "0", "--register", MODEL, "--promote",
                                "--json", "--quiet", env=cli_env)
        _require(trained.returncode == 0, f"train failed:\n{trained.stdout[-2000:]}\n{trained.stderr[-3000:]}")
        # version 2: the same weights, recalibrated at another coverage level (not promoted yet)
        calibrated = noisewise_cli("calibrate", "--model", f"{MODEL}/1", "--alpha", "0.2", "--risk", "0.25", "--json",
                                   env=cli_env)
        _require(calibrated.returncode == 0, f"calibrate failed:\n{calibrated.stderr[-3000:]}")
        replica_env = child_env(
            MLFLOW_TRACKING_URI=mlflow_url, NOISEWISE_STORE_URL=postgres_server.url(store_db),
            NOISEWISE_MODEL=f"{MODEL}@champion", NOISEWISE_DEVICE="cpu", OMP_NUM_THREADS="1",
            # follow the alias and refresh the store's gauges every second (defaults: 5 s and 10 s)
            NOISEWISE_RELOAD_INTERVAL_S="1", NOISEWISE_MONITOR_INTERVAL_S="1",
        )
        with bentoml_replicas(REPLICAS, replica_env, workdir) as replicas:
            targets = [url.removeprefix("http://") for url in replicas]
            with contextlib.ExitStack() as running:
                balancer = running.enter_context(nginx_balancer(nginx, targets, workdir))
                prom = running.enter_context(
                    run_prometheus(binaries[0], replicas_config(targets), workdir, free_port()))
                wait_for_instance_scrapes(prom, targets, since=0)
                yield Stack(balancer, replicas, prom, cli_env, workdir)


# ---------------------------------------------------------------- helpers

def served_version(url: str) -> str:
    response = httpx.get(f"{url}/model", timeout=10)
    response.raise_for_status()
    return response.json()["version"]


def wait_for_instance_scrapes(prom: str, targets: list[str], since: float, n: int = 1, timeout_s: float = 30) -> None:
    """Wait until every target was scraped successfully ``n`` times with a timestamp after ``since``."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = query(prom, f'up{{job="{JOB}"}}[1m]')["result"]
        done = {s["metric"]["instance"]: sum(1 for ts, v in s["values"] if float(ts) > since and v == "1")
                for s in series}
        if all(done.get(target, 0) >= n for target in targets):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"targets not scraped {n} time(s) after {since} within {timeout_s} s: {done}")
        time.sleep(0.25)


def by_instance(prom: str, expr: str, at: float) -> dict[str, float]:
    return {s["metric"].get("instance", ""): float(s["value"][1]) for s in query(prom, expr, at=at)["result"]}


class PredictionClient(threading.Thread):
    """Sends one-input predictions through the balancer back to back until stopped; records each outcome."""

    def __init__(self, url: str):
        super().__init__(name="replicas-client", daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.outcomes: list[tuple[float, int, str]] = []  # (time sent, status (0: no response), version or error)
        self.x, _ = digits(50, start=600)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/predict", json={"inputs": [self.x[i % len(self.x)].tolist()]})
                    detail = (response.json()["predictions"][0]["model"]["version"] if response.status_code == 200
                              else response.text[:300])
                    self.outcomes.append((sent, response.status_code, detail))
                except (httpx.HTTPError, ValueError, KeyError) as err:  # no answer, or not a prediction: a failure too
                    self.outcomes.append((sent, 0, f"{type(err).__name__}: {err}"))
                i += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=120)


# ---------------------------------------------------------------- the alias move

def test_alias_move_reaches_every_replica_without_a_failed_request(stack):
    assert [served_version(url) for url in stack.replicas] == ["1"] * REPLICAS
    client = PredictionClient(stack.balancer)
    client.start()
    try:
        time.sleep(2)  # traffic on version 1 first
        promoted = noisewise_cli("promote", MODEL, "2", "--json", env=stack.cli_env)
        assert promoted.returncode == 0, promoted.stderr[-2000:]
        moved_at = time.monotonic()
        pending, deadline = set(stack.replicas), moved_at + 60
        while pending and time.monotonic() < deadline:
            pending = {url for url in pending if served_version(url) != "2"}
            time.sleep(0.2)
        all_moved = time.monotonic()
        time.sleep(2)  # and traffic after the move
    finally:
        client.stop()
    assert not pending, f"replicas still on version 1 60 s after the alias moved: {sorted(pending)}"
    failed = [(status, detail) for _, status, detail in client.outcomes if status != 200]
    assert failed == [], f"{len(failed)} of {len(client.outcomes)} requests failed: {failed[:5]}"
    versions = [detail for _, _, detail in client.outcomes]
    assert versions.count("1") > 0 and versions.count("2") > 0, {v: versions.count(v) for v in set(versions)}
    # once /model says 2 on every replica, no response through the balancer comes from version 1
    after = [detail for sent, _, detail in client.outcomes if sent > all_moved]
    assert after and set(after) == {"2"}
    # each replica found the move by its own polling (NOISEWISE_RELOAD_INTERVAL_S=1), nobody called /reload
    wait_for_instance_scrapes(stack.prometheus, stack.targets, since=time.time())
    reloads = by_instance(stack.prometheus, f'sum by (instance) (noisewise_model_reloads_total{{job="{JOB}", '
                                            'outcome="ok"})', at=time.time())
    assert reloads == {target: 1.0 for target in stack.targets}


# ---------------------------------------------------------------- feedback across replicas

@pytest.fixture(scope="module")
def cross_feedback(stack) -> dict:
    """Predictions made on replica 1, labelled through replica 0: every third label moved to another class
    (disagreements the suspect finder should flag). Returns what was sent and stored."""
    x, y = digits(60, start=900)
    response = httpx.post(f"{stack.replicas[1]}/predict", json={"inputs": x.reshape(len(x), -1).tolist()},
                          timeout=60)
    assert response.status_code == 200, response.text
    ids = [p["id"] for p in response.json()["predictions"]]
    labels = [int((label + 4) % 10) if i % 3 == 0 else int(label) for i, label in enumerate(y)]
    sent = httpx.post(f"{stack.replicas[0]}/feedback",
                      json={"items": [{"prediction_id": i, "label": label} for i, label in zip(ids, labels)]},
                      timeout=60)
    assert sent.status_code in (200, 201), sent.text
    stack.feedback = {"ids": ids, "labels": labels, "response": sent.json()}
    return stack.feedback


def test_feedback_given_to_one_replica_is_seen_by_the_other(stack, cross_feedback):
    assert cross_feedback["response"]["stored"] == len(cross_feedback["ids"])
    seen = [httpx.post(f"{url}/suspects", json={"limit": 1000}, timeout=60) for url in stack.replicas]
    assert [r.status_code for r in seen] == [200] * REPLICAS, [r.text for r in seen]
    zero, one = (r.json() for r in seen)
    assert one["n_feedback"] == len(cross_feedback["ids"])
    assert one["n_suspects"] > 0, one
    assert {s["prediction_id"] for s in one["suspects"]} <= set(cross_feedback["ids"])
    # both replicas answer from the one store: the same list, in the same order
    assert [s["prediction_id"] for s in one["suspects"]] == [s["prediction_id"] for s in zero["suspects"]]
    assert one["n_suspects"] == zero["n_suspects"]


# ---------------------------------------------------------------- Prometheus over the replicas

def test_counters_summed_over_replicas_equal_the_traffic(stack):
    """Exact increase between two instants with no other traffic: every input is counted once, on the replica
    that served it, and the balancer spread the requests over both."""
    wait_for_instance_scrapes(stack.prometheus, stack.targets, since=time.time())
    before = time.time()
    x, _ = digits(90, start=1100)
    sizes, start = [1, 2, 3, 4, 5] * 6, 0
    with httpx.Client(base_url=stack.balancer, timeout=60) as client:
        for size in sizes:
            response = client.post("/predict", json={"inputs": x[start:start + size].reshape(size, -1).tolist()})
            assert response.status_code == 200, response.text
            start += size
    wait_for_instance_scrapes(stack.prometheus, stack.targets, since=time.time())
    after = time.time()

    def increase(expr: str) -> dict[str, float]:
        at_before, at_after = by_instance(stack.prometheus, expr, before), by_instance(stack.prometheus, expr, after)
        return {instance: value - at_before.get(instance, 0.0) for instance, value in at_after.items()}

    inputs = increase(f'sum by (instance) (noisewise_predictions_total{{job="{JOB}"}})')
    requests = increase(f'sum by (instance) (bentoml_service_request_total{{job="{JOB}", endpoint="/predict", '
                        'http_response_code="200"})')
    assert sum(inputs.values()) == sum(sizes) == start
    assert sum(requests.values()) == len(sizes)
    assert set(requests) == set(stack.targets) and min(requests.values()) > 0, requests  # round-robin: both served


def _uses_only_shared_gauges(expr: str) -> bool:
    names = {name for name, _ in metric_selectors(expr)}
    return bool(names) and names <= SHARED_STATE_GAUGES


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=1e-12)
                                    for x, y in zip(sorted(a), sorted(b)))


def test_shared_state_gauges_are_not_double_counted_on_the_dashboards(stack, cross_feedback):
    """Every panel query built only from gauges that the replicas compute from shared state shows the same
    number with both replicas selected as with either one alone (a sum over instances would show twice it)."""
    missing = wait_for_series(stack.prometheus, STORE_GAUGES, timeout_s=30)
    assert missing == [], f"store gauges never scraped: {missing}"
    window = f'noisewise_feedback_window_items{{job="{JOB}"}}'
    deadline = time.monotonic() + 30  # the replicas refresh the gauges every second; wait until both saw it
    while True:
        per_replica = values(query(stack.prometheus, window))
        # the window counts the in-distribution items among those stored (OOD-flagged ones are not judged)
        if len(per_replica) == REPLICAS and len(set(per_replica)) == 1 and per_replica[0] > 0:
            break
        assert time.monotonic() < deadline, query(stack.prometheus, window)
        time.sleep(0.5)
    stored = per_replica[0]
    assert stored <= len(cross_feedback["ids"])
    compared, differ = [], []
    for panel in (q for q in panel_queries() if _uses_only_shared_gauges(q.expr)):
        board = dashboards()[panel.dashboard]
        both = resolve_variables(stack.prometheus, board, {"job": JOB})
        results = [values(query(stack.prometheus, substitute_variables(panel.expr, both)))]
        for target in stack.targets:
            alone = {**both, "instance": regex_escape(target)}
            results.append(values(query(stack.prometheus, substitute_variables(panel.expr, alone))))
        if not has_data({"resultType": "vector", "result": [{"value": [0, str(v)]} for v in results[0]]}):
            continue  # e.g. drift gauges: no `noisewise monitor` report in this stack
        compared.append(panel.id)
        if not all(_same(results[0], other) for other in results[1:]):
            differ.append((panel.id, results))
    assert differ == [], f"panels whose value changes with the number of replicas selected: {differ}"
    assert len(compared) >= 10, compared
    # the panel an operator reads the count from shows the count, not REPLICAS times it
    window_panels = [q for q in panel_queries() if "noisewise_feedback_window_items" in q.expr and q.id in compared
                     and {name for name, _ in metric_selectors(q.expr)} == {"noisewise_feedback_window_items"}]
    assert window_panels, "no dashboard panel shows noisewise_feedback_window_items alone"
    for panel in window_panels:
        expr = substitute_variables(panel.expr, resolve_variables(stack.prometheus, dashboards()[panel.dashboard],
                                                                  {"job": JOB}))
        assert values(query(stack.prometheus, expr)) == [stored], panel.id

"""The shipped monitoring files against real parts: promtool checks the Prometheus config and alert rules, a
real Prometheus scrapes a real ``bentoml serve`` on loopback after ``noisewise demo`` traffic (and feedback),
and then every expression of every Grafana panel (its dashboard variables resolved against that Prometheus
the way Grafana resolves them) and both sides of every alert rule return data from its query API. The
dashboards' static checks are in tests/unit/test_grafana_dashboards.py. The docker-compose file cannot run here (no container engine): its structure is checked instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.prometheus_harness import (
    ALERTS_YML,
    COMPOSE_YML,
    DASHBOARD_PROVIDER_YML,
    DASHBOARDS,
    DATASOURCES_YML,
    JOB,
    PROMETHEUS_YML,
    alert_rules,
    dashboards,
    has_data,
    panel_queries,
    private_config,
    prometheus_binaries,
    promtool,
    query,
    regex_escape,
    resolve_variables,
    run_prometheus,
    split_comparison,
    substitute_variables,
    wait_for_scrapes,
    wait_for_series,
)
from tests.e2e.test_server import bentoml_serve, free_port, server_env
from tests.integration.serving_model import digits, ensure_model

pytestmark = pytest.mark.slow

PANEL_QUERIES = panel_queries()
ALERTS = alert_rules()
ALERT_SIDES = [(rule["alert"], side, part) for rule in ALERTS
               for side, part in zip(("lhs", "rhs"), split_comparison(rule["expr"])[::2])]
# the operator's alerts, plus the service being down and failed hot reloads
REQUIRED_ALERTS = {"NoisewiseOODRateHigh", "NoisewiseAbstentionSpike", "NoisewiseCoverageBelowTarget",
                   "NoisewiseNoiseRateAboveAssumption", "NoisewiseLabelDrift", "NoisewiseHigh5xxRate"}
# 160 inputs: the demo's auditor then labels 32, enough for the direct audit estimate (30 paired items) that
# the noise-rate and corrected-coverage gauges are computed from (heuristic estimates feed no gauge)
DEMO_N, DEMO_BATCH = 160, 8
# Gauges the service refreshes from the store in the background (every NOISEWISE_MONITOR_INTERVAL_S) after
# feedback and `noisewise monitor`: the test waits for them (bounded) before querying.
ASYNC_GAUGES = ["noisewise_noise_rate_lower", "noisewise_realized_coverage", "noisewise_suspect_share",
                "noisewise_drift_score", "noisewise_drift_detected"]


@pytest.fixture(scope="module")
def binaries() -> tuple[str, str]:
    found = prometheus_binaries()
    if isinstance(found, str):
        pytest.skip(found)
    return found


# ---------------------------------------------------------------- static checks of the shipped files

def test_promtool_check_config(binaries):
    result = promtool(binaries[1], "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(binaries):
    result = promtool(binaries[1], "check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout + result.stderr


def test_alert_rules_are_complete():
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in ALERTS}
    assert len({rule["alert"] for rule in ALERTS}) == len(ALERTS), "duplicate alert names"
    for rule in ALERTS:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: needs a `for` duration"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, rule["alert"]
        notes = rule.get("annotations", {})
        assert notes.get("summary") and len(notes.get("description", "")) > 40, f"{rule['alert']}: annotations"
        lhs, op, rhs = split_comparison(rule["expr"])
        assert lhs and rhs and op in {">", "<", ">=", "<=", "==", "!="}


def test_split_comparison_finds_the_top_level_operator():
    expr = 'sum(rate(x{code=~"5..", a!="b"}[5m])) / sum(rate(x[5m])) > bool on() group_left() max(y >= 2)'
    assert split_comparison(expr) == ('sum(rate(x{code=~"5..", a!="b"}[5m])) / sum(rate(x[5m]))', ">",
                                      "max(y >= 2)")
    with pytest.raises(ValueError, match="found 0"):
        split_comparison("sum(x) + 1")
    with pytest.raises(ValueError, match="found 2"):
        split_comparison("x > 1 and y < 2")


def test_compose_stack_is_consistent():
    compose = yaml.safe_load(COMPOSE_YML.read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "prometheus", "grafana", "noisewise"} <= set(services)
    base = COMPOSE_YML.parent

    def host_ports(service: dict) -> dict[int, int]:
        """container port -> host port"""
        out = {}
        for spec in service.get("ports", []):
            *_, host, container = str(spec).split(":")
            out[int(container)] = int(host)
        return out

    ports = {name: host_ports(s) for name, s in services.items()}
    assert ports["grafana"] == {3000: ports["grafana"][3000]} and ports["grafana"][3000] != 3000
    assert ports["noisewise"] == {3000: 3000}
    all_host = [p for mapping in ports.values() for p in mapping.values()]
    assert len(all_host) == len(set(all_host)), f"host ports collide: {ports}"

    env = services["noisewise"]["environment"]
    assert re.fullmatch(r"postgresql(\+psycopg)?://[^@]+@postgres:5432/\w+", env["NOISEWISE_STORE_URL"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert re.search(r"--backend-store-uri=postgresql://[^@]+@postgres:5432/(\w+)", mlflow_cmd)
    store_db = env["NOISEWISE_STORE_URL"].rsplit("/", 1)[1]
    assert store_db != re.search(r"postgres:5432/(\w+)", mlflow_cmd).group(1), "store and MLflow share a database"

    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        build = service.get("build")
        if build:
            context = (base / build["context"]).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            if "target" in build:
                assert re.search(rf"^FROM .+ AS {build['target']}$", dockerfile.read_text(), re.MULTILINE), name
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (base / source).exists(), f"{name}: missing {source}"
    assert "psycopg2" in (base / "Dockerfile").read_text()

    # Prometheus reads the shipped files where compose mounts them, and scrapes the service by name
    mounts = {str(v).split(":")[1]: (base / str(v).split(":")[0]).resolve()
              for v in services["prometheus"]["volumes"] if str(v).startswith(".")}
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert mounts[str(config_path.parent)] / config_path.name == PROMETHEUS_YML
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == ["noisewise:3000"]

    # Grafana: provisioning and dashboards mounted where the provisioning files look for them
    mounts = {str(v).split(":")[1]: (base / str(v).split(":")[0]).resolve()
              for v in services["grafana"]["volumes"] if str(v).startswith(".")}
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES_YML.parents[1]
    provider = yaml.safe_load(DASHBOARD_PROVIDER_YML.read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARDS["serving"].parent
    source = yaml.safe_load(DATASOURCES_YML.read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- a real Prometheus scraping a real server

@dataclass
class Scraped:
    service: str
    prometheus: str
    demo: dict
    before: float  # unix time: scraped state before the demo traffic
    after: float  # unix time: scraped state after it
    feedback: dict = field(default_factory=dict)
    missing_gauges: list[str] = field(default_factory=list)  # ASYNC_GAUGES not there after the wait
    target: str = ""  # host:port Prometheus scrapes
    model_name: str = ""  # the registered model the service serves
    variables: dict[str, dict[str, str]] = field(default_factory=dict)  # dashboard -> variable -> value


def predict(url: str, x) -> list[dict]:
    response = httpx.post(f"{url}/predict", json={"inputs": x.reshape(len(x), -1).tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def send_feedback(url: str) -> dict:
    """Labelled feedback on fresh predictions, when the service has ``POST /feedback``: true labels, every
    fourth flipped (disagreements, suspects), feedback on OOD photo patches, one retried item (duplicate) and
    one unknown prediction id (rejected). Returns the response, or why none was sent."""
    from noisewise.models.data import load_ood

    x, y = digits(40, start=1000)
    served = predict(url, x)
    photos = predict(url, load_ood("photos", (1, 8, 8), n=8, seed=3))
    items = [{"prediction_id": p["id"], "label": int((label + 3) % 10 if i % 4 == 0 else label)}
             for i, (p, label) in enumerate(zip(served, y))]
    items += [{"prediction_id": p["id"], "label": 0} for p in photos]
    items += [items[0], {"prediction_id": "00000000-0000-4000-8000-000000000000", "label": 1}]
    response = httpx.post(f"{url}/feedback", json={"items": items}, timeout=60)
    if response.status_code == 404:
        return {"sent": False, "reason": "the service has no POST /feedback"}
    return {"sent": True, "status": response.status_code, "body": response.text[:2000]}


def run_demo(url: str, ref: str) -> dict:
    from noisewise.services.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["demo", "--url", url, "--model", ref, "--n", str(DEMO_N), "--batch", str(DEMO_BATCH),
                       "--json"])
    assert status == 0, out.getvalue()
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scraped(binaries, tmp_path_factory):
    ref = ensure_model("prometheus-e2e")  # a copy: the demo recalibrates it and moves its alias
    workdir = tmp_path_factory.mktemp("prometheus")
    # refresh the feedback gauges and follow the alias every second (defaults: 10 s and 5 s)
    env = server_env(NOISEWISE_MODEL=ref, NOISEWISE_MONITOR_INTERVAL_S="1", NOISEWISE_RELOAD_INTERVAL_S="1")
    with bentoml_serve("noisewise.services.service:Noisewise", env, workdir / "bentoml-serve.log") as url:
        # before the first scrape: labelled series (e.g. /predict's duration histogram) exist from the start,
        # so that rates over the test traffic see an increase rather than a new series
        predict(url, digits(8, start=1500)[0])
        config = private_config(url.removeprefix("http://"), scrape_interval="1s")
        with run_prometheus(binaries[0], config, workdir, free_port()) as prom:
            wait_for_scrapes(prom, 2, since=0)
            feedback = send_feedback(url)
            wait_for_scrapes(prom, 1, since=time.time())
            before = time.time()
            demo = run_demo(url, ref)
            after = time.time()
            wait_for_scrapes(prom, 2, since=after)  # rate() needs two samples that saw the traffic
            after = time.time()
            missing = wait_for_series(prom, ASYNC_GAUGES, timeout_s=20)
            # the dashboards' variables as Grafana resolves them, the job being the test's scrape job
            variables = {name: resolve_variables(prom, board, {"job": JOB}) for name, board in dashboards().items()}
            yield Scraped(url, prom, demo, before, after, feedback, missing, target=url.removeprefix("http://"),
                          model_name=ref.split("@")[0].split("/")[0], variables=variables)


def test_dashboard_variables_resolve_to_the_scraped_service(scraped):
    """job, model and instance list exactly what the test's Prometheus scrapes: the one target, serving the
    one registered model; the instance is regex-escaped as Grafana does for a multi-value variable."""
    for name, values in scraped.variables.items():
        assert values == {"job": JOB, "model": regex_escape(scraped.model_name),
                          "instance": regex_escape(scraped.target)}, name
    assert regex_escape("127.0.0.1:3000") == r"127\\.0\\.0\\.1:3000"


@pytest.mark.parametrize("panel", PANEL_QUERIES, ids=[q.id for q in PANEL_QUERIES])
def test_panel_query_has_data(scraped, panel):
    expr = substitute_variables(panel.expr, scraped.variables[panel.dashboard])
    assert "$" not in expr, f"unresolved variable in {expr}"
    data = query(scraped.prometheus, expr)
    assert has_data(data), (f"no data for panel {panel.id!r}: {expr}\nresult: {data}\n"
                            f"feedback: {scraped.feedback}\ngauges never set: {scraped.missing_gauges}")


def test_panel_queries_see_only_the_selected_job(scraped):
    """With a job no target has, no panel shows data: every query is filtered by the job variable."""
    shown = []
    for panel in PANEL_QUERIES:
        expr = substitute_variables(panel.expr, {**scraped.variables[panel.dashboard], "job": "no-such-job"})
        if has_data(query(scraped.prometheus, expr)):
            shown.append(panel.id)
    assert shown == []


@pytest.mark.parametrize(("alert", "side", "expr"), ALERT_SIDES, ids=[f"{a}:{s}" for a, s, _ in ALERT_SIDES])
def test_alert_side_has_data(scraped, alert, side, expr):
    data = query(scraped.prometheus, expr)
    assert has_data(data), (f"no data for the {side} of {alert}: {expr}\nresult: {data}\nfeedback: {scraped.feedback}\n"
                            f"gauges never set: {scraped.missing_gauges}")


def _evaluated_at(text: str) -> float:
    """Prometheus's RFC 3339 timestamps carry nanoseconds; datetime takes microseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def test_rules_evaluate_without_errors(scraped):
    """Prometheus loaded every shipped rule and evaluates each without error on the scraped series (e.g. no
    many-to-many matching between the two sides)."""
    deadline = time.monotonic() + 15
    while True:
        groups = httpx.get(f"{scraped.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if all(_evaluated_at(rule["lastEvaluation"]) > scraped.after for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in ALERTS)
    problems = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not problems, problems


def _increase(scraped: Scraped, expr: str) -> dict[tuple, float]:
    """Exact counter increase between the scrapes before and after the demo, by label set (instant queries at
    both times: no rate() extrapolation)."""
    def at(t):
        return {tuple(sorted(s["metric"].items())): float(s["value"][1])
                for s in query(scraped.prometheus, expr, at=t)["result"]}

    before, after = at(scraped.before), at(scraped.after)
    return {key: after[key] - before.get(key, 0.0) for key in after}


def test_prometheus_counts_what_the_demo_saw(scraped):
    """The decisions Prometheus recorded over the demo equal the demo's own tally of the responses, and
    BentoML's request counter saw each of its /predict requests: nothing lost or double-counted across the
    worker processes and the scrape."""
    streams = scraped.demo["streams"]
    counted = _increase(scraped, "sum by (decision, reason) (noisewise_predictions_total)")
    got = {dict(key).get("decision", "") + "/" + dict(key).get("reason", ""): value for key, value in counted.items()}
    expected = {
        "accept/none": sum(s["accepted"] for s in streams.values()),
        "abstain/ood": sum(s["abstained_ood"] for s in streams.values()),
        "abstain/low_confidence": sum(s["abstained_low_confidence"] for s in streams.values()),
    }
    assert {k: got.get(k, 0.0) for k in expected} == expected
    requests = _increase(scraped, 'sum(bentoml_service_request_total{endpoint="/predict", http_response_code="200"})')
    sent = sum(-(-s["sent"] // DEMO_BATCH) for s in streams.values())
    assert list(requests.values()) == [sent]


def test_ood_alert_pends_on_ood_heavy_traffic(scraped):
    """The demo sends a third of its inputs or more from OOD sources: far above alpha_ood beyond sampling
    error, so NoisewiseOODRateHigh must be pending (it fires after its `for`), while the service-health alerts
    stay inactive."""
    alpha = httpx.post(f"{scraped.service}/model", timeout=10).json()["calibration"]["ood"]["alpha_ood"]
    streams = scraped.demo["streams"]
    n = sum(s["sent"] for s in streams.values())
    ood_share = sum(s["abstained_ood"] for s in streams.values()) / n
    assert ood_share > 2 * alpha + 4 * (alpha * (1 - alpha) / n) ** 0.5, "precondition: the demo's OOD share"
    deadline = time.monotonic() + 15
    while True:
        groups = httpx.get(f"{scraped.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        state = {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}
        if state["NoisewiseOODRateHigh"] != "inactive" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert state["NoisewiseOODRateHigh"] in {"pending", "firing"}, state
    assert state["NoisewiseDown"] == state["NoisewiseHigh5xxRate"] == "inactive", state

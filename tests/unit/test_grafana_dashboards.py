"""Static checks of the shipped Grafana dashboards: alarm colours and value mappings on every stat and gauge,
target lines, the Prometheus data source as a variable (imported and provisioned alike), the job / instance /
model variables on every query, and the links to MLflow and the Evidently reports. Every query against a real
Prometheus: tests/e2e/test_prometheus.py."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.e2e.prometheus_harness import (
    COMPOSE_YML,
    DATASOURCES_YML,
    JOB,
    PROMETHEUS_YML,
    dashboards,
    metric_selectors,
    panels,
    query_variables,
    variable_query,
)

BOARDS = dashboards()
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALARM_PANELS = {"stat", "gauge"}  # panels read by colour at a glance
COLOURED_PANELS = ALARM_PANELS | {"bargauge"}  # panels whose colour comes from thresholds


def graphs(board: dict) -> list[dict]:
    return [p for p in panels(board) if p["type"] != "row"]


def all_panels() -> list[tuple[str, dict]]:
    return [(name, panel) for name, board in BOARDS.items() for panel in graphs(board)]


COLOURED = [(name, panel) for name, panel in all_panels() if panel["type"] in COLOURED_PANELS]


def threshold_colour(panel: dict, value: float) -> str:
    """The colour Grafana gives ``value`` from the panel's absolute thresholds (the last step at or below it;
    the base step has value null)."""
    colour = None
    for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]:
        if step["value"] is None or value >= step["value"]:
            colour = step["color"]
    return colour


def mapped_text(panel: dict, value: float) -> tuple[str, str] | None:
    """(text, colour) a value mapping gives ``value``, or None."""
    for mapping in panel["fieldConfig"]["defaults"].get("mappings", []):
        if mapping["type"] == "value":
            hit = mapping["options"].get(f"{value:g}")
            if hit:
                return hit["text"], hit.get("color")
    return None


def test_dashboards_are_well_formed():
    uids = {board["uid"] for board in BOARDS.values()}
    assert len(uids) == len(BOARDS)
    for name, board in BOARDS.items():
        assert 36 <= board["schemaVersion"] <= 41 and board["title"], name
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert len(graphs(board)) >= 8, name
        for panel in graphs(board):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']}"


@pytest.mark.parametrize(("board", "panel"), COLOURED, ids=[f"{b}:{p['title']}" for b, p in COLOURED])
def test_stat_and_gauge_panels_have_thresholds_and_mappings(board, panel):
    defaults = panel["fieldConfig"]["defaults"]
    thresholds = defaults.get("thresholds")
    assert thresholds and thresholds["mode"] == "absolute", "no absolute thresholds"
    steps = thresholds["steps"]
    assert steps[0]["value"] is None, "the first step is the base (value null)"
    levels = [s["value"] for s in steps[1:]]
    assert levels == sorted(levels) and len(set(levels)) == len(levels), f"steps not increasing: {levels}"
    if panel["type"] in ALARM_PANELS:
        assert len(steps) >= 2, "an alarm panel needs at least one level above the base colour"
        assert len({s["color"] for s in steps}) >= 2, "every step has the same colour"
        assert defaults.get("mappings"), "no value mappings"
        assert defaults.get("color", {}).get("mode") == "thresholds", "colour does not follow the thresholds"


def test_scrape_target_up_reads_down_in_red():
    up = [p for p in graphs(BOARDS["serving"]) if any(
        name == "up" for t in p["targets"] for name, _ in metric_selectors(t["expr"]))]
    assert len(up) == 1 and up[0]["type"] == "stat"
    panel = up[0]
    assert threshold_colour(panel, 0) == "red" and threshold_colour(panel, 1) == "green"
    assert mapped_text(panel, 0) == ("DOWN", "red")
    assert mapped_text(panel, 1) == ("UP", "green")
    assert mapped_text(panel, 0.5) is None
    # no series at all (a target that never answered) is not green either
    special = [m["options"] for m in panel["fieldConfig"]["defaults"]["mappings"] if m["type"] == "special"]
    assert any(s["match"] in {"null", "null+nan"} and s["result"]["color"] == "red" for s in special)


def test_alarm_levels_match_the_alerts():
    """The colours change where the alerts fire: 5xx share at 1%, coverage 3 standard errors below target,
    drift at 1, and the drift p-value line at the default level 0.05."""
    by_title = {(name, p["title"]): p for name, p in all_panels()}
    five = by_title["serving", "5xx rate"]
    assert threshold_colour(five, 0.0099) != "red" and threshold_colour(five, 0.01) == "red"
    gap = by_title["feedback", "Coverage vs target (standard errors)"]
    assert [threshold_colour(gap, z) for z in (-3.01, -2.5, -1.0)] == ["red", "orange", "green"]
    drift = by_title["feedback", "Drift detected"]
    assert mapped_text(drift, 1) == ("DRIFT", "red") and threshold_colour(drift, 1) == "red"
    assert threshold_colour(drift, 0) == "green"
    p_value = by_title["feedback", "Drift p-value by report"]
    assert threshold_colour(p_value, 0.049) == "red" and threshold_colour(p_value, 0.05) != "red"


def _dashed_series(panel: dict) -> set[str]:
    out = set()
    for override in panel["fieldConfig"].get("overrides", []):
        props = {p["id"]: p["value"] for p in override["properties"]}
        if props.get("custom.lineStyle", {}).get("fill") == "dash":
            out.add(override["matcher"]["options"])
    return out


def test_time_series_draw_target_lines():
    """Where a panel plots a value against its target (coverage, alpha_ood, the assumed noise rate), the target
    series is a dashed line; a fixed alarm level is a dashed threshold line."""
    targets = {"noisewise_target_coverage", "noisewise_alpha_ood", "noisewise_calibration_noise_rate"}
    checked = 0
    for name, panel in all_panels():
        if panel["type"] != "timeseries":
            continue
        style = panel["fieldConfig"]["defaults"].get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
        if style != "off":
            assert len(panel["fieldConfig"]["defaults"]["thresholds"]["steps"]) >= 2, panel["title"]
        if len(panel["targets"]) < 2:
            continue
        for target in panel["targets"]:
            names = {n for n, _ in metric_selectors(target["expr"])}
            if names <= targets:  # this series is the target itself
                assert target["legendFormat"] in _dashed_series(panel), f"{name}: {panel['title']}"
                checked += 1
    assert checked >= 4


def test_every_panel_uses_the_datasource_variable():
    for name, panel in all_panels():
        where = f"{name}: {panel['title']}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"], where
    for name, board in BOARDS.items():
        for variable in query_variables(board):
            assert variable["datasource"] == DATASOURCE, f"{name}: variable {variable['name']}"
        assert "noisewise-prometheus" not in json.dumps(board), f"{name}: a fixed data source uid"


def test_datasource_works_imported_and_provisioned():
    """Imported: Grafana asks for DS_PROMETHEUS and writes its uid where ``${DS_PROMETHEUS}`` stands, the
    datasource variable's default. Provisioned: nothing replaces it, and Grafana falls back to the option whose
    text matches the default's text, which is the provisioned data source's name."""
    provisioned = yaml.safe_load(DATASOURCES_YML.read_text())["datasources"][0]
    for name, board in BOARDS.items():
        inputs = {i["name"]: i for i in board["__inputs"]}
        assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
        assert inputs["DS_PROMETHEUS"]["pluginId"] == provisioned["type"] == "prometheus"
        variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
        assert variable["type"] == "datasource" and variable["query"] == "prometheus"
        assert variable["current"]["value"] == "${DS_PROMETHEUS}", name
        assert variable["current"]["text"] == provisioned["name"], name
        assert {"type": "datasource", "id": "prometheus"}.items() <= next(
            r for r in board["__requires"] if r["type"] == "datasource").items()


def test_job_instance_and_model_variables():
    shipped_jobs = [j["job_name"] for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]]
    for name, board in BOARDS.items():
        variables = {v["name"]: v for v in query_variables(board)}
        assert list(variables) == ["job", "model", "instance"], name
        assert variables["job"]["current"]["value"] == JOB and JOB in shipped_jobs
        assert not variables["job"]["multi"]
        # label_values queries; each later one narrowed by the earlier ones
        queries = {n: variable_query(v) for n, v in variables.items()}
        assert re.fullmatch(r"label_values\(noisewise_model_info, job\)", queries["job"])
        for later in ("model", "instance"):
            assert queries[later].startswith("label_values(")
            selectors = metric_selectors(queries[later].removeprefix("label_values(").rsplit(",", 1)[0])
            assert ("job", "=", "$job") in selectors[0][1], queries[later]
        assert ("name", "=~", "$model") in metric_selectors(queries["instance"][len("label_values("):])[0][1]
        for n in ("model", "instance"):
            assert variables[n]["multi"] and variables[n]["includeAll"] and not variables[n].get("allValue")


@pytest.mark.parametrize(("board", "panel"), all_panels(), ids=[f"{b}:{p['title']}" for b, p in all_panels()])
def test_every_query_filters_by_job_and_instance(board, panel):
    for target in panel["targets"]:
        selectors = metric_selectors(target["expr"])
        assert selectors, target["expr"]
        for metric, matchers in selectors:
            assert ("job", "=", "$job") in matchers, f"{metric} without the job filter in {target['expr']}"
            assert ("instance", "=~", "$instance") in matchers, f"{metric} without the instance filter"
            if metric == "noisewise_model_info":
                assert ("name", "=~", "$model") in matchers, f"{metric} without the model filter"


def test_metric_selectors_finds_every_selector():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="$job", x=~"5.."}[1m]))) / on(job) '
            'group_left(v) max(up offset 5m) > bool 1e3 and sum without (k) (b{y="q\\"}"}) + count(c)')
    assert metric_selectors(expr) == [("a_bucket", [("job", "=", "$job"), ("x", "=~", "5..")]), ("up", []),
                                      ("b", [("y", "=", 'q\\"}')]), ("c", [])]


def test_links_to_mlflow_and_evidently():
    compose = yaml.safe_load(COMPOSE_YML.read_text())["services"]
    mlflow_port = next(str(p).split(":")[-2] for p in compose["mlflow"]["ports"])
    for name, board in BOARDS.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        urls = {link["title"]: link["url"] for link in board["links"] if link["type"] == "link"}
        assert urls == {"MLflow": "${mlflow_url}", "Evidently reports": "${evidently_url}"}, name
        for var in ("mlflow_url", "evidently_url"):
            assert variables[var]["type"] == "textbox"
            assert re.fullmatch(r"https?://[\w.-]+:\d+/?", variables[var]["query"]), variables[var]["query"]
            assert variables[var]["current"]["value"] == variables[var]["query"]
        assert variables["mlflow_url"]["query"].endswith(f":{mlflow_port}")
        # the link between the three dashboards carries the selected job/instance/model along
        assert any(link["type"] == "dashboards" and link["includeVars"] for link in board["links"]), name

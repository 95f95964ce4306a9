"""Helpers for tests/e2e/test_prometheus.py: the shipped monitoring files, a private Prometheus on loopback,
and its HTTP query API.

The shipped files are read as they are; the only changes for the test are made on a copy of
``prometheus.yml`` (scrape interval, the noisewise target on loopback, the absolute path of ``alerts.yml``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
ALERTS_YML = MONITORING / "prometheus" / "alerts.yml"
DASHBOARDS = {name: MONITORING / "grafana" / "dashboards" / f"{name}.json"
              for name in ("serving", "uncertainty", "feedback")}
DATASOURCES_YML = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_YML = MONITORING / "grafana" / "provisioning" / "dashboards" / "noisewise.yml"
COMPOSE_YML = MONITORING / "docker-compose.yml"
JOB = "noisewise"

# Grafana's interval variables, should a panel use them: a plain window Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${__range}": "1h",
                     "${__rate_interval}": "1m", "${__interval}": "1m"}


# ---------------------------------------------------------------- the shipped files

@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel}:{self.ref_id}"


def panels(board: dict) -> Iterator[dict]:
    """Every panel of a dashboard, those nested in collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboards() -> dict[str, dict]:
    """The three shipped dashboards, parsed."""
    return {name: json.loads(path.read_text()) for name, path in DASHBOARDS.items()}


def panel_queries() -> list[PanelQuery]:
    """``targets[].expr`` of every panel of the three dashboards, as written (dashboard variables such as
    ``$job`` in place: :func:`substitute_variables` fills them in)."""
    out = []
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if expr:
                    out.append(PanelQuery(name, panel.get("title", "?"), target.get("refId", "?"), expr))
    return out


def substitute_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's interval variables replaced by plain windows and each dashboard variable in
    ``values`` (name -> the text Grafana would put in its place, see :func:`resolve_variables`) substituted
    in both spellings, ``$name`` and ``${name}``."""
    replacements = dict(GRAFANA_VARIABLES)
    for name, value in (values or {}).items():
        replacements[f"${{{name}}}"] = value
        replacements[f"${name}"] = value
    # longest first, so that $instance is not read as $in... of a shorter name
    for name in sorted(replacements, key=len, reverse=True):
        expr = expr.replace(name, replacements[name])
    return expr


# ---------------------------------------------------------------- PromQL selectors in dashboard queries

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NUMBER = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[smhdwy]*")
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
# aggregations may put `by (...)` between their name and their parenthesis: never a metric name
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _closing(expr: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``start`` (quotes respected)."""
    depth, quote, i = 0, None, start
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"expr: unbalanced {open_!r} at {start} in {expr!r}")


def metric_selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The vector selectors of a PromQL expression: ``(metric name, [(label, op, value), ...])`` each, in
    order. Function names, aggregation label lists (``by (...)``), keywords, numbers, durations and strings
    are skipped; a selector without a name (``{__name__=...}``) has name ``""``."""
    out, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            end = expr.index(c, i + 1)
            while expr[end - 1] == "\\":
                end = expr.index(c, end + 1)
            i = end + 1
        elif c == "[":
            i = _closing(expr, i, "[", "]")
        elif c == "{":
            end = _closing(expr, i, "{", "}")
            out.append(("", MATCHER.findall(expr[i + 1:end - 1])))
            i = end
        elif c.isdigit() or (c == "." and expr[i + 1:i + 2].isdigit()):
            i = _NUMBER.match(expr, i).end()
        elif (word := _IDENT.match(expr, i)) is not None:
            name, i = word.group(), word.end()
            k = i
            while k < len(expr) and expr[k].isspace():
                k += 1
            following = expr[k:k + 1]
            if name in _LABEL_LISTS:
                if following == "(":
                    i = _closing(expr, k, "(", ")")
            elif following == "(" or name.lower() in _KEYWORDS or name in _AGGREGATIONS:
                continue  # a function or an operator keyword
            elif following == "{":
                end = _closing(expr, k, "{", "}")
                out.append((name, MATCHER.findall(expr[k + 1:end - 1])))
                i = end
            else:
                out.append((name, []))
        else:
            i += 1
    return out


# ---------------------------------------------------------------- dashboard variables against Prometheus

_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def regex_escape(value: str) -> str:
    """A value escaped the way Grafana's Prometheus data source does for a multi-value variable inside a
    regex matcher: regex metacharacters get a backslash, itself doubled for the PromQL string literal."""
    return _REGEX_SPECIAL.sub(r"\\\\\1", value)


def label_values(url: str, selector: str, label: str) -> list[str]:
    """What Grafana's ``label_values(selector, label)`` lists: the label's values over the series matching
    ``selector`` (``/api/v1/series``, the last hour)."""
    now = time.time()
    response = httpx.get(f"{url}/api/v1/series", params={"match[]": selector, "start": f"{now - 3600:.3f}",
                                                          "end": f"{now:.3f}"}, timeout=30)
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{selector}: {body.get('errorType')}: {body.get('error')}")
    return sorted({series[label] for series in body["data"] if label in series})


def query_variables(board: dict) -> list[dict]:
    """The dashboard's ``query`` variables (those resolved from Prometheus), in their order."""
    return [v for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]


def variable_query(variable: dict) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else str(query or variable.get("definition", ""))


def resolve_variables(url: str, board: dict, fixed: dict[str, str]) -> dict[str, str]:
    """Each query variable of ``board`` resolved against the Prometheus at ``url`` the way Grafana does it,
    in order (later variables see the earlier ones): a variable named in ``fixed`` takes that value, which
    must be among its options; a multi-value variable takes all of its options, as Grafana's *All* without a
    custom all-value does (``(a|b)``, regex-escaped). Returns name -> the text substituted into queries.

    Raises ValueError naming the variable when its query is not ``label_values(...)``, it lists no option,
    or the fixed value is not among its options.
    """
    values: dict[str, str] = {}
    for variable in query_variables(board):
        name, text = variable["name"], variable_query(variable)
        match = _LABEL_VALUES.match(text.strip())
        if match is None:
            raise ValueError(f"variable {name}: expected label_values(selector, label), got {text!r}")
        selector = substitute_variables(match["selector"] or "{__name__=~\".+\"}", values)
        options = label_values(url, selector, match["label"])
        if not options:
            raise ValueError(f"variable {name}: {text} lists no value ({selector})")
        if name in fixed:
            if fixed[name] not in options:
                raise ValueError(f"variable {name}: {fixed[name]!r} is not among its values {options}")
            values[name] = fixed[name]
        elif variable.get("multi") or variable.get("includeAll"):
            escaped = [regex_escape(option) for option in options]
            values[name] = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        else:
            values[name] = options[0]
    return values


def alert_rules() -> list[dict]:
    """The alerting rules of ``alerts.yml``, each with its group name under ``group``."""
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return [{**rule, "group": group["name"]} for group in doc["groups"] for rule in group["rules"]
            if "alert" in rule]


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_MODIFIER = re.compile(r"^\s*(bool\b)?\s*((on|ignoring)\s*\([^)]*\))?\s*((group_left|group_right)\s*(\([^)]*\))?)?")


def split_comparison(expr: str) -> tuple[str, str, str]:
    """``lhs op rhs`` of an alert expression whose one top-level operator is a comparison; binary-operator
    modifiers after it (``bool``, ``on(...)``, ``group_left(...)``) are dropped from the right side.

    Raises ValueError naming the expression when there is not exactly one top-level comparison.
    """
    depth, quote, found, i = 0, None, [], 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None and not expr.startswith("=~", i) and not expr.startswith("!~", i):
                found.append((i, op))
                i += len(op)
                continue
        i += 1
    if len(found) != 1:
        raise ValueError(f"expr: expected one top-level comparison (<lhs> <op> <rhs>), found {len(found)} in {expr!r}")
    at, op = found[0]
    rhs = expr[at + len(op):]
    rhs = rhs[_MODIFIER.match(rhs).end():]
    return expr[:at].strip(), op, rhs.strip()


# ---------------------------------------------------------------- Prometheus binaries

def prometheus_binaries(install: bool = True) -> tuple[str, str] | str:
    """``(prometheus, promtool)`` paths, installing the Debian package when missing and possible; else the
    reason they are not available (a string)."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found  # type: ignore[return-value]
    if not install:
        return "prometheus/promtool not on PATH"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "prometheus/promtool not on PATH and not installable here (needs apt-get as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], env=env,
                       check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as err:
        return f"prometheus/promtool not on PATH and `apt-get install prometheus` failed: {err}"
    found = shutil.which("prometheus"), shutil.which("promtool")
    return found if all(found) else "apt-get installed prometheus but prometheus/promtool are not on PATH"  # type: ignore[return-value]


def promtool(promtool_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_bin, *args], capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------- a private Prometheus

def private_config(target: str, scrape_interval: str = "1s") -> dict:
    """The shipped ``prometheus.yml`` with the noisewise job pointed at ``target`` (host:port), the other jobs
    dropped (nothing else runs in the test), both intervals at ``scrape_interval`` and ``alerts.yml`` by its
    absolute path."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["global"]["scrape_timeout"] = scrape_interval
    config["rule_files"] = [str((PROMETHEUS_YML.parent / path).resolve()) for path in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    if len(jobs) != 1:
        raise ValueError(f"{PROMETHEUS_YML}: expected one scrape job named {JOB!r}")
    job = dict(jobs[0], static_configs=[{"targets": [target]}])
    job.pop("scrape_interval", None)
    config["scrape_configs"] = [job]
    return config


@contextlib.contextmanager
def run_prometheus(prometheus_bin: str, config: dict, workdir: Path, port: int,
                   timeout_s: float = 60) -> Iterator[str]:
    """A Prometheus of our own on 127.0.0.1:``port`` (own config, own TSDB under ``workdir``); yields its
    base URL and stops it by PID."""
    from tests.e2e.test_server import stop

    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def query(url: str, expr: str, at: float | None = None) -> dict:
    """``/api/v1/query`` -> ``data`` (resultType, result); RuntimeError with Prometheus's message on error."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    response = httpx.post(f"{url}/api/v1/query", data=params, timeout=30)
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


def values(data: dict) -> list[float]:
    """The sample values of a query result (instant vector or scalar)."""
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "vector":
        return [float(sample["value"][1]) for sample in data["result"]]
    if data["resultType"] == "matrix":
        return [float(v) for series in data["result"] for _, v in series["values"]]
    return []


def has_data(data: dict) -> bool:
    """At least one sample that is a number (NaN, e.g. 0/0 or a quantile of empty buckets, is no data)."""
    return any(not math.isnan(v) for v in values(data))


def scrapes_after(url: str, since: float) -> int:
    """Completed scrapes of the noisewise job with a timestamp after ``since`` (unix seconds)."""
    data = query(url, f'up{{job="{JOB}"}}[5m]')
    return sum(1 for series in data["result"] for ts, v in series["values"] if float(ts) > since and v == "1")


def wait_for_series(url: str, names: list[str], timeout_s: float = 30) -> list[str]:
    """Wait until Prometheus has a sample of each metric in ``names`` (series the service sets asynchronously,
    e.g. gauges refreshed from the store); returns those still missing at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [name for name in names if not query(url, f"count({name})")["result"]]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.25)


def wait_for_scrapes(url: str, n: int, since: float, timeout_s: float = 30) -> None:
    """Wait until the noisewise target was scraped successfully ``n`` times after ``since``."""
    deadline = time.monotonic() + timeout_s
    while scrapes_after(url, since) < n:
        if time.monotonic() > deadline:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()
            raise RuntimeError(f"fewer than {n} successful scrapes after {since} within {timeout_s} s: {targets}")
        time.sleep(0.25)

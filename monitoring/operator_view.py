"""What an operator sees in Evidently: the summary card that opens the HTML report, drift and suspect shares
in percent, and the project dashboard over the stored snapshots.

The numbers this product exists for (the noise rate with its interval, the realized coverage raw and
noise-corrected against the target, the suspect share) are computed by noisewise (``monitoring/feedback.py``),
not by Evidently. They enter the Evidently report as :class:`OperatorPercent` metrics: each reads its value
from the current dataset's metadata (key :data:`METADATA_KEY`, a JSON list written by :func:`percent_values`),
so that every snapshot stores them as plain single values, which the dashboard panels of
:func:`dashboard_panels` plot over time. ``evidently ui`` needs no noisewise code to serve them: a snapshot
stores metric parameters and rendered widgets, not classes.

Three metric containers (Evidently's way to render a group of metrics) replace Evidently's default widgets:

* :class:`OperatorSummary`, first in the report: the numbers in percent with their verdicts;
* :class:`DriftInShares`: a drift test's p-value and verdict, and the class shares (not counts) of both
  samples, whose sizes differ (feedback labels against calibration labels);
* :class:`SuspectShares`: suspect shares overall, per given label and per annotator, in percent with their
  sample sizes. The reference (calibration) has no suspect flags, so Evidently's default widgets would show
  histograms headed "reference: nan".

The metrics inside the containers are Evidently's own (``ValueDrift``, ``MeanValue``, ``GroupByMetric``):
their values stay in the snapshot and its JSON as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go
from evidently.core.container import MetricContainer
from evidently.core.datasets import Dataset
from evidently.core.metric_types import (
    Metric,
    MetricId,
    SingleValue,
    SingleValueCalculation,
    SingleValueMetric,
)
from evidently.core.report import Context
from evidently.legacy.model.widget import BaseWidgetInfo
from evidently.legacy.renderers.html_widgets import (
    CounterData,
    WidgetSize,
    counter,
    plotly_figure,
    table_data,
)
from evidently.metrics import ValueDrift
from evidently.sdk.models import (
    DashboardModel,
    DashboardPanelPlot,
    DashboardTabModel,
    PanelMetric,
)
from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

__all__ = [
    "DASHBOARD_TAB",
    "METADATA_KEY",
    "DriftInShares",
    "OperatorPercent",
    "OperatorSummary",
    "SuspectShares",
    "dashboard_panels",
    "ensure_dashboard",
    "operator_numbers",
    "percent_values",
]

METADATA_KEY = "noisewise_operator_percent"
DASHBOARD_TAB = "Operator view"
_ESTIMATE_SOURCES = {
    "audit": "audited labels",
    "duplicates": "two annotators on the same inputs",
    "confident_learning": "the model's confident joint",
}


# ------------------------------------------------------------------------------------------- numbers


def operator_numbers(state: Mapping[str, Any], calibration_noise: Mapping[str, Any] | None = None,
                     noise_above_calibration: bool | None = None) -> dict[str, Any]:
    """The noise rate and coverage an operator checks, from ``noisewise.monitoring.monitor.feedback_state``.

    The noise rate shown is the estimate used for guarantees (``state["best"]``); when there is none, the
    heuristic one if it exists, marked as such (it is shown, never used).

    Parameters
    ----------
    state : mapping
        ``feedback_state(...)``: ``n``, ``n_ood``, ``noise`` {method: estimate dict}, ``best``,
        ``coverage``, ``target``.
    calibration_noise : mapping, optional
        The flip rate the calibration assumed (``flip_rate``, ``lower``, ``method``, ``heuristic``).
    noise_above_calibration : bool, optional
        Whether the lower bound of the feedback's noise rate exceeds the calibration's assumption.

    Returns
    -------
    dict
        JSON-serializable: ``has_feedback_state`` (True), ``noise`` (``method``, ``heuristic``, ``used_for_guarantees``, ``flip_rate``,
        ``lower``, ``upper``, ``n``, ``confidence``; or None), ``calibration`` (the assumed flip rate, or
        None), ``noise_above_calibration``, ``coverage`` (``feedback_state``'s coverage, or None),
        ``target``, ``n_feedback``, ``n_ood``.
    """
    if not isinstance(state, Mapping) or "noise" not in state or "target" not in state:
        raise ValueError("state must be a feedback state (noisewise.monitoring.monitor.feedback_state), "
                         f"with 'noise' and 'target'; got {type(state).__name__}")
    estimates = state.get("noise") or {}
    best = state.get("best")
    shown = best if best in estimates else next((m for m, e in estimates.items() if e.get("heuristic")), None)
    noise = None
    if shown is not None and estimates[shown].get("flip_rate") is not None:
        est = estimates[shown]
        noise = {"method": shown, "heuristic": bool(est.get("heuristic")), "used_for_guarantees": shown == best,
                 "flip_rate": est.get("flip_rate"), "lower": est.get("lower"), "upper": est.get("upper"),
                 "n": int(est.get("n", 0)), "confidence": float(est.get("confidence", 0.95))}
    calibration = None
    if calibration_noise and calibration_noise.get("lower") is not None:
        calibration = {"flip_rate": calibration_noise.get("flip_rate"), "lower": calibration_noise.get("lower"),
                       "method": calibration_noise.get("method"),
                       "heuristic": bool(calibration_noise.get("heuristic", False))}
    coverage = dict(state.get("coverage") or {}) or None
    return {"has_feedback_state": True, "noise": noise, "calibration": calibration,
            "noise_above_calibration": noise_above_calibration,
            "coverage": coverage if coverage and coverage.get("n") else None, "target": float(state["target"]),
            "n_feedback": int(state.get("n", 0)), "n_ood": int(state.get("n_ood", 0))}


def _percent(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def percent_values(operator: Mapping[str, Any] | None, suspects: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The numbers stored as :class:`OperatorPercent` metrics: ``[{quantity, group, estimate, value}]``, in percent.

    Quantities: ``noise_rate``, ``noise_rate_lower``, ``noise_rate_upper`` (``estimate`` names the method, with
    ``", heuristic"`` for a heuristic), ``coverage_raw``, ``coverage_corrected``, ``coverage_audited``,
    ``coverage_target``, ``suspect_share`` and ``suspect_share_by_class`` / ``suspect_share_by_annotator``
    (``group`` names the class or annotator). Missing numbers are left out.
    """
    values: list[dict[str, Any]] = []

    def add(quantity: str, value: Any, group: str = "", estimate: str = "") -> None:
        if value is not None:
            values.append({"quantity": quantity, "group": group, "estimate": estimate, "value": _percent(value)})

    operator = operator or {}
    noise = operator.get("noise")
    if noise:
        estimate = noise["method"] + (", heuristic" if noise["heuristic"] else "")
        add("noise_rate", noise["flip_rate"], estimate=estimate)
        add("noise_rate_lower", noise["lower"], estimate=estimate)
        add("noise_rate_upper", noise["upper"], estimate=estimate)
    coverage = operator.get("coverage")
    if coverage:
        add("coverage_raw", coverage.get("raw"))
        add("coverage_corrected", coverage.get("corrected"))
        add("coverage_audited", (coverage.get("audited") or {}).get("coverage"))
    if operator.get("target") is not None:
        add("coverage_target", operator["target"])
    add("suspect_share", suspects.get("share"))
    for name, share in (suspects.get("per_class") or {}).items():
        add("suspect_share_by_class", share["share"], group=str(name))
    for name, share in (suspects.get("per_annotator") or {}).items():
        add("suspect_share_by_annotator", share["share"], group=str(name))
    return values


def metadata_for(values: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Current-dataset metadata carrying ``values`` to the :class:`OperatorPercent` metrics."""
    return {METADATA_KEY: json.dumps(list(values))}


# ------------------------------------------------------------------------------------------- metrics


class OperatorPercent(SingleValueMetric):
    """A noisewise number in percent (see :func:`percent_values`), read from the current dataset's metadata."""

    quantity: str
    group: str = ""
    estimate: str = ""


class OperatorPercentCalculation(SingleValueCalculation[OperatorPercent]):
    def calculate(self, context: Context, current_data: Dataset, reference_data: Dataset | None) -> SingleValue:
        stored = current_data.metadata.get(METADATA_KEY)
        if stored is None:
            raise ValueError(f"OperatorPercent needs the current dataset's metadata {METADATA_KEY!r} "
                             "(noisewise.monitoring.operator_view.metadata_for)")
        metric = self.metric
        for item in json.loads(stored):
            if (item["quantity"], item["group"], item["estimate"]) == (metric.quantity, metric.group, metric.estimate):
                result = self.result(float(item["value"]))
                result.widget = []  # shown by OperatorSummary, not one widget per number
                return result
        raise ValueError(f"no value for {metric.quantity!r} (group {metric.group!r}) in the dataset's metadata")

    def display_name(self) -> str:
        metric = self.metric
        return " ".join(p for p in (metric.quantity.replace("_", " "), metric.group,
                                    f"({metric.estimate})" if metric.estimate else "", "%") if p)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100.0 * value:.{digits}f}%"


def _interval(lower: float | None, upper: float | None) -> str:
    return "" if lower is None or upper is None else f"[{_fmt(lower)}, {_fmt(upper)}]"


class _Row(NamedTuple):
    """One line of the summary; ``headline`` (short) is set on the lines that also get a counter."""

    name: str
    value: str
    interval: str
    verdict: str
    headline: str | None = None


def _drift_row(line: Mapping[str, Any], score: float | None) -> _Row:
    sizes = f"{line['n_current']} {line['current_name']} vs {line['n_reference']} {line['reference_name']}"
    if score is None:
        needed = f", {line['min_rows']} needed" if line.get("min_rows") else ""
        status = line.get("status", "no data")
        return _Row(line["name"], "not tested", "", f"{status} ({sizes}{needed})", f"{line['name']}: {status}")
    kind = line.get("score_kind", "p_value")
    detected = score < line["threshold"] if kind == "p_value" else score >= line["threshold"]
    label = "p" if kind == "p_value" else line.get("stattest", "distance")
    rule = "below" if kind == "p_value" else "at or above"
    verdict = "DRIFT" if detected else "no drift"
    return _Row(line["name"], f"{label} = {score:.3g}", "",
                f"{verdict} (drift when {rule} {line['threshold']:g}; {sizes})", f"{line['name']}: {verdict}")


class OperatorSummary(MetricContainer):
    """The summary card: noise rate, coverage, suspect share and drift, in percent with their verdicts.

    ``numbers`` is :func:`operator_numbers` plus ``suspects`` (``drift_report``'s suspect numbers); ``values``
    the :func:`percent_values` stored as metrics; ``drift`` one line per drift test (``name``,
    ``reference_name``, ``current_name``, ``n_reference``, ``n_current``, ``threshold``, ``score_kind`` and,
    when it was not run, ``status``), with its ``ValueDrift`` in ``drift_metrics`` (None when not run).
    """

    title: str
    numbers: dict[str, Any]
    values: list[dict[str, Any]]
    drift: list[dict[str, Any]]
    drift_metrics: list[ValueDrift | None]

    def generate_metrics(self, context: Context) -> list[Metric]:
        metrics: list[Metric] = [OperatorPercent(quantity=v["quantity"], group=v["group"], estimate=v["estimate"])
                                 for v in self.values]
        return metrics + [m for m in self.drift_metrics if m is not None]

    def render(self, context: Context,
               child_widgets: list[tuple[MetricId | None, list[BaseWidgetInfo]]] | None = None,
               ) -> list[BaseWidgetInfo]:
        rows = self._noise_rows() + self._coverage_rows() + self._suspect_rows()
        for line, metric in zip(self.drift, self.drift_metrics):
            rows.append(_drift_row(line, None if metric is None else float(context.get_metric_result(metric).value)))
        counters = [CounterData(row.headline, row.value) for row in rows if row.headline]
        return [
            counter(title=self.title, counters=counters, size=WidgetSize.FULL),
            table_data(title="What the numbers say", column_names=["", "value", "interval", "verdict"],
                       data=[row[:4] for row in rows], size=WidgetSize.FULL),
        ]

    def _noise_rows(self) -> list[_Row]:
        if not self.numbers.get("has_feedback_state"):
            return []
        noise = self.numbers.get("noise")
        if not noise:
            return [_Row("noise rate", "n/a", "", "not enough feedback yet: audit some labels, or have two "
                                                  "annotators label the same inputs", "noise rate: no estimate yet")]
        source = _ESTIMATE_SOURCES.get(noise["method"], noise["method"])
        interval = _interval(noise["lower"], noise["upper"])
        if noise["heuristic"]:
            verdict = (f"HEURISTIC estimate from {source}: shown only, never used for guarantees; audit some "
                       "labels for one that is")
            short = "HEURISTIC, not used for guarantees"
        else:
            calibration = self.numbers.get("calibration")
            above = self.numbers.get("noise_above_calibration")
            if calibration is None or calibration.get("heuristic") or above is None:
                short = "no calibration assumption to compare with"
            elif above:
                short = f"ABOVE the calibration's assumed {_fmt(calibration['lower'])}"
            else:
                short = f"not above the calibration's assumed {_fmt(calibration['lower'])}"
            verdict = f"estimate from {source}, used for guarantees; {short}"
        headline = f"noise rate ({noise['method']} estimate, n={noise['n']}), {interval}: {short}"
        return [_Row(f"noise rate ({noise['method']}, n={noise['n']})", _fmt(noise["flip_rate"]),
                     f"{noise['confidence']:.0%} interval {interval}", verdict, headline)]

    def _coverage_rows(self) -> list[_Row]:
        if not self.numbers.get("has_feedback_state"):
            return []
        coverage = self.numbers.get("coverage")
        target = _fmt(self.numbers.get("target"))
        if not coverage:
            return [_Row("coverage", "n/a", "", f"no feedback labels yet (target {target})",
                         f"coverage: no feedback labels yet (target {target})")]
        n = coverage["n"]
        raw = _Row(f"coverage, raw (n={n})", _fmt(coverage.get("raw")),
                   _interval(coverage.get("raw_lower"), coverage.get("raw_upper")),
                   f"on noisy labels, biased low; target {target}")
        if coverage.get("corrected") is not None:
            interval = _interval(coverage.get("corrected_lower"), coverage.get("corrected_upper"))
            short = f"BELOW TARGET {target}" if coverage.get("below_target") else f"consistent with target {target}"
            rows = [_Row(f"coverage, noise-corrected (n={n})", _fmt(coverage["corrected"]), interval,
                         f"{short}; corrected with the {coverage.get('noise_method')} noise rate",
                         f"coverage noise-corrected, {interval} (raw {_fmt(coverage.get('raw'))}): {short}"), raw]
        else:
            rows = [_Row(f"coverage, noise-corrected (n={n})", "n/a", "",
                         "not corrected: no noise-rate estimate usable for guarantees (a heuristic never is)"),
                    raw._replace(headline=f"coverage raw (not noise-corrected), target {target}")]
        audited = coverage.get("audited") or {}
        if audited.get("n"):
            short = f"BELOW TARGET {target}" if audited.get("below_target") else f"consistent with target {target}"
            rows.append(_Row(f"coverage on audited labels (n={audited['n']})", _fmt(audited.get("coverage")),
                             _interval(audited.get("lower"), audited.get("upper")), f"{short}; assumes nothing"))
        return rows

    def _suspect_rows(self) -> list[_Row]:
        suspects = self.numbers.get("suspects") or {}
        if suspects.get("share") is None:
            return [_Row("suspected annotation errors", "n/a", "", "no in-distribution feedback yet")]
        return [_Row(f"suspected annotation errors (n={suspects['n']})", _fmt(suspects["share"]), "",
                     f"{suspects['n_suspect']} of {suspects['n']} in-distribution labels to review "
                     "(`noisewise flags` lists them)",
                     f"suspected annotation errors: {suspects['n_suspect']} of {suspects['n']} labels")]


class DriftInShares(MetricContainer):
    """One drift test (Evidently's ``ValueDrift``): its score and verdict, and the class shares of both samples."""

    title: str
    metric: ValueDrift
    line: dict[str, Any]
    reference_counts: dict[str, int]
    current_counts: dict[str, int]

    def generate_metrics(self, context: Context) -> list[Metric]:
        return [self.metric]

    def render(self, context: Context,
               child_widgets: list[tuple[MetricId | None, list[BaseWidgetInfo]]] | None = None,
               ) -> list[BaseWidgetInfo]:
        row = _drift_row(self.line, float(context.get_metric_result(self.metric).value))
        names = list(self.reference_counts)
        figure = go.Figure()
        for sample, counts in ((f"{self.line['reference_name']} (n={self.line['n_reference']})",
                                self.reference_counts),
                               (f"{self.line['current_name']} (n={self.line['n_current']})", self.current_counts)):
            total = sum(counts.values()) or 1
            shares = [100.0 * counts.get(name, 0) / total for name in names]
            figure.add_trace(go.Bar(name=sample, x=names, y=shares, text=[f"{s:.1f}%" for s in shares],
                                    customdata=[counts.get(name, 0) for name in names],
                                    hovertemplate="%{x}: %{y:.1f}% (%{customdata} items)<extra></extra>"))
        figure.update_layout(barmode="group", yaxis_title="share of the sample, %", xaxis_title="class",
                             legend={"orientation": "h", "y": 1.12})
        return [counter(title=self.title, counters=[CounterData(row.verdict, row.value)], size=WidgetSize.FULL),
                plotly_figure(title=f"{self.title}: class shares, %", figure=figure, size=WidgetSize.FULL)]


class SuspectShares(MetricContainer):
    """Suspected annotation errors: the share overall, per given label and per annotator, in percent with n.

    ``metrics`` are the Evidently metrics of the same shares (kept in the snapshot); ``suspects`` is
    ``drift_report``'s suspect numbers, which equal them.
    """

    share_metrics: list[Metric]
    suspects: dict[str, Any]

    def generate_metrics(self, context: Context) -> list[Metric]:
        return list(self.share_metrics)

    def render(self, context: Context,
               child_widgets: list[tuple[MetricId | None, list[BaseWidgetInfo]]] | None = None,
               ) -> list[BaseWidgetInfo]:
        s = self.suspects
        widgets = [counter(title="Suspected annotation errors (in-distribution feedback)", counters=[
            CounterData(f"{s['n_suspect']} of {s['n']} labels; `noisewise flags` lists them", _fmt(s["share"]))])]
        for title, groups in (("per given label", s.get("per_class") or {}),
                              ("per annotator", s.get("per_annotator") or {})):
            if not groups:
                continue
            names = list(groups)
            shares = [100.0 * groups[n]["share"] for n in names]
            figure = go.Figure(go.Bar(x=names, y=shares, text=[f"{v:.1f}% (n={groups[n]['n']})"
                                                                for v, n in zip(shares, names)],
                                      hovertemplate="%{x}: %{y:.1f}%<extra></extra>"))
            figure.update_layout(yaxis_title="suspect share, %", xaxis_title=title.split()[-1],
                                 xaxis={"type": "category"})
            widgets.append(plotly_figure(title=f"Suspect share {title}, %", figure=figure, size=WidgetSize.HALF))
        return widgets


# ----------------------------------------------------------------------------------------- dashboard


def _series(quantity: str, legend: str) -> PanelMetric:
    return PanelMetric(metric="OperatorPercent", metric_labels={"quantity": quantity}, legend=legend)


def dashboard_panels() -> list[DashboardPanelPlot]:
    """The operator panels, over the snapshots ``noisewise monitor`` stores (titles identify them)."""
    noise = [_series("noise_rate", "flip rate ({{estimate}})"), _series("noise_rate_lower", "lower bound"),
             _series("noise_rate_upper", "upper bound")]
    coverage = [_series("coverage_raw", "raw"), _series("coverage_corrected", "noise-corrected"),
                _series("coverage_target", "target")]
    drift = [PanelMetric(metric="ValueDrift", metric_labels={"column": "label"}, legend="label drift"),
             PanelMetric(metric="ValueDrift", metric_labels={"column": "served_prediction"},
                         legend="prediction drift")]
    return [
        counter_panel("Noise rate, %", noise, size="half", description=(
            "Flip rate of the feedback labels with its interval (latest run); the estimate used for guarantees "
            "(audit or two annotators), or the confident-learning heuristic when there is none")),
        counter_panel("Realized coverage, %", coverage, size="half", description=(
            "Share of feedback labels inside the served prediction sets (latest run): raw, and corrected for "
            "the label noise, against the target 1 - alpha")),
        line_plot_panel("Noise rate over time, %", noise, size="half"),
        line_plot_panel("Realized coverage over time, %",
                        coverage + [_series("coverage_audited", "on audited labels")], size="half"),
        bar_plot_panel("Suspect share by class, %", [_series("suspect_share_by_class", "{{group}}")], size="half",
                       description="Suspected annotation errors per given label"),
        bar_plot_panel("Suspect share by annotator, %", [_series("suspect_share_by_annotator", "{{group}}")],
                       size="half", description="Suspected annotation errors per annotator"),
        line_plot_panel("Label and prediction drift, p-value", drift, size="full", description=(
            "Two-sample chi-square test of the class counts against the calibration set: drift when the "
            "p-value is below the threshold (0.05 by default)")),
    ]


def ensure_dashboard(workspace: Any, project_id: Any) -> int:
    """Put the operator panels on the project's dashboard, in the tab :data:`DASHBOARD_TAB`, idempotently.

    A panel is known by its title: an existing one is updated in place (same id), a missing one added, so that
    running it on every ``noisewise monitor`` run brings projects created before these panels up to date
    without duplicating anything. Other tabs and panels are left as they are.

    Returns
    -------
    int
        Panels added (0 when all were there).
    """
    dashboard: DashboardModel = workspace.get_dashboard(project_id)
    by_title = {p.title: p for p in dashboard.panels}
    tab = next((t for t in dashboard.tabs if t.title == DASHBOARD_TAB), None)
    if tab is None:
        tab = DashboardTabModel(title=DASHBOARD_TAB, panels=[])
        dashboard.tabs.insert(0, tab)
    added = 0
    wanted_ids = []
    for panel in dashboard_panels():
        existing = by_title.get(panel.title)
        if existing is None:
            dashboard.panels.append(panel)
            added += 1
            wanted_ids.append(panel.id)
        else:
            updated = panel.copy(update={"id": existing.id})
            dashboard.panels = [updated if p.id == existing.id else p for p in dashboard.panels]
            wanted_ids.append(existing.id)
    # The tab lists the operator panels once each, in order, then anything else a user put there.
    tab.panels = wanted_ids + [i for i in dict.fromkeys(tab.panels) if i not in set(wanted_ids)]
    workspace.save_dashboard(project_id, dashboard)
    return added

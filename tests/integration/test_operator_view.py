"""The operator view, as an operator opens it: the Evidently workspace dashboard served by `evidently ui` and the
HTML report of `noisewise monitor`, both rendered by a real headless Chromium.

`noisewise monitor` runs (in process) on the session's small digits model and a real SQLite store filled the
way the service fills it: served predictions with the model's own probabilities, feedback from two annotators
with 20% label errors and an auditor giving true labels. The workspace holds a project created before the
operator panels existed, as older noisewise versions left it.

Screenshots go to the test's tmp dir; with NOISEWISE_SCREENSHOT_DIR=docs they are also written there as
evidently-dashboard.png and evidently-report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from evidently.sdk.models import ProjectModel
from evidently.ui.workspace import Workspace

from tests.integration.evidently_ui import evidently_ui as serve_evidently_ui
from tests.integration.serving_model import ensure_model, prediction_rows
from tests.integration.serving_model import run_in_process as run

from noisewise.monitoring.feedback import score_feedback
from noisewise.monitoring.operator_view import DASHBOARD_TAB, dashboard_panels
from noisewise.monitoring.store import FeedbackRow, Store

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The first screen of a laptop: the summary card must be readable without scrolling.
FIRST_SCREEN = {"width": 1280, "height": 800}
N_SERVED, N_AUDITED, FLIP = 300, 100, 0.2


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """Two `noisewise monitor` runs into a workspace whose project predates the operator panels."""
    from sklearn.datasets import load_digits

    from noisewise.models.predictor import Predictor
    from noisewise.models.registry import load_model

    ref = ensure_model()
    model = load_model(ref, device="cpu")
    root = tmp_path_factory.mktemp("operator-view")
    url = f"sqlite:///{root / 'store.db'}"
    bunch = load_digits()
    x = (bunch.images[:N_SERVED] / 16.0).astype("float32")[:, None]
    y = bunch.target[:N_SERVED]
    outputs = Predictor(model.net, model.calibration, device="cpu").predict(x)
    probs = np.stack([np.asarray(o.probs, dtype=np.float32) for o in outputs])
    thresholds = np.asarray(model.calibration.cl_thresholds, dtype=np.float32)
    ids = [str(uuid.uuid4()) for _ in outputs]
    store = Store(url)
    store.add_predictions(prediction_rows(model, outputs, ids))
    rng = np.random.default_rng(3)

    def add(rows: np.ndarray, labels: np.ndarray, annotator: str, audited: bool) -> None:
        scores = score_feedback(probs[rows], labels, thresholds)
        store.add_feedback([
            FeedbackRow(prediction_id=ids[j], label=int(lb), annotator=annotator, audited=audited, quality=float(q),
                        suspect=bool(s), proposed=int(p), in_set=int(lb) in outputs[j].set_indices)
            for j, lb, q, s, p in zip(rows, labels, scores.quality, scores.suspect, scores.proposed)])

    everyone = np.arange(N_SERVED)
    for annotator in ("ann-a", "ann-b"):
        flip = rng.random(N_SERVED) < FLIP
        add(everyone, np.where(flip, (y + rng.integers(1, 10, N_SERVED)) % 10, y), annotator, False)
    audited = rng.choice(N_SERVED, N_AUDITED, replace=False)
    add(audited, y[audited], "auditor", True)
    store.close()

    workspace = root / "ws"
    old = Workspace(str(workspace)).add_project(ProjectModel(name="noisewise", description="made before the panels"))
    reports = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOISEWISE_STORE_URL", url)
        for _ in range(2):
            status, out, err = run("monitor", "--model", ref, "--workspace", str(workspace), "--json")
            assert status == 0, err
            reports.append(json.loads(out))
        fresh = root / "fresh-ws"
        status, out, err = run("monitor", "--model", ref, "--workspace", str(fresh), "--json")
        assert status == 0, err
    return {"workspace": workspace, "project_id": str(old.id), "reports": reports, "fresh": fresh,
            "fresh_report": json.loads(out)}


def test_existing_project_gets_the_operator_panels_once(monitored):
    workspace = Workspace(str(monitored["workspace"]))
    assert [str(p.id) for p in workspace.search_project("noisewise")] == [monitored["project_id"]]
    assert {r["drift"]["project_id"] for r in monitored["reports"]} == {monitored["project_id"]}
    dashboard = workspace.get_dashboard(monitored["project_id"])
    wanted = [p.title for p in dashboard_panels()]
    assert [p.title for p in dashboard.panels] == wanted  # two runs, each panel once
    tabs = [t for t in dashboard.tabs if t.title == DASHBOARD_TAB]
    assert len(tabs) == 1 and tabs[0].panels == [p.id for p in dashboard.panels]
    assert len(workspace.list_runs(monitored["project_id"])) == 2


def test_new_workspace_project_is_created_with_the_panels(monitored):
    workspace = Workspace(str(monitored["fresh"]))
    (project,) = workspace.search_project("noisewise")
    assert str(project.id) == monitored["fresh_report"]["drift"]["project_id"]
    assert [p.title for p in workspace.get_dashboard(project.id).panels] == [p.title for p in dashboard_panels()]


def _operator_values(report: dict) -> dict[tuple[str, str], float]:
    """The OperatorPercent values of the report's Evidently snapshot, by (quantity, group)."""
    evidently = json.loads(Path(report["drift"]["json"]).read_text())["evidently"]
    return {(m["config"]["quantity"], m["config"]["group"]): m["value"] for m in evidently["metrics"]
            if m["config"]["type"] == "evidently:metric_v2:OperatorPercent"}


def test_snapshot_holds_the_monitor_numbers_in_percent(monitored):
    report = monitored["reports"][-1]
    state, suspects = report["feedback"], report["drift"]["suspects"]
    noise = state["noise"][state["best"]]
    coverage = state["coverage"]
    assert state["best"] == "audit" and not noise["heuristic"]
    assert 0 < noise["lower"] <= noise["flip_rate"] <= noise["upper"] < 0.5  # annotators flip 20% of their labels
    values = _operator_values(report)
    expected = {("noise_rate", ""): noise["flip_rate"], ("noise_rate_lower", ""): noise["lower"],
                ("noise_rate_upper", ""): noise["upper"], ("coverage_raw", ""): coverage["raw"],
                ("coverage_corrected", ""): coverage["corrected"], ("coverage_target", ""): state["target"],
                ("coverage_audited", ""): coverage["audited"]["coverage"],
                ("suspect_share", ""): state["suspect_share"],
                **{("suspect_share_by_class", k): v["share"] for k, v in suspects["per_class"].items()},
                **{("suspect_share_by_annotator", k): v["share"] for k, v in suspects["per_annotator"].items()}}
    # `--json` prints shares to 4 decimals: 0.005 percentage points
    assert values == pytest.approx({k: 100.0 * v for k, v in expected.items()}, abs=0.0051)
    assert set(suspects["per_annotator"]) == {"ann-a", "ann-b", "auditor"}


# ------------------------------------------------------------------------------------------ browser


def _browser(playwright, user_data_dir: Path):
    """The system Chromium with a fresh profile (pytest's tmp dir: Chromium may still write there on close)."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian package `chromium`; CI installs it)")
    # Playwright drives the system Chromium (never `playwright install`: no download). It adds --headless itself.
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=str(CHROMIUM), headless=True, viewport=FIRST_SCREEN,
        args=[f for f in CHROMIUM_FLAGS if f != "--headless"])


def _save_screenshot(page, tmp_path: Path, name: str, full_page: bool) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    target = os.environ.get("NOISEWISE_SCREENSHOT_DIR")
    if target:
        shutil.copyfile(path, Path(target) / name)
    assert path.stat().st_size > 10_000
    return path


def _percent(value: float) -> str:
    """A share as the summary card writes it."""
    return f"{100.0 * value:.1f}%"


def _dashboard_number(value: float) -> str:
    """A percent as Evidently's dashboard counter shows it: Number.parseFloat(v.toFixed(2))."""
    return f"{100.0 * value:.2f}".rstrip("0").rstrip(".")


def test_html_report_opens_on_the_summary_card(monitored, tmp_path):
    from playwright.sync_api import sync_playwright

    report = monitored["reports"][-1]
    state = report["feedback"]
    noise, coverage = state["noise"]["audit"], state["coverage"]
    with sync_playwright() as playwright:
        browser = _browser(playwright, tmp_path / "chromium-profile")
        page = browser.new_page()
        page.goto(Path(report["drift"]["html"]).as_uri())
        title = page.get_by_text("noisewise summary", exact=False).first
        title.wait_for(timeout=60_000)
        page.wait_for_timeout(500)
        card = title.locator("xpath=ancestor::*[contains(., 'suspected annotation errors')][1]")
        box = card.bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= FIRST_SCREEN["height"], box
        text = card.inner_text()
        for number in (noise["flip_rate"], noise["lower"], noise["upper"], coverage["corrected"], coverage["raw"],
                       state["suspect_share"]):
            assert _percent(number) in text, (_percent(number), text)
        assert f"audit estimate, n={noise['n']}" in text and f"target {_percent(state['target'])}" in text
        body = page.inner_text("body")
        assert "reference: nan" not in body.lower() and "share of the sample, %" in body
        label = report["drift"]["label_drift"]
        assert f"{label['n_current']} feedback labels vs {label['n_reference']} calibration labels" in body
        _save_screenshot(page, tmp_path, "evidently-report.png", full_page=False)
        browser.close()


@pytest.fixture
def evidently_ui(monitored, tmp_path):
    """`evidently ui` serving the workspace on a free loopback port; yields its base URL."""
    with serve_evidently_ui(monitored["workspace"], tmp_path / "ui.log") as base:
        yield base


def _panel_text(body: str, title: str, next_title: str) -> str:
    start = body.index(title)
    return body[start:body.index(next_title, start)]


def test_dashboard_shows_noise_rate_and_coverage_with_numbers(monitored, evidently_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    state = monitored["reports"][-1]["feedback"]
    noise, coverage = state["noise"]["audit"], state["coverage"]
    with sync_playwright() as playwright:
        browser = _browser(playwright, tmp_path / "chromium-profile")
        page = browser.new_page()
        page.set_viewport_size({"width": 1400, "height": 900})
        page.goto(f"{evidently_ui}/projects/{monitored['project_id']}")
        # The counters fill in once the panel data arrive from the server.
        page.get_by_text("noise-corrected", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("Label and prediction drift, p-value").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        body = page.inner_text("body")
        assert "This dashboard is currently empty" not in body
        noise_panel = _panel_text(body, "Noise rate, %", "Realized coverage, %")
        for value, legend in ((noise["flip_rate"], "flip rate (audit)"), (noise["lower"], "lower bound"),
                              (noise["upper"], "upper bound")):
            assert f"{_dashboard_number(value)}\n{legend}" in noise_panel, (value, legend, noise_panel)
        coverage_panel = _panel_text(body, "Realized coverage, %", "Noise rate over time, %")
        for value, legend in ((coverage["raw"], "raw"), (coverage["corrected"], "noise-corrected"),
                              (state["target"], "target")):
            assert f"{_dashboard_number(value)}\n{legend}" in coverage_panel, (value, legend, coverage_panel)
        for title in ("Suspect share by class, %", "Suspect share by annotator, %"):
            assert title in body
        _save_screenshot(page, tmp_path, "evidently-dashboard.png", full_page=True)
        browser.close()

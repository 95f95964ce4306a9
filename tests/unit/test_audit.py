"""The audit planner (models/uncertainty/audit.py) against brute force and simulation, and the worklist
reading and validation of `noisewise audit` (services/cli_audit.py), without a server."""

from __future__ import annotations

import contextlib
import io
import json
import math
import uuid

import numpy as np
import pytest
from scipy import stats

from noisewise.models.uncertainty.audit import (
    WORST_CASE_RATE,
    audit_plan_table,
    audit_size_for_coverage_margin,
    audit_size_for_rate_width,
    coverage_margin,
    expected_width,
    planned_width,
)


def cp_width(x, m, confidence):
    """Clopper-Pearson width written out from the beta quantiles (real x allowed), independently of the module."""
    a = 1 - confidence
    lo = 0.0 if x <= 0 else stats.beta.ppf(a / 2, x, m - x + 1)
    hi = 1.0 if x >= m else stats.beta.ppf(1 - a / 2, x + 1, m - x)
    return hi - lo


# --- planned width ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,x", [(1, 0), (1, 1), (20, 3), (50, 10), (137, 0), (137, 137), (400, 200)])
def test_planned_width_at_integer_counts_is_scipys_exact_interval(m, x):
    ci = stats.binomtest(x, m).proportion_ci(0.95, method="exact")
    assert planned_width(m, x / m) == pytest.approx(ci.high - ci.low, abs=1e-9)


def test_planned_width_decreases_in_m_and_peaks_at_one_half():
    m = np.arange(1, 3001)
    for rate in (0.0, 0.01, 0.1, 0.2, 0.5, 0.8, 1.0):
        for confidence in (0.9, 0.95, 0.99):
            assert np.all(np.diff(planned_width(m, rate, confidence)) < 0), (rate, confidence)
    rates = np.linspace(0, 1, 101)
    for size in (1, 7, 60, 500):
        widths = [planned_width(size, r) for r in rates]
        assert rates[int(np.argmax(widths))] == WORST_CASE_RATE
        assert planned_width(size, None) == pytest.approx(max(widths))


# --- size for a width -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("rate", [None, 0.0, 0.02, 0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("width", [0.6, 0.3, 0.1, 0.05])
def test_size_for_width_is_the_first_m_of_a_linear_scan(width, rate, confidence):
    m = audit_size_for_rate_width(width, rate, confidence)
    share = 0.5 if rate is None else rate
    assert cp_width(share * m, m, confidence) <= width
    if m > 1:
        assert cp_width(share * (m - 1), m - 1, confidence) > width
    scan = np.arange(1, m + 1, dtype=float)
    widths = np.array([cp_width(share * k, k, confidence) for k in scan[-200:]])  # brute force near m
    first = scan[-200:][np.flatnonzero(widths <= width)[0]]
    assert first == m


def test_size_for_width_worst_case_bounds_every_rate_and_matches_known_values():
    for width in (0.2, 0.1, 0.05):
        worst = audit_size_for_rate_width(width)
        assert worst == audit_size_for_rate_width(width, 0.5)
        assert all(audit_size_for_rate_width(width, r) <= worst for r in np.linspace(0, 1, 21))
    # the normal approximation (2 * 1.96)^2 * 0.25 / 0.1^2 = 384 is close to, but below, the exact 402
    assert audit_size_for_rate_width(0.1) == 402
    assert audit_size_for_rate_width(1.0) == 1


def test_audit_of_the_planned_size_delivers_the_width_and_the_coverage_in_simulation():
    """X ~ Binomial(m, r) at m = audit_size_for_rate_width(0.1, r): the realized intervals' mean width is the
    exact expected_width (3 s.e.), at most the width asked for, and they cover r at least 95% of the time."""
    rng = np.random.default_rng(0)
    draws = 4000
    for rate in (0.05, 0.2):
        m = audit_size_for_rate_width(0.1, rate)
        x = rng.binomial(m, rate, size=draws)
        lo = np.where(x == 0, 0.0, stats.beta.ppf(0.025, np.maximum(x, 1), m - x + 1))
        hi = np.where(x == m, 1.0, stats.beta.ppf(0.975, x + 1, np.maximum(m - x, 1)))
        widths = hi - lo
        se = widths.std(ddof=1) / math.sqrt(draws)
        assert abs(widths.mean() - expected_width(m, rate)) <= 3 * se
        assert widths.mean() <= 0.1 + 3 * se
        covered = np.mean((lo <= rate) & (rate <= hi))
        assert covered >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / draws)


def test_expected_width_is_the_exact_binomial_average():
    for m, rate in ((1, 0.3), (25, 0.1), (60, 0.5)):
        brute = sum(stats.binom.pmf(x, m, rate) * cp_width(x, m, 0.95) for x in range(m + 1))
        assert expected_width(m, rate) == pytest.approx(brute, rel=1e-9)
    assert expected_width(40, 0.0) == pytest.approx(cp_width(0, 40, 0.95))


# --- coverage margin --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [None, 5000])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2, 0.4])
@pytest.mark.parametrize("margin", [0.1, 0.05, 0.02])
def test_size_for_margin_is_the_first_m_where_the_margin_fits(margin, rate, n):
    z = 1.645
    m = audit_size_for_coverage_margin(margin, rate, z, n=n, coverage=0.9)
    noisy = 0 if n is None else 0.09 / n
    assert z * math.sqrt(rate / m + noisy) <= margin
    if m > 1:
        assert z * math.sqrt(rate / (m - 1) + noisy) > margin
    if n is None:
        assert m == math.ceil(z**2 * rate / margin**2 - 1e-9)


def test_size_for_margin_refuses_when_the_noisy_items_alone_use_the_margin():
    with pytest.raises(ValueError, match="`n` = 100 noisy items alone"):
        audit_size_for_coverage_margin(0.04, 0.2, n=100)  # 1.645 * sqrt(0.09 / 100) = 0.049 > 0.04
    assert audit_size_for_coverage_margin(0.05, 0.0) == 1


def test_margin_is_exact_when_every_wrong_label_flips_the_coverage_indicator():
    """Worst case of v_d <= r: d = +-1 with probability r/2 each, so Var(d) = r. The realized margin
    z * sqrt(var_hat(d) / m) then averages the planned one, up to 3 s.e. and the Jensen bias of the square root
    (relative (1 - r) / (8 m r), from the delta method)."""
    rng = np.random.default_rng(1)
    z, rate, m, draws = 1.645, 0.2, 200, 2000
    d = rng.choice([-1.0, 0.0, 1.0], p=[rate / 2, 1 - rate, rate / 2], size=(draws, m))
    realized = z * np.sqrt(d.var(axis=1, ddof=1) / m)
    planned = coverage_margin(m, rate, z)
    se = realized.std(ddof=1) / math.sqrt(draws)
    bias = planned * (1 - rate) / (8 * m * rate)
    assert abs(realized.mean() - planned) <= 3 * se + bias


def test_margin_bounds_the_audit_rectified_thresholds_margin():
    """On synthetic scores with 20% uniform label noise, the margin the conditional audit-rectified threshold
    actually subtracts at its threshold, z * sqrt(v_d / m + F_n (1 - F_n) / n), stays below the planned bound
    (3 s.e. over 200 draws) and is not far below it: most wrong labels change the coverage indicator."""
    from noisewise.models.uncertainty.conformal import audit_rectified_threshold

    rng = np.random.default_rng(2)
    n, k, m, rate, alpha, z = 2000, 10, 200, 0.2, 0.1, 1.645
    realized = []
    for _ in range(200):
        y = rng.integers(k, size=n)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 2.5
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        scores = 1 - probs
        flip = rng.random(n) < rate
        noisy = np.where(flip, (y + rng.integers(1, k, size=n)) % k, y)
        audit = rng.choice(n, m, replace=False)
        q = audit_rectified_threshold(scores, noisy, audit, y[audit], alpha, conditional=True, z=z).q
        covered_noisy = scores[np.arange(n), noisy] <= q
        covered_true = scores[np.arange(n), y] <= q
        d = covered_true[audit].astype(float) - covered_noisy[audit]
        f_n = covered_noisy.mean()
        realized.append(z * math.sqrt(d.var(ddof=1) / m + f_n * (1 - f_n) / n))
    realized = np.array(realized)
    planned = coverage_margin(m, rate, z, n=n, coverage=1 - alpha)
    se = realized.std(ddof=1) / math.sqrt(len(realized))
    assert realized.mean() <= planned + 3 * se
    assert realized.mean() >= 0.7 * planned


# --- the table -------------------------------------------------------------------------------------------------


def test_plan_table_rows_match_the_single_functions_and_shrink_with_m():
    table = audit_plan_table(0.2, (50, 100, 200, 400, 800), n=3000)
    assert [row["m"] for row in table] == [50, 100, 200, 400, 800]
    for row in table:
        assert row["rate"] == 0.2
        assert row["width"] == pytest.approx(cp_width(0.2 * row["m"], row["m"], 0.95))
        assert row["expected_width"] == pytest.approx(expected_width(row["m"], 0.2))
        assert row["coverage_margin"] == pytest.approx(1.645 * math.sqrt(0.2 / row["m"] + 0.09 / 3000))
    for key in ("width", "expected_width", "coverage_margin"):
        values = [row[key] for row in table]
        assert values == sorted(values, reverse=True)
    # halving the width takes about four times the items
    assert table[2]["width"] / table[4]["width"] == pytest.approx(2.0, rel=0.05)
    unknown = audit_plan_table(None, (60,))
    assert unknown[0]["rate"] == 0.5 and unknown[0]["coverage_margin"] is None
    assert unknown[0]["width"] == pytest.approx(planned_width(60))


@pytest.mark.parametrize("call,match", [
    (lambda: audit_size_for_rate_width(0.0), "`width`"),
    (lambda: audit_size_for_rate_width(1.5), "`width`"),
    (lambda: audit_size_for_rate_width(float("nan")), "`width`"),
    (lambda: audit_size_for_rate_width(True), "`width`"),
    (lambda: audit_size_for_rate_width(0.1, 1.2), "`rate`"),
    (lambda: audit_size_for_rate_width(0.1, 0.2, confidence=1.0), "`confidence`"),
    (lambda: audit_size_for_coverage_margin(0.0, 0.2), "`margin`"),
    (lambda: audit_size_for_coverage_margin(0.05, None), "`rate`"),
    (lambda: audit_size_for_coverage_margin(0.05, 0.2, z=-1), "`z`"),
    (lambda: audit_size_for_coverage_margin(0.05, 0.2, n=0), "`n`"),
    (lambda: planned_width(0), "`m`"),
    (lambda: planned_width(2.5), "`m`"),
    (lambda: expected_width([10, 20], 0.2), "`m`"),
    (lambda: audit_plan_table(0.2, ()), "`sizes`"),
    (lambda: audit_plan_table(0.2, (50, -1)), "`sizes`"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- worklists (services/cli_audit.py) ------------------------------------------------------------------------

NAMES = ["cat", "dog", "bird, small"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_prediction_worklist_rows_are_checked_line_by_line(tmp_path):
    from noisewise.services.cli_audit import check_prediction_rows, read_worklist

    ids = [str(uuid.uuid4()) for _ in range(5)]
    text = ("prediction_id,observed_label,annotator,predicted_label,trusted_label\n"
            f"{ids[0]},cat,a,cat,dog\n"
            f"{ids[1]},cat,a,cat,\n"
            f"not-an-id,cat,a,cat,cat\n"
            f"{ids[2]},cat,a,cat,horse\n"
            f"{ids[0]},cat,a,cat,cat\n"
            f'{ids[3]},cat,a,cat,"bird, small"\n'
            f"{ids[4].upper()},cat,a,cat,cat\n")
    worklist = read_worklist(write(tmp_path, "w.csv", text))
    assert worklist.kind == "predictions" and len(worklist.rows) == 7
    items, skipped, errors = check_prediction_rows(worklist, NAMES)
    assert skipped == 1
    assert [it["prediction_id"] for it in items] == [ids[0], ids[3], ids[4]]  # ids in the service's lowercase
    assert items[1]["label"] == "bird, small"
    assert len(errors) == 3
    assert errors[0].startswith("line 4: malformed prediction_id 'not-an-id'")
    assert errors[1].startswith("line 5: unknown class 'horse'") and "cat, dog" in errors[1]
    assert errors[2].startswith(f"line 6: prediction_id {ids[0]} is already listed (line 2)")


def test_calibration_worklist_rows_and_json_worklists(tmp_path):
    from noisewise.services.cli_audit import check_calibration_rows, read_worklist

    doc = {"kind": "calibration", "model": "m@champion", "items": [
        {"index": 3, "observed_label": "cat", "trusted_label": "dog"},
        {"index": 4, "observed_label": "cat", "trusted_label": ""},
        {"index": "x", "observed_label": "cat", "trusted_label": "cat"},
        {"index": 99, "observed_label": "cat", "trusted_label": "cat"},
        {"index": 5, "observed_label": "cat", "trusted_label": "cat"},
        {"index": 3, "observed_label": "cat", "trusted_label": "cat"},
    ]}
    worklist = read_worklist(write(tmp_path, "w.json", json.dumps(doc)))
    assert worklist.kind == "calibration" and worklist.meta["model"] == "m@champion"
    items, skipped, errors = check_calibration_rows(worklist, NAMES, n_rows=50, calibration_rows=[3, 4, 6])
    assert skipped == 1 and [(it["index"], it["label_index"]) for it in items] == [(3, 1)]
    assert [e.split(":")[0] for e in errors] == ["item 2", "item 3", "item 4", "item 5"]
    assert "not a row of the dataset file (0..49)" in errors[1]
    assert "not in the model's calibration split" in errors[2]
    assert "already listed (item 0)" in errors[3]


@pytest.mark.parametrize("name,text,match", [
    ("w.csv", "prediction_id,label\nabc,cat\n", "no trusted_label column"),
    ("w.csv", "foo,trusted_label\n1,cat\n", "neither a prediction_id nor an index column"),
    ("w.csv", "prediction_id,trusted_label\n", "no rows"),
    ("w.json", "{not json", "not valid JSON"),
    ("w.json", '{"items": 3}', "expected a list of rows"),
])
def test_unreadable_worklists_are_refused_whole(tmp_path, name, text, match):
    from noisewise.services.cli_audit import WorklistError, read_worklist

    with pytest.raises(WorklistError, match=match):
        read_worklist(write(tmp_path, name, text))
    with pytest.raises(WorklistError, match="no such file"):
        read_worklist(tmp_path / "missing.csv")


def audit_cli(*argv):
    """``noisewise audit ...`` through the ``add_parsers(commands, common)`` contract noisewise.services.cli uses."""
    from noisewise.services import cli, cli_audit

    parser = cli._Parser(prog="noisewise")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=cli._Parser)
    cli_audit.add_parsers(commands, cli)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(["audit", *argv])
            status = args.handler(args)
        except SystemExit as stop:
            status = stop.code
    return status, out.getvalue(), err.getvalue()


def test_audit_size_command_answers_with_the_planner():
    status, out, err = audit_cli("size", "--width", "0.1", "--rate", "0.2", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["m_for_width"] == audit_size_for_rate_width(0.1, 0.2)
    assert result["m_for_margin"] == audit_size_for_coverage_margin(0.05, 0.2, 1.6448536269514722, coverage=0.9)
    assert {row["m"] for row in result["table"]} >= {50, 800, result["m_for_width"], result["m_for_margin"]}
    status, out, _ = audit_cli("size")
    assert status == 0 and "402 audited items give an unknown flip rate (worst case 0.5)" in out
    assert "give --rate" in out
    status, _, err = audit_cli("size", "--rate", "2")
    assert status == 2 and "--rate" in err and "[0, 1]" in err

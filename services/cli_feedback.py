"""``noisewise flags | monitor | recalibrate``: the feedback side of the command line.

All three read the predictions + feedback store (``NOISEWISE_STORE_URL``, default SQLite under
``NOISEWISE_HOME``) that the running service writes, and the MLflow registry.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

from noisewise.monitoring.report_worker import KEEP_SNAPSHOTS


#: Feedback items (and predictions) ``noisewise monitor`` reads by default.
DEFAULT_MONITOR_WINDOW = 10_000


def add_parsers(commands, common) -> None:
    """Register the three commands; ``common`` is noisewise.services.cli (its argument types and helpers)."""
    default_model = os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion")

    flags = commands.add_parser(
        "flags", help="list suspected annotation errors in the feedback, for re-annotation",
        description="Feedback labels that look wrong (confident learning), most suspicious first, "
        "with the model's proposed label. Feedback on inputs flagged OOD is listed apart: the model cannot judge "
        "those labels. Reads the store the service writes (NOISEWISE_STORE_URL or $NOISEWISE_HOME/store.db).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    flags.add_argument("--since", default=None, help="only feedback received at or after this ISO 8601 time")
    flags.add_argument("--class", dest="class_name", default=None, help="only labels of this class")
    flags.add_argument("--limit", type=common._positive_int, default=50, help="most suspects listed (one page)")
    flags.add_argument("--cursor", default=None, help="the next page: the `next_cursor` a previous call printed")
    flags.add_argument("--csv", type=Path, default=None, help="also write the suspects to this CSV file")
    flags.add_argument("--json", action="store_true", help="print one JSON object")
    flags.set_defaults(handler=cmd_flags)

    monitor = commands.add_parser(
        "monitor", help="noise-rate estimate, realized coverage, suspects and Evidently drift reports",
        description="Estimate the feedback labels' noise rate as a flip rate (share of wrong labels) with its "
        "interval: counted directly on audited feedback (items with an ordinary and a trusted label), from two "
        "annotators on the same predictions, and the confident-learning heuristic (shown, never used for a "
        "guarantee). Report the realized coverage of the served sets on feedback labels (raw, on audited labels, "
        "and corrected with a non-heuristic noise rate) and the suspects; run Evidently label-drift, "
        "prediction-drift and quality reports and save them (HTML + JSON + a snapshot in an Evidently workspace "
        "that `evidently ui --workspace DIR` serves). The result is stored, and the running service exports it "
        "as noisewise_drift_* gauges.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    monitor.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    monitor.add_argument("--window", type=common._positive_int, default=DEFAULT_MONITOR_WINDOW,
                         help="estimates, coverage, suspects and drift over the most recent N feedback items and "
                         "predictions (read newest first through an index: the cost follows N, not the store); "
                         "the whole-store totals are counted in SQL")
    monitor.add_argument("--workspace", type=Path, default=None,
                         help="Evidently workspace (default $NOISEWISE_HOME/evidently)")
    monitor.add_argument("--keep-snapshots", type=common._non_negative_int, default=KEEP_SNAPSHOTS,
                         help="keep the workspace project's newest N snapshots and delete older ones (0: keep "
                         "all); every report's HTML and JSON files are kept. Opening the workspace reads every "
                         "snapshot, so an unbounded history makes each run slower than the last")
    monitor.add_argument("--json", action="store_true", help="print one JSON object")
    monitor.set_defaults(handler=cmd_monitor)

    recal = commands.add_parser(
        "recalibrate", help="re-estimate the conformal threshold on recent feedback; the service switches live",
        description="Re-estimate the prediction-set threshold on recent in-distribution feedback: the "
        "audit-rectified threshold when at least 50 of the labelled predictions also carry an audited label "
        "(valid: no noise model), otherwise split conformal on the observed feedback labels (conservative: it "
        "covers the true label at least as often when label errors are spread over classes; errors concentrated "
        "on the classes the model confuses can make it fall slightly short). NACP only with an explicit "
        "--noise-rate and --assume-uniform-noise. Logs the new calibration as a new version of the model (same "
        "weights) and moves the alias, so a running service switches to it without a restart (it checks the "
        "alias every NOISEWISE_RELOAD_INTERVAL_S, or at once with --url). Refuses, with the reason, when the "
        "feedback is too small for the guarantee.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    recal.add_argument("--model", default=default_model, help="served model; must be NAME@ALIAS to move the alias")
    recal.add_argument("--window", type=common._positive_int, default=None,
                       help="use the most recent N feedback items (default: all)")
    recal.add_argument("--min-items", type=common._positive_int, default=None,
                       help="refuse with fewer labelled predictions than this (default: the rule in "
                       "monitoring/feedback.py, at least enough for a finite quantile)")
    recal.add_argument("--conformal", choices=("plugin", "finite-sample"), default="plugin",
                       help="plugin: coverage on average over feedback draws (like calibrate's default); "
                       "finite-sample: coverage with probability >= 1 - delta over the draw (the calibration's "
                       "--delta), at the price of larger sets")
    recal.add_argument("--noise-rate", type=float, default=None, metavar="R",
                       help="flip rate (share of wrong feedback labels) you vouch for; with --assume-uniform-noise "
                       "it selects NACP when the audit does not suffice (never estimated from the feedback)")
    recal.add_argument("--assume-uniform-noise", action="store_true",
                       help="assert that wrong labels are spread uniformly over the other classes, independent of "
                       "the input (NACP's noise model); needs --noise-rate")
    recal.add_argument("--no-promote", action="store_true", help="log the new version but leave the alias")
    recal.add_argument("--url", default=None,
                       help="a running service to tell at once (POST /reload), e.g. http://127.0.0.1:3000")
    recal.add_argument("--json", action="store_true", help="print one JSON object")
    from noisewise.services.client import add_api_key_option

    add_api_key_option(recal)
    recal.set_defaults(handler=cmd_recalibrate)


def _cli():
    from noisewise.services import cli

    return cli


def _open_store():
    from noisewise.monitoring.store import Store, StoreError

    try:
        return Store()
    except StoreError as err:
        raise _cli().UsageError(str(err)) from None


def _loaded(ref: str, network: bool = True):
    from noisewise.models import registry

    loaded = registry.load_model(ref, network=network)
    if loaded.calibration is None:
        raise _cli().UsageError(f"{ref} has no calibration: run `noisewise calibrate --model {ref}` first")
    return loaded


def cmd_flags(args: argparse.Namespace) -> int:
    from noisewise.monitoring.feedback import CursorError, _to_utc, decode_cursor

    cli = _cli()
    loaded = _loaded(args.model)
    names = list(loaded.calibration.class_names)
    if args.class_name is not None and args.class_name not in names:
        raise cli.UsageError(f"--class: unknown class {args.class_name!r}: expected one of {', '.join(names[:20])}")
    try:
        since = None if args.since is None else _to_utc(args.since, "--since").to_pydatetime()
    except ValueError:
        raise cli.UsageError(f"--since: expected an ISO 8601 time, got {args.since!r}") from None
    if args.cursor is not None:
        try:
            decode_cursor(args.cursor)
        except CursorError as err:
            raise cli.UsageError(f"--cursor: {err}") from None
    store = _open_store()
    # ranked and paged in SQL: one page of rows is read, whatever the store's size
    result = store.suspects(loaded.name, names, since=since, class_name=args.class_name, limit=args.limit,
                            cursor=args.cursor)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        fields = ["prediction_id", "feedback_id", "annotator", "label", "proposed", "quality", "received_at", "audited"]
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(result["suspects"])
    lines = [f"{result['n_suspects']} suspected annotation errors among {result['n_feedback']} feedback labels of "
             f"{loaded.name} ({result['n_ood']} on OOD inputs, listed apart)"]
    if result["suspects"]:
        lines.append(f"  {'quality':>8}  {'label':>10}  {'proposed':>10}  {'annotator':>10}  prediction_id")
        for s in result["suspects"]:
            lines.append(f"  {s['quality']:8.4f}  {s['label']:>10}  {s['proposed']:>10}  "
                         f"{(s['annotator'] or '-'):>10}  {s['prediction_id']}")
    if result["ood"]:
        lines.append(f"feedback on OOD inputs (the model cannot judge these labels): {len(result['ood'])} listed")
    if result["next_cursor"] is not None:
        lines.append(f"more: --cursor {result['next_cursor']}")
    if args.csv is not None:
        lines.append(f"written to {args.csv}")
    cli._emit(args, result, "\n".join(lines))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from noisewise.monitoring.report_worker import ReportWorker, ReportWorkerError

    # First, before any heavy import: a child process imports Evidently on the other core while this one loads
    # the model and reads the store, then computes the reports from the window (monitoring/report_worker.py).
    with ReportWorker() as reports:
        from noisewise.models.registry import home_dir
        from noisewise.monitoring.monitor import run_monitor

        cli = _cli()
        loaded = _loaded(args.model, network=False)  # the calibration's classes, thresholds and targets suffice
        store = _open_store()
        workspace = args.workspace or home_dir() / "evidently"
        try:
            report = run_monitor(store, loaded, workspace, window=args.window, reports=reports,
                                 keep_snapshots=args.keep_snapshots or None)
        except ReportWorkerError as err:
            print(f"noisewise: error: {err}", file=sys.stderr)
            return 1
    cli._emit(args, report, _monitor_text(report, workspace))
    return 0


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _noise_line(method: str, est: dict, used: bool) -> str:
    """One flip-rate record: ``flip rate r [lower, upper] (method, n, level)``, heuristics spelled out."""
    level = f"{float(est.get('confidence', 0.95)):.0%}"
    tag = ("HEURISTIC, shown only, never used for guarantees" if est.get("heuristic")
           else "used for guarantees" if used else "not a heuristic")
    return (f"  noise rate ({method}, n={est['n']}): flip rate {_fmt(est.get('flip_rate'))} "
            f"[{_fmt(est['lower'])}, {_fmt(est['upper'])}] ({level} interval; {tag})")


def _monitor_text(report: dict, workspace: Path) -> str:
    state, drift = report["feedback"], report["drift"]
    model = report["model"]
    totals = report.get("totals") or {}
    lines = [f"{model['name']} version {model['version']}, whole store: {totals.get('predictions', 'n/a')} "
             f"predictions, {totals.get('feedback', 'n/a')} feedback labels ({totals.get('feedback_ood', 'n/a')} on "
             f"OOD inputs, {totals.get('suspects', 'n/a')} suspected errors)",
             f"window (newest {report.get('window') or 'all'}; every number below): {report['n_predictions']} "
             f"predictions, {report['n_feedback']} feedback labels ({state['n_ood']} on OOD inputs)"]
    if state["noise"]:
        for method, est in state["noise"].items():
            lines.append(_noise_line(method, est, used=method == state["best"]))
        if state["best"] is None:
            lines.append("  no noise-rate estimate usable for guarantees (a heuristic never is): mark some feedback "
                         "as audited, or have two annotators label the same predictions")
    else:
        lines.append("  noise rate: not enough feedback yet (need audited items that also have an ordinary label, "
                     "two annotators on some predictions, or labels covering every class)")
    calib = report.get("calibration_noise") or {}
    if calib.get("lower") is not None:
        if calib.get("heuristic"):
            lines.append(f"  calibration labels: flip rate {_fmt(calib.get('flip_rate'))} by the {calib.get('method')} "
                         "HEURISTIC (assumed by no guarantee)")
        else:
            warn = "  ABOVE the calibration's assumption" if report.get("noise_above_calibration") else ""
            lines.append(f"  calibration assumed a flip rate of {calib['lower']:.3f} ({calib.get('method')}){warn}")
    cov = state.get("coverage") or {}
    if cov.get("n"):
        below = "  BELOW TARGET" if cov.get("below_target") else ""
        corrected = (f"noise-corrected {_fmt(cov['corrected'])} [{_fmt(cov['corrected_lower'])}, "
                     f"{_fmt(cov['corrected_upper'])}]{below}" if cov.get("corrected") is not None else "not corrected")
        lines.append(f"  realized coverage on feedback labels (n={cov['n']}, target {cov['target']:.3f}): raw "
                     f"{_fmt(cov['raw'])}, {corrected}")
        lines.append(f"    correction: {cov.get('correction', 'n/a')}")
    audited = cov.get("audited") or {}
    if audited.get("n"):
        below = "  BELOW TARGET" if audited.get("below_target") else ""
        lines.append(f"  realized coverage on audited labels (n={audited['n']}, no assumption): "
                     f"{_fmt(audited['coverage'])} [{_fmt(audited['lower'])}, {_fmt(audited['upper'])}]{below}")
    if state.get("suspect_share") is not None:
        lines.append(f"  suspected annotation errors: {report['suspects']['n_suspects']} "
                     f"({state['suspect_share']:.1%} of in-distribution feedback); `noisewise flags` lists them")
    for name in ("label_drift", "prediction_drift"):
        d = drift.get(name) or {}
        if d.get("score") is not None:
            lines.append(f"  {name.replace('_', ' ')}: p={d['score']:.4g} ({d.get('stattest')}, threshold "
                         f"{d.get('threshold')}) -> {'DRIFT' if d.get('detected') else 'no drift'}")
        else:
            lines.append(f"  {name.replace('_', ' ')}: {d.get('status', 'not computed')}")
    quality = drift.get("quality") or {}
    if quality.get("accuracy") is not None:
        lines.append(f"  accuracy on labelled in-distribution feedback: {quality['accuracy']:.3f} (n={quality.get('n')})")
    if drift.get("html"):
        lines.append(f"  Evidently report: {drift['html']}\n  workspace: {workspace} (browse it with "
                     f"`evidently ui --workspace {workspace}`)")
    return "\n".join(lines)


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from noisewise.models import registry
    from noisewise.monitoring.feedback import RecalibrationRefused, recalibrated_threshold

    cli = _cli()
    alias = args.model.split("@", 1)[1] if "@" in args.model else None
    if alias is None and not args.no_promote:
        raise cli.UsageError("--model: give NAME@ALIAS so that the alias can move (or use --no-promote)")
    if (args.noise_rate is None) != (not args.assume_uniform_noise):
        raise cli.UsageError("--noise-rate and --assume-uniform-noise go together: NACP corrects for a rate you vouch "
                             "for under a uniform noise model (leave both out for split conformal or the audit)")
    loaded = _loaded(args.model)
    k = loaded.calibration.num_classes
    if args.noise_rate is not None and not 0.0 <= args.noise_rate < (k - 1) / k:
        raise cli.UsageError(f"--noise-rate: a flip rate in [0, (K-1)/K) = [0, {(k - 1) / k:.4f}) for this model's "
                             f"{k} classes, got {args.noise_rate}")
    store = _open_store()
    frame = store.feedback_frame(model_name=loaded.name)
    basis = dataclasses.replace(loaded.calibration, settings={**loaded.calibration.settings,
                                                               "conformal": args.conformal})
    try:
        recal = recalibrated_threshold(frame, basis, window=args.window, min_items=args.min_items,
                                       weights=loaded.weights, noise_flip_rate=args.noise_rate,
                                       assume_uniform_noise=args.assume_uniform_noise)
    except RecalibrationRefused as err:
        print(f"noisewise: recalibration refused: {err.reason}", file=sys.stderr)
        return 1
    old = loaded.calibration
    calibration = dataclasses.replace(
        old, threshold=recal.threshold,
        noise=_noise_record(recal, args.noise_rate),
        settings={**old.settings, "conformal": args.conformal, "recalibrated_from": f"{loaded.name}/{loaded.version}",
                  "recalibration_window": args.window, "recalibration_n": recal.n,
                  "recalibration_n_audited": recal.n_audited, "recalibration_method": recal.method},
        assumptions=[a for a in old.assumptions if not a.startswith("prediction sets:")] + [f"prediction sets: {recal.note}"],
        guarantees={**old.guarantees, "prediction_set": {"kind": recal.guarantee_kind, "condition": recal.condition}},
    )
    params = {"recalibrated_from": f"{loaded.name}/{loaded.version}", "recalibration.method": recal.method,
              "recalibration.n": recal.n, "recalibration.n_audited": recal.n_audited,
              "recalibration.window": args.window or "all", "recalibration.eps": recal.eps,
              "recalibration.conformal": args.conformal, "recalibration.guarantee": recal.guarantee_kind}
    logged = registry.log_training_run(
        loaded.net.cpu(), loaded.spec, params, history=[],
        metrics={"recalibration_q": recal.threshold.q, "recalibration_n": recal.n}, register_as=loaded.name,
        calibration=calibration, tags={"noisewise.recalibrated_from": f"{loaded.name}/{loaded.version}"},
        reference=registry.load_reference(loaded, test=True))  # same network: its drift reference and test sample
    moved, refused = False, []
    if not args.no_promote:  # the same check as `noisewise promote`: never to a version that abstains on everything
        try:
            registry.promote_version(loaded.name, logged.version, alias)
            moved = True
        except registry.PromotionRefused as err:
            refused = err.reasons
    reloaded = None
    if args.url and moved:
        reloaded = _tell_service(args.url, getattr(args, "api_key", None))
    old_t, new_t = old.threshold, recal.threshold
    payload = {"model_name": loaded.name, "model_version": logged.version, "recalibrated_from": loaded.version,
               "alias": alias if moved else None, "promotion_refused": refused, "service_reloaded": reloaded,
               **recal.to_dict(),
               "previous_threshold": old_t.to_dict()}
    where = (f"{loaded.name}@{alias} now points to version {logged.version}" if moved
             else f"alias not moved: {'; '.join(refused)} (`noisewise promote {loaded.name} {logged.version} --alias "
                  f"{alias} --force` moves it anyway)" if refused else "alias not moved (--no-promote)")
    given = "" if recal.eps is None else f", given flip rate {args.noise_rate:g} under uniform noise"
    text = (f"{loaded.name} version {logged.version}: threshold recalibrated on {recal.n} feedback labels "
            f"({recal.method}{f', {recal.n_audited} audited' if recal.n_audited else ''}{given}): "
            f"q {old_t.q:.4f} -> {new_t.q:.4f}\n"
            f"  guarantee: {recal.guarantee_kind}: {recal.condition}\n"
            f"  {recal.note}\n  {where}")
    if reloaded is not None:
        text += f"\n  service at {args.url}: {reloaded}"
    cli._emit(args, payload, text)
    return 0


def _noise_record(recal, given_flip_rate: float | None) -> dict:
    """The calibration's ``noise`` record after a recalibration: one flip-rate record, like calibrate's.

    NACP: the rate the caller gave (what the threshold assumes). Otherwise the threshold assumes no rate and
    the record is the best non-heuristic feedback estimate, for comparison with later feedback; with only the
    heuristic (or nothing) it is marked ``used_for_guarantees: False``.
    """
    estimates = recal.noise.get("estimates", {})
    common = {"source": "feedback", "recalibration_method": recal.method, "estimates": estimates}
    if recal.method == "nacp":
        r = float(given_flip_rate)
        return {"method": "given", "flip_rate": r, "lower": r, "upper": r, "convention": "flip", "heuristic": False,
                "note": "flip rate given to recalibrate under an asserted uniform noise model", **common}
    best = recal.noise.get("best")
    if best is not None:
        return {**best, **common}
    heuristic = estimates.get("confident_learning")
    if heuristic is not None:
        return {**heuristic, "used_for_guarantees": False, **common}
    return {"method": "none", "flip_rate": None, "lower": None, "upper": None, "convention": "flip",
            "heuristic": False, "used_for_guarantees": False, "note": "no noise-rate estimate from the feedback",
            **common}


def _tell_service(url: str, api_key: str | None = None) -> str:
    """POST /reload to the service at ``url`` (with retries and the API key, see services/client.py); what
    happened, in one line. The alias has already moved, so a failure here is reported, not raised: the service
    switches at its next alias check anyway."""
    from noisewise.services.client import ServiceClient, ServiceError

    try:
        with ServiceClient(url, api_key, timeout=120) as client:
            response = client.post("/reload")
    except ServiceError as err:
        return f"not told ({err}); it will switch at its next alias check"
    if response.status_code != 200:
        return f"reload answered {response.status_code}: {' '.join(response.text.split())[:200]}"
    body = response.json()
    return f"serving version {body['version']}" + (" (switched now)" if body.get("reloaded") else "")

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


def add_parsers(commands, common) -> None:
    """Register the three commands; ``common`` is services.cli (its argument types and helpers)."""
    default_model = os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion")

    flags = commands.add_parser(
        "flags", help="list suspected annotation errors in the feedback, for re-annotation",
        description="Feedback labels that look wrong (confident learning, DESIGN.md 4.7), most suspicious first, "
        "with the model's proposed label. Feedback on inputs flagged OOD is listed apart: the model cannot judge "
        "those labels. Reads the store the service writes (NOISEWISE_STORE_URL or $NOISEWISE_HOME/store.db).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    flags.add_argument("--since", default=None, help="only feedback received at or after this ISO 8601 time")
    flags.add_argument("--class", dest="class_name", default=None, help="only labels of this class")
    flags.add_argument("--limit", type=common._positive_int, default=50, help="most suspects listed")
    flags.add_argument("--csv", type=Path, default=None, help="also write the suspects to this CSV file")
    flags.add_argument("--json", action="store_true", help="print one JSON object")
    flags.set_defaults(handler=cmd_flags)

    monitor = commands.add_parser(
        "monitor", help="noise-rate estimate, realized coverage, suspects and Evidently drift reports",
        description="Estimate the feedback labels' noise rate (duplicates, audited items or the confident-learning "
        "heuristic, each with its interval), the realized coverage of the served sets on feedback labels (raw "
        "and noise-corrected) and the suspects; run Evidently label-drift, prediction-drift and quality reports "
        "and save them (HTML + JSON + a snapshot in an Evidently workspace that `evidently ui --workspace DIR` "
        "serves). The result is stored, and the running service exports it as noisewise_drift_* gauges.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    monitor.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    monitor.add_argument("--window", type=common._positive_int, default=None,
                         help="only the most recent N feedback items and predictions (default: all)")
    monitor.add_argument("--workspace", type=Path, default=None,
                         help="Evidently workspace (default $NOISEWISE_HOME/evidently)")
    monitor.add_argument("--json", action="store_true", help="print one JSON object")
    monitor.set_defaults(handler=cmd_monitor)

    recal = commands.add_parser(
        "recalibrate", help="re-estimate the conformal threshold on recent feedback; the service switches live",
        description="Re-estimate the prediction-set threshold on recent in-distribution feedback: the "
        "audit-rectified threshold when enough feedback is marked audited, otherwise NACP with the lower bound "
        "of the feedback noise rate. Logs the new calibration as a new version of the model (same weights) and "
        "moves the alias, so a running service switches to it without a restart (it checks the alias every "
        "NOISEWISE_RELOAD_INTERVAL_S, or at once with --url). Refuses, with the reason, when the feedback is too "
        "small for the guarantee.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    recal.add_argument("--model", default=default_model, help="served model; must be NAME@ALIAS to move the alias")
    recal.add_argument("--window", type=common._positive_int, default=None,
                       help="use the most recent N feedback items (default: all)")
    recal.add_argument("--min-items", type=common._positive_int, default=None,
                       help="refuse with fewer labelled predictions than this (default: the rule in "
                       "monitoring/feedback.py, at least enough for a finite quantile)")
    recal.add_argument("--conformal", choices=("plugin", "finite-sample"), default="finite-sample",
                       help="finite-sample: the audit-rectified threshold holds coverage with probability ~95%% "
                       "(lower confidence bound), NACP adds its Delta margin; plugin: coverage in expectation only, "
                       "which with a few dozen audited items can miss by several points on one draw")
    recal.add_argument("--no-promote", action="store_true", help="log the new version but leave the alias")
    recal.add_argument("--url", default=None,
                       help="a running service to tell at once (POST /reload), e.g. http://127.0.0.1:3000")
    recal.add_argument("--json", action="store_true", help="print one JSON object")
    recal.set_defaults(handler=cmd_recalibrate)


def _cli():
    from services import cli

    return cli


def _open_store():
    from monitoring.store import Store, StoreError

    try:
        return Store()
    except StoreError as err:
        raise _cli().UsageError(str(err)) from None


def _loaded(ref: str):
    from models import registry

    loaded = registry.load_model(ref)
    if loaded.calibration is None:
        raise _cli().UsageError(f"{ref} has no calibration: run `noisewise calibrate --model {ref}` first")
    return loaded


def cmd_flags(args: argparse.Namespace) -> int:
    from monitoring.feedback import suspects

    cli = _cli()
    loaded = _loaded(args.model)
    names = list(loaded.calibration.class_names)
    if args.class_name is not None and args.class_name not in names:
        raise cli.UsageError(f"--class: unknown class {args.class_name!r}: expected one of {', '.join(names[:20])}")
    store = _open_store()
    frame = store.feedback_frame(model_name=loaded.name)
    result = suspects(frame, names, since=args.since, class_name=args.class_name, limit=args.limit)
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
    if args.csv is not None:
        lines.append(f"written to {args.csv}")
    cli._emit(args, result, "\n".join(lines))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from models.registry import home_dir
    from monitoring.monitor import run_monitor

    cli = _cli()
    loaded = _loaded(args.model)
    store = _open_store()
    workspace = args.workspace or home_dir() / "evidently"
    report = run_monitor(store, loaded, workspace, window=args.window)
    cli._emit(args, report, _monitor_text(report, workspace))
    return 0


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _monitor_text(report: dict, workspace: Path) -> str:
    state, drift = report["feedback"], report["drift"]
    model = report["model"]
    lines = [f"{model['name']} version {model['version']}: {report['n_predictions']} predictions, "
             f"{report['n_feedback']} feedback labels ({state['n_ood']} on OOD inputs)"]
    if state["noise"]:
        for method, est in state["noise"].items():
            mark = "  <- used" if method == state["best"] else ""
            lines.append(f"  noise rate ({method}, n={est['n']}): {est['flip_rate']:.3f} "
                         f"[{est['lower']:.3f}, {est['upper']:.3f}] (flip rate, 95% interval){mark}")
    else:
        lines.append("  noise rate: not enough feedback yet (need audited items, two annotators on some "
                     "predictions, or labels covering every class)")
    calib = report.get("calibration_noise") or {}
    if calib.get("lower") is not None:
        warn = "  ABOVE the calibration's assumption" if report.get("noise_above_calibration") else ""
        lines.append(f"  calibration assumed a flip rate of {calib['lower']:.3f} ({calib.get('method')}){warn}")
    cov = state.get("coverage") or {}
    if cov.get("n"):
        lines.append(f"  realized coverage on feedback labels: raw {_fmt(cov['raw'])}, noise-corrected "
                     f"{_fmt(cov['corrected'])} [{_fmt(cov['corrected_lower'])}, {_fmt(cov['corrected_upper'])}] vs "
                     f"target {cov['target']:.3f}{'  BELOW TARGET' if cov.get('below_target') else ''} (n={cov['n']})")
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
    from models import registry
    from monitoring.feedback import RecalibrationRefused, recalibrated_threshold

    cli = _cli()
    alias = args.model.split("@", 1)[1] if "@" in args.model else None
    if alias is None and not args.no_promote:
        raise cli.UsageError("--model: give NAME@ALIAS so that the alias can move (or use --no-promote)")
    loaded = _loaded(args.model)
    store = _open_store()
    frame = store.feedback_frame(model_name=loaded.name)
    basis = dataclasses.replace(loaded.calibration, settings={**loaded.calibration.settings,
                                                               "conformal": args.conformal})
    try:
        recal = recalibrated_threshold(frame, basis, window=args.window, min_items=args.min_items,
                                       weights=loaded.weights)
    except RecalibrationRefused as err:
        print(f"noisewise: recalibration refused: {err.reason}", file=sys.stderr)
        return 1
    old = loaded.calibration
    calibration = dataclasses.replace(
        old, threshold=recal.threshold,
        noise=_noise_record(recal, old.num_classes),
        settings={**old.settings, "conformal": args.conformal, "recalibrated_from": f"{loaded.name}/{loaded.version}",
                  "recalibration_window": args.window, "recalibration_n": recal.n,
                  "recalibration_n_audited": recal.n_audited, "recalibration_method": recal.method},
        assumptions=[a for a in old.assumptions if not a.startswith("prediction sets:")] + [f"prediction sets: {recal.note}"],
    )
    params = {"recalibrated_from": f"{loaded.name}/{loaded.version}", "recalibration.method": recal.method,
              "recalibration.n": recal.n, "recalibration.n_audited": recal.n_audited,
              "recalibration.window": args.window or "all", "recalibration.eps": recal.eps,
              "recalibration.conformal": args.conformal}
    logged = registry.log_training_run(
        loaded.net.cpu(), loaded.spec, params, history=[],
        metrics={"recalibration_q": recal.threshold.q, "recalibration_n": recal.n}, register_as=loaded.name,
        calibration=calibration, tags={"noisewise.recalibrated_from": f"{loaded.name}/{loaded.version}"})
    moved = False
    if not args.no_promote:
        registry.set_alias(loaded.name, logged.version, alias)
        moved = True
    reloaded = None
    if args.url and moved:
        reloaded = _tell_service(args.url)
    old_t, new_t = old.threshold, recal.threshold
    payload = {"model_name": loaded.name, "model_version": logged.version, "recalibrated_from": loaded.version,
               "alias": alias if moved else None, "service_reloaded": reloaded, **recal.to_dict(),
               "previous_threshold": old_t.to_dict()}
    where = (f"{loaded.name}@{alias} now points to version {logged.version}" if moved
             else "alias not moved (--no-promote)")
    text = (f"{loaded.name} version {logged.version}: threshold recalibrated on {recal.n} feedback labels "
            f"({recal.method}{f', {recal.n_audited} audited' if recal.n_audited else ''}"
            f"{'' if recal.eps is None else f', eps={recal.eps:.4f} (uniform)'}): q {old_t.q:.4f} -> {new_t.q:.4f}\n"
            f"  {recal.note}\n  {where}")
    if reloaded is not None:
        text += f"\n  service at {args.url}: {reloaded}"
    cli._emit(args, payload, text)
    return 0


def _noise_record(recal, num_classes: int) -> dict:
    """The calibration's ``noise`` record after a recalibration, in the flip convention like the others."""
    from models.uncertainty.labelnoise import NoiseRateEstimate, uniform_to_flip_rate

    best = recal.noise.get("best")
    record = {**(NoiseRateEstimate.from_dict(best).flip_record() if best is not None else {}), "source": "feedback",
              "method": recal.method, "estimator": best and best.get("method"),
              "estimates": recal.noise.get("estimates", {})}
    if recal.eps is not None:  # what NACP assumed: the lower bound
        record["lower"] = uniform_to_flip_rate(recal.eps, num_classes)
    return record


def _tell_service(url: str) -> str:
    import httpx

    try:
        response = httpx.post(f"{url.rstrip('/')}/reload", timeout=120)
    except httpx.HTTPError as err:
        return f"not reached ({type(err).__name__}); it will switch at its next alias check"
    if response.status_code != 200:
        return f"reload answered {response.status_code}: {response.text[:200]}"
    body = response.json()
    return f"serving version {body['version']}" + (" (switched now)" if body.get("reloaded") else "")

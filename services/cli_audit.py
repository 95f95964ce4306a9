"""``noisewise audit plan | submit | status | size``: trusted labels as a first-class input.

An audit is a random sample of labelled items that an expert labels again. With it the noise rate of the
ordinary labels is *counted* (share that differ from the trusted labels, exact Clopper-Pearson interval) and
the conformal sets become valid without any noise model (the audit-rectified threshold). Production audits
go through the running service's ``/feedback`` route as ``audited`` items; calibration audits become a
``index,label`` file for ``noisewise calibrate --trusted``. The planner is ``noisewise.models.uncertainty.audit``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from noisewise.services.client import API_KEY_ENV  # the key `audit submit` sends by default

#: Items per POST /feedback (well under the service's default NOISEWISE_MAX_FEEDBACK_ITEMS).
BATCH_ITEMS = 100
#: Per-class rates are listed only for classes with at least this many audited items (below, the
#: interval spans most of [0, 1] and says nothing).
MIN_PER_CLASS_ITEMS = 20

PREDICTION_COLUMNS = ("prediction_id", "observed_label", "annotator", "predicted_label", "trusted_label")
CALIBRATION_COLUMNS = ("index", "observed_label", "trusted_label")

WORKFLOW = """\
An audit: an expert relabels a random sample of labelled items; the trusted labels turn assumptions into counts.
  1. noisewise audit plan --n 200 --out worklist.csv   draw the items (served predictions, or --from calibration)
  2. fill in trusted_label with class names, then: noisewise audit submit worklist.csv --url URL
  3. noisewise audit status   the noise rate counted on the audit; from 50 audited items `noisewise recalibrate`
     makes the sets valid without a noise model (a calibration audit: `noisewise calibrate --trusted FILE`)
noisewise audit size: how many audited items a given precision needs."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the workflow's line breaks and still shows the defaults."""


def add_parsers(commands, common) -> None:
    """Register ``audit`` and its subcommands; ``common`` is noisewise.services.cli (its argument types and helpers)."""
    default_model = os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion")

    audit = commands.add_parser(
        "audit", help="trusted labels: plan an audit, submit it, see the noise rate and what more audit buys",
        description=WORKFLOW, formatter_class=_Formatter)
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True,
                               parser_class=type(audit))

    plan = sub.add_parser(
        "plan", help="draw a random sample of labelled items to audit and write the worklist",
        description="Draw N items uniformly at random (seeded) and write a worklist for the auditor. From "
        "predictions (default): served in-distribution predictions of the model's weights that carry an ordinary "
        "feedback label and no audited one yet, read from the store the service writes (NOISEWISE_STORE_URL or "
        "$NOISEWISE_HOME/store.db); observed_label is their first ordinary label, the one the noise rate and "
        "recalibration compare with. From calibration: rows of the model's calibration split (index = row of the "
        "dataset file). Also says what an audit of N items buys at the current noise-rate estimate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    plan.add_argument("--n", type=common._positive_int, default=100, help="items to draw")
    plan.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    plan.add_argument("--out", type=Path, default=Path("worklist.csv"), help="worklist file: .csv or .json")
    plan.add_argument("--from", dest="source", choices=("predictions", "calibration"), default="predictions",
                      help="draw served predictions with feedback, or rows of the calibration split")
    plan.add_argument("--blind", action="store_true",
                      help="leave the observed and predicted labels out of the worklist, so that they cannot "
                      "anchor the auditor")
    plan.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=cmd_plan)

    submit = sub.add_parser(
        "submit", help="send a filled-in worklist: audited feedback to the service, or a trusted-labels file",
        description="Read a worklist written by `noisewise audit plan` with its trusted_label column filled in "
        "(class names; empty rows are skipped and counted). A predictions worklist is POSTed to the service's "
        "/feedback route as audited labels (batches of 100; stored, duplicate and rejected items are reported "
        "with reasons), then the noise rate counted on all audited items is shown. A calibration worklist becomes "
        "a trusted-labels file (index,label) for `noisewise calibrate --trusted`. Unknown class names, malformed "
        "ids or duplicate rows are listed line by line and nothing is sent. With API keys on the service, set "
        f"{API_KEY_ENV} (or pass --api-key).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    submit.add_argument("worklist", type=Path, help="the filled-in worklist (.csv or .json)")
    submit.add_argument("--url", default=None,
                        help="the running service (predictions worklist), e.g. http://127.0.0.1:3000")
    submit.add_argument("--annotator", default="auditor", help="annotator name stored with the audited labels")
    submit.add_argument("--model", default=None,
                        help=f"calibration worklist: the model it was drawn for (default: the one the JSON worklist "
                        f"names, else NOISEWISE_MODEL or {default_model})")
    submit.add_argument("--out", type=Path, default=None,
                        help="calibration worklist: trusted-labels file to write (default: trusted.csv beside the "
                        "worklist)")
    submit.add_argument("--json", action="store_true", help="print one JSON object")
    from noisewise.services.client import add_api_key_option

    add_api_key_option(submit)
    submit.set_defaults(handler=cmd_submit, default_model=default_model)

    status = sub.add_parser(
        "status", help="audited items so far, the noise rate counted on them, and what more audit would buy",
        description="Count the audited feedback of the model in the store, show the flip rate counted on it (share "
        "of ordinary labels that differ from the trusted ones, exact Clopper-Pearson interval), per class where "
        f"a class has >= {MIN_PER_CLASS_ITEMS} audited items, whether `noisewise recalibrate` can use the "
        "audit-rectified threshold, and what a larger audit would buy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    status.add_argument("--model", default=default_model, help="served model (NAME@ALIAS or NAME/VERSION)")
    status.add_argument("--confidence", type=common._unit_interval, default=0.95, help="level of the intervals")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_status)

    size = sub.add_parser(
        "size", help="the audit planner: items needed for a noise-rate precision and a coverage margin",
        description="How many audited items give the flip rate to a total interval width W (exact Clopper-Pearson, "
        "at the rate R, worst case 0.5 without --rate), and how many keep the audit-rectified threshold's "
        "finite-sample coverage margin z*sqrt(R/m) under --margin (the sets are sized for 1 - alpha + margin, "
        "so the margin is what a small audit costs in set size), with a table of audit sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size.add_argument("--width", type=common._unit_interval, default=0.1,
                      help="total width of the noise rate's interval (0.1 = about +-0.05)")
    size.add_argument("--rate", type=_rate, default=None,
                      help="the flip rate you expect (share of wrong labels); default: unknown, worst case 0.5")
    size.add_argument("--alpha", type=common._unit_interval, default=0.1, help="miscoverage target of the sets")
    size.add_argument("--margin", type=common._unit_interval, default=None,
                      help="largest coverage margin accepted (default: alpha / 2)")
    size.add_argument("--confidence", type=common._unit_interval, default=0.95,
                      help="level of the interval; the margin's z is its one-sided quantile (1.645 at 0.95)")
    size.add_argument("--json", action="store_true", help="print one JSON object")
    size.set_defaults(handler=cmd_size)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a flip rate in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a flip rate in [0, 1], got {value}")
    return value


def _cli():
    from noisewise.services import cli

    return cli


def _fail(message: str) -> int:
    """A refusal that is not a usage mistake: one line on stderr, exit 1."""
    print(f"noisewise: {message}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------------------------
# What the store says: one label per prediction, audited pairs, the rate to plan with
# --------------------------------------------------------------------------------------------------------------


def _first_labels(rows):
    """First label per prediction by arrival: the convention of monitoring.feedback."""
    ordered = rows.sort_values(["received_at", "feedback_id"], kind="mergesort")
    return ordered.drop_duplicates("prediction_id", keep="first")


def _audit_pairs(frame):
    """In-distribution predictions with both an ordinary and an audited label: ``prediction_id, observed,
    trusted, weights`` (the first of each), as ``noisewise.monitoring.feedback.noise_rate_estimates`` pairs them."""
    rows = frame[~frame["is_ood"].astype(bool)]
    audited = rows["audited"].astype(bool)
    ordinary = _first_labels(rows[~audited])[["prediction_id", "label", "weights"]]
    trusted = _first_labels(rows[audited])[["prediction_id", "label"]]
    return ordinary.merge(trusted, on="prediction_id", suffixes=("_observed", "_trusted"))


def _audit_estimate(frame, num_classes: int, confidence: float = 0.95):
    """``(estimate or None, note)``: the direct audit count of ``noise_rate_estimates``; below its minimum of
    items the same count on the few pairs there are, marked as such."""
    from noisewise.models.uncertainty.labelnoise import noise_rate_direct
    from noisewise.monitoring.feedback import MIN_AUDIT_ITEMS, noise_rate_estimates

    est = noise_rate_estimates(frame, num_classes, confidence=confidence).get("audit")
    if est is not None:
        return est, ""
    pairs = _audit_pairs(frame)
    if len(pairs) == 0:
        return None, "no audited item carries an ordinary label yet"
    est = noise_rate_direct(pairs["label_observed"].to_numpy("int64"), pairs["label_trusted"].to_numpy("int64"),
                            num_classes, confidence=confidence)
    return est, (f"only {len(pairs)} audited items (`noisewise monitor` and recalibration show the audit estimate "
                 f"from {MIN_AUDIT_ITEMS})")


def _planning_rate(frame, num_classes: int, calibration) -> tuple[float | None, str]:
    """The flip rate to plan with and where it comes from. Planning may use a heuristic (it sizes an audit,
    it guarantees nothing); None when nothing is known (the planner then takes the worst case)."""
    if frame is not None and len(frame):
        from noisewise.monitoring.feedback import noise_rate_estimates

        estimates = noise_rate_estimates(frame, num_classes)
        for key in ("audit", "duplicates", "confident_learning", "heuristic"):
            est = estimates.get(key)
            rate = None if est is None else getattr(est, "flip_rate", None)
            if rate is not None and math.isfinite(rate):
                kind = "; a heuristic, good enough to plan with, never used in a guarantee" if est.heuristic else ""
                return float(rate), f"the {key} estimate on the feedback, n={est.n}{kind}"
    noise = dict(getattr(calibration, "noise", None) or {}) if calibration is not None else {}
    rate = noise.get("flip_rate")
    if noise.get("convention", "flip") == "flip" and isinstance(rate, (int, float)) and math.isfinite(rate):
        kind = ", a heuristic" if noise.get("heuristic") else ""
        where = f" on {noise['source']}" if noise.get("source") else ""
        return float(rate), f"the calibration's noise record: {noise.get('method', 'unknown')}{where}{kind}"
    return None, "no estimate yet: worst case"


def _buys(m: int, rate: float | None, alpha: float, n_noisy: int | None, confidence: float = 0.95) -> dict:
    """What an audit of ``m`` items buys, from the planner."""
    from scipy.stats import norm

    from noisewise.models.uncertainty.audit import audit_plan_table

    z = float(norm.ppf(confidence))
    row = audit_plan_table(rate, (max(1, m),), confidence=confidence, z=z, n=n_noisy, coverage=1 - alpha)[0]
    return {**row, "confidence": confidence, "z": z, "alpha": alpha}


def _buys_text(buys: dict, rate_source: str, already: int = 0) -> str:
    total = (f"an audit of {buys['m']} items buys" if not already else
             f"with the {already} already audited, {buys['m']} audited items buy")
    width = (f"the flip rate to a {buys['confidence']:.0%} interval about {buys['width']:.3f} wide "
             f"(+-{buys['width'] / 2:.3f})")
    if buys["coverage_margin"] is None:
        return (f"  {total}: {width} in the worst case (rate 0.5: {rate_source}); the coverage margin needs "
                "a rate estimate")
    margin = buys["coverage_margin"]
    warn = ("; that is more than alpha, so the finite-sample sets would be near full: audit more, or take coverage "
            "on average only (--conformal plugin)" if margin >= buys["alpha"] else "")
    return (f"  at the flip rate {buys['rate']:.3f} ({rate_source}), {total}: {width}; sets valid without a noise "
            f"model (audit-rectified threshold), in the finite-sample form sized for coverage up to "
            f"{1 - buys['alpha']:.2f} + {margin:.3f} (margin z*sqrt(rate/m + c(1-c)/n)){warn}")


# --------------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    cli = _cli()
    if args.out.suffix.lower() not in (".csv", ".json"):
        raise cli.UsageError(f"--out: the worklist is a .csv or .json file, got {args.out}")
    if args.out.exists() and not args.force:
        raise cli.UsageError(f"--out: {args.out} exists (a worklist being filled in?); choose another file or --force")
    if args.source == "calibration":
        return _plan_calibration(args)
    return _plan_predictions(args)


def _plan_predictions(args: argparse.Namespace) -> int:
    import numpy as np

    from noisewise.monitoring.feedback import MIN_AUDITED_FOR_RECTIFIED
    from noisewise.services import cli_feedback

    cli = _cli()
    loaded = cli_feedback._loaded(args.model)
    names = list(loaded.calibration.class_names)
    frame = cli_feedback._open_store().feedback_frame(model_name=loaded.name)
    served = frame[frame["weights"].astype(str) == str(loaded.weights)]  # recalibration uses these weights' feedback
    in_dist = served[~served["is_ood"].astype(bool)]  # OOD feedback enters no estimate: auditing it buys nothing
    audited_ids = set(frame.loc[frame["audited"].astype(bool), "prediction_id"])
    ordinary = _first_labels(in_dist[~in_dist["audited"].astype(bool)])
    eligible = ordinary[~ordinary["prediction_id"].isin(audited_ids)].sort_values("prediction_id")
    n_ood = int(served["is_ood"].astype(bool).groupby(served["prediction_id"]).any().sum())
    if len(eligible) == 0:
        why = (f"{len(frame)} feedback items on {loaded.name}, {len(in_dist)} on in-distribution predictions of the "
               f"served weights, {len(audited_ids)} predictions already audited")
        return _fail(f"audit plan: no prediction to audit ({why}). Eligible are served in-distribution predictions "
                     f"of {loaded.name} version {loaded.version}'s weights with an ordinary feedback label and no "
                     "audited one: send feedback first (POST /feedback), or draw from the calibration split with "
                     "--from calibration")
    rng = np.random.default_rng(args.seed)
    n = min(args.n, len(eligible))
    picked = eligible.iloc[np.sort(rng.choice(len(eligible), size=n, replace=False))]
    columns = [c for c in PREDICTION_COLUMNS if not (args.blind and c in ("observed_label", "annotator",
                                                                           "predicted_label"))]
    rows = [{"prediction_id": str(r.prediction_id), "observed_label": names[int(r.label)],
             "annotator": str(r.annotator or ""), "predicted_label": names[int(r.predicted)], "trusted_label": ""}
            for r in picked.itertuples(index=False)]
    _write_worklist(args.out, columns, rows, {"kind": "predictions", "model": args.model, "model_name": loaded.name,
                                              "model_version": loaded.version, "seed": args.seed})
    already = len(_audit_pairs(served))
    rate, source = _planning_rate(frame, len(names), loaded.calibration)
    buys = _buys(already + n, rate, float(loaded.calibration.threshold.alpha), max(len(ordinary), 1))
    payload = {"source": "predictions", "worklist": str(args.out), "n": n, "eligible": len(eligible),
               "already_audited": already, "ood_excluded": n_ood, "model_name": loaded.name,
               "model_version": loaded.version, "seed": args.seed, "rate": rate, "rate_source": source,
               "buys": buys, "min_audited_for_rectified": MIN_AUDITED_FOR_RECTIFIED}
    lines = [(f"drew {n} of {len(eligible)} eligible predictions of {loaded.name} version {loaded.version} (served, "
             f"in-distribution, with an ordinary label and no audited one; {n_ood} OOD predictions left out) "
             f"-> {args.out}")]
    if n < args.n:
        lines.append(f"  only {len(eligible)} were eligible, fewer than --n {args.n}: all of them are in the worklist")
    lines.append(f"  fill in trusted_label (class names: {_names_hint(names)}), then `noisewise audit submit "
                 f"{args.out} --url URL`")
    lines.append(_buys_text(buys, source, already))
    if already + n < MIN_AUDITED_FOR_RECTIFIED:
        lines.append(f"  `noisewise recalibrate` uses the audit-rectified threshold from {MIN_AUDITED_FOR_RECTIFIED} "
                     f"audited items: {MIN_AUDITED_FOR_RECTIFIED - already - n} more needed")
    cli._emit(args, payload, "\n".join(lines))
    return 0


def _plan_calibration(args: argparse.Namespace) -> int:
    import numpy as np

    from noisewise.models import registry

    cli = _cli()
    loaded = registry.load_model(args.model)
    # the worklist's rows are rows of the data file: drawing them needs the file itself
    dataset = registry.training_data(
        loaded, needed_by="audit plan --from calibration",
        alternative=f"draw served predictions instead (--from predictions), or calibrate on labelled data you hold "
        f"(`noisewise calibrate --model {args.model} --dataset FILE`)")
    names = list(dataset.class_names)
    cal = np.asarray(dataset.splits["cal"], dtype=np.int64)
    trusted = getattr(dataset, "trusted", None)
    known = cal[trusted[cal] >= 0] if trusted is not None else cal[:0]
    eligible = np.setdiff1d(cal, known)
    if eligible.size == 0:
        return _fail(f"audit plan: the calibration split of {loaded.name} version {loaded.version} has "
                     f"{cal.size} items, {known.size} already audited: nothing left to draw")
    rng = np.random.default_rng(args.seed)
    n = min(args.n, eligible.size)
    picked = np.sort(rng.choice(eligible, size=n, replace=False))
    columns = [c for c in CALIBRATION_COLUMNS if not (args.blind and c == "observed_label")]
    rows = [{"index": int(i), "observed_label": names[int(dataset.y[i])], "trusted_label": ""} for i in picked]
    _write_worklist(args.out, columns, rows, {"kind": "calibration", "model": args.model, "model_name": loaded.name,
                                              "model_version": loaded.version, "seed": args.seed})
    alpha = float(loaded.calibration.threshold.alpha) if loaded.calibration is not None else 0.1
    rate, source = _planning_rate(None, len(names), loaded.calibration)
    buys = _buys(int(known.size) + n, rate, alpha, int(cal.size))
    payload = {"source": "calibration", "worklist": str(args.out), "n": n, "eligible": int(eligible.size),
               "already_audited": int(known.size), "model_name": loaded.name, "model_version": loaded.version,
               "seed": args.seed, "rate": rate, "rate_source": source, "buys": buys}
    lines = [(f"drew {n} of the {eligible.size} unaudited calibration items of {loaded.name} version {loaded.version} "
             f"(index = row of the dataset file) -> {args.out}")]
    if n < args.n:
        lines.append(f"  only {eligible.size} were eligible, fewer than --n {args.n}: all of them are in the worklist")
    lines.append(f"  fill in trusted_label (class names: {_names_hint(names)}), then `noisewise audit submit "
                 f"{args.out} --model {args.model}` writes the trusted-labels file for `noisewise calibrate --trusted`")
    lines.append(_buys_text(buys, source, int(known.size)))
    cli._emit(args, payload, "\n".join(lines))
    return 0


def _names_hint(names: list[str]) -> str:
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def _write_worklist(path: Path, columns: list[str], rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**meta, "columns": columns,
                                    "items": [{c: r[c] for c in columns} for r in rows]}, indent=1) + "\n")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------------------


class WorklistError(ValueError):
    """The worklist cannot be read at all (one line)."""


@dataclass
class Worklist:
    """A worklist read back: its kind, its rows with their place in the file (``line N`` of a CSV, ``item N``
    of a JSON list) and the metadata a JSON worklist carries."""

    kind: str
    rows: list[tuple[str, dict]]
    meta: dict = field(default_factory=dict)


def read_worklist(path: Path) -> Worklist:
    """Read a worklist (CSV with a header, or the JSON ``audit plan`` writes: ``{"items": [...]}`` or a list).

    The kind follows the columns: ``prediction_id`` -> predictions, ``index`` -> calibration; both need
    ``trusted_label``. Raises :class:`WorklistError` when the file cannot be used at all."""
    if not path.is_file():
        raise WorklistError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise WorklistError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
    meta: dict = {}
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise WorklistError(f"{path}: not valid JSON ({err})") from None
        if isinstance(doc, dict):
            meta = {k: v for k, v in doc.items() if k != "items"}
            doc = doc.get("items")
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise WorklistError(f"{path}: expected a list of rows (objects), or an object with such a list under "
                                "'items'")
        rows = [(f"item {i}", {str(k): ("" if v is None else str(v)) for k, v in r.items()}) for i, r in enumerate(doc)]
        columns = set().union(*(r.keys() for _, r in rows)) if rows else set(meta.get("columns") or [])
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            columns = set(reader.fieldnames or [])
            rows = [(f"line {reader.line_num}", {k: (v or "") for k, v in r.items() if k is not None})
                    for r in reader]
        except csv.Error as err:
            raise WorklistError(f"{path}: not a readable CSV ({err})") from None
    if "trusted_label" not in columns:
        raise WorklistError(f"{path}: no trusted_label column (columns: {', '.join(sorted(columns)) or 'none'}); "
                            "use the worklist `noisewise audit plan` wrote")
    if "prediction_id" in columns:
        kind = "predictions"
    elif "index" in columns:
        kind = "calibration"
    else:
        raise WorklistError(f"{path}: neither a prediction_id nor an index column; use the worklist `noisewise audit "
                            "plan` wrote")
    if not rows:
        raise WorklistError(f"{path}: the worklist has no rows")
    return Worklist(kind, rows, meta)


def _canonical_uuid(text: str) -> str | None:
    """The id in the service's form (a lowercase UUID as /predict returns it), or None when it is not one."""
    try:
        return str(uuid.UUID(text)) if len(text) == 36 else None
    except ValueError:
        return None


def check_prediction_rows(worklist: Worklist, class_names: list[str]) -> tuple[list[dict], int, list[str]]:
    """``(items, skipped, errors)``: one ``{"where", "prediction_id", "label"}`` per filled-in row, how many rows
    had no trusted label, and one message per bad row (malformed id, unknown class, repeated id)."""
    names = set(class_names)
    items, errors, seen = [], [], {}
    skipped = 0
    for where, row in worklist.rows:
        pid = row.get("prediction_id", "").strip()
        label = row.get("trusted_label", "").strip()
        if not label:
            skipped += 1
            continue
        canonical = _canonical_uuid(pid)
        if canonical is None:
            errors.append(f"{where}: malformed prediction_id {pid[:64]!r}: expected the id of a served prediction "
                          "(a UUID, as /predict returns it)")
            continue
        pid = canonical
        if label not in names:
            errors.append(f"{where}: unknown class {label[:64]!r} in trusted_label: expected one of "
                          f"{_names_hint(class_names)}")
            continue
        if pid in seen:
            errors.append(f"{where}: prediction_id {pid} is already listed ({seen[pid]}); keep one row per prediction")
            continue
        seen[pid] = where
        items.append({"where": where, "prediction_id": pid, "label": label})
    return items, skipped, errors


def check_calibration_rows(worklist: Worklist, class_names: list[str], n_rows: int,
                           calibration_rows) -> tuple[list[dict], int, list[str]]:
    """``(items, skipped, errors)`` of a calibration worklist: ``index`` a row of the dataset file in the
    calibration split, ``trusted_label`` a class name, one row per index."""
    names = list(class_names)
    cal = {int(i) for i in calibration_rows}
    items, errors, seen = [], [], {}
    skipped = 0
    for where, row in worklist.rows:
        raw = row.get("index", "").strip()
        label = row.get("trusted_label", "").strip()
        if not label:
            skipped += 1
            continue
        try:
            index = int(raw)
        except ValueError:
            errors.append(f"{where}: malformed index {raw[:32]!r}: expected a row number of the dataset file")
            continue
        if not 0 <= index < n_rows:
            errors.append(f"{where}: index {index} is not a row of the dataset file (0..{n_rows - 1})")
            continue
        if index not in cal:
            errors.append(f"{where}: index {index} is not in the model's calibration split (the audit must be drawn "
                          "from it: `noisewise audit plan --from calibration`)")
            continue
        if label not in names:
            errors.append(f"{where}: unknown class {label[:64]!r} in trusted_label: expected one of "
                          f"{_names_hint(names)}")
            continue
        if index in seen:
            errors.append(f"{where}: index {index} is already listed ({seen[index]}); keep one row per item")
            continue
        seen[index] = where
        items.append({"where": where, "index": index, "label": label, "label_index": names.index(label)})
    return items, skipped, errors


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        worklist = read_worklist(args.worklist)
    except WorklistError as err:
        return _fail(f"audit submit: {err}; nothing was sent")
    if worklist.kind == "calibration":
        return _submit_calibration(args, worklist)
    return _submit_predictions(args, worklist)


def _report_bad_rows(errors: list[str], what: str) -> int:
    for message in errors[:50]:
        print(f"noisewise: {message}", file=sys.stderr)
    if len(errors) > 50:
        print(f"noisewise: ... and {len(errors) - 50} more", file=sys.stderr)
    return _fail(f"audit submit: {len(errors)} bad row(s); {what}: fix them and submit again")


def _submit_predictions(args: argparse.Namespace, worklist: Worklist) -> int:
    from noisewise.services.client import ServiceClient, ServiceError

    cli = _cli()
    if not args.url:
        raise cli.UsageError(f"--url: a predictions worklist goes to the running service, e.g. `noisewise audit submit "
                             f"{args.worklist} --url http://127.0.0.1:3000`")
    if not args.annotator.strip():
        raise cli.UsageError("--annotator: give a non-empty name (labels are keyed by prediction and annotator)")
    base = args.url.rstrip("/")
    try:
        client = ServiceClient(base, getattr(args, "api_key", None), timeout=120)
    except ServiceError as err:
        raise cli.UsageError(str(err)) from None
    with client:
        try:
            response = client.post("/model")
        except ServiceError as err:  # refused after the retries, or the key is missing / refused
            raise cli.UsageError(str(err)) from None
        if response.status_code != 200:
            raise cli.UsageError(f"--url: {base}/model answered {response.status_code}: {response.text[:200]}")
        info = response.json()
        class_names = list(info["classes"])
        items, skipped, errors = check_prediction_rows(worklist, class_names)
        if errors:
            return _report_bad_rows(errors, "nothing was sent")
        if not items:
            return _fail(f"audit submit: no trusted_label is filled in ({skipped} rows); nothing was sent")
        results = []
        for start in range(0, len(items), BATCH_ITEMS):
            batch = items[start:start + BATCH_ITEMS]
            body = {"items": [{"prediction_id": it["prediction_id"], "label": it["label"],
                               "annotator": args.annotator, "audited": True} for it in batch]}
            try:  # retried on a reset too: a repeated item comes back as a duplicate
                response = client.post("/feedback", json=body)
            except ServiceError as err:
                return _fail(f"audit submit: {err}; stopped after {start} items: submitting again is safe (stored "
                             "items come back as duplicates)")
            try:
                answer = response.json()
            except ValueError:
                answer = {}
            if "items" not in answer:
                return _fail(f"audit submit: /feedback answered {response.status_code}: {response.text[:300]} "
                             f"(after {start} items; submitting again is safe)")
            for result in answer["items"]:
                item = batch[result["index"]]
                results.append({**item, "outcome": result["outcome"], "status": result["status"],
                                "error": result.get("error")})
    counts = {key: sum(r["outcome"] == key for r in results) for key in ("stored", "duplicate", "rejected")}
    rejected = [r for r in results if r["outcome"] == "rejected"]
    noise, note, recal = _after_submit(info, results)
    payload = {"kind": "predictions", "url": base, "model_name": info["name"], "model_version": info["version"],
               "annotator": args.annotator, "sent": len(items), "skipped_empty": skipped, **counts,
               "rejected_items": [{"where": r["where"], "prediction_id": r["prediction_id"], "status": r["status"],
                                   "error": r["error"]} for r in rejected],
               "noise": noise, "noise_note": note, "recalibrate": recal}
    lines = [(f"sent {len(items)} audited labels to {base} ({info['name']} version {info['version']}, annotator "
             f"{args.annotator!r}): {counts['stored']} stored, {counts['duplicate']} duplicates (already stored), "
             f"{counts['rejected']} rejected; {skipped} rows without a trusted label skipped")]
    for r in rejected[:20]:
        lines.append(f"  {r['where']}: {r['status']} {r['error']}")
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more rejected (see --json)")
    lines += _noise_lines(noise, note)
    if recal is not None:
        lines.append("  " + recal["message"])
    cli._emit(args, payload, "\n".join(lines))
    return 1 if rejected else 0


def _after_submit(info: dict, results: list[dict]) -> tuple[dict | None, str, dict | None]:
    """The noise rate counted on every audited item of the model in the store, and whether recalibration can
    use the audit-rectified threshold on the weights the audited predictions were made with."""
    from noisewise.monitoring.feedback import MIN_AUDITED_FOR_RECTIFIED
    from noisewise.monitoring.store import Store, StoreError

    try:
        store = Store()
    except StoreError as err:
        return None, (f"the store is not readable here ({err}); run `noisewise audit status` where the service "
                      "runs"), None
    try:
        frame = store.feedback_frame(model_name=info["name"])
    finally:
        store.close()
    if len(frame) == 0:
        return None, "the store here holds no feedback of this model: run `noisewise audit status` where it runs", None
    est, note = _audit_estimate(frame, len(info["classes"]))
    sent = {r["prediction_id"] for r in results if r["outcome"] != "rejected"}
    pairs = _audit_pairs(frame)
    weights = pairs.loc[pairs["prediction_id"].isin(sent), "weights"]
    m = int((pairs["weights"] == weights.mode().iloc[0]).sum()) if len(weights) else 0
    if m >= MIN_AUDITED_FOR_RECTIFIED:
        message = (f"`noisewise recalibrate --url URL` now uses the audit-rectified threshold ({m} audited items >= "
                   f"{MIN_AUDITED_FOR_RECTIFIED}): prediction sets valid without any noise model")
    else:
        message = (f"`noisewise recalibrate` uses the audit-rectified threshold from {MIN_AUDITED_FOR_RECTIFIED} "
                   f"audited items on the served weights; {m} so far: audit {MIN_AUDITED_FOR_RECTIFIED - m} more "
                   f"(`noisewise audit plan --n {MIN_AUDITED_FOR_RECTIFIED - m}`)")
    recal = {"n_audited": m, "min_audited": MIN_AUDITED_FOR_RECTIFIED, "rectified": m >= MIN_AUDITED_FOR_RECTIFIED,
             "message": message}
    return (None if est is None else est.to_dict()), note, recal


def _noise_lines(noise: dict | None, note: str) -> list[str]:
    if noise is None:
        return [f"  noise rate: {note}"] if note else []
    lines = [(f"  noise rate counted on {noise['n']} audited items: {noise['flip_rate']:.3f} "
             f"[{noise['lower']:.3f}, {noise['upper']:.3f}] (flip rate: share of ordinary labels that differ from the "
             f"trusted ones; exact {noise['confidence']:.0%} Clopper-Pearson interval; no noise model)")]
    if note:
        lines.append(f"  ({note})")
    return lines


def _submit_calibration(args: argparse.Namespace, worklist: Worklist) -> int:
    import numpy as np

    from noisewise.models import registry
    from noisewise.models.uncertainty.labelnoise import noise_rate_direct

    cli = _cli()
    ref = args.model or worklist.meta.get("model") or args.default_model
    loaded = registry.load_model(ref)
    dataset = registry.training_data(
        loaded, needed_by="audit submit (calibration worklist)",
        alternative=f"calibrate on labelled data you hold (`noisewise calibrate --model {ref} --dataset FILE "
        "--trusted FILE`)")
    names = list(dataset.class_names)
    items, skipped, errors = check_calibration_rows(worklist, names, len(dataset.y), dataset.splits["cal"])
    if errors:
        return _report_bad_rows(errors, "no file was written")
    if not items:
        return _fail(f"audit submit: no trusted_label is filled in ({skipped} rows); no file was written")
    out = args.out or args.worklist.with_name("trusted.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "label"])
        writer.writerows([it["index"], it["label"]] for it in items)
    index = np.array([it["index"] for it in items], dtype=np.int64)
    trusted = np.array([it["label_index"] for it in items], dtype=np.int64)
    est = noise_rate_direct(np.asarray(dataset.y)[index], trusted, len(names))
    command = f"noisewise calibrate --model {ref} --trusted {out}"
    payload = {"kind": "calibration", "model": ref, "model_name": loaded.name, "model_version": loaded.version,
               "trusted_file": str(out), "written": len(items), "skipped_empty": skipped, "noise": est.to_dict(),
               "next": command}
    lines = [(f"wrote {len(items)} trusted labels of calibration items of {loaded.name} version {loaded.version} to "
             f"{out} (index,label); {skipped} rows without a trusted label skipped")]
    lines += _noise_lines(est.to_dict(), "")
    lines.append(f"  next: `{command}` (the audit makes the sets and abstention valid without a noise model)")
    cli._emit(args, payload, "\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from scipy.stats import norm

    from noisewise.models.uncertainty.audit import (
        DEFAULT_PLAN_SIZES,
        audit_plan_table,
        audit_size_for_rate_width,
    )
    from noisewise.monitoring.feedback import MIN_AUDITED_FOR_RECTIFIED
    from noisewise.services import cli_feedback

    cli = _cli()
    loaded = cli_feedback._loaded(args.model)
    names = list(loaded.calibration.class_names)
    k = len(names)
    frame = cli_feedback._open_store().feedback_frame(model_name=loaded.name)
    rows = frame[~frame["is_ood"].astype(bool)]
    audited = rows[rows["audited"].astype(bool)]
    n_ordinary = int(rows.loc[~rows["audited"].astype(bool), "prediction_id"].nunique())
    pairs = _audit_pairs(frame)
    m = len(pairs)
    m_served = int((pairs["weights"].astype(str) == str(loaded.weights)).sum())
    est, note = _audit_estimate(frame, k, confidence=args.confidence) if len(frame) else (None, "no feedback yet")
    per_class = []
    if est is not None and est.per_class is not None:
        per_class = [{**e, "class": names[int(e["class"])]} for e in est.per_class if e["n"] >= MIN_PER_CLASS_ITEMS]
    rate, source = (est.flip_rate, "counted on the audit") if est is not None and math.isfinite(est.flip_rate) \
        else _planning_rate(frame, k, loaded.calibration)
    alpha = float(loaded.calibration.threshold.alpha)
    z = float(norm.ppf(args.confidence))
    sizes = sorted({s for s in (*DEFAULT_PLAN_SIZES, 2 * m, 4 * m) if s > m}) or [2 * m]
    table = audit_plan_table(rate, sizes, confidence=args.confidence, z=z, n=max(n_ordinary, 1), coverage=1 - alpha)
    halve = None
    if est is not None and est.upper - est.lower > 0:
        halve = audit_size_for_rate_width((est.upper - est.lower) / 2, rate, confidence=args.confidence)
    payload = {
        "model_name": loaded.name, "model_version": loaded.version, "n_ordinary": n_ordinary,
        "n_audited_labels": len(audited), "n_audited": int(audited["prediction_id"].nunique()),
        "n_audited_paired": m, "n_audited_served_weights": m_served,
        "noise": None if est is None else est.to_dict(), "noise_note": note, "per_class": per_class,
        "per_class_min_items": MIN_PER_CLASS_ITEMS,
        "rectified": {"min_audited": MIN_AUDITED_FOR_RECTIFIED, "ready": m_served >= MIN_AUDITED_FOR_RECTIFIED,
                      "missing": max(0, MIN_AUDITED_FOR_RECTIFIED - m_served)},
        "plan": {"rate": rate, "rate_source": source, "alpha": alpha, "z": z, "table": table,
                 "items_to_halve_width": halve},
    }
    lines = [(f"{loaded.name} version {loaded.version}: {n_ordinary} predictions with ordinary feedback, "
             f"{payload['n_audited']} audited ({m} of them also carry an ordinary label; {m_served} on the served "
             "weights)")]
    lines += _noise_lines(payload["noise"], note)
    if per_class:
        lines.append(f"  per class (trusted label; classes with >= {MIN_PER_CLASS_ITEMS} audited items, each interval on "
                     "its own):")
        for e in per_class:
            lines.append(f"    {e['class']:>12}: {e['rate']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}] "
                         f"({e['flips']}/{e['n']})")
    elif est is not None:
        lines.append(f"  per-class rates: no class has {MIN_PER_CLASS_ITEMS} audited items yet")
    if payload["rectified"]["ready"]:
        lines.append(f"  `noisewise recalibrate` uses the audit-rectified threshold ({m_served} audited items >= "
                     f"{MIN_AUDITED_FOR_RECTIFIED}): sets valid without a noise model")
    else:
        lines.append(f"  `noisewise recalibrate` needs {MIN_AUDITED_FOR_RECTIFIED} audited items on the served weights "
                     f"for the audit-rectified threshold: {payload['rectified']['missing']} more")
    rate_text = "worst case 0.5" if rate is None else f"{rate:.3f}"
    lines.append(f"  more audit, at the flip rate {rate_text} ({source}); z={z:.3f}, alpha={alpha:g}:")
    lines.append(f"    {'audited':>8}  {'mean interval width':>19}  {'coverage margin':>15}")
    for row in table:
        margin = "n/a" if row["coverage_margin"] is None else f"{row['coverage_margin']:.3f}"
        lines.append(f"    {row['m']:>8}  {row['expected_width']:>19.3f}  {margin:>15}")
    if halve is not None:
        lines.append(f"  halving the interval's width takes about {halve} audited items in all ({max(0, halve - m)} more)")
    cli._emit(args, payload, "\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------------------------------------------


def cmd_size(args: argparse.Namespace) -> int:
    from scipy.stats import norm

    from noisewise.models.uncertainty.audit import (
        DEFAULT_PLAN_SIZES,
        audit_plan_table,
        audit_size_for_coverage_margin,
        audit_size_for_rate_width,
    )
    from noisewise.monitoring.feedback import MIN_AUDITED_FOR_RECTIFIED

    cli = _cli()
    margin = args.alpha / 2 if args.margin is None else args.margin
    z = float(norm.ppf(args.confidence))
    m_width = audit_size_for_rate_width(args.width, args.rate, confidence=args.confidence)
    m_margin = None if args.rate is None else audit_size_for_coverage_margin(margin, args.rate, z,
                                                                            coverage=1 - args.alpha)
    sizes = sorted({*DEFAULT_PLAN_SIZES, m_width, *(() if m_margin is None else (m_margin,))})
    table = audit_plan_table(args.rate, sizes, confidence=args.confidence, z=z, coverage=1 - args.alpha)
    payload = {"width": args.width, "rate": args.rate, "confidence": args.confidence, "alpha": args.alpha,
               "margin": margin, "z": z, "m_for_width": m_width, "m_for_margin": m_margin,
               "min_audited_for_rectified": MIN_AUDITED_FOR_RECTIFIED, "table": table}
    rate_text = "an unknown flip rate (worst case 0.5)" if args.rate is None else f"a flip rate near {args.rate:g}"
    lines = [(f"{m_width} audited items give {rate_text} a {args.confidence:.0%} Clopper-Pearson interval at most "
             f"{args.width:g} wide (exact beta quantiles)")]
    if m_margin is None:
        lines.append("  coverage margin: give --rate (the flip rate you expect) to size it")
    else:
        lines.append(f"{m_margin} audited items keep the audit-rectified threshold's coverage margin "
                     f"z*sqrt(rate/m) = {z:.3f}*sqrt({args.rate:g}/m) under {margin:g}: finite-sample sets sized for "
                     f"coverage up to {1 - args.alpha:g} + {margin:g} (many noisy items assumed)")
    lines.append(f"  `noisewise recalibrate` uses the audit-rectified threshold from {MIN_AUDITED_FOR_RECTIFIED} audited "
                 "items")
    lines.append(f"    {'audited':>8}  {'width at rate':>13}  {'mean width':>10}  {'coverage margin':>15}")
    for row in table:
        m_text = "n/a" if row["coverage_margin"] is None else f"{row['coverage_margin']:.3f}"
        lines.append(f"    {row['m']:>8}  {row['width']:>13.3f}  {row['expected_width']:>10.3f}  {m_text:>15}")
    cli._emit(args, payload, "\n".join(lines))
    return 0

"""The ``noisewise`` command line.

Every command validates its arguments before doing work: a bad argument prints one line
``noisewise: error: ...`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

# Only light modules at the top (models.data needs numpy alone): `noisewise --help` and `--version` must not wait
# seconds for torch, MLflow or BentoML. Each command imports what it needs when it runs.
from noisewise.models.choices import (
    CONFORMAL_MODES,
    CONFORMITY_SCORES,
    NOISE_MODELS,
    OOD_INDEXES,
    OOD_SCORERS,
    RECIPES,
    RISK_CORRECTIONS,
)
from noisewise.models.data import BUILTIN_DATASETS, DataError, parse_noise_spec

EXIT_USAGE = 2
#: a model that cannot be served (refused artifacts): the status of the server's own pre-start check
#: (``noisewise.services.service.EXIT_MODEL``, not imported from there because that module imports BentoML)
EXIT_MODEL = 3


class UsageError(Exception):
    """A user mistake the CLI reports in one line (exit 2)."""


def _quiet_environment() -> None:
    for name in ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK"):
        os.environ.setdefault(name, "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _noise_arg(text: str) -> str:
    try:
        return str(parse_noise_spec(text))
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--noise: ")) from None


def _positive_int(text: str, least: int = 1) -> int:
    kind = "a positive integer" if least == 1 else f"an integer >= {least}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return _positive_int(text, least=0)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="noisewise",
        description="Train, calibrate, serve and monitor classifiers trained on noisy labels. "
        "State lives under $NOISEWISE_HOME (default ./.noisewise); MLFLOW_TRACKING_URI points at another "
        "MLflow store.",
    )
    from noisewise import __version__

    parser.add_argument("--version", action="version", version=f"noisewise {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train a noise-robust recipe, log it to MLflow and optionally register it",
        description="Train a classifier with a noise-robust recipe on a built-in dataset or your own data, "
        "keep the epoch with the best accuracy on the noisy validation split, log params/metrics/model to "
        "MLflow and optionally register it. Clean test accuracy is reported when clean labels are known.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument(
        "--dataset", default="mnist5k",
        help=f"built-in ({', '.join(BUILTIN_DATASETS)}), an .npz with arrays x [N,...], y [N] (optional "
        "class_names, and y_clean [N]: reference labels, -1 where unknown; a partial y_clean is an audit), or a "
        "folder with one sub-folder of PNG/JPEG images per class",
    )
    train.add_argument("--trusted", metavar="FILE", default=None,
                       help="trusted (audited) labels for some items: a CSV with header index,label or an .npz with "
                       "arrays index and label; calibration uses the calibration items among them as an audit")
    train.add_argument(
        "--noise", type=_noise_arg, default="none",
        help="label noise injected into the observed labels: none, symmetric:R, pair:R, instance:R or "
        "confusion:R (human-like: the items a reference model finds most ambiguous move to the class it confuses "
        "them with), R in [0,1) = the fraction of labels moved to another class",
    )
    train.add_argument("--recipe", default="elr", help=f"{', '.join(RECIPES)} or a path to a recipe .yaml")
    train.add_argument("--arch", default="auto", choices=["auto", "mlp", "cnn", "resnet18"],
                       help="network; auto = mlp for grayscale/vectors, cnn for colour images")
    train.add_argument("--epochs", type=_positive_int, default=None, help="override the recipe's epochs")
    train.add_argument("--sam", action="store_true", help="sharpness-aware minimization around the optimizer")
    train.add_argument("--sam-rho", type=float, default=None, help="SAM radius (default: the recipe's, 0.1)")
    train.add_argument("--seed", type=int, default=0, help="seed for splits, noise and training")
    train.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    train.add_argument("--register", metavar="NAME", default=None, help="register the model under NAME")
    train.add_argument("--promote", action="store_true", help="move the alias 'champion' to the new version")
    train.add_argument("--skip-if-registered", action="store_true",
                       help="do nothing when NAME@champion already exists (used by `make run`)")
    train.add_argument("--no-calibrate", action="store_true",
                       help="skip calibration (the version cannot be served until `noisewise calibrate` runs)")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_calibration_options(train)
    train.set_defaults(handler=cmd_train)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit OOD gate, conformal sets and certified abstention; log them as a new model version",
        description="Fit the uncertainty layer of a registered model on its calibration split (or on --dataset): "
        "a KNN (or other) OOD score with a conformal p-value, conformal prediction sets (audit-rectified when "
        "some labels are audited, NACP where uniform noise is known, else split conformal on the observed "
        "labels) and a certified abstention threshold with its risk-coverage frontier. Every guarantee states "
        "its kind: valid, conservative (under a stated noise condition) or none. The result is logged as a NEW "
        "version of the same model with the same weights (versions are immutable; promote it to serve it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    calibrate.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    calibrate.add_argument("--dataset", default=None,
                           help="calibrate on this labelled data instead of the model's own calibration split: an "
                           ".npz (x, y, optional y_clean with -1 where unknown) or an image folder with the model's "
                           "input shape; every item calibrates, and the OOD bank and confidence function of --model "
                           "are kept")
    calibrate.add_argument("--trusted", metavar="FILE", default=None,
                           help="trusted (audited) labels for some items of the data: CSV index,label or .npz; they "
                           "become the audit")
    calibrate.add_argument("--promote", action="store_true", help="move NAME@champion to the new version")
    calibrate.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    _add_calibration_options(calibrate)
    calibrate.set_defaults(handler=cmd_calibrate)

    evaluate = commands.add_parser(
        "evaluate",
        help="coverage, set size, selective risk and OOD AUROC of a calibrated model on test data",
        description="Evaluate a calibrated model on the test split of its dataset, or on every item of --dataset, "
        "and on OOD sets (natural photo patches, another digit source, inverted images), so you can see what the "
        "guarantees mean on your data. Labels: the reference labels (y_clean) where known, else the observed "
        "labels, and the output says which.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    evaluate.add_argument("--dataset", default=None,
                          help="evaluate on every item of this .npz or image folder (same input shape) instead of the "
                          "model's own test split")
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    evaluate.set_defaults(handler=cmd_evaluate)

    serve = commands.add_parser(
        "serve",
        help="serve a registered, calibrated model over HTTP (BentoML) and print a ready-to-paste curl",
        description="Start `bentoml serve noisewise.services.service:Noisewise` for a registered model, wait until it is "
        "ready, then print an example request. Stop it with Ctrl-C. Configuration beyond these options comes "
        "from NOISEWISE_* variables (see services/settings.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--model", default=os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion"),
                       help="NAME@ALIAS or NAME/VERSION")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=_positive_int, default=3000, help="port")
    serve.add_argument("--ready-timeout", type=_positive_int, default=180, help="seconds to wait for /readyz")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="send traffic and feedback to a running service, then monitor and recalibrate: the whole loop",
        description="Send the served model's clean test images and OOD images (natural photo patches, another "
        "digit source) to a running noisewise service in small batches and summarize what came back "
        "(decisions, abstention reasons, set sizes, coverage of the clean labels). Then the feedback loop: "
        "annotators label the predictions (some wrong on purpose, some twice, some audited), the suspected "
        "annotation errors are listed, `noisewise monitor` estimates the noise rate and runs the Evidently "
        "reports, and `noisewise recalibrate` moves the model's alias to a recalibrated version that the "
        "service switches to live. Run it on the machine that serves (it reads the same store and registry).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    demo.add_argument("--model", default=os.environ.get("NOISEWISE_MODEL", "noisewise-demo@champion"),
                      help="the served model (its dataset supplies the test images)")
    demo.add_argument("--n", type=_positive_int, default=300, help="ID test images to send (OOD: a third each)")
    demo.add_argument("--batch", type=_positive_int, default=8, help="inputs per request")
    demo.add_argument("--feedback-noise", type=_unit_interval, default=0.2,
                      help="share of annotator-a's feedback labels made wrong on purpose (to see them flagged)")
    demo.add_argument("--no-feedback", action="store_true",
                      help="only send predictions: no feedback, monitor or recalibration")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    from noisewise.services.client import add_api_key_option

    add_api_key_option(demo)
    demo.set_defaults(handler=cmd_demo)

    from noisewise.services import cli_audit, cli_feedback, cli_import, cli_registry

    cli_feedback.add_parsers(commands, sys.modules[__name__])
    cli_audit.add_parsers(commands, sys.modules[__name__])
    cli_import.add_parsers(commands, sys.modules[__name__])
    cli_registry.add_parsers(commands, sys.modules[__name__])
    return parser


def _rate_arg(text: str):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a flip rate in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a flip rate in [0, 1), got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--noise-rate", type=_rate_arg, default="auto",
                       help="flip rate of the calibration labels (fraction wrong) that you vouch for, or auto (the "
                       "injected rate for synthetic noise, else unknown; with audited items the rate is counted on "
                       "them). A given rate bounds hidden errors in the abstention certificate and, with "
                       "--noise-model uniform, feeds NACP")
    group.add_argument("--noise-model", choices=NOISE_MODELS, default="auto",
                       help="uniform: assert that label noise is uniform and independent of the input, so NACP "
                       "corrects the sets (needs --noise-rate or an audit); auto: NACP only where noise was injected "
                       "symmetrically, else split conformal on the observed labels")
    group.add_argument("--audit", type=int, default=0, metavar="N",
                       help="draw N random calibration items and use their reference labels (y_clean) as an audit. "
                       "Without it, trusted labels the data carries (partial y_clean, --trusted) are the audit. "
                       "An audit makes sets and abstention valid without any noise model")
    group.add_argument("--alpha", type=_unit_interval, default=0.1, help="miscoverage: sets target 1 - alpha")
    group.add_argument("--conformal", choices=CONFORMAL_MODES, default="plugin",
                       help="plugin: coverage >= 1 - alpha on average over calibration draws; finite-sample: with "
                       "probability >= 1 - delta over the draw (larger sets). The same default as `recalibrate`")
    group.add_argument("--delta", type=_unit_interval, default=0.001,
                       help="failure probability of the finite-sample conformal guarantee")
    group.add_argument("--score", choices=sorted(CONFORMITY_SCORES), default="lac",
                       help="conformity score: lac (smallest sets, coverage on target), aps or raps (MAPIE's "
                       "convention: adaptive sets that over-cover by a few points)")
    group.add_argument("--risk", type=_unit_interval, default=0.05, help="selective risk target r* for abstention")
    group.add_argument("--risk-delta", type=_unit_interval, default=0.05,
                       help="probability that the certified threshold's risk exceeds r*")
    group.add_argument("--risk-correction", choices=RISK_CORRECTIONS, default="auto",
                       help="how certified abstention accounts for wrong calibration labels: symmetric (valid for "
                       "symmetric noise), worst-case (every wrong label may hide an error; needs a rate), none "
                       "(observed labels as they are). auto: symmetric when injected symmetrically, worst-case when "
                       "the rate is known or given, else none (and the guarantee says its condition)")
    group.add_argument("--ood-alpha", type=_unit_interval, default=0.05, help="false-OOD rate bound on ID inputs")
    group.add_argument("--ood-scorer", choices=sorted(OOD_SCORERS), default="knn", help="OOD score")
    group.add_argument("--ood-index", choices=OOD_INDEXES, default="auto",
                       help="knn bank: exact (every training row), subsample (a class-stratified 10,000 rows), "
                       "kmeans (10,000 weighted k-means centroids), ivf (every row, filed in about 4 sqrt(n) "
                       "k-means lists; a request scores its nearest lists until they hold 1,250 rows) or auto (exact up to "
                       "10,000 training rows, ivf above), so the cost per request stops growing with the training "
                       "set. The OOD gate is fitted on the served bank's scores, so the false-OOD bound holds "
                       "either way")
    group.add_argument("--calibration-seed", type=int, default=0, help="seed for the audit draw and randomized scores")


def _calibration_settings(args: argparse.Namespace):
    from noisewise.models.calibrate import CalibrationSettings

    settings = CalibrationSettings(
        noise_rate=args.noise_rate, noise_model=args.noise_model, audit=args.audit, alpha=args.alpha, delta=args.delta, conformal=args.conformal,
        risk=args.risk, risk_delta=args.risk_delta, risk_correction=args.risk_correction, ood_alpha=args.ood_alpha,
        ood_scorer=args.ood_scorer, ood_index=args.ood_index, score=args.score, seed=args.calibration_seed,
    )
    settings.check()
    return settings


def _calibrate_and_evaluate(net, dataset, settings, device, base=None):
    """Fit the calibration and evaluate it on the dataset's test split (if any) and the OOD sets."""
    from noisewise.models.calibrate import fit_calibration
    from noisewise.models.evaluation import evaluate
    from noisewise.models.predictor import Predictor

    calibration = fit_calibration(net, dataset, settings, device=device, base=base)
    if len(dataset.splits["test"]) == 0:
        return calibration, {}
    return calibration, evaluate(Predictor(net, calibration, device=device), dataset)


def _calibration_payload(calibration, evaluation: dict) -> dict:
    summary = calibration.summary()
    keep = ("labels", "accuracy", "coverage", "mean_set_size", "target_coverage", "selective_risk",
            "selective_coverage", "risk_target", "ood_auroc", "id_ood_flag_rate", "ece", "aurc", "eaurc",
            "realized_noise_rate")
    return _round_all({
        "calibration": {
            "sets": {k: summary["prediction_set"][k] for k in ("kind", "condition", "method", "score",
                                                                "target_coverage", "q", "eps", "delta", "full_sets")},
            "abstention": {k: summary["abstention"][k] for k in ("kind", "condition", "certified", "risk_target",
                                                                 "delta", "coverage", "risk_ucb", "confidence",
                                                                 "can_certify", "frontier")},
            "ood": summary["ood"],
            "noise": summary["noise"],
            "assumptions": summary["assumptions"],
        },
        "evaluation": {k: evaluation[k] for k in keep if k in evaluation},
    })


def _round_all(value):
    """Round floats for display and turn non-finite ones into null, so --json output is strict JSON."""
    if isinstance(value, dict):
        return {k: _round_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round_all(v) for v in value]
    if isinstance(value, float):
        return _round(value) if math.isfinite(value) else None
    return value


def _calibration_text(calibration, evaluation: dict) -> str:
    s = calibration.summary()
    sets, abst = s["prediction_set"], s["abstention"]
    measured = (f": on the test labels ({evaluation['labels']}) coverage {evaluation['coverage']:.3f}, mean size "
                f"{evaluation['mean_set_size']:.2f}" if evaluation else "")
    lines = [f"  sets: {sets['method']} ({sets['score']}), target coverage {sets['target_coverage']:.2f} "
             f"[{sets['kind']}]{measured}"]
    if abst["certified"]:
        accepted = (f": accepts {evaluation['selective_coverage']:.1%} of the test split with risk "
                    f"{_round(evaluation['selective_risk'])}" if evaluation else "")
        lines.append(f"  abstention: r*={abst['risk_target']} delta={abst['delta']} certified [{abst['kind']}]{accepted}")
    else:
        lines.append(f"  abstention: r*={abst['risk_target']} NOTHING CERTIFIED: the model abstains on every input")
    if abst.get("frontier"):
        lines.append("  certified frontier (risk: coverage; the rows hold together, so each is stricter than the r* "
                     "certificate alone): " + ", ".join(
            f"{row['risk']:g}: {row['coverage']:.2f}" for row in abst["frontier"]))
    if abst.get("can_certify"):
        lines.append(f"  what it can certify: {abst['can_certify']}")
    if evaluation.get("ood_auroc"):
        lines.append(f"  ood: {s['ood']['scorer']} at alpha_ood={s['ood']['alpha_ood']}: AUROC "
                     + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["ood_auroc"].items()))
    lines += [f"  assumes: {a}" for a in s["assumptions"]]
    return "\n".join(lines)


def _stage(report: bool, text: str) -> None:
    """One progress line on stderr, flushed so it reaches a log as it happens."""
    if report:
        print(f"noisewise: {text}", file=sys.stderr, flush=True)


def _log_progress_to_stderr() -> None:
    """Show the INFO lines of training (one per epoch) and calibration (its long steps) on stderr (once,
    however often a process trains)."""
    import logging

    logger = logging.getLogger("noisewise.models")
    if not any(getattr(handler, "noisewise_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)  # flushes after every record
        handler.setFormatter(logging.Formatter("noisewise: %(message)s"))
        handler.noisewise_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def cmd_train(args: argparse.Namespace) -> int:
    from noisewise.models.train import load_recipe

    if args.promote and not args.register:
        raise UsageError("--promote needs --register NAME")
    if args.skip_if_registered and not args.register:
        raise UsageError("--skip-if-registered needs --register NAME")
    if args.sam_rho is not None and args.sam_rho <= 0:
        raise UsageError(f"--sam-rho must be > 0, got {args.sam_rho}")
    recipe = load_recipe(args.recipe, epochs=args.epochs, sam=args.sam or None, sam_rho=args.sam_rho)
    if args.dataset not in BUILTIN_DATASETS and not os.path.exists(args.dataset):
        raise UsageError(f"--dataset: {args.dataset!r} is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                         "and no such file or folder exists")

    from noisewise.models import registry

    if args.skip_if_registered and registry.has_alias(args.register):
        name, version, run_id = registry.resolve_version(args.register)
        _emit(args, {"model_name": name, "model_version": version, "run_id": run_id, "skipped": True},
              f"{name}@{registry.CHAMPION} is already registered (version {version}); not retraining.")
        return 0

    from noisewise.models.data import load_dataset
    from noisewise.models.nets import pick_device
    from noisewise.models.train import train

    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, args.noise, seed=args.seed, trusted=args.trusted)
    if not args.json:
        print(f"dataset {dataset.name}: {len(dataset.x)} items, {dataset.num_classes} classes, noise "
              f"{dataset.noise.spec} (realized flip rate {dataset.noise.realized_rate:.3f}); recipe "
              f"{recipe.name}{' + SAM' if recipe.sam else ''}, {recipe.epochs} epochs on {device}", file=sys.stderr)
    settings = None if args.no_calibrate else _calibration_settings(args)
    report = not args.quiet and not args.json
    on_terminal = sys.stderr.isatty()
    if report and not on_terminal:  # logs and CI: one line per epoch instead of a bar nobody sees redrawn
        _log_progress_to_stderr()
    result = train(dataset, recipe, arch=args.arch, seed=args.seed, device=device, progress=report and on_terminal)
    if settings is not None:
        _stage(report, "calibrating: OOD gate, conformal sets and certified abstention on the calibration split, "
               "then evaluation on the test split and OOD sets")
    started = time.perf_counter()
    calibration, evaluation = (None, {}) if settings is None else _calibrate_and_evaluate(
        result.net, dataset, settings, device)
    if settings is not None:
        _stage(report, f"calibrated and evaluated in {time.perf_counter() - started:.1f} s")
    _stage(report, "logging the run and the model to MLflow")
    spec = registry.spec_from_training(result.net, dataset, recipe, result.arch_kwargs)
    params = {
        **recipe.params(), "arch": result.arch, "seed": args.seed, "dataset": dataset.name,
        "noise": dataset.noise.spec, "noise_convention": "flip", "realized_noise_rate": dataset.noise.realized_rate,
        "data_source": dataset.lineage.get("source"), "data_sha256": dataset.lineage.get("sha256"),
        "n_items": len(dataset.x), "splits": {k: len(v) for k, v in dataset.splits.items()},
    }
    from noisewise.models.evaluation import flat_metrics

    logged = registry.log_training_run(result.net.cpu(), spec, params, result.history,
                                       {**result.metrics, **flat_metrics(evaluation)}, register_as=args.register,
                                       promote=args.promote, calibration=calibration, dataset=dataset)
    m = result.metrics
    payload = {
        "run_id": logged.run_id,
        "model_name": logged.name,
        "model_version": logged.version,
        "promoted": logged.promoted,
        "promotion_refused": list(logged.promotion_refused),
        "dataset": dataset.name,
        "recipe": recipe.name,
        "sam": recipe.sam,
        "arch": result.arch,
        "seed": args.seed,
        "noise": dataset.noise.spec,
        "realized_noise_rate": round(dataset.noise.realized_rate, 4),
        "noise_convention": dataset.noise.convention,
        "best_epoch": m["best_epoch"],
        "val_noisy_accuracy": _round(m["val_noisy_accuracy"]),
        "clean_test_accuracy": _round(m["clean_test_accuracy"]),
        "last_clean_test_accuracy": _round(m["last_clean_test_accuracy"]),
        "train_seconds": round(m["train_seconds"], 2),
        "tracking_uri": registry.tracking_uri(),
        **({} if calibration is None else _calibration_payload(calibration, evaluation)),
    }
    clean = "unknown (no clean labels)" if m["clean_test_accuracy"] is None else f"{m['clean_test_accuracy']:.4f}"
    where = f"registered {logged.name} version {logged.version}" if logged.name else "not registered"
    if logged.promoted:
        where += f" and promoted to {logged.name}@{registry.CHAMPION}"
    where += logged.refusal_note
    _emit(args, payload,
          f"run {logged.run_id}: {where}\n"
          f"  selected epoch {m['best_epoch']}: noisy-val accuracy {m['val_noisy_accuracy']:.4f}, "
          f"clean test accuracy {clean}\n  trained in {m['train_seconds']:.1f} s; MLflow store {registry.tracking_uri()}"
          + ("\n  not calibrated (--no-calibrate)" if calibration is None else "\n" + _calibration_text(calibration, evaluation)))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from noisewise.models import registry
    from noisewise.models.evaluation import flat_metrics
    from noisewise.models.nets import pick_device

    settings = _calibration_settings(args)
    device = pick_device(args.device)
    if not args.json:
        _log_progress_to_stderr()
    source = registry.load_model(args.model, device=device)
    base = reference = None
    if args.dataset is None:
        dataset = registry.training_data(source, needed_by="calibrate", trusted=args.trusted,
                                         alternative="pass --dataset FILE (labelled data with the model's input shape "
                                         "and classes) to calibrate on it")
    else:
        if source.calibration is None:
            raise UsageError(f"--dataset keeps the OOD bank of {args.model}, which has no calibration: calibrate it "
                             "on its own data first")
        dataset = _whole_file(args.dataset, source, split="cal", trusted=args.trusted)
        base = source.calibration
        reference = registry.load_reference(source, test=True)  # keeps the source's example and test sample
    calibration, evaluation = _calibrate_and_evaluate(source.net, dataset, settings, device, base=base)
    params = {**{f"calibration.{k}": v for k, v in settings.__dict__.items()},
              "calibrated_from": f"{source.name}/{source.version}", "source_run_id": source.run_id}
    if args.dataset is not None:
        params.update({"calibration.data_source": dataset.lineage.get("source"),
                       "calibration.data_sha256": dataset.lineage.get("sha256"),
                       "calibration.n_items": len(dataset.x)})
    logged = registry.log_training_run(
        source.net.cpu(), source.spec, params, history=[], metrics=flat_metrics(evaluation), register_as=source.name,
        promote=args.promote, calibration=calibration,
        tags={"noisewise.calibrated_from": f"{source.name}/{source.version}"}, dataset=dataset, reference=reference)
    payload = {"model_name": logged.name, "model_version": logged.version, "calibrated_from": source.version,
               "calibration_data": dataset.name, "n_calibration": int(len(dataset.splits["cal"])),
               "promoted": logged.promoted, "promotion_refused": list(logged.promotion_refused), "run_id": logged.run_id,
               **_calibration_payload(calibration, evaluation)}
    promoted = (f", promoted to {logged.name}@{registry.CHAMPION}" if logged.promoted
                else logged.refusal_note or " (not promoted: use --promote)")
    _emit(args, payload, f"{logged.name} version {logged.version}: calibration of version {source.version} on "
          f"{dataset.name} ({len(dataset.splits['cal'])} calibration items){promoted}\n"
          + _calibration_text(calibration, evaluation))
    return 0


def _whole_file(path: str, loaded, split: str, trusted: str | None = None):
    """A user dataset whose every item lies in ``split`` (calibration or test), checked against the model."""
    import dataclasses

    import numpy as np

    from noisewise.models.data import load_dataset

    dataset = load_dataset(path, "none", seed=0, trusted=trusted)
    if list(dataset.input_shape) != list(loaded.spec.input_shape):
        raise UsageError(f"--dataset: inputs are {dataset.input_shape}, the model takes {tuple(loaded.spec.input_shape)}")
    if list(dataset.class_names) != list(loaded.spec.class_names):
        raise UsageError(f"--dataset: classes {list(dataset.class_names)} differ from the model's "
                         f"{list(loaded.spec.class_names)}")
    empty = np.empty(0, dtype=np.int64)
    splits = {name: empty for name in dataset.splits}
    splits[split] = np.arange(len(dataset.x))
    return dataclasses.replace(dataset, splits=splits)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from noisewise.models import registry
    from noisewise.models.evaluation import evaluate
    from noisewise.models.nets import pick_device
    from noisewise.models.predictor import Predictor

    device = pick_device(args.device)
    loaded = registry.load_model(args.model, device=device)
    if loaded.calibration is None:
        raise UsageError(f"{args.model} has no calibration: run `noisewise calibrate --model {args.model}` first")
    if args.dataset is not None:
        dataset, items = _whole_file(args.dataset, loaded, split="test"), "every item of the file"
    else:
        dataset, items = _stored_test_split(loaded)
    result = evaluate(Predictor(loaded.net, loaded.calibration, device=device), dataset)
    payload = {"model_name": loaded.name, "model_version": loaded.version, "dataset": dataset.name,
               "items": items,
               **_round_all({k: v for k, v in result.items() if k != "assumptions"}),
               "assumptions": result["assumptions"]}
    noise = ("" if result["realized_noise_rate"] is None else
             f", realized noise rate {result['realized_noise_rate']:.3f} (observed labels vs reference labels)")
    _emit(args, payload, f"{loaded.name} version {loaded.version} on {dataset.name} ({payload['items']}, n="
          f"{result['n_test']}; labels: {result['labels']}{noise}): accuracy {result['accuracy']:.3f}\n"
          + _calibration_text(loaded.calibration, result))
    return 0


def _stored_test_split(loaded):
    """``(dataset, description)``: the test sample stored with the version; for a version that stores no
    reference (registered by an older noisewise), the test split of its data on disk."""
    from noisewise.models import registry

    reference = registry.load_reference(loaded, test=True)
    if reference is None:
        dataset = registry.training_data(loaded, needed_by="evaluate", alternative="pass --dataset FILE (an .npz or "
                                         "image folder with the model's input shape and classes) to evaluate on it")
        return dataset, "the test split"
    test = reference.info.get("test", {})
    if reference.test_x is None:
        raise UsageError(f"{loaded.name}/{loaded.version} stores no test sample ({test.get('reason') or 'none was stored'})"
                         ": pass --dataset FILE (an .npz or image folder with the model's input shape and classes) to "
                         "evaluate on it")
    n, total = len(reference.test_x), int(test.get("n_split") or len(reference.test_x))
    items = ("the test split (stored with the version)" if n == total
             else f"a random sample of {n} of the {total} test items (stored with the version)")
    return reference.test_dataset(loaded.spec), items


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def cmd_serve(args: argparse.Namespace) -> int:
    """``bentoml serve`` the model in this very process (exec), with a small forked child that prints the curl
    once the server is ready.

    Nothing heavy is imported here: the model check (which also writes the example request the curl sends) is
    forked here, so that it runs while the server starts, and the server waits for it before its worker
    starts; the worker loads the model once, and no wrapper stays resident beside the server. Being the server, this process gets Ctrl-C and SIGTERM itself and exits with the server's status
    (3 for a model that cannot be served).
    """
    import contextlib

    from noisewise.services import startup_check
    from noisewise.services.settings import ensure_home

    example = ensure_home() / "example-request.json"
    with contextlib.suppress(FileNotFoundError):  # one left by another model must not be sent
        example.unlink()
    env = {**os.environ, "NOISEWISE_MODEL": args.model, "NOISEWISE_EXAMPLE_REQUEST": str(example)}
    command = [sys.executable, "-m", "bentoml", "serve", "noisewise.services.service:Noisewise", "--host", args.host,
               "--port", str(args.port)]
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"noisewise: starting {args.model} on http://{args.host}:{args.port} ...", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.environ.update(env)  # the model check reads the model and the example request's path from it
    startup_check.fork_check_for_exec()  # runs while the server starts; the server waits for it
    env = dict(os.environ)
    server = os.getpid()  # the server's, once exec'd below
    if os.fork() == 0:
        status = 0
        try:
            status = _announce_when_ready(server, base, example, env, args.ready_timeout)
        finally:
            os._exit(status)
    os.execve(sys.executable, command, env)
    return 1  # not reached: execve replaces this process or raises


def _announce_when_ready(server: int, base: str, example: Path, env: dict[str, str], ready_timeout: float) -> int:
    """The forked child of ``noisewise serve``: wait for ``/readyz``, print the curl lines, exit. Quiet when the
    server (its parent) stops first or on Ctrl-C; stops the server past ``ready_timeout`` seconds."""
    import contextlib
    import signal
    import urllib.request

    signal.signal(signal.SIGINT, lambda *_: os._exit(0))  # Ctrl-C reaches the whole group: the server stops
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    deadline = time.monotonic() + ready_timeout
    while True:
        if os.getppid() != server:  # the server exited (it said why): nothing to announce
            return 0
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"noisewise: error: the server did not become ready within {ready_timeout:g} s; stopping it",
                  file=sys.stderr, flush=True)
            os.kill(server, signal.SIGTERM)
            return 0
        time.sleep(0.25)
    from noisewise.services.auth import AuthConfig, auth_from_env
    from noisewise.services.client import API_KEY_ENV, curl_command
    from noisewise.services.settings import SettingsError

    try:  # the keys the server reads from the same environment decide which curl lines need the header
        auth = auth_from_env(env)
    except SettingsError:
        auth = AuthConfig()
    served = env["NOISEWISE_MODEL"]
    request = urllib.request.Request(f"{base}/model")
    if env.get(API_KEY_ENV):
        request.add_header("Authorization", f"Bearer {env[API_KEY_ENV]}")
    # a key that is needed and not at hand: the reference as given
    with contextlib.suppress(OSError, ValueError, KeyError), urllib.request.urlopen(request, timeout=5) as response:
        info = json.loads(response.read())
        served = f"{info['name']} version {info['version']}"
    metrics_key = f"; needs `Authorization: Bearer ${API_KEY_ENV}`" if auth.requires_key("/metrics") else ""
    demo_key = f" with {API_KEY_ENV} set to one of its keys" if auth.enabled else ""
    print(f"\nnoisewise is serving {served} at {base}\n\n"
          f"  try it:   {curl_command(base, '/predict', auth, body=str(example))}\n"
          f"  model:    {curl_command(base, '/model', auth)}\n"
          f"  metrics:  {base}/metrics (Prometheus format; noisewise_* and bentoml_service_* series{metrics_key})\n"
          f"  feedback loop: `noisewise demo --url {base}`{demo_key} in a second shell (traffic, feedback, "
          "suspects, monitor, live recalibration)\n"
          f"  API docs: {base}/docs.json\n\nCtrl-C stops the server.\n", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from noisewise.services.client import ServiceError

    try:
        return _demo(args)
    except ServiceError as err:  # connection, key or 503 after the retries: one line, no traceback
        raise UsageError(str(err)) from None


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from noisewise.models import registry
    from noisewise.models.data import load_ood

    loaded = registry.load_model(args.model)
    class_names, input_shape = list(loaded.spec.class_names), tuple(loaded.spec.input_shape)
    reference = registry.load_reference(loaded, test=True)
    if reference is not None and reference.test_x is not None:
        x_test, y_clean = reference.test_x, reference.test_y_clean
    elif reference is not None:
        raise UsageError(f"demo sends the test inputs stored with {loaded.name}/{loaded.version}, which stores none "
                         f"({reference.info.get('test', {}).get('reason') or 'none was stored'}); serve a version "
                         "trained with a test split")
    else:  # a version registered by an older noisewise: the test split of its data on disk
        dataset = registry.training_data(loaded, needed_by="demo", alternative="serve a version that stores its test "
                                         "sample (train or calibrate it again)")
        x_test, _, y_clean = dataset.split("test")
    if y_clean is not None:  # only items with a reference label can be scored and labelled by the annotators
        known = y_clean >= 0
        x_test, y_clean = (x_test[known], y_clean[known]) if known.any() else (x_test, None)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(x_test), size=min(args.n, len(x_test)), replace=False)
    streams = {"id": (x_test[pick], None if y_clean is None else y_clean[pick])}
    if len(input_shape) == 3:
        for name in ("photos", "other-digits"):
            streams[name] = (load_ood(name, input_shape, n=max(1, args.n // 3), seed=1), None)
    summary: dict = {}
    served_predictions: dict = {}
    from noisewise.services.client import ServiceClient, ServiceError

    with ServiceClient(args.url, getattr(args, "api_key", None), timeout=120) as client:
        try:
            answer = client.post("/model")
        except ServiceError as err:
            hint = "; start the service with `noisewise serve` or `make run`" if err.unreachable else ""
            raise UsageError(f"{err}{hint}") from None
        if answer.status_code != 200:
            raise UsageError(f"{args.url}/model answered {answer.status_code}: {answer.text[:200]}")
        served = answer.json()
        for name, (x, labels) in streams.items():
            predictions = []
            for start in range(0, len(x), args.batch):
                body = {"inputs": [row.ravel().round(4).tolist() for row in x[start : start + args.batch]]}
                response = client.post("/predict", json=body, idempotent=False)  # a repeat would log it twice
                if response.status_code != 200:
                    raise UsageError(f"/predict answered {response.status_code}: {response.text[:200]}")
                predictions += response.json()["predictions"]
            served_predictions[name] = predictions
            names = class_names
            stats = {
                "sent": len(predictions),
                "accepted": sum(p["decision"] == "accept" for p in predictions),
                "abstained_ood": sum(p["reason"] == "ood" for p in predictions),
                "abstained_low_confidence": sum(p["reason"] == "low_confidence" for p in predictions),
                "mean_set_size": float(np.mean([len(p["prediction_set"]) for p in predictions])),
            }
            if labels is not None:
                stats["set_coverage_of_clean_labels"] = float(np.mean(
                    [names[y] in p["prediction_set"] for p, y in zip(predictions, labels)]))
                accepted = [(p, y) for p, y in zip(predictions, labels) if p["decision"] == "accept"]
                stats["accepted_error_rate"] = (float(np.mean([p["label"] != y for p, y in accepted]))
                                                if accepted else None)
            summary[name] = stats
        payload = {"url": args.url, "model": served.get("name"), "version": served.get("version"), "streams": summary}
        lines = [f"demo traffic to {args.url} ({payload['model']} version {payload['version']}):"]
        for name, st in summary.items():
            line = (f"  {name:>12}: {st['sent']} sent, {st['accepted']} accepted, {st['abstained_ood']} abstained "
                    f"(ood), {st['abstained_low_confidence']} abstained (low confidence), mean set size "
                    f"{st['mean_set_size']:.2f}")
            if "set_coverage_of_clean_labels" in st:
                err = st["accepted_error_rate"]
                line += (f", set coverage {st['set_coverage_of_clean_labels']:.3f}, error among accepted "
                         f"{'n/a' if err is None else f'{err:.3f}'}")
            lines.append(line)
        if not args.no_feedback and y_clean is not None:
            feedback_payload, feedback_lines = _demo_feedback(args, client, loaded, served_predictions,
                                                              streams["id"][1], class_names, rng)
            payload["feedback"] = feedback_payload
            lines += feedback_lines
    _emit(args, payload, "\n".join(lines))
    return 0


def _demo_feedback(args, client, loaded, served_predictions: dict, y_clean, class_names, rng) -> tuple[dict, list]:
    """The feedback loop of the demo: annotators label the in-distribution predictions (annotator-a all of
    them, with ``--feedback-noise`` symmetric errors at known positions; annotator-b a third, independently
    noisy; an auditor a fifth, correctly, marked audited) and the OOD ones (random labels); then the suspects,
    the monitor (noise rate, coverage, Evidently reports) and a recalibration that the service picks up live."""
    import numpy as np

    from noisewise.services import cli_feedback

    k = len(class_names)
    ids = [p["id"] for p in served_predictions["id"]]
    n = len(ids)

    def noisy(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flip = rng.random(len(labels)) < args.feedback_noise
        shifted = (labels + rng.integers(1, k, size=len(labels))) % k  # a different class, uniformly
        return np.where(flip, shifted, labels), flip

    labels_a, flipped_a = noisy(y_clean)
    second = rng.choice(n, size=n // 3, replace=False)
    labels_b, _ = noisy(y_clean[second])
    audited = rng.choice(n, size=max(1, n // 5), replace=False)
    items = [{"prediction_id": ids[i], "label": class_names[labels_a[i]], "annotator": "annotator-a"} for i in range(n)]
    items += [{"prediction_id": ids[i], "label": class_names[lb], "annotator": "annotator-b"}
              for i, lb in zip(second, labels_b)]
    items += [{"prediction_id": ids[i], "label": class_names[y_clean[i]], "annotator": "auditor", "audited": True}
              for i in audited]
    ood_ids = [p["id"] for name, preds in served_predictions.items() if name != "id" for p in preds]
    items += [{"prediction_id": pid, "label": class_names[int(rng.integers(k))], "annotator": "annotator-a"}
              for pid in ood_ids[: max(1, len(ood_ids) // 4)]]
    counts = {"stored": 0, "duplicates": 0, "rejected": 0}
    for start in range(0, len(items), 200):
        response = client.post("/feedback", json={"items": items[start:start + 200]})
        if response.status_code not in (200, 207):
            raise UsageError(f"/feedback answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        for key in counts:
            counts[key] += body[key]
    flagged = client.post("/suspects", json={"limit": 10_000}).json()
    flagged_a = {s["prediction_id"] for s in flagged["suspects"] if s["annotator"] == "annotator-a"}
    true_flips = {ids[i] for i in np.flatnonzero(flipped_a)}
    hits = len(flagged_a & true_flips)
    quality = {"suspects_annotator_a": len(flagged_a), "injected_errors_annotator_a": len(true_flips),
               "precision": hits / len(flagged_a) if flagged_a else None,
               "recall": hits / len(true_flips) if true_flips else None}
    lines = [f"feedback: {len(items)} labels sent ({n} by annotator-a with {len(true_flips)} injected errors, "
             f"{len(second)} by annotator-b, {len(audited)} audited, {len(items) - n - len(second) - len(audited)} on "
             f"OOD inputs): {counts['stored']} stored, {counts['duplicates']} duplicates, {counts['rejected']} rejected",
             f"suspects (POST /suspects, `noisewise flags`): {flagged['n_suspects']} flagged; annotator-a: "
             f"{len(flagged_a)} flagged, precision {_pct(quality['precision'])}, recall {_pct(quality['recall'])} "
             "against the injected errors"]
    for s in flagged["suspects"][:5]:
        lines.append(f"    {s['prediction_id']}  label {s['label']!r} -> proposed {s['proposed']!r} "
                     f"(quality {s['quality']:.3f}, {s['annotator'] or 'anonymous'})")

    from noisewise.models.registry import home_dir
    from noisewise.monitoring.monitor import run_monitor

    store = cli_feedback._open_store()
    workspace = home_dir() / "evidently"
    report = run_monitor(store, loaded, workspace)
    lines.append("monitor (`noisewise monitor`):")
    lines += ["  " + line for line in cli_feedback._monitor_text(report, workspace).splitlines()[1:]]

    recal_args = argparse.Namespace(model=args.model, window=None, min_items=None, no_promote=False, url=args.url,
                                    conformal="finite-sample", noise_rate=None, assume_uniform_noise=False,
                                    json=True, api_key=getattr(args, "api_key", None))
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_feedback.cmd_recalibrate(recal_args)
    if status == 0:
        recal = json.loads(out.getvalue())
        model = client.post("/model").json()
        live = model["calibration"]["prediction_set"]
        # with a few dozen audited items the plug-in threshold can miss by several points on one draw, so the
        # demo asks for the calibration-conditional form
        lines.append(f"recalibrate (`noisewise recalibrate --conformal finite-sample --url {args.url}`): "
                     f"{recal['method']} threshold [{recal['guarantee_kind']}] on "
                     f"{recal['n']} feedback labels, q {recal['previous_threshold']['q']:.4f} -> "
                     f"{recal['threshold']['q']:.4f}; version {recal['model_version']} registered; the service now "
                     f"serves version {model['version']} (q {live['q']:.4f}, method {live['method']}) without a restart")
    else:
        recal = {"refused": err.getvalue().strip()}
        lines.append(f"recalibrate: {err.getvalue().strip()}")
    lines.append(f"dashboards: Prometheus metrics at {args.url}/metrics (monitoring/README.md sets up Prometheus and "
                 "Grafana)")
    return ({"counts": counts, "suspects": {"n": flagged["n_suspects"], **quality}, "monitor": report,
             "recalibration": recal}, lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(_round_all(payload), allow_nan=False) if getattr(args, "json", False) else text)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, DataError, ValueError, *_loaded_user_errors()) as err:
        print(f"noisewise: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _loaded_user_errors() -> tuple[type[Exception], ...]:
    """The registry's and calibration's user-error classes, from the modules a command has already imported:
    a module that was never imported cannot have raised its error, and importing it here would cost seconds."""
    errors = []
    for module, name in (("noisewise.models.registry", "RegistryError"),
                         ("noisewise.models.calibrate", "CalibrationError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())

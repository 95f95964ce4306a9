"""The ``noisewise`` command line.

Every command validates its arguments before doing work: a bad argument prints one line
``noisewise: error: ...`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from models.data import BUILTIN_DATASETS, DataError, parse_noise_spec
from models.registry import RegistryError
from models.train import RECIPES

EXIT_USAGE = 2


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
        "class_names, y_clean), or a folder with one sub-folder of PNG/JPEG images per class",
    )
    train.add_argument(
        "--noise", type=_noise_arg, default="none",
        help="label noise injected into the observed labels: none, symmetric:R, pair:R or instance:R, R in "
        "[0,1) = the fraction of labels moved to another class",
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
    train.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import load_recipe

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

    from models import registry

    if args.skip_if_registered and registry.has_alias(args.register):
        name, version, run_id = registry.resolve_version(args.register)
        _emit(args, {"model_name": name, "model_version": version, "run_id": run_id, "skipped": True},
              f"{name}@{registry.CHAMPION} is already registered (version {version}); not retraining.")
        return 0

    from models.data import load_dataset
    from models.nets import pick_device
    from models.train import train

    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, args.noise, seed=args.seed)
    if not args.json:
        print(f"dataset {dataset.name}: {len(dataset.x)} items, {dataset.num_classes} classes, noise "
              f"{dataset.noise.spec} (realized flip rate {dataset.noise.realized_rate:.3f}); recipe "
              f"{recipe.name}{' + SAM' if recipe.sam else ''}, {recipe.epochs} epochs on {device}", file=sys.stderr)
    result = train(dataset, recipe, arch=args.arch, seed=args.seed, device=device,
                   progress=not args.quiet and sys.stderr.isatty())
    spec = registry.spec_from_training(result.net, dataset, recipe, result.arch_kwargs)
    params = {
        **recipe.params(), "arch": result.arch, "seed": args.seed, "dataset": dataset.name,
        "noise": dataset.noise.spec, "noise_convention": "flip", "realized_noise_rate": dataset.noise.realized_rate,
        "data_source": dataset.lineage.get("source"), "data_sha256": dataset.lineage.get("sha256"),
        "n_items": len(dataset.x), "splits": {k: len(v) for k, v in dataset.splits.items()},
    }
    logged = registry.log_training_run(result.net.cpu(), spec, params, result.history, result.metrics,
                                       register_as=args.register, promote=args.promote)
    m = result.metrics
    payload = {
        "run_id": logged.run_id,
        "model_name": logged.name,
        "model_version": logged.version,
        "promoted": logged.promoted,
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
    }
    clean = "unknown (no clean labels)" if m["clean_test_accuracy"] is None else f"{m['clean_test_accuracy']:.4f}"
    where = f"registered {logged.name} version {logged.version}" if logged.name else "not registered"
    if logged.promoted:
        where += f" and promoted to {logged.name}@{registry.CHAMPION}"
    _emit(args, payload,
          f"run {logged.run_id}: {where}\n"
          f"  selected epoch {m['best_epoch']}: noisy-val accuracy {m['val_noisy_accuracy']:.4f}, "
          f"clean test accuracy {clean}\n  trained in {m['train_seconds']:.1f} s; MLflow store {registry.tracking_uri()}")
    return 0


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload) if getattr(args, "json", False) else text)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, DataError, RegistryError, ValueError) as err:
        print(f"noisewise: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""``noisewise import``: register a model that noisewise did not train, calibrated on your data.

The model (a TorchScript archive, a ``torch.export`` program, or a torchvision/timm architecture with safetensors
weights: ``noisewise.models.imported``) is wrapped with its input preprocessing, calibrated on the dataset's
splits exactly as ``noisewise train`` calibrates its own networks (OOD bank from the train split, confidence
function tuned on val, conformal threshold and certified abstention on cal, evaluation on test) and logged as a
version that serves, recalibrates and monitors like any other. The original archive is stored in the version
with its sha256, checked whenever the version is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys

#: Said with every imported model's calibration: noisewise cannot check how the model was trained.
NOT_TRAINED_ON_CAL = ("imported model: assumed not trained on the calibration and test items of the dataset (noisewise "
                      "did not train it and cannot check; a model that saw them is over-confident on them and the "
                      "guarantees do not hold)")


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (or D for vectors), got {text!r}") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (or D for vectors) with positive sizes, got {text!r}")
    return shape


def _floats_arg(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (one per channel), got {text!r}") from None


def add_parsers(commands, common) -> None:
    """Register ``import``; ``common`` is noisewise.services.cli (its argument types and helpers)."""
    from noisewise.models.data import BUILTIN_DATASETS
    from noisewise.models.choices import LOGITS_SCORERS

    parser = commands.add_parser(
        "import",
        help="register a model noisewise did not train (TorchScript, torch.export .pt2, torchvision/timm + "
        "safetensors), calibrated on your data",
        description="Register a model trained elsewhere and make it servable like any version: it is calibrated on "
        "--dataset exactly as `noisewise train` calibrates (OOD bank from the train split, confidence tuned on val, "
        "sets and certified abstention on cal, evaluation on test). MODEL is a TorchScript archive (torch.jit.save; "
        "with @torch.jit.export methods forward_features(x) -> features [N, D] and forward_head(features) -> logits "
        "it gives features, so KNN/Mahalanobis/ViM OOD scores work; otherwise it is logits-only) or a torch.export "
        "program (.pt2, torch.export.save; logits-only). Or --arch torchvision:resnet18 / timm:NAME with --weights "
        "FILE.safetensors (optional extras: pip install 'noisewise[torchvision]' or 'noisewise[timm]'). Pickle files "
        "(torch.save .pt/.pth, .pkl) are refused: loading them runs arbitrary code. The version takes inputs shaped "
        "like the dataset's items in [0, 1]; --input-shape/--resize/--mean/--std say how they become what the "
        "network takes, and are stored with the version. The model must not have been trained on the calibration "
        "or test items of --dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="MODEL", default=None,
                        help="a TorchScript archive or a .pt2 torch.export program (or use --arch with --weights)")
    parser.add_argument("--arch", default=None, help="a known architecture instead of MODEL: torchvision:NAME (ResNet "
                        "family) or timm:NAME")
    parser.add_argument("--weights", default=None, metavar="FILE", help="weights for --arch, a .safetensors file")
    parser.add_argument("--dataset", required=True,
                        help=f"built-in ({', '.join(BUILTIN_DATASETS)}), an .npz (x, y, optional class_names and "
                        "y_clean) or an image folder: split into train/val/cal/test as for training")
    parser.add_argument("--trusted", metavar="FILE", default=None,
                        help="trusted (audited) labels for some items: CSV index,label or .npz; the calibration items "
                        "among them are an audit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/cal/test split")
    parser.add_argument("--register", metavar="NAME", required=True, help="register the model under NAME")
    parser.add_argument("--promote", action="store_true", help="move the alias 'champion' to the new version")
    group = parser.add_argument_group("input preprocessing (stored with the version)")
    group.add_argument("--input-shape", type=_shape_arg, default=None, metavar="C,H,W",
                       help="what the network takes (default: the dataset's item shape; for torchvision/timm the "
                       "architecture's channels); grey <-> RGB and the size are converted")
    group.add_argument("--resize", type=common._positive_int, default=None, metavar="S",
                       help="resize the shorter side to S, then center-crop H x W (torchvision's Resize + CenterCrop); "
                       "default: resize straight to H x W when the sizes differ")
    group.add_argument("--mean", type=_floats_arg, default=None, metavar="M[,M,M]",
                       help="per-channel mean subtracted after the resize (default: none for archives, ImageNet's for "
                       "torchvision, the model's own for timm)")
    group.add_argument("--std", type=_floats_arg, default=None, metavar="S[,S,S]",
                       help="per-channel std divided by after the mean (defaults as for --mean)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    common._add_calibration_options(parser)
    for action in parser._actions:  # a logits-only model cannot use the feature scorers: "auto" picks for it
        if action.dest == "ood_scorer":
            action.choices = ["auto", *action.choices]
            action.default = "auto"
            action.help = (f"OOD score; auto: knn when the model gives features, energy when it is logits-only (then "
                           f"only {', '.join(LOGITS_SCORERS)})")
    parser.set_defaults(handler=lambda args: cmd_import(args, common))


def cmd_import(args: argparse.Namespace, common) -> int:
    import torch

    from noisewise.models import imported, registry
    from noisewise.models.data import BUILTIN_DATASETS, load_dataset
    from noisewise.models.evaluation import flat_metrics
    from noisewise.models.nets import pick_device

    if args.dataset not in BUILTIN_DATASETS and not os.path.exists(args.dataset):
        raise common.UsageError(f"--dataset: {args.dataset!r} is not a built-in dataset "
                                f"({', '.join(BUILTIN_DATASETS)}) and no such file or folder exists")
    try:
        # the file and the optional extra are checked before any data is read
        source = imported.check_source(args.model, arch=args.arch, weights=args.weights)
    except imported.ImportedModelError as err:
        raise common.UsageError(str(err)) from None
    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, "none", seed=args.seed, trusted=args.trusted)
    probe = torch.as_tensor(dataset.split("train")[0][:4])
    try:
        net = imported.import_model(source, dataset.input_shape, dataset.num_classes, network_shape=args.input_shape,
                                    resize=args.resize, mean=args.mean, std=args.std, probe=probe)
    except imported.ImportedModelError as err:
        raise common.UsageError(f"{source.path.name}: {err}") from None
    if args.ood_scorer == "auto":
        args.ood_scorer = "energy" if net.logits_only else "knn"
    settings = common._calibration_settings(args)
    if not args.json:
        print(f"importing {source.path.name} ({source.arch}, "
              f"{'logits-only' if net.logits_only else 'features + head'}) on {dataset.name}: {len(dataset.x)} items, "
              f"{dataset.num_classes} classes; input {net.preprocess.describe(dataset.input_shape)}", file=sys.stderr)
    calibration, evaluation = common._calibrate_and_evaluate(net, dataset, settings, device)
    calibration.assumptions.append(NOT_TRAINED_ON_CAL)
    arch_kwargs = {**net.arch_kwargs(), "imported_from": {"file": source.path.name, "sha256": source.sha256}}
    spec = registry.ModelSpec(
        arch=source.arch, input_shape=list(dataset.input_shape), class_names=list(dataset.class_names),
        arch_kwargs=arch_kwargs, preprocess=net.preprocess.to_dict(),
        lineage={**dataset.lineage, "dataset": dataset.name, "realized_noise_rate": dataset.noise.realized_rate},
        recipe={"name": "imported", "source": source.path.name},
    )
    params = {"imported_from": source.path.name, "source_sha256": source.sha256, "arch": source.arch,
              "logits_only": net.logits_only, "preprocess": spec.preprocess, "dataset": dataset.name,
              "seed": args.seed, "data_source": dataset.lineage.get("source"),
              "data_sha256": dataset.lineage.get("sha256"), "n_items": len(dataset.x),
              "splits": {k: len(v) for k, v in dataset.splits.items()},
              **{f"calibration.{k}": v for k, v in settings.__dict__.items()}}
    logged = registry.log_training_run(net.cpu(), spec, params, history=[], metrics=flat_metrics(evaluation),
                                       register_as=args.register, promote=args.promote, calibration=calibration,
                                       tags={"noisewise.imported": source.arch}, dataset=dataset)
    head = net.linear_head() is not None
    features = ("none: logits-only (forward_features returns the logits, OOD scores read the logits only)"
                if net.logits_only else "forward_features/forward_head" + (" (linear head)" if head else ""))
    payload = {
        "run_id": logged.run_id, "model_name": logged.name, "model_version": logged.version,
        "promoted": logged.promoted, "promotion_refused": list(logged.promotion_refused), "arch": source.arch,
        "imported_from": source.path.name,
        "source_sha256": source.sha256, "logits_only": net.logits_only, "features": features,
        "input": {"shape": list(dataset.input_shape), "range": [0.0, 1.0], "preprocess": spec.preprocess,
                  "described": net.preprocess.describe(dataset.input_shape)},
        "dataset": dataset.name, "seed": args.seed, "tracking_uri": registry.tracking_uri(),
        **common._calibration_payload(calibration, evaluation),
    }
    where = f"registered {logged.name} version {logged.version}"
    if logged.promoted:
        where += f" and promoted to {logged.name}@{registry.CHAMPION}"
    where += logged.refusal_note
    accuracy = evaluation.get("accuracy")
    measured = "" if accuracy is None else f"; test accuracy {accuracy:.4f} ({evaluation.get('labels')} labels)"
    common._emit(args, payload,
                 f"run {logged.run_id}: imported {source.path.name} ({source.arch}), {where}\n"
                 f"  features: {features}\n  input: {net.preprocess.describe(dataset.input_shape)}{measured}\n"
                 + common._calibration_text(calibration, evaluation))
    return 0


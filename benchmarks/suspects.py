"""Suspected annotation errors: noisewise's streaming rule against cleanlab's find_label_issues.

Writes docs/suspects.md and prints it (with --json, prints every number as JSON instead).

    nice -n 5 .venv/bin/python benchmarks/suspects.py            # the table in docs/ (~5 min, 2 busy cores)
    .venv/bin/python benchmarks/suspects.py --quick              # smoke run: 2 seeds, 3 epochs, /tmp output

Per seed s (default 0..9):

* data: ``load_dataset("mnist5k", "symmetric:0.2", seed=s)``: 20% of the labels of every split
  moved to another class uniformly at random (flip convention), positions known from
  ``y != y_clean``;
* model: the repo's MLP trained with the ``elr`` recipe (``--epochs``, default the recipe's 60,
  cosine schedule over those) on the noisy train split, checkpoint picked on the noisy val
  split; never trained on val or test;
* thresholds: ``per_class_thresholds`` of the calibration split's probabilities and noisy
  labels, as ``noisewise.models.calibrate.fit_calibration`` stores them (``Calibration.cl_thresholds``);
* feedback stream: the val + test splits (1250 items) with their noisy labels and the float32
  softmax the service would have stored; the flips among them are the errors to find.

Methods, all on the same probabilities:

* ``ours``: ``noisewise.monitoring.feedback.score_feedback(...).suspect``, the O(K) per-item rule applied
  at ingestion with the calibration thresholds (each item judged alone);
* ``cleanlab``: ``cleanlab.filter.find_label_issues(labels, probs)`` with its defaults
  (``filter_by="prune_by_noise_rate"``) over the whole feedback batch (the issue's reference);
* ``cleanlab-cl``: the same with ``filter_by="confident_learning"`` (the off-diagonal of the
  confident joint with thresholds fitted on the feedback batch itself).

Criterion: recall(ours) >= 0.8 recall(cleanlab) at equal or better precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402

import numpy as np
import torch

from noisewise.models.uncertainty.labelnoise import per_class_thresholds
from noisewise.monitoring.feedback import batch_label_issues, score_feedback

ROOT = Path(__file__).resolve().parents[1]
NOISE = "symmetric:0.2"
DEFAULT_SEEDS = tuple(range(10))
DEFAULT_EPOCHS = 60  # the elr recipe's own
CACHE_DIR = Path("/tmp/noisewise-suspects-cache")
METHODS = ("ours", "cleanlab", "cleanlab-cl")


def seed_probs(seed: int, epochs: int, cache_dir: Path | None) -> dict:
    """Train on mnist5k with injected noise; float32 probabilities of the cal, val and test splits."""
    from noisewise.models.data import load_dataset
    from noisewise.models.train import load_recipe, predict_logits, train

    ds = load_dataset("mnist5k", NOISE, seed=seed)
    cache = None if cache_dir is None else cache_dir / f"mnist5k-{NOISE.replace(':', '')}-elr-seed{seed}-epochs{epochs}.npz"
    out: dict = {"k": ds.num_classes}
    for split in ("cal", "val", "test"):
        _, y, y_clean = ds.split(split)
        out[split] = {"y": y, "y_clean": y_clean}
    if cache is not None and cache.exists():
        stored = np.load(cache)
        for split in ("cal", "val", "test"):
            out[split]["probs"] = stored[split]
        out["info"] = {**json.loads(str(stored["info"])), "cached": str(cache)}
        return out
    started = time.perf_counter()
    result = train(ds, load_recipe("elr", epochs=epochs), seed=seed, progress=False)
    for split in ("cal", "val", "test"):
        x, _, _ = ds.split(split)
        logits = predict_logits(result.net, torch.as_tensor(x)).float().cpu()
        out[split]["probs"] = torch.softmax(logits, dim=1).numpy()  # the service stores float32
    out["info"] = {"train_seconds": time.perf_counter() - started, "epochs": epochs,
                   "clean_test_accuracy": float(result.metrics["clean_test_accuracy"])}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **{s: out[s]["probs"] for s in ("cal", "val", "test")}, info=json.dumps(out["info"]))
    return out


def precision_recall(flagged: np.ndarray, errors: np.ndarray) -> dict:
    tp = int(np.sum(flagged & errors))
    n_flagged, n_errors = int(flagged.sum()), int(errors.sum())
    return {"flagged": n_flagged, "true_positives": tp,
            "precision": tp / n_flagged if n_flagged else float("nan"),
            "recall": tp / n_errors if n_errors else float("nan")}


def run_seed(seed: int, epochs: int, cache_dir: Path | None) -> dict:
    data = seed_probs(seed, epochs, cache_dir)
    k = data["k"]
    thresholds = per_class_thresholds(data["cal"]["probs"].astype(np.float64), data["cal"]["y"], k)
    probs = np.concatenate([data["val"]["probs"], data["test"]["probs"]])
    labels = np.concatenate([data["val"]["y"], data["test"]["y"]])
    clean = np.concatenate([data["val"]["y_clean"], data["test"]["y_clean"]])
    errors = labels != clean
    flags = {
        "ours": score_feedback(probs, labels, thresholds).suspect,
        "cleanlab": batch_label_issues(probs, labels),
        "cleanlab-cl": batch_label_issues(probs, labels, filter_by="confident_learning"),
    }
    return {
        "seed": seed, "n_feedback": len(labels), "n_errors": int(errors.sum()),
        "realized_flip_rate": float(errors.mean()),
        "model_accuracy_clean": float(np.mean(probs.argmax(1) == clean)),
        "info": data["info"],
        "methods": {name: precision_recall(np.asarray(f, bool), errors) for name, f in flags.items()},
    }


def summarize(per_seed: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        a = np.asarray(values, dtype=float)
        return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0}

    table = {m: {key: stat([r["methods"][m][key] for r in per_seed]) for key in ("precision", "recall", "flagged")}
             for m in METHODS}
    ratio = [r["methods"]["ours"]["recall"] / r["methods"]["cleanlab"]["recall"] for r in per_seed]
    prec_diff = [r["methods"]["ours"]["precision"] - r["methods"]["cleanlab"]["precision"] for r in per_seed]
    per_seed_ok = [q >= 0.8 and d >= 0.0 for q, d in zip(ratio, prec_diff)]
    mean_ratio = stat(ratio)["mean"]
    mean_prec_diff = stat(prec_diff)["mean"]
    return {
        "table": table,
        "recall_ratio": {**stat(ratio), "per_seed": ratio},
        "precision_difference": {**stat(prec_diff), "per_seed": prec_diff},
        "criterion": {
            "rule": "recall(ours) / recall(cleanlab) >= 0.8 and precision(ours) >= precision(cleanlab)",
            "holds_on_means": bool(mean_ratio >= 0.8 and mean_prec_diff >= 0.0),
            "holds_per_seed": per_seed_ok,
        },
    }


def run_benchmark(seeds: tuple[int, ...] = DEFAULT_SEEDS, epochs: int = DEFAULT_EPOCHS,
                  cache_dir: Path | None = CACHE_DIR) -> dict:
    started = time.perf_counter()
    per_seed = [run_seed(s, epochs, cache_dir) for s in seeds]
    import cleanlab

    return {
        "meta": {"noise": NOISE, "seeds": list(seeds), "epochs": epochs, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                 "machine": machine(), "wall_seconds": time.perf_counter() - started,
                 "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                              "cleanlab": cleanlab.__version__}},
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores (shared), CPU only"


def _pm(s: dict, pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    return f"{s['mean'] * f:.1f} ± {s['sd'] * f:.1f}" if pct else f"{s['mean']:.1f} ± {s['sd']:.1f}"


def render_markdown(report: dict, command: str) -> str:
    meta, summary, rows = report["meta"], report["summary"], report["per_seed"]
    v = meta["versions"]
    crit = summary["criterion"]
    ratio, diff = summary["recall_ratio"], summary["precision_difference"]
    n_seeds = len(rows)
    lines = [
        "# Suspected annotation errors: streaming rule vs cleanlab",
        "",
        f"Command: `{command}`  ",
        f"Machine: {meta['machine']}; Python {v['python']}, numpy {v['numpy']}, torch {v['torch']}, "
        f"cleanlab {v['cleanlab']}.  ",
        f"Date: {meta['date']}. Wall time: {meta['wall_seconds'] / 60:.1f} min ({n_seeds} seeds"
        + (", probabilities from the cache" if any("cached" in r["info"] for r in rows) else "") + ").",
        "",
        "## Setup",
        "",
        f"* Data: `load_dataset(\"mnist5k\", \"{meta['noise']}\", seed=s)` for s in {meta['seeds']}: 20% of the "
        "labels of every split moved to another class uniformly at random; the flips are known (`y != y_clean`).",
        f"* Model: the repo's MLP, recipe `elr` for {meta['epochs']} epochs (cosine schedule over those), trained on "
        "the noisy train split, checkpoint chosen on noisy val accuracy; one model per seed.",
        "* Thresholds: `per_class_thresholds` on the calibration split (noisy labels), as the Calibration stores them.",
        "* Feedback: the val + test splits (1250 items per seed) with their noisy labels and the float32 softmax "
        "the service stores. Errors to find = the injected flips among them. The val split chose the checkpoint "
        "but was never trained on, so its probabilities are out of sample.",
        "* `ours` = `score_feedback(probs, labels, cl_thresholds).suspect` (per item, at ingestion); "
        "`cleanlab` = `cleanlab.filter.find_label_issues(labels, probs)` with its defaults "
        "(`prune_by_noise_rate`, over the whole batch); `cleanlab-cl` = the same with "
        "`filter_by=\"confident_learning\"`.",
        "",
        f"## Results (mean ± sd over {n_seeds} seeds, %)",
        "",
        "| method | precision | recall | items flagged |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        t = summary["table"][m]
        lines.append(f"| {m} | {_pm(t['precision'])} | {_pm(t['recall'])} | {_pm(t['flagged'], pct=False)} |")
    lines += [
        "",
        f"recall(ours) / recall(cleanlab) = **{ratio['mean']:.3f} ± {ratio['sd']:.3f}** "
        f"(per seed: {', '.join(f'{r:.3f}' for r in ratio['per_seed'])}); "
        f"precision(ours) - precision(cleanlab) = **{diff['mean'] * 100:+.1f} ± {diff['sd'] * 100:.1f} points** "
        f"(per seed: {', '.join(f'{d * 100:+.1f}' for d in diff['per_seed'])}).",
        "",
        f"Criterion, recall ratio >= 0.8 at equal or better precision: "
        f"**{'holds' if crit['holds_on_means'] else 'does NOT hold'}** on the means; per seed: "
        f"{sum(crit['holds_per_seed'])}/{n_seeds} seeds.",
        "",
        "### Per seed",
        "",
        "| seed | errors / feedback | model acc. (clean) | " + " | ".join(f"{m} P / R" for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for r in rows:
        cells = [f"{r['methods'][m]['precision'] * 100:.1f} / {r['methods'][m]['recall'] * 100:.1f}" for m in METHODS]
        lines.append(f"| {r['seed']} | {r['n_errors']} / {r['n_feedback']} | {r['model_accuracy_clean'] * 100:.1f}% | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Interpretation", "", *interpretation(report), ""]
    return "\n".join(lines)


def interpretation(report: dict) -> list[str]:
    s = report["summary"]
    t = s["table"]
    ours, cl = t["ours"], t["cleanlab"]
    better_p = ours["precision"]["mean"] >= cl["precision"]["mean"]
    acc = float(np.mean([r["model_accuracy_clean"] for r in report["per_seed"]]))
    return [
        f"* The per-item rule finds {ours['recall']['mean'] * 100:.0f}% of the injected errors at "
        f"{ours['precision']['mean'] * 100:.0f}% precision; cleanlab's batch filter finds "
        f"{cl['recall']['mean'] * 100:.0f}% at {cl['precision']['mean'] * 100:.0f}%. "
        + ("Ours flags with equal or better precision. " if better_p else "Ours flags with LOWER precision. ")
        + f"The recall ratio is {s['recall_ratio']['mean']:.2f} (criterion: >= 0.8).",
        "* Why they differ: the rule flags a label only when another class reaches its calibration threshold AND is "
        "more probable than the given label, item by item (every flag is off-diagonal in cleanlab's confident joint, "
        "see `suspect_mask`); cleanlab first estimates how many errors each (given, true) cell holds from the whole "
        "batch, then keeps that many items per cell ranked by margin, so it can drop borderline items the "
        "per-item rule keeps, or keep items the rule spares.",
        "* What the criterion buys: the service scores each feedback item at ingestion in O(K), with no batch and "
        "no refit; cleanlab's batch result is available for the accumulated feedback "
        "(`noisewise.monitoring.feedback.batch_label_issues`).",
        f"* The errors are symmetric flips on MNIST digits, which a model of {acc * 100:.0f}% clean accuracy "
        "contradicts easily; human annotation errors fall on ambiguous items and are harder to catch for both "
        "methods. Precision is bounded by the model's own errors: an item the model gets wrong with confidence "
        "looks like a flip to both methods.",
    ]


def _format_command(argv: list[str]) -> str:
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)
    try:
        niceness = os.nice(0)
    except OSError:
        niceness = 0
    return (f"nice -n {niceness} " if niceness else "") + command


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"dataset/noise/training seeds (default {' '.join(map(str, DEFAULT_SEEDS))}; 0 1 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS}; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run; writes /tmp/noisewise-suspects-quick.md")
    parser.add_argument("--out", default=None, help="markdown output (default docs/suspects.md)")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="probability cache ('' disables it)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON instead of the markdown")
    args = parser.parse_args(argv)
    seeds = tuple(args.seeds) if args.seeds else ((0, 1) if args.quick else DEFAULT_SEEDS)
    epochs = args.epochs or (3 if args.quick else DEFAULT_EPOCHS)
    out = Path(args.out) if args.out else (Path("/tmp/noisewise-suspects-quick.md") if args.quick
                                           else ROOT / "docs" / "suspects.md")
    report = run_benchmark(seeds, epochs, Path(args.cache_dir) if args.cache_dir else None)
    command = _format_command(["benchmarks/suspects.py", *argv])
    report["meta"]["command"] = command
    markdown = render_markdown(report, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    print(json.dumps(report, indent=1) if args.json else markdown)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""OOD detection under label noise: AUROC and FPR@95 of every registered OOD scorer.

Writes docs/ood.md and prints it (with --json, prints every number as JSON instead).

    nice -n 10 .venv/bin/python benchmarks/ood.py                  # the tables in docs/ (~10 min, 2 cores)
    .venv/bin/python benchmarks/ood.py --quick                     # smoke run (~15 s): 2 epochs, ce only,
                                                                   # 1 seed, 100 OOD items, /tmp output
    .venv/bin/python benchmarks/ood.py --seeds 0 --json            # one seed, JSON on stdout

Models: the repo's MLP on mnist5k (models.data.load_dataset("mnist5k", noise, seed)), trained with
models.train.train on the *observed* labels, for noise `none` and `symmetric:0.4` (40% of the labels
moved to another class) and the recipes `ce` (plain cross-entropy, the setting of the "noisy
elephant" study) and `elr`. Two checkpoints of the same run are scored:

* `selected`: the epoch with the best accuracy on the noisy validation split, which is what
  `noisewise train` registers (for `ce` under noise this is early stopping, before memorization);
* `last`: the last epoch (for `ce` under noise, a network that has memorized the wrong labels).
  The last-epoch weights are captured by observing models.train.accuracy, which train() calls
  after every epoch; training itself is unchanged (checked: the captured weights reproduce
  train()'s own `last_clean_test_accuracy`).

Scorers: every entry of models.uncertainty.ood.OOD_SCORERS with its default parameters, fitted on
the train split's features and logits (models.calibrate.features_and_logits) with
head=(net.head.weight, net.head.bias) and, for mahalanobis, the observed (noisy) train labels,
exactly as models.calibrate.fit_calibration fits the served scorer. Higher score = more OOD.

ID = the clean test split (750 items). OOD = each set of models.data.OOD_DATASETS, drawn by
models.data.load_ood(name, (1, 28, 28), n=750, seed, reference=x_test): `photos` (far-OOD
grayscale crops of sklearn's two sample photos), `other-digits` (near-OOD: sklearn's 8x8 digits
upsampled, another digit source), `inverted` (near-OOD: 1 - x of the ID test images).

Metrics (models.evaluation.ood_metrics): AUROC of ID (negative) vs OOD (positive) and FPR@95
(share of ID items flagged at the threshold that catches 95% of the OOD items). Mistakes-vs-OOD:
AUROC of the ID test items the model gets wrong on their clean labels (negative) vs OOD items
(positive): can the score tell the model's own mistakes from OOD inputs? 0.5 = not at all.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from noisewise.models.calibrate import OOD_BANK_BUDGET, features_and_logits  # noqa: E402
from noisewise.models.data import OOD_DATASETS, load_dataset, load_ood  # noqa: E402
from noisewise.models.evaluation import ood_metrics  # noqa: E402
from noisewise.models.uncertainty.ood import OOD_SCORERS, build_ood_scorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOISES = ("none", "symmetric:0.4")
RECIPES = ("ce", "elr")
SEEDS = (0, 1, 2)
CHECKPOINTS = ("selected", "last")
N_OOD = 750
QUICK = {"recipes": ("ce",), "seeds": (0,), "n_ood": 100, "epochs": 2}
CHANCE_BAND = 0.6  # a mistakes-vs-OOD AUROC below this counts as "cannot separate"
CHANGE_MARGIN = 0.03
LOGIT_ONLY_SCORERS = tuple(name for name, cls in OOD_SCORERS.items() if cls.uses == ("logits",))


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def train_selected_and_last(dataset, recipe, seed: int) -> tuple[dict[str, torch.nn.Module], dict]:
    """Train once; return the selected and the last-epoch networks and train()'s metrics.

    train() keeps only the selected checkpoint, so the last epoch is captured by wrapping
    models.train.accuracy (called after every epoch, on the current network) with a function that
    snapshots the weights before delegating. Nothing in the training changes.
    """
    import noisewise.models.train as train_module

    snapshot: dict[str, dict] = {}
    real_accuracy = train_module.accuracy

    def observing_accuracy(net, x, y):
        snapshot["last"] = copy.deepcopy(net.state_dict())
        return real_accuracy(net, x, y)

    with mock.patch.object(train_module, "accuracy", observing_accuracy):
        result = train_module.train(dataset, recipe, seed=seed, progress=False)
    last = copy.deepcopy(result.net)
    last.load_state_dict(snapshot["last"])
    last.eval()
    return {"selected": result.net.eval(), "last": last}, result.metrics


def evaluate_scorers(net, dataset, n_ood: int, seed: int) -> dict:
    """Fit every scorer on the train split and score ID test and each OOD set."""
    device = torch.device("cpu")
    x_tr, y_tr, _ = dataset.split("train")
    x_te, _, y_te_clean = dataset.split("test")
    f_tr, z_tr = features_and_logits(net, x_tr, device)
    f_te, z_te = features_and_logits(net, x_te, device)
    wrong = (z_te.argmax(1).numpy() != y_te_clean)
    ood_inputs = {name: load_ood(name, dataset.input_shape, n=n_ood, seed=seed, reference=x_te)
                  for name in OOD_DATASETS}
    ood_outputs = {name: features_and_logits(net, x, device) for name, x in ood_inputs.items()}
    head = (net.head.weight.detach(), net.head.bias.detach())
    labels = torch.as_tensor(y_tr)
    scorers: dict[str, dict] = {}
    for name in OOD_SCORERS:
        scorer = build_ood_scorer(name).fit(f_tr, z_tr, labels, head=head)
        id_scores = scorer.score(f_te, z_te).double().numpy()
        # share of ID items on the most common score value: saturated scores (e.g. msp = -1.0 in fp32) tie
        entry = {"ood": {}, "mistakes_vs_ood": {},
                 "id_largest_tie": float(np.unique(id_scores, return_counts=True)[1].max() / len(id_scores))}
        pooled = []
        for ood_name, (f_o, z_o) in ood_outputs.items():
            ood_scores = scorer.score(f_o, z_o).double().numpy()
            pooled.append(ood_scores)
            entry["ood"][ood_name] = ood_metrics(id_scores, ood_scores)
            entry["mistakes_vs_ood"][ood_name] = (
                ood_metrics(id_scores[wrong], ood_scores)["auroc"] if wrong.any() else None)
        entry["mistakes_vs_ood"]["all"] = (
            ood_metrics(id_scores[wrong], np.concatenate(pooled))["auroc"] if wrong.any() else None)
        scorers[name] = entry
    return {
        "clean_test_accuracy": float(1.0 - wrong.mean()),
        "n_test": int(len(y_te_clean)),
        "n_mistakes": int(wrong.sum()),
        "n_ood": {name: int(len(x)) for name, x in ood_inputs.items()},
        "scorers": scorers,
    }


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def run_benchmark(noises=NOISES, recipes=RECIPES, seeds=SEEDS, checkpoints=CHECKPOINTS, n_ood: int = N_OOD,
                  epochs: int | None = None, quick: bool = False, progress: bool = True) -> dict:
    """Train, score and summarize; returns the report (``runs``, ``summary``, ``claims``, ``meta``)."""
    from noisewise.models.train import load_recipe

    if quick:
        recipes, seeds, n_ood, epochs = QUICK["recipes"], QUICK["seeds"], QUICK["n_ood"], epochs or QUICK["epochs"]
    unknown = [c for c in checkpoints if c not in CHECKPOINTS]
    if unknown:
        raise ValueError(f"unknown checkpoints {unknown}; expected some of {CHECKPOINTS}")
    started = time.perf_counter()
    runs = []
    jobs = [(r, n, s) for r in recipes for n in noises for s in seeds]
    bar = tqdm(jobs, desc="ood benchmark", unit="model", disable=not progress)
    for recipe_name, noise, seed in bar:
        bar.set_postfix(recipe=recipe_name, noise=noise, seed=seed)
        dataset = load_dataset("mnist5k", noise, seed=seed)
        recipe = load_recipe(recipe_name, epochs=epochs)
        t0 = time.perf_counter()
        nets, metrics = train_selected_and_last(dataset, recipe, seed)
        train_seconds = time.perf_counter() - t0
        for checkpoint in checkpoints:
            result = evaluate_scorers(nets[checkpoint], dataset, n_ood, seed)
            expected = metrics["clean_test_accuracy" if checkpoint == "selected" else "last_clean_test_accuracy"]
            # the captured checkpoint must be the one train() evaluated
            if abs(result["clean_test_accuracy"] - expected) > 1e-6:
                raise RuntimeError(f"{checkpoint} checkpoint accuracy {result['clean_test_accuracy']} "
                                   f"differs from train()'s {expected}")
            runs.append({"recipe": recipe_name, "noise": noise, "seed": seed, "checkpoint": checkpoint,
                         "epochs": recipe.epochs, "best_epoch": metrics["best_epoch"],
                         "realized_noise_rate": dataset.noise.realized_rate, "train_seconds": train_seconds,
                         **result})
    bar.close()
    report = {"runs": runs,
              "meta": {"noises": list(noises), "recipes": list(recipes), "seeds": list(seeds),
                       "checkpoints": list(checkpoints), "n_ood": n_ood, "epochs": epochs, "quick": quick,
                       "scorers": list(OOD_SCORERS), "ood_sets": list(OOD_DATASETS),
                       "wall_seconds": time.perf_counter() - started, **machine_info()}}
    report["summary"] = summarize(runs)
    report["claims"] = check_claims(report["summary"], noises)
    return report


def _mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Mean and sd over seeds, keyed ``"recipe/checkpoint/noise"`` -> scorer -> metric."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['recipe']}/{run['checkpoint']}/{run['noise']}", []).append(run)
    summary = {}
    for key, members in groups.items():
        cell = {"clean_test_accuracy": _mean_sd([m["clean_test_accuracy"] for m in members]),
                "best_epoch": _mean_sd([m["best_epoch"] for m in members]),
                "n_mistakes": _mean_sd([m["n_mistakes"] for m in members]), "scorers": {}}
        for name in OOD_SCORERS:
            per = {}
            for ood_name in OOD_DATASETS:
                per[f"auroc/{ood_name}"] = _mean_sd([m["scorers"][name]["ood"][ood_name]["auroc"] for m in members])
                per[f"fpr95/{ood_name}"] = _mean_sd([m["scorers"][name]["ood"][ood_name]["fpr95"] for m in members])
                per[f"mistakes/{ood_name}"] = _mean_sd([m["scorers"][name]["mistakes_vs_ood"][ood_name]
                                                        for m in members])
            per["auroc/mean"] = _mean_sd([statistics.fmean(m["scorers"][name]["ood"][o]["auroc"]
                                                           for o in OOD_DATASETS) for m in members])
            per["fpr95/mean"] = _mean_sd([statistics.fmean(m["scorers"][name]["ood"][o]["fpr95"]
                                                           for o in OOD_DATASETS) for m in members])
            per["mistakes/all"] = _mean_sd([m["scorers"][name]["mistakes_vs_ood"]["all"] for m in members])
            per["id_largest_tie"] = _mean_sd([m["scorers"][name]["id_largest_tie"] for m in members])
            cell["scorers"][name] = per
        summary[key] = cell
    return summary


def check_claims(summary: dict, noises) -> list[dict]:
    """The two claims under test (feature-space scores hold up under label noise; MSP cannot tell the model's mistakes from OOD inputs), checked per recipe/checkpoint (needs a clean and a noisy setting).

    "Degrades" / "holds up" use a margin of ``CHANGE_MARGIN`` in mean AUROC over the OOD sets, about
    the seed-to-seed sd of the logit scores' mean AUROC (see the spread table).
    """
    if "none" not in noises or len(noises) < 2:
        return []
    noisy = [n for n in noises if n != "none"][-1]
    claims = []
    combos = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in summary))  # run order: selected first
    for combo in combos:
        clean_cell, noisy_cell = summary.get(f"{combo}/none"), summary.get(f"{combo}/{noisy}")
        if clean_cell is None or noisy_cell is None:
            continue
        mean_auroc = {s: (clean_cell["scorers"][s]["auroc/mean"]["mean"], noisy_cell["scorers"][s]["auroc/mean"]["mean"])
                      for s in OOD_SCORERS}
        change = {s: b - a for s, (a, b) in mean_auroc.items()}
        rank = sorted(OOD_SCORERS, key=lambda s: -mean_auroc[s][1])
        claims.append({
            "setting": combo, "noisy": noisy,
            "mean_auroc_clean": {s: v[0] for s, v in mean_auroc.items()},
            "mean_auroc_noisy": {s: v[1] for s, v in mean_auroc.items()},
            "change": change, "rank_noisy": rank,
            "knn_minus_msp_noisy": mean_auroc["knn"][1] - mean_auroc["msp"][1],
            "msp_degrades": bool(change["msp"] < -CHANGE_MARGIN),
            "knn_holds_up": bool(change["knn"] >= -CHANGE_MARGIN),
            "knn_best_under_noise": rank[0] == "knn",
            "mistakes_vs_ood_clean": {s: clean_cell["scorers"][s]["mistakes/all"]["mean"] for s in OOD_SCORERS},
            "mistakes_vs_ood_noisy": {s: noisy_cell["scorers"][s]["mistakes/all"]["mean"] for s in OOD_SCORERS},
        })
    return claims


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    model = platform.machine()
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": list(os.getloadavg())}


def _fmt(stat: dict, digits: int = 3, sd: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    if sd and stat["n"] > 1:
        text += f" ± {stat['sd']:.{digits}f}"
    return text


def _best(cells: dict[str, float], higher: bool = True) -> set[str]:
    valid = {k: v for k, v in cells.items() if v is not None}
    if not valid:
        return set()
    target = max(valid.values()) if higher else min(valid.values())
    return {k for k, v in valid.items() if abs(v - target) < 1e-12}


def _table(summary: dict, combo: str, noises, metric: str, higher: bool) -> list[str]:
    sets = [*OOD_DATASETS, "mean"] if metric != "mistakes" else [*OOD_DATASETS, "all"]
    header = "| scorer | " + " | ".join(f"{n}: {s}" for n in noises for s in sets) + " |"
    lines = [header, "|---|" + "---|" * (len(noises) * len(sets))]
    best = {}
    for noise in noises:
        cell = summary.get(f"{combo}/{noise}")
        for s in sets:
            if cell is not None:
                best[(noise, s)] = _best({name: cell["scorers"][name][f"{metric}/{s}"]["mean"] for name in OOD_SCORERS},
                                         higher)
    for name in OOD_SCORERS:
        row = [f"`{name}`"]
        for noise in noises:
            cell = summary.get(f"{combo}/{noise}")
            for s in sets:
                if cell is None:
                    row.append("")
                    continue
                text = _fmt(cell["scorers"][name][f"{metric}/{s}"], sd=False)
                row.append(f"**{text}**" if name in best[(noise, s)] else text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def explain(report: dict) -> list[str]:
    """Data-driven reading of the tables against those claims (the sentences follow the numbers)."""
    lines = []
    for claim in report["claims"]:
        c, n, d = claim["mean_auroc_clean"], claim["mean_auroc_noisy"], claim["change"]
        recipe, checkpoint = claim["setting"].split("/")
        rank = claim["rank_noisy"]
        text = (f"* **{recipe}, {checkpoint} checkpoint.** Mean AUROC over the three OOD sets, none -> "
                f"{claim['noisy']}: `knn` {c['knn']:.3f} -> {n['knn']:.3f} ({d['knn']:+.3f}), `msp` "
                f"{c['msp']:.3f} -> {n['msp']:.3f} ({d['msp']:+.3f}), `energy` {c['energy']:.3f} -> {n['energy']:.3f}, "
                f"`mahalanobis` {c['mahalanobis']:.3f} -> {n['mahalanobis']:.3f}, `vim` {c['vim']:.3f} -> "
                f"{n['vim']:.3f}. Under noise: {', '.join(f'`{s}`' for s in rank)}. ")
        text += ("`msp` degrades" if claim["msp_degrades"] else
                 f"`msp` does **not** degrade (change within -{CHANGE_MARGIN} or better)")
        text += "; `knn` holds up" if claim["knn_holds_up"] else "; `knn` **degrades** too"
        text += (" and is the best scorer under noise." if claim["knn_best_under_noise"] else
                 f", but `{rank[0]}` beats it under noise.")
        mc, mn = claim["mistakes_vs_ood_clean"], claim["mistakes_vs_ood_noisy"]
        text += (f" Mistakes vs OOD (pooled OOD sets), none / {claim['noisy']}: `msp` {mc['msp']:.3f} / "
                 f"{mn['msp']:.3f}, `knn` {mc['knn']:.3f} / {mn['knn']:.3f}, `mahalanobis` {mc['mahalanobis']:.3f} / "
                 f"{mn['mahalanobis']:.3f}: ")
        near = [label for label, v in (("none", mc["msp"]), (claim["noisy"], mn["msp"])) if v < CHANCE_BAND]
        text += (f"`msp` is near chance (< {CHANCE_BAND}) at telling the model's own mistakes from OOD inputs "
                 f"with {' and '.join(near)} labels." if near else
                 f"`msp` stays above {CHANCE_BAND} with both label sets.")
        lines.append(text)
    return lines


def overview(report: dict) -> list[str]:
    """One paragraph over all settings (counts, not adjectives)."""
    claims = report["claims"]
    if not claims:
        return ["(The claims need runs with noise `none` and a noisy setting.)"]
    n = len(claims)
    degrade = [c["setting"] for c in claims if c["msp_degrades"]]
    holds = [c["setting"] for c in claims if c["knn_holds_up"]]
    best = [c["setting"] for c in claims if c["knn_best_under_noise"]]
    gap = [c["knn_minus_msp_noisy"] for c in claims]
    names = lambda xs: ", ".join(f"`{x}`" for x in xs) if xs else "none"
    text = (f"The claim: feature-space scores, `knn` first, hold up under label noise while logit scores "
            f"such as MSP degrade, and that MSP cannot even tell the model's own mistakes from OOD inputs. Over the "
            f"{n} recipe/checkpoint settings here (mnist5k MLP, 40% symmetric flips vs clean): `knn` holds up in "
            f"{len(holds)} of {n} ({names(holds)}) and is the best of the {len(OOD_SCORERS)} scorers under noise in "
            f"{len(best)} of {n}; its mean AUROC under noise exceeds `msp`'s by {min(gap):+.3f} to {max(gap):+.3f}. "
            f"`msp` degrades (by more than {CHANGE_MARGIN} mean AUROC) in {len(degrade)} of {n} ({names(degrade)}). ")
    selected = [c for c in claims if c["setting"].endswith("/selected")]
    last = [c for c in claims if c["setting"].endswith("/last")]
    if selected and last and not any(c["msp_degrades"] for c in selected) and all(c["msp_degrades"] for c in last):
        text += ("The degradation of the logit scores is a memorization effect: at the **selected** checkpoint (early "
                 "stopping on the noisy validation split, what noisewise registers) MSP does not degrade, and "
                 "only the last-epoch networks, which have fitted the wrong labels, show the collapse. `knn` is "
                 "the safer default either way, because it does not depend on whether checkpoint selection caught "
                 "the memorization. ")
    mistakes = [c["mistakes_vs_ood_noisy"]["msp"] for c in claims]
    knn_mistakes = [c["mistakes_vs_ood_noisy"]["knn"] for c in claims]
    clean_mistakes = [c["mistakes_vs_ood_clean"]["msp"] for c in claims]
    knn_change = [c["change"]["knn"] for c in claims]
    text += (f"`knn`'s mean AUROC changes by {min(knn_change):+.3f} to {max(knn_change):+.3f} with the noise. "
             f"Mistakes vs OOD (AUROC of misclassified ID items vs OOD items, chance = 0.5): `msp` "
             f"{min(mistakes):.2f}-{max(mistakes):.2f} under noise and {min(clean_mistakes):.2f}-"
             f"{max(clean_mistakes):.2f} with clean labels, `knn` {min(knn_mistakes):.2f}-{max(knn_mistakes):.2f} "
             "under noise. ")
    below_noisy = sum(v < CHANCE_BAND for v in mistakes)
    below_clean = sum(v < CHANCE_BAND for v in clean_mistakes)
    text += (f"`msp` is below {CHANCE_BAND} on this test in {below_noisy} of {n} settings under noise and in "
             f"{below_clean} of {n} with clean labels")
    text += (": the inability is real but not specific to label noise (the mistakes of a clean model are "
             "low-confidence items, which is exactly what MSP flags)." if below_clean >= below_noisy else ".")
    return [text]


def caveats(report: dict) -> list[str]:
    summary, meta = report["summary"], report["meta"]
    n_id, n_ood = 750, meta["n_ood"]
    # Mann-Whitney sd of an AUROC under no separation, sqrt((n1 + n2 + 1) / (12 n1 n2)); smaller near 0 or 1
    se = ((n_id + n_ood + 1) / (12 * n_id * n_ood)) ** 0.5
    lines = [
        "* One small setting: an MLP on 2,500 MNIST training items, and OOD sets built from what ships with the "
        "packages; the per-set tables show how much the ranking of the scorers depends on the OOD set.",
        f"* With {n_id} ID and {n_ood} OOD items the sampling sd of one AUROC is at most about {se:.3f}.",
    ]
    if len(meta["seeds"]) > 1:
        sd = lambda names: max(v["scorers"][s]["auroc/mean"]["sd"] for v in summary.values() for s in names)
        lines.append(f"* Seed-to-seed sd of the mean AUROC: up to {sd(LOGIT_ONLY_SCORERS):.3f} for the logit scores "
                     f"({', '.join(LOGIT_ONLY_SCORERS)}), up to {sd(('knn',)):.3f} for `knn`.")
    ties = {k: v["scorers"]["msp"]["id_largest_tie"]["mean"] for k, v in summary.items()}
    worst = max(ties, key=ties.get)
    if ties[worst] > 0.05:
        full_fpr = any(v["scorers"]["msp"][f"fpr95/{o}"]["mean"] > 0.999 for v in summary.values() for o in OOD_DATASETS)
        lines.append(
            f"* `msp` saturates in fp32: in `{worst}` on average {100 * ties[worst]:.0f}% of the ID test items share one "
            "score value (-max p = -1.0 exactly), so their order is lost. FPR@95 counts tied ID items as flagged "
            "(no threshold can split a tie)" + (", which is where `msp`'s FPR@95 of 1.000 comes from" if full_fpr else "")
            + ". MSP as a confidence function has the same ties.")
    return lines


def render_markdown(report: dict, command: str, interpretation: list[str] | None = None) -> str:
    meta, summary = report["meta"], report["summary"]
    noises = meta["noises"]
    seeds = meta["seeds"]
    lines = [
        "# OOD detection under label noise",
        "",
        f"Command: `{command}`  ",
        f"Machine: {meta['cpu']}, {meta['cores']} cores (shared with other jobs), CPU only; Python {meta['python']}, "
        f"torch {meta['torch']} (`torch.set_num_threads({meta['torch_threads']})`), numpy {meta['numpy']}.  ",
        f"Date: {meta['date']}. Wall time: {meta['wall_seconds'] / 60:.1f} min"
        + (" (QUICK smoke run: not for conclusions)." if meta["quick"] else "."),
        "",
        "## Setup",
        "",
        f"* Models: the MLP on `mnist5k` (train 2500 / val 500 / cal 1250 / test 750), trained by "
        f"`noisewise.models.train.train` on the observed labels with recipes {', '.join(f'`{r}`' for r in meta['recipes'])}, "
        f"noise {', '.join(f'`{n}`' for n in noises)} (flip rates), seeds {', '.join(map(str, seeds))} "
        "(the seed draws the split, the noise, the initialization and the OOD samples). Cells are means over seeds"
        + ("; the last section gives the spread." if len(seeds) > 1 else "."),
        "* Checkpoints of the same run: **selected** = best accuracy on the noisy validation split (what "
        "`noisewise train` registers; for `ce` under noise it stops before memorization); **last** = the last epoch "
        "(for `ce` under noise the network has memorized many wrong labels). The last-epoch weights are captured by "
        "observing `noisewise.models.train.accuracy` after each epoch; they reproduce `train()`'s own last-epoch accuracy.",
        "* Scorers: all of `OOD_SCORERS` with default parameters (`knn` k = 50; `mahalanobis` Ledoit-Wolf shrinkage; "
        "`vim` dim = D/2 = 256; `react` 90th percentile), fitted like `fit_calibration` does: train-split features "
        "and logits, head = (W, b) of `net.head`, and the **observed (noisy)** train labels for `mahalanobis`.",
        f"* ID = the clean test split (750 items). OOD ({meta['n_ood']} items each, `noisewise.models.data.load_ood`): "
        "`photos` (far-OOD: grayscale crops of sklearn's two sample photos), `other-digits` (near-OOD: sklearn's "
        "8x8 digits upsampled to 28x28), `inverted` (near-OOD: 1 - x of the ID test images).",
        "* AUROC: ID negative vs OOD positive (higher = better; 0.5 = chance). FPR@95: share of ID items flagged "
        "at the threshold that catches 95% of the OOD items (lower = better). **Mistakes vs OOD**: AUROC of the "
        "ID test items the model misclassifies (clean labels) vs the OOD items: can the score tell the model's own "
        "mistakes from OOD inputs? Bold = best scorer in the column.",
        "",
        "Clean test accuracy (%), ID mistakes (of 750) and, for **selected**, the mean selected epoch (of "
        f"{meta['epochs'] or 60}):",
        "",
        "| recipe | checkpoint | " + " | ".join(noises) + " |",
        "|---|---|" + "---|" * len(noises),
    ]
    combos = [f"{r}/{c}" for r in meta["recipes"] for c in meta["checkpoints"]]
    for combo in combos:
        cells = []
        for noise in noises:
            cell = summary.get(f"{combo}/{noise}")
            if cell is None:
                cells.append("")
                continue
            text = f"{100 * cell['clean_test_accuracy']['mean']:.1f} ({cell['n_mistakes']['mean']:.0f} mistakes"
            if combo.endswith("/selected"):
                text += f", epoch {cell['best_epoch']['mean']:.0f}"
            cells.append(text + ")")
        recipe, checkpoint = combo.split("/")
        lines.append(f"| {recipe} | {checkpoint} | " + " | ".join(cells) + " |")
    lines.append("")
    if interpretation:
        lines += ["## Reading: do feature-space scores hold up under label noise?", "", *overview(report), "", "Per setting:", "", *interpretation, ""]
        lines += ["Caveats:", "", *caveats(report), ""]
    for combo in combos:
        recipe, checkpoint = combo.split("/")
        lines += [f"## {recipe}, {checkpoint} checkpoint", "", "AUROC (higher = better):", "",
                  *_table(summary, combo, noises, "auroc", True), "", "FPR@95 (lower = better):", "",
                  *_table(summary, combo, noises, "fpr95", False), "",
                  "Mistakes vs OOD, AUROC of misclassified ID test items vs OOD items (higher = better):", "",
                  *_table(summary, combo, noises, "mistakes", True), ""]
    if len(seeds) > 1:
        lines += ["## Spread over seeds", "",
                  "Mean AUROC over the three OOD sets, mean ± sd over seeds:", "",
                  "| scorer | " + " | ".join(f"{c} {n}" for c in combos for n in noises) + " |",
                  "|---|" + "---|" * (len(combos) * len(noises))]
        for name in OOD_SCORERS:
            row = [f"`{name}`"] + [_fmt(summary[f"{c}/{n}"]["scorers"][name]["auroc/mean"])
                                   if f"{c}/{n}" in summary else "" for c in combos for n in noises]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------
# reduced KNN banks (--bank-index): detection power and time against the exact bank
# ----------------------------------------------------------------------------------------------

BANK_INDEXES = ("exact", "subsample", "kmeans", "ivf")


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _knn_time_ms(index: str, rows: int, budget: int, batch: int, dim: int = 512, reps: int = 30) -> float:
    """Median ms of one knn score of ``batch`` random queries against a bank of ``rows`` random rows
    reduced by ``index`` to ``budget`` rows (a k-means bank is timed with random centroids and sizes:
    its cost depends only on its shape; an ivf bank keeps all ``rows``)."""
    from noisewise.models.uncertainty.ood import KNNScorer

    gen = torch.Generator().manual_seed(0)
    if index == "kmeans":
        counts = torch.full((budget,), rows // budget, dtype=torch.long)
        counts[: rows - int(counts.sum())] += 1
        config = {"name": "knn", "params": {"k": 50, "index": "kmeans", "budget": budget}, "fitted": True,
                  "bank_size": budget, "feature_dim": dim, "index_used": "kmeans", "source_rows": rows}
        scorer = KNNScorer.from_state(config, {"bank": torch.randn(budget, dim, generator=gen), "bank_counts": counts})
    else:
        scorer = KNNScorer(k=50, index=index, budget=budget).fit(torch.randn(rows, dim, generator=gen))
    query = torch.randn(batch, dim, generator=gen)
    return _median_ms(lambda: scorer.score(query), reps)


def augmented(x: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """``copies`` random affine variants of every image of ``x`` ``[N, C, H, W]`` (rotation within 12 degrees,
    scale 0.9 to 1.1, shift within 2 pixels), as ``[N * copies, C, H, W]``: a bigger bank of real-looking digits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    n, _, h, w = x.shape
    out = []
    for _ in range(copies):
        angle = (torch.rand(n, generator=gen) * 2 - 1) * np.deg2rad(12)
        scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
        shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * torch.tensor([2 * 2 / w, 2 * 2 / h])
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        out.append(torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="border"))
    return torch.cat(out)


def run_bank_index(seeds=(0, 1), budgets=(250,), alpha_ood: float = 0.05, n_ood: int = N_OOD,
                   timing_rows: int = 50000, timing_budget: int = 5000, augment: int = 0,
                   indexes=BANK_INDEXES, epochs: int | None = None, timing_reps: int = 30,
                   ivf_probes: tuple[int | None, ...] = (None,), arch: str = "auto") -> dict:
    """Exact vs reduced knn banks on the mnist5k network ``arch`` (the MLP by default; recipe ce, clean labels,
    selected checkpoint): AUROC and
    FPR@95 per OOD set, the false-OOD rate on the ID test split and the share of OOD decisions unchanged, each
    bank with its own gate fitted on its own scores of the calibration split; then knn time per batch.
    Every reduced index in ``indexes`` is built at every budget of ``budgets``. With ``augment`` > 0 the bank
    is the features of that many augmented copies of each train image (:func:`augmented`), so that a reduced
    bank keeps a small share of a large bank of real features. The ivf bank is fitted once and scored with each
    number of probed lists in ``ivf_probes`` (None: the default)."""
    from noisewise.models.train import load_recipe, train
    from noisewise.models.uncertainty.ood import KNNScorer, OODGate

    # an ivf bank keeps every row whatever the budget: one fit, scored at each number of probes
    banks = ([("exact", max(budgets), None)] + [(i, b, None) for i in indexes if i not in ("exact", "ivf")
                                                for b in budgets]
             + [("ivf", max(budgets), p) for p in ivf_probes if "ivf" in indexes])
    runs = []
    for seed in tqdm(seeds, desc="bank index"):
        dataset = load_dataset("mnist5k", noise="none", seed=seed)
        net = train(dataset, load_recipe("ce", epochs=epochs), arch=arch, seed=seed, progress=False).net.eval()
        device = torch.device("cpu")
        x_tr, y_tr, _ = dataset.split("train")
        if augment:
            x_tr, y_tr = augmented(torch.as_tensor(x_tr), augment, seed), np.tile(np.asarray(y_tr), augment)
        with torch.no_grad():
            f_tr, _ = features_and_logits(net, x_tr, device)
            f_cal, _ = features_and_logits(net, dataset.split("cal")[0], device)
            x_te = dataset.split("test")[0]
            f_te, _ = features_and_logits(net, x_te, device)
            f_ood = {name: features_and_logits(net, load_ood(name, dataset.input_shape, n=n_ood, seed=seed,
                                                             reference=x_te), device)[0] for name in OOD_DATASETS}
        row: dict = {"seed": seed, "bank_rows": int(len(f_tr)), "augment": augment, "arch": arch, "banks": {}}
        flags, ivf = {}, None
        for index, budget, probes in banks:
            key = _bank_key(index, budget, probes)
            if index != "ivf":
                scorer = KNNScorer(k=50, index=index, budget=budget, seed=seed).fit(f_tr, labels=torch.as_tensor(y_tr))
            else:
                ivf = ivf or KNNScorer(k=50, index="ivf", budget=budget, seed=seed).fit(f_tr)
                # a fixed number of probes: exactly that many lists per query, no row budget
                scorer = ivf if probes is None else KNNScorer.from_state(
                    {**ivf.config(), "probes": probes, "probe_rows": None}, ivf.state_dict())
            gate = OODGate(scorer.score(f_cal), alpha_ood=alpha_ood)
            id_scores = scorer.score(f_te)
            entry = {"index": index, "bank_size": int(scorer.state_dict()["bank"].shape[0]),
                     "probes": scorer.probes_used, "probe_rows": scorer.probe_rows_used,
                     "lists": len(scorer.state_dict().get("list_centroids", ())),
                     "false_ood": float(gate.is_ood(id_scores).double().mean()), "ood": {}}
            flags[key] = [gate.is_ood(id_scores)]
            for name, f in f_ood.items():
                scores = scorer.score(f)
                entry["ood"][name] = {**ood_metrics(id_scores.double().numpy(), scores.double().numpy()),
                                      "flagged": float(gate.is_ood(scores).double().mean())}
                flags[key].append(gate.is_ood(scores))
            entry["ms_batch1"] = _median_ms(lambda: scorer.score(f_te[:1]), 20 * timing_reps // 3)
            entry["ms_batch64"] = _median_ms(lambda: scorer.score(f_te[:64]), 10 * timing_reps // 3)
            row["banks"][key] = entry
        exact_flags = torch.cat(flags["exact"])
        for key, entry in row["banks"].items():
            entry["same_decisions"] = float((torch.cat(flags[key]) == exact_flags).double().mean())
        runs.append(row)
    timing = {index: {batch: _knn_time_ms(index, timing_rows, timing_budget if index != "exact" else timing_rows,
                                          batch, reps=timing_reps) for batch in (1, 64)} for index in BANK_INDEXES}
    return {"runs": runs, "timing": timing, "timing_rows": timing_rows, "timing_budget": timing_budget,
            "alpha_ood": alpha_ood, "banks": [_bank_key(*bank) for bank in banks], "meta": machine_info()}


def _bank_key(index: str, budget: int, probes: int | None = None) -> str:
    if index == "ivf":
        return "ivf" if probes is None else f"ivf:{probes}"
    return "exact" if index == "exact" else f"{index}:{budget}"


def render_bank_index(report: dict, command: str) -> str:
    runs, alpha, keys = report["runs"], report["alpha_ood"], report["banks"]
    n_rows = runs[0]["bank_rows"]

    def mean(get) -> float:
        return statistics.fmean(get(r) for r in runs)

    def label(key: str) -> str:
        return f"`{key.split(':')[0]}`"

    def rows(key: str) -> str:
        entry = runs[0]["banks"][key]
        if entry.get("probes") is None:
            return f"{entry['bank_size']:,}"
        if entry.get("probe_rows") is None:
            return f"{entry['bank_size']:,} in {entry['lists']:,} lists, {entry['probes']} probed"
        return (f"{entry['bank_size']:,} in {entry['lists']:,} lists, the nearest holding {entry['probe_rows']:,} "
                f"rows probed (at most {entry['probes']})")

    bank = (f"the {n_rows:,} features of {runs[0]['augment']} augmented copies of each train-split image (random "
            "rotation within 12 degrees, scale 0.9 to 1.1, shift within 2 pixels)" if runs[0]["augment"] else
            f"the {n_rows:,} train-split features")
    lines = ["## Reduced knn banks (`--ood-index`)", "",
             f"Command: `{command}`  ",
             f"Machine: {report['meta'].get('cpu', 'CPU')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch thread(s).", "",
             f"Setup: the mnist5k {'ResNet-18' if runs[0].get('arch') == 'resnet18' else 'MLP'} (recipe `ce`, "
             "clean labels, selected checkpoint), seeds "
             f"{', '.join(str(r['seed']) for r in runs)} (means over seeds). Bank = {bank}; `subsample` and "
             "`kmeans` keep the rows shown; `ivf` keeps every row in k-means lists and scores a query against the "
             "rows of the lists it probes. Each bank has its own conformal gate (alpha_ood = "
             f"{alpha}) fitted on its own scores of the calibration split, as `noisewise calibrate` does, so the "
             "false-OOD bound holds for the bank that is served. ID = the test split; OOD sets as above. `same "
             "decisions` = share of ID and OOD items whose OOD flag equals the exact bank's.", "",
             "| bank | rows | OOD set | AUROC | AUROC - exact | FPR@95 | flagged |", "|---|---|---|---|---|---|---|"]
    for key in keys:
        for name in OOD_DATASETS:
            auroc = mean(lambda r: r["banks"][key]["ood"][name]["auroc"])
            exact = mean(lambda r: r["banks"]["exact"]["ood"][name]["auroc"])
            lines.append(f"| {label(key)} | {rows(key)} | {name} | {auroc:.3f} | "
                         f"{auroc - exact:+.3f} | {mean(lambda r: r['banks'][key]['ood'][name]['fpr95']):.3f} | "
                         f"{mean(lambda r: r['banks'][key]['ood'][name]['flagged']):.3f} |")
    lines += ["", "| bank | rows | false-OOD rate on ID test (bound " + f"{alpha}) | same decisions as exact | "
              "knn ms, batch 1 | knn ms, batch 64 | time ratio exact / bank (batch 1, 64) |",
              "|---|---|---|---|---|---|---|"]
    for key in keys:
        e = lambda field: mean(lambda r: r["banks"][key][field])
        ex = lambda field: mean(lambda r: r["banks"]["exact"][field])
        lines.append(f"| {label(key)} | {rows(key)} | {e('false_ood'):.3f} | "
                     f"{e('same_decisions'):.3f} | {e('ms_batch1'):.3f} | {e('ms_batch64'):.3f} | "
                     f"{ex('ms_batch1') / e('ms_batch1'):.1f}, {ex('ms_batch64') / e('ms_batch64'):.1f} |")
    t, rows, budget = report["timing"], report["timing_rows"], report["timing_budget"]
    lines += ["", f"Time at a larger bank: knn score of random 512-d queries against {rows:,} random rows "
              f"(`exact`, `ivf`) or {budget:,} (`subsample`, `kmeans`), median ms:", "",
              "| bank | batch 1 | batch 64 | ratio exact / bank (batch 1, 64) |", "|---|---|---|---|"]
    for index in BANK_INDEXES:
        lines.append(f"| `{index}` | {t[index][1]:.2f} | {t[index][64]:.2f} | "
                     f"{t['exact'][1] / t[index][1]:.1f}, {t['exact'][64] / t[index][64]:.1f} |")
    return "\n".join(lines)

def _format_command(argv: list[str]) -> str:
    prefix = f"nice -n {os.nice(0)} " if os.nice(0) else ""
    return prefix + ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: recipe ce, seed 0, {QUICK['epochs']} epochs, {QUICK['n_ood']} OOD items; "
                             "writes /tmp/noisewise-ood-quick.md unless --out is given")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="training recipes (default: ce elr)")
    parser.add_argument("--noises", nargs="+", default=list(NOISES),
                        help="noise specs; the claims need 'none' plus a noisy one (default: none symmetric:0.4)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (default: 0 1 2)")
    parser.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS), choices=CHECKPOINTS,
                        help="which checkpoints of each run to score (default: selected last)")
    parser.add_argument("--n-ood", type=int, default=N_OOD, help=f"items per OOD set (default {N_OOD})")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared 2-core machine MKL's threaded "
                             "eigh, used by the vim fit, can take seconds instead of ~30 ms with 2 threads)")
    parser.add_argument("--out", default=None, help="markdown output (default docs/ood.md)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON on stdout instead of "
                                                            "the markdown (the markdown is still written)")
    parser.add_argument("--bank-index", action="store_true",
                        help="instead: compare the exact knn bank with the reduced ones (--ood-index) and print "
                             "that markdown section")
    parser.add_argument("--augment", type=int, default=0, metavar="COPIES",
                        help="with --bank-index: the bank is the features of COPIES augmented copies of each "
                             "train image (a large bank of real features) instead of the train split alone")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="with --bank-index: rows kept by the reduced banks (default 250, or the serving "
                             "budget with --augment)")
    parser.add_argument("--indexes", nargs="+", default=list(BANK_INDEXES), choices=BANK_INDEXES,
                        help="with --bank-index: the banks to compare (exact is always included)")
    parser.add_argument("--arch", default="auto", help="with --bank-index: the network (default: the MLP; "
                        "resnet18 for a ResNet-18 feature bank)")
    parser.add_argument("--probes", type=int, nargs="+", default=None,
                        help="with --bank-index: also score the ivf bank at each of these fixed numbers of probed "
                             "lists, besides the served default (the nearest lists that hold 25 k rows)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    if args.bank_index:
        budgets = tuple(args.budgets) if args.budgets else ((250,) if not args.augment else (OOD_BANK_BUDGET,))
        report = run_bank_index(n_ood=args.n_ood, budgets=budgets, augment=args.augment, epochs=args.epochs,
                                indexes=tuple(args.indexes), seeds=tuple(args.seeds[:2]),
                                ivf_probes=(None, *(args.probes or ())), arch=args.arch)
        print(json.dumps(report, indent=1) if args.json else
              render_bank_index(report, _format_command(["benchmarks/ood.py", *argv])))
        return
    out = Path(args.out) if args.out else (Path("/tmp/noisewise-ood-quick.md") if args.quick
                                           else ROOT / "docs" / "ood.md")
    report = run_benchmark(noises=tuple(args.noises), recipes=tuple(args.recipes), seeds=tuple(args.seeds),
                           checkpoints=tuple(args.checkpoints), n_ood=args.n_ood, epochs=args.epochs,
                           quick=args.quick)
    command = _format_command(["benchmarks/ood.py", *argv])
    report["meta"]["command"] = command
    markdown = render_markdown(report, command, explain(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown + "\n")
    print(json.dumps(report, indent=1) if args.json else markdown)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

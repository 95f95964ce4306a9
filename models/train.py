"""Training loop for the noise-robust recipes.

A recipe is a YAML file under ``models/recipes/`` (or a user path): the loss and its parameters, an
optional strategy (``coteaching``), epochs, batch size, optimizer and the SAM radius used when SAM is
switched on. The checkpoint that is kept is the epoch with the best accuracy on the held-out *noisy*
validation split: clean labels are never used for selection, only reported.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from noisewise.models.choices import RECIPE_DIR, RECIPES
from noisewise.models.data import Dataset
from noisewise.models.losses import build_loss, coteaching_keep_rate, coteaching_select
from noisewise.models.nets import Classifier, build_net, default_arch, pick_device

# One INFO line per epoch. Silent unless the application attaches a handler: `noisewise train` does when its
# stderr is not a terminal (logs, CI, `make run | cat`), where the progress bar would show nothing.
log = logging.getLogger(__name__)


@dataclass
class Recipe:
    """A training recipe; see the YAML files in ``models/recipes/``."""

    name: str
    loss: str = "ce"
    loss_params: dict = field(default_factory=dict)
    strategy: str = "standard"
    strategy_params: dict = field(default_factory=dict)
    epochs: int = 60
    batch_size: int = 128
    optimizer: dict = field(default_factory=lambda: {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3})
    scheduler: str = "cosine"  # cosine annealing of the learning rate to 0 over the epochs, or "none"
    sam: bool = False
    sam_rho: float = 0.1

    def params(self) -> dict:
        """Flat ``recipe.*`` parameters for experiment tracking."""
        flat = {"recipe": self.name, "loss": self.loss, "strategy": self.strategy, "epochs": self.epochs,
                "batch_size": self.batch_size, "scheduler": self.scheduler, "sam": self.sam}
        if self.sam:
            flat["sam_rho"] = self.sam_rho
        flat.update({f"loss.{k}": v for k, v in self.loss_params.items()})
        flat.update({f"strategy.{k}": v for k, v in self.strategy_params.items()})
        flat.update({f"optimizer.{k}": v for k, v in self.optimizer.items()})
        return flat


def load_recipe(name_or_path: str, **overrides) -> Recipe:
    """Load a built-in recipe by name or a YAML file by path; ``overrides`` replace fields (None = keep)."""
    path = Path(name_or_path)
    if name_or_path in RECIPES:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    elif path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(f"--recipe: unknown recipe {name_or_path!r}; expected one of {', '.join(RECIPES)} "
                         "or a path to a recipe .yaml file")
    fields = yaml.safe_load(path.read_text()) or {}
    unknown = set(fields) - set(Recipe.__dataclass_fields__)
    if unknown:
        raise ValueError(f"--recipe: {path} has unknown keys {sorted(unknown)}")
    recipe = Recipe(name=path.stem, **fields)
    for key, value in overrides.items():
        if value is not None:
            setattr(recipe, key, value)
    if recipe.strategy not in ("standard", "coteaching"):
        raise ValueError(f"--recipe: strategy must be 'standard' or 'coteaching', got {recipe.strategy!r}")
    if recipe.scheduler not in ("none", "cosine"):
        raise ValueError(f"--recipe: scheduler must be 'none' or 'cosine', got {recipe.scheduler!r}")
    if recipe.epochs < 1:
        raise ValueError(f"--epochs: must be >= 1, got {recipe.epochs}")
    return recipe


class SAM:
    """Sharpness-aware minimization (Foret et al., ICLR 2021) around any base optimizer.

    ``perturb()`` moves the weights to w + rho g/||g|| (the worst case in an L2 ball) after the first
    backward; ``restore()`` moves them back after the second backward, before the base step.
    """

    def __init__(self, params, rho: float):
        self.params = [p for p in params if p.requires_grad]
        self.rho = float(rho)
        self._offsets: list[torch.Tensor | None] = []

    @torch.no_grad()
    def perturb(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2) if grads else torch.tensor(0.0)
        scale = self.rho / (norm + 1e-12)
        self._offsets = []
        for p in self.params:
            offset = None if p.grad is None else p.grad * scale
            if offset is not None:
                p.add_(offset)
            self._offsets.append(offset)

    @torch.no_grad()
    def restore(self) -> None:
        for p, offset in zip(self.params, self._offsets):
            if offset is not None:
                p.sub_(offset)


@dataclass
class TrainResult:
    """The selected network, its per-epoch history and summary metrics."""

    net: Classifier
    recipe: Recipe
    arch: str
    history: list[dict]
    metrics: dict
    state: dict = field(default_factory=dict)  # per-sample state (ELR targets, co-teaching selections)
    arch_kwargs: dict = field(default_factory=dict)


def _build_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    opt = dict(recipe.optimizer)
    name = opt.pop("name", "adam").lower()
    if name == "adam":
        return torch.optim.Adam(params, **opt)
    if name == "sgd":
        return torch.optim.SGD(params, **opt)
    raise ValueError(f"recipe optimizer: expected 'adam' or 'sgd', got {name!r}")


@torch.no_grad()
def predict_logits(net: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, K]`` in eval mode, in batches."""
    was_training = net.training
    net.eval()
    out = torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    net.train(was_training)
    return out


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_logits(net, x).argmax(1) == y).float().mean())


def train(
    dataset: Dataset,
    recipe: Recipe,
    arch: str = "auto",
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    arch_kwargs: dict | None = None,
) -> TrainResult:
    """Train ``recipe`` on the observed labels of ``dataset``'s train split; keep the epoch with the best
    noisy-validation accuracy. Clean test accuracy (when clean labels exist) is reported at the selected
    checkpoint and at the last epoch, never used for selection.

    ``progress`` shows a tqdm bar; independently, each epoch is logged at INFO on the ``noisewise.models.train``
    logger (epoch, mean training loss, noisy-validation accuracy, seconds since the start)."""
    started = time.perf_counter()
    device = pick_device(device) if isinstance(device, str) else device
    arch = default_arch(dataset.input_shape) if arch == "auto" else arch
    torch.manual_seed(seed)
    np.random.seed(seed)

    def tensors(split):
        x, y, y_clean = dataset.split(split)
        as_y = lambda a: None if a is None else torch.as_tensor(a, device=device)
        return torch.as_tensor(x, device=device), as_y(y), as_y(y_clean)

    x_train, y_train, _ = tensors("train")
    x_val, y_val, _ = tensors("val")
    x_test, _, y_test_clean = tensors("test")
    if y_test_clean is not None:  # a partial reference (-1 = unknown): score the items that have one
        known = y_test_clean >= 0
        x_test, y_test_clean = (x_test[known], y_test_clean[known]) if bool(known.any()) else (x_test, None)
    k, n_train = dataset.num_classes, len(x_train)

    n_nets = 2 if recipe.strategy == "coteaching" else 1
    nets = [build_net(arch, dataset.input_shape, k, **(arch_kwargs or {})).to(device) for _ in range(n_nets)]
    for net in nets:
        net.fit_standardization(x_train)
    losses = [build_loss(recipe.loss, k, n_train, **recipe.loss_params).to(device) for _ in nets]
    optimizers = [_build_optimizer(recipe, net.parameters()) for net in nets]
    schedulers = [
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs) for opt in optimizers
    ] if recipe.scheduler == "cosine" else []
    sams = [SAM(net.parameters(), recipe.sam_rho) if recipe.sam else None for net in nets]
    forget_rate = _forget_rate(recipe, dataset)
    selected_counts = torch.zeros(n_train, device=device)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict] = []
    best = {"val_noisy_accuracy": -1.0}
    bar = tqdm(range(recipe.epochs), desc=f"train {recipe.name}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        for net in nets:
            net.train()
        order = torch.randperm(n_train, generator=generator).to(device)
        keep_rate = coteaching_keep_rate(epoch, forget_rate, int(recipe.strategy_params.get("warmup_epochs", 10))) if n_nets == 2 else 1.0
        total, count = 0.0, 0
        for start in range(0, n_train, recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            xb, yb = x_train[index], y_train[index]
            if n_nets == 1:
                loss_value = _step(nets[0], losses[0], optimizers[0], sams[0], xb, yb, index)
            else:
                with torch.no_grad():
                    per_item = [nn.functional.cross_entropy(net(xb), yb, reduction="none") for net in nets]
                picks = coteaching_select(per_item[0], per_item[1], keep_rate)
                selected_counts[index[picks[0]]] += 1
                selected_counts[index[picks[1]]] += 1
                loss_value = sum(
                    _step(net, loss, opt, sam, xb[pick], yb[pick], index[pick])
                    for net, loss, opt, sam, pick in zip(nets, losses, optimizers, sams, picks)
                ) / 2
            total += loss_value * len(index)
            count += len(index)
        for scheduler in schedulers:
            scheduler.step()
        val_accs = [accuracy(net, x_val, y_val) for net in nets]
        chosen = int(np.argmax(val_accs))
        record = {"epoch": epoch, "train_loss": total / count, "val_noisy_accuracy": val_accs[chosen]}
        if y_test_clean is not None:
            record["clean_test_accuracy"] = accuracy(nets[chosen], x_test, y_test_clean)
        history.append(record)
        if record["val_noisy_accuracy"] > best["val_noisy_accuracy"]:
            best = {**record, "state": copy.deepcopy(nets[chosen].state_dict())}
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_noisy_accuracy']:.3f}")
        log.info("epoch %d/%d: loss %.4f, noisy-val accuracy %.4f, %.1f s", epoch + 1, recipe.epochs,
                 record["train_loss"], record["val_noisy_accuracy"], time.perf_counter() - started)
    bar.close()

    last = history[-1]
    final = nets[0]
    final.load_state_dict(best.pop("state"))
    final.eval()
    metrics = {
        "val_noisy_accuracy": best["val_noisy_accuracy"],
        "best_epoch": best["epoch"],
        "last_val_noisy_accuracy": last["val_noisy_accuracy"],
        "clean_test_accuracy": best.get("clean_test_accuracy"),
        "last_clean_test_accuracy": last.get("clean_test_accuracy"),
        "realized_noise_rate": dataset.noise.realized_rate,
        "train_seconds": time.perf_counter() - started,
    }
    state: dict = {}
    if recipe.loss == "elr":
        state["elr_targets"] = losses[0].targets.detach().cpu()
    if n_nets == 2:
        state["coteaching_selected_counts"] = selected_counts.cpu()
        state["coteaching_forget_rate"] = forget_rate
    return TrainResult(final, recipe, arch, history, metrics, state, dict(arch_kwargs or {}))


def _step(net, loss_fn, optimizer, sam, xb, yb, index) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(net(xb), yb, index)
    loss.backward()
    if sam is not None:
        sam.perturb()
        optimizer.zero_grad(set_to_none=True)
        # the second pass only supplies the sharpness-aware gradient; per-sample state moves once per step
        frozen = getattr(loss_fn, "targets", None)
        saved = None if frozen is None else frozen.clone()
        loss_fn(net(xb), yb, index).backward()
        if saved is not None:
            frozen.copy_(saved)
        sam.restore()
    optimizer.step()
    return float(loss.detach())


def _forget_rate(recipe: Recipe, dataset: Dataset) -> float:
    value = recipe.strategy_params.get("forget_rate", "auto")
    if value == "auto":
        return dataset.noise.realized_rate if dataset.noise.n_flipped else 0.2
    return float(value)

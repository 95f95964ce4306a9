"""The training loop: determinism, checkpoint selection, per-sample state of ELR and co-teaching, SAM."""

import numpy as np
import pytest
import torch

from noisewise.models.data import load_dataset
from noisewise.models.train import RECIPES, SAM, load_recipe, train


@pytest.fixture(scope="module")
def digits_noisy():
    return load_dataset("digits", "symmetric:0.4", seed=0)


def _weights(net):
    return torch.cat([p.detach().flatten() for p in net.state_dict().values()])


def test_recipes_ship_and_load():
    assert set(RECIPES) >= {"ce", "gce", "sce", "elr", "coteaching"}
    for name in RECIPES:
        recipe = load_recipe(name)
        assert recipe.epochs >= 1 and recipe.name == name
    assert load_recipe("elr").loss_params == {"lam": 3.0, "beta": 0.7}
    assert load_recipe("gce").loss_params == {"q": 0.7}


def test_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: ce\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        load_recipe(str(bad))


def test_training_is_deterministic_with_a_seed(digits_noisy):
    recipe = load_recipe("gce", epochs=3)
    a = train(digits_noisy, recipe, seed=5, progress=False)
    b = train(digits_noisy, recipe, seed=5, progress=False)
    c = train(digits_noisy, recipe, seed=6, progress=False)
    assert torch.equal(_weights(a.net), _weights(b.net))
    assert a.history == b.history
    assert not torch.equal(_weights(a.net), _weights(c.net))


def test_checkpoint_is_selected_on_noisy_validation_only(digits_noisy):
    result = train(digits_noisy, load_recipe("ce", epochs=8), seed=0, progress=False)
    val = [h["val_noisy_accuracy"] for h in result.history]
    assert result.metrics["best_epoch"] == int(np.argmax(val))
    assert result.metrics["val_noisy_accuracy"] == max(val)
    assert result.metrics["clean_test_accuracy"] == result.history[result.metrics["best_epoch"]]["clean_test_accuracy"]
    # the returned network is the selected checkpoint, not the last epoch
    x, y, _ = digits_noisy.split("val")
    acc = float((result.net(torch.as_tensor(x)).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(max(val), abs=1e-6)


def test_elr_keeps_a_running_target_per_training_item(digits_noisy):
    epochs = 4
    result = train(digits_noisy, load_recipe("elr", epochs=epochs), seed=0, progress=False)
    targets = result.state["elr_targets"]
    assert targets.shape == (len(digits_noisy.splits["train"]), 10)
    # every item is visited once per epoch and t starts at 0, so each row sums to 1 - beta^epochs
    assert torch.allclose(targets.sum(1), torch.full((len(targets),), 1 - 0.7**epochs), atol=1e-4)


def test_coteaching_selects_clean_items_more_often(digits_noisy):
    recipe = load_recipe("coteaching", epochs=8, strategy_params={"forget_rate": "auto", "warmup_epochs": 3})
    result = train(digits_noisy, recipe, seed=0, progress=False)
    counts = result.state["coteaching_selected_counts"].numpy()
    train_idx = digits_noisy.splits["train"]
    noisy = digits_noisy.y[train_idx] != digits_noisy.y_clean[train_idx]
    assert result.state["coteaching_forget_rate"] == pytest.approx(digits_noisy.noise.realized_rate)
    # the small-loss rule is the point of co-teaching: mislabelled items are picked far less often
    assert counts[~noisy].mean() > 1.3 * counts[noisy].mean()
    # selected counts are bounded by two picks per epoch
    assert counts.max() <= 2 * 8


def test_sam_perturbs_and_restores_exactly():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([3.0, 4.0])
    sam = SAM([w], rho=0.5)
    sam.perturb()
    assert torch.allclose(w.detach(), torch.tensor([3.3, 4.4]))  # w + rho g/||g||, ||g|| = 5
    sam.restore()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]))


def test_sam_changes_training_and_still_learns(digits_noisy):
    plain = train(digits_noisy, load_recipe("ce", epochs=8), seed=0, progress=False)
    sharp = train(digits_noisy, load_recipe("ce", epochs=8, sam=True), seed=0, progress=False)
    assert not torch.equal(_weights(plain.net), _weights(sharp.net))
    assert sharp.metrics["clean_test_accuracy"] > 0.5

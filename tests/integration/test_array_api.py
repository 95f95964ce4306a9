"""The array API (`noisewise.models.arrays`): the docs example runs and prints what docs/api.md says, the
thresholds equal those of `noisewise calibrate` (`fit_calibration`) on the same outputs, predictions equal the
served predictor's, coverage holds over many splits, and bad inputs get messages that name the argument."""

import contextlib
import dataclasses
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from noisewise.models.arrays import NoiseAwareClassifier, NotConformalizedError
from noisewise.models.calibrate import CalibrationSettings, features_and_logits, fit_calibration
from noisewise.models.data import load_dataset
from noisewise.models.nets import build_net
from noisewise.models.predictor import Predictor

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


# ------------------------------------------------------------------------------------------------
# docs/api.md: the example runs and prints its documented output
# ------------------------------------------------------------------------------------------------


def test_docs_example_runs_and_prints_the_documented_output():
    """Every python block of the doc runs, in order, and prints the text block that follows the last one."""
    doc = DOC.read_text()
    python = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    assert python, "docs/api.md has no python example"
    after = doc[doc.rindex("```python"):]
    expected = re.search(r"```python\n.*?```.*?```text\n(.*?)```", after, re.DOTALL).group(1).strip().splitlines()
    out = io.StringIO()
    namespace = {"__name__": "docs_api_example"}
    with contextlib.redirect_stdout(out):
        for block in python:
            exec(compile(block, str(DOC), "exec"), namespace)
    assert out.getvalue().strip().splitlines() == expected
    # and what the doc's prose says of it
    audited = float(re.search(r"coverage of the true label: ([0-9.]+)", out.getvalue()).group(1))
    plain = float(re.search(r"no audit: coverage ([0-9.]+)", out.getvalue()).group(1))
    assert audited >= 0.88 and plain > audited and "valid audit_rectified" in out.getvalue()


# ------------------------------------------------------------------------------------------------
# parity with `noisewise calibrate` and the served predictor
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A noisewise MLP on digits with noisy labels: random ReLU features, the head fitted in closed form
    (ridge regression on one-hot labels: a second, not a minute, and 95% accurate)."""
    ds = load_dataset("digits", "symmetric:0.2", seed=0)
    torch.manual_seed(0)
    net = build_net("mlp", ds.input_shape, ds.num_classes, hidden=(512,)).eval()
    x_tr, y_tr, _ = ds.split("train")
    net.fit_standardization(torch.as_tensor(x_tr))
    with torch.no_grad():
        f = net.forward_features(torch.as_tensor(x_tr)).double()
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
        target = 10.0 * torch.nn.functional.one_hot(torch.as_tensor(y_tr), ds.num_classes).double()
        w = torch.linalg.solve(f.T @ f + torch.eye(f.shape[1], dtype=f.dtype), f.T @ target)
        net.head.weight.copy_(w[:-1].T)
        net.head.bias.copy_(w[-1])
    outputs = {split: features_and_logits(net, ds.split(split)[0], torch.device("cpu"))
               for split in ("train", "val", "cal", "test")}
    return ds, net, {s: (f.numpy(), z.numpy()) for s, (f, z) in outputs.items()}


def _audit_index(ds, n, seed=0):
    # the draw of `noisewise calibrate --audit N` (calibrate._audit)
    _, _, y_clean = ds.split("cal")
    index = np.sort(np.random.default_rng(seed).choice(np.flatnonzero(y_clean >= 0), n, replace=False))
    return index, y_clean[index]


CASES = {
    # name: (dataset change, settings shared by CalibrationSettings and NoiseAwareClassifier, noise knowledge
    # of the array API, audit size)
    "known-symmetric": (None, {}, {"known_noise": "symmetric:0.2"}, 0),
    "known-symmetric-aps": (None, {"score": "aps"}, {"known_noise": "symmetric:0.2"}, 0),
    "audit": (None, {}, {}, 150),
    "audit-finite-sample": (None, {"conformal": "finite-sample"}, {}, 150),
    "unknown": ("unknown", {}, {}, 0),
    "given-uniform": ("unknown", {"noise_rate": 0.2, "noise_model": "uniform"}, {}, 0),
}
# prediction-set method, its kind, abstention kind, certified at risk 0.1
EXPECTED = {"known-symmetric": ("nacp", "valid", "valid", True),
            "known-symmetric-aps": ("nacp", "valid", "valid", True),
            "audit": ("audit_rectified", "valid", "valid", True),
            "audit-finite-sample": ("audit_rectified_conditional", "valid", "valid", True),
            "unknown": ("split", "conservative", "conservative", False),
            "given-uniform": ("nacp", "conservative", "conservative", True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_array_api_reproduces_the_cli_calibration(trained, case):
    ds, net, out = trained
    change, shared, knowledge, audit = CASES[case]
    shared = {**shared, "risk": 0.1}
    if change == "unknown":  # a user's own dataset: no injected noise on record, not a built-in
        ds = dataclasses.replace(ds, name="mine.npz", lineage={**ds.lineage, "noise": "none"})
    cli = fit_calibration(net, ds, CalibrationSettings(**shared, **({"audit": audit} if audit else {})))

    (f_tr, z_tr), (_, z_val), (f_cal, z_cal), (f_te, z_te) = (out[s] for s in ("train", "val", "cal", "test"))
    model = NoiseAwareClassifier(ood_scorer="knn", **shared, **knowledge)
    model.fit(features_train=f_tr, logits_train=z_tr, labels_train=ds.split("train")[1])
    trusted = _audit_index(ds, audit) if audit else None
    model.conformalize(z_cal, ds.split("cal")[1], trusted_labels=trusted, features=f_cal,
                       confidence_tuning=(z_val, ds.split("val")[1]))
    ours = model.calibration_

    # exactly the same thresholds, frontier, noise record and guarantee kinds
    assert ours.threshold == cli.threshold
    assert ours.certified.to_dict() == cli.certified.to_dict()
    assert ours.frontier == cli.frontier
    assert ours.noise == cli.noise
    assert ours.guarantees == cli.guarantees
    assert (ours.confidence_name, ours.confidence_params) == (cli.confidence_name, cli.confidence_params)
    assert ours.cl_thresholds == cli.cl_thresholds
    assert torch.equal(ours.ood_gate.calibration_scores, cli.ood_gate.calibration_scores)
    # `audit` is the CLI's draw size (the array API takes the audited items themselves); n_audited is compared
    assert {k: v for k, v in ours.settings.items() if k not in ("inputs", "audit")} == {
        k: v for k, v in cli.settings.items() if k != "audit"}
    # the assumption lines too, but for the wording of where the audit came from
    skip = 1 if audit else 0
    assert ours.assumptions[skip:] == cli.assumptions[skip:]
    summary = model.guarantees()
    assert (summary["prediction_set"]["method"], summary["prediction_set"]["kind"], summary["abstention"]["kind"],
            summary["abstention"]["certified"]) == EXPECTED[case]
    assert np.isfinite(summary["prediction_set"]["q"])

    # predictions equal the served predictor's, item by item
    served = Predictor(net, cli, "cpu").forward(torch.as_tensor(ds.split("test")[0]))
    for predicted in (model.predict(z_te, features=f_te),
                      NoiseAwareClassifier.from_calibration(cli).predict(z_te, features=f_te)):
        np.testing.assert_array_equal(predicted["sets"], served.sets.numpy())
        np.testing.assert_array_equal(predicted["accept"], served.accept.numpy())
        np.testing.assert_array_equal(predicted["ood_p_value"], served.ood_p_value.numpy())
        np.testing.assert_array_equal(predicted["confidence"], served.confidence.numpy())
        np.testing.assert_array_equal(predicted["reason"], np.array(["none", "ood", "low_confidence"])[served.reason])
    np.testing.assert_array_equal(model.predict_set(z_te), served.sets.numpy())
    accept, reason = model.predict_decision(z_te, features=f_te)
    np.testing.assert_array_equal(accept, served.accept.numpy())
    np.testing.assert_array_equal(reason == "ood", served.is_ood.numpy())
    scores, p_values, is_ood = model.predict_ood(features=f_te)
    np.testing.assert_array_equal(scores, served.ood_score.double().numpy())
    np.testing.assert_array_equal(p_values, served.ood_p_value.double().numpy())
    np.testing.assert_array_equal(is_ood, served.is_ood.numpy())


def test_torch_tensors_and_probabilities_are_accepted(trained):
    ds, _, out = trained
    (_, z_cal), (_, z_te) = out["cal"], out["test"]
    y_cal = ds.split("cal")[1]
    from_numpy = NoiseAwareClassifier(ood_scorer="energy").conformalize(z_cal, y_cal)
    from_torch = NoiseAwareClassifier(ood_scorer="energy").conformalize(torch.as_tensor(z_cal), torch.as_tensor(y_cal))
    assert from_numpy.calibration_.threshold == from_torch.calibration_.threshold
    sets = from_torch.predict_set(torch.as_tensor(z_te))
    assert isinstance(sets, np.ndarray) and sets.dtype == bool and sets.shape == z_te.shape
    # probabilities: MSP on p is MSP on the logits, so the certified threshold matches up to float32 rounding
    probs = torch.softmax(torch.as_tensor(z_cal).double(), 1).numpy()
    on_probs = NoiseAwareClassifier(inputs="probs", ood_scorer="msp").conformalize(probs, y_cal)
    on_logits = NoiseAwareClassifier(ood_scorer="msp").conformalize(z_cal, y_cal)
    assert on_probs.calibration_.certified.n_accepted == on_logits.calibration_.certified.n_accepted
    assert on_probs.calibration_.threshold.q == pytest.approx(on_logits.calibration_.threshold.q, abs=1e-6)


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "vim", "react", "energy", "maxlogit", "msp", "auto"])
def test_every_ood_scorer_fits_from_arrays(trained, name):
    ds, net, out = trained
    (f_tr, z_tr), (f_cal, z_cal), (f_te, z_te) = out["train"], out["cal"], out["test"]
    head = (net.head.weight.detach().numpy(), net.head.bias.detach().numpy())
    model = NoiseAwareClassifier(ood_scorer=name).fit(f_tr, z_tr, ds.split("train")[1], head=head)
    model.conformalize(z_cal, ds.split("cal")[1], features=f_cal)
    assert model.ood_scorer_.name == ("knn" if name == "auto" else name)
    scores, p_values, is_ood = model.predict_ood(features=f_te, logits_or_probs=z_te)
    assert scores.shape == p_values.shape == is_ood.shape == (len(z_te),)
    assert np.all((p_values > 0) & (p_values <= 1)) and is_ood.mean() < 0.15  # in-distribution test items
    if name not in ("knn", "mahalanobis", "auto"):
        return  # the logit scorers of this closed-form head do not see random images (its logits grow with them)
    # feature distances flag random images far more often than in-distribution ones
    noise = torch.rand(200, *ds.input_shape)
    with torch.no_grad():
        f_noise = net.forward_features(noise)
        z_noise = net.forward_head(f_noise)
    _, _, flagged = model.predict_ood(features=f_noise.numpy(), logits_or_probs=z_noise.numpy())
    assert flagged.mean() > 0.5


def test_auto_ood_scorer_follows_what_is_given(small):
    z, p, y = small
    assert NoiseAwareClassifier().conformalize(z, y).ood_scorer_.name == "energy"
    assert NoiseAwareClassifier(inputs="probs").conformalize(p, y).ood_scorer_.name == "msp"


@pytest.mark.parametrize("known, expected", [
    ("none", ("split", "valid", "valid", None)),
    ("symmetric:0.2", ("nacp", "valid", "valid", None)),
    ("confusion:0.2", ("split", "conservative", "valid", 0.2)),
    ("pair:0.1", ("split", "conservative", "valid", 0.1)),
])
def test_known_noise_gives_the_documented_kinds(small, known, expected):
    """The table of docs/api.md: what is known by construction and the guarantee kinds it gives."""
    _, p, y = small
    g = NoiseAwareClassifier(inputs="probs", known_noise=known).conformalize(p, y).guarantees()
    *kinds, worst_case_rate = expected
    assert [g["prediction_set"]["method"], g["prediction_set"]["kind"], g["abstention"]["kind"]] == kinds
    assert g["noise"]["method"] == "known" and g["noise"]["heuristic"] is False
    if worst_case_rate is not None:
        assert g["abstention"]["condition"].startswith("worst case") and f"flip rate {worst_case_rate:g}" in \
            g["abstention"]["condition"]


# ------------------------------------------------------------------------------------------------
# coverage over many calibration draws, through the API
# ------------------------------------------------------------------------------------------------


def _synthetic(rng, n, k=5):
    """Calibrated synthetic probabilities, true labels drawn from them, and ambiguity-driven noisy labels
    (the most ambiguous items get their runner-up class, as annotators err)."""
    logits = rng.normal(size=(n, k)) * rng.lognormal(0.7, 0.5, size=(n, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    runner_up = np.argsort(-probs, 1)[:, 1]
    margin = np.sort(probs, 1)[:, -1] - np.sort(probs, 1)[:, -2]
    flip = margin < np.quantile(margin, 0.2)
    return probs, y, np.where(flip, np.where(runner_up == y, np.argmax(probs, 1), runner_up), y)


def test_audit_rectified_sets_cover_on_average_under_ambiguity_noise():
    """E[coverage] >= 1 - alpha over calibration draws with trusted labels (plug-in guarantee, valid); split
    conformal on the same noisy labels falls short (its guarantee is only conservative, and this noise, on the
    items the model finds ambiguous, is the kind that breaks it). 150 draws, mean -+ 3 s.e."""
    rng = np.random.default_rng(11)
    alpha, n_cal, n_test, m = 0.1, 400, 600, 100
    audited_cov, plain_cov = [], []
    for _ in range(150):
        probs, y, y_noisy = _synthetic(rng, n_cal + n_test)
        audited = rng.choice(n_cal, m, replace=False)
        for trusted, out in (((audited, y[audited]), audited_cov), (None, plain_cov)):
            model = NoiseAwareClassifier(alpha=alpha, inputs="probs", ood_scorer="msp")
            model.conformalize(probs[:n_cal], y_noisy[:n_cal], trusted_labels=trusted)
            sets = model.predict_set(probs[n_cal:])
            out.append(sets[np.arange(n_test), y[n_cal:]].mean())
    audited_cov, plain_cov = np.asarray(audited_cov), np.asarray(plain_cov)
    se = max(audited_cov.std(ddof=1), plain_cov.std(ddof=1)) / np.sqrt(len(audited_cov))
    assert 1 - alpha - 3 * se <= audited_cov.mean() <= 1 - alpha + 0.02  # valid, and sets stay informative
    assert plain_cov.mean() < 1 - alpha - 3 * se


# ------------------------------------------------------------------------------------------------
# bad inputs: the message names the argument and says what to do
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def small():
    rng = np.random.default_rng(0)
    probs, y, _ = _synthetic(rng, 300)
    return np.log(probs), probs, y


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, "`alpha` must be a number in (0, 1)"),
    ({"risk": 0}, "`risk` must be a number in (0, 1)"),
    ({"inputs": "scores"}, "`inputs` must be one of 'logits', 'probs'"),
    ({"score": "naive"}, "`score` must be one of"),
    ({"ood_scorer": "lof"}, "`ood_scorer` must be one of"),
    ({"noise_rate": 1.0}, "`noise_rate` must be None or a flip rate in [0, 1)"),
    ({"noise_rate": 0.1, "known_noise": "symmetric:0.1"}, "either `noise_rate`"),
    ({"known_noise": "gaussian:0.1"}, "`known_noise`: unknown kind 'gaussian'"),
    ({"inputs": "probs", "ood_scorer": "energy"}, "reads the scale of the logits"),
])
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as err:
        NoiseAwareClassifier(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("call, message", [
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z[:, 0], y), "2-D array [N, K]"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z, y[:-1]), "1-D array of 300 class indices"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z, y + 5), "class indices in [0, 5)"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(np.where(z < -3, np.nan, z), y), "NaN or infinite"),
    (lambda z, p, y: NoiseAwareClassifier(inputs="probs").conformalize(z, y), "use inputs='logits'"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z, y, trusted_labels=np.full(10, -1)),
     "`trusted_labels` must be an int array of 300 entries"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z, y, trusted_labels=(np.array([1, 1]), np.array([0, 0]))),
     "repeated rows"),
    (lambda z, p, y: NoiseAwareClassifier(ood_scorer="knn").conformalize(z, y), "call fit(features_train=...)"),
    (lambda z, p, y: NoiseAwareClassifier(ood_scorer="knn").fit(logits_train=z), "pass features_train=..."),
    (lambda z, p, y: NoiseAwareClassifier(noise_model="uniform").conformalize(z, y), "give noise_rate=R"),
    (lambda z, p, y: NoiseAwareClassifier(risk_correction="worst-case").conformalize(z, y), "risk_correction"),
    (lambda z, p, y: NoiseAwareClassifier().conformalize(z, y).predict_set(z[:, :3]), "has 3 columns"),
    (lambda z, p, y: NoiseAwareClassifier(class_names=["a"]).conformalize(z, y), "`class_names` has 1 names"),
])
def test_bad_arrays_name_the_argument(small, call, message):
    z, p, y = small
    with pytest.raises(ValueError) as err:
        call(z, p, y)
    assert message in str(err.value)


def test_predicting_before_conformalize_says_so(small):
    z, _, _ = small
    with pytest.raises(NotConformalizedError, match="call conformalize"):
        NoiseAwareClassifier().predict_set(z)


def test_probabilities_passed_as_logits_warn(small):
    _, p, y = small
    with pytest.warns(UserWarning, match="looks like probabilities"):
        NoiseAwareClassifier().conformalize(p, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NoiseAwareClassifier(inputs="probs").conformalize(p, y)

"""What a version says about itself (tags and description) and when an alias may move to it, on facts alone."""

from __future__ import annotations

import pytest

from noisewise.models.registry import (
    ModelSpec,
    RegisteredVersion,
    describe_version,
    promotion_blockers,
    version_facts,
)

CERTIFIED = {
    "noisewise.calibrated": "true",
    "noisewise.sets.kind": "conservative", "noisewise.sets.method": "split", "noisewise.sets.coverage": "0.9",
    "noisewise.abstention.kind": "valid", "noisewise.abstention.method": "audited-labels",
    "noisewise.abstention.risk": "0.1", "noisewise.abstention.delta": "0.05",
    "noisewise.certified": "true", "noisewise.accept_rate": "0.6320",
    "noisewise.ood.kind": "valid", "noisewise.ood.method": "knn p-value", "noisewise.ood.alpha": "0.05",
}


def _spec(**overrides) -> ModelSpec:
    fields = {"arch": "mlp", "input_shape": [1, 8, 8], "class_names": [str(c) for c in range(10)],
              "lineage": {"dataset": "digits", "noise": "symmetric:0.2", "realized_noise_rate": 0.19832},
              "recipe": {"name": "gce", "epochs": 3, "sam": False}}
    return ModelSpec(**{**fields, **overrides})


def test_a_certified_version_with_stated_guarantees_may_be_promoted():
    assert promotion_blockers(CERTIFIED) == []


@pytest.mark.parametrize("change, reason", [
    ({"noisewise.certified": "false", "noisewise.accept_rate": "0.0000"}, "it abstains on every input"),
    ({"noisewise.accept_rate": "0.0000"}, "it abstains on every input"),
    ({"noisewise.sets.kind": "none"}, "its prediction sets guarantee is of kind none"),
    ({"noisewise.abstention.kind": "none"}, "its abstention guarantee is of kind none"),
    ({"noisewise.ood.kind": "none"}, "its OOD guarantee is of kind none"),
])
def test_each_blocker_is_named(change, reason):
    reasons = promotion_blockers({**CERTIFIED, **change})
    assert len(reasons) == 1 and reasons[0].startswith(reason)


def test_a_guarantee_without_a_recorded_kind_counts_as_none_and_blockers_add_up():
    facts = {k: v for k, v in CERTIFIED.items() if k != "noisewise.ood.kind"}
    facts.update({"noisewise.sets.kind": "none", "noisewise.certified": "false"})
    assert len(promotion_blockers(facts)) == 3


def test_an_uncalibrated_version_is_not_blocked_and_says_it_promises_nothing():
    facts = version_facts(_spec(), {}, None, weights_sha256="ab" * 32)
    assert facts["noisewise.calibrated"] == "false" and promotion_blockers(facts) == []
    assert "Not calibrated: states no guarantee" in describe_version(facts)


def test_a_trained_version_says_recipe_data_and_noise():
    facts = version_facts(_spec(), {}, None, weights_sha256="0123456789abcdef" * 4)
    assert facts["noisewise.origin"] == "trained" and facts["noisewise.recipe"] == "gce"
    assert (facts["noisewise.trained_on"], facts["noisewise.noise"]) == ("digits", "symmetric:0.2")
    assert facts["noisewise.epochs"] == "3" and facts["noisewise.realized_noise_rate"] == "0.1983"
    text = describe_version(facts)
    assert text.splitlines()[0] == ("Trained: recipe gce, 3 epochs, mlp on digits, label noise symmetric:0.2 "
                                    "(realized flip rate 0.1983).")
    assert "Weights sha256 0123456789ab" in text


def test_recalibrated_and_calibrated_versions_name_their_source_and_their_labels():
    recal = version_facts(_spec(), {"recalibration.n": 292, "recalibration.method": "split"}, None,
                          {"noisewise.recalibrated_from": "demo/1"})
    assert recal["noisewise.origin"] == "recalibrated" and recal["noisewise.derived_from"] == "demo/1"
    assert recal["noisewise.feedback_labels"] == "292"
    assert describe_version(recal, "demo").startswith(
        "Recalibrated: the weights of version 1, conformal threshold recalibrated on 292 feedback labels by split")
    calibrated = version_facts(_spec(), {}, None, {"noisewise.calibrated_from": "demo/4"})
    assert calibrated["noisewise.origin"] == "calibrated"
    assert describe_version(calibrated, "demo").startswith("Calibrated: the weights of version 4, calibrated on digits")
    assert "version 4" not in describe_version(calibrated, "other")  # another model's version is named in full


def test_an_imported_version_names_its_source():
    facts = version_facts(_spec(arch="torchscript", recipe={"name": "imported", "source": "net.pt"}), {}, None,
                          {"noisewise.imported": "torchscript"})
    assert facts["noisewise.origin"] == "imported" and facts["noisewise.source"] == "net.pt"
    assert describe_version(facts).startswith("Imported from net.pt (torchscript), calibrated on digits")


def test_the_description_states_each_guarantee_and_the_accept_rate():
    text = describe_version({"noisewise.origin": "trained", **CERTIFIED})
    assert "Prediction sets: 90% coverage, split [conservative]." in text
    assert ("Abstention: certified at risk 0.1 (delta 0.05, audited-labels) [valid]; accepts 63.2% of the "
            "calibration data.") in text
    assert "OOD: knn p-value gate at alpha 0.05 [valid]." in text
    abstaining = describe_version({**CERTIFIED, "noisewise.certified": "false", "noisewise.accept_rate": "0"})
    assert "Abstention: NOTHING CERTIFIED at risk 0.1: abstains on every input." in abstaining


def test_a_refused_promotion_is_said_in_one_note():
    refused = RegisteredVersion("run", "demo", "2", False, ("it abstains on every input (nothing certified)",))
    assert refused.refusal_note == ("; NOT promoted to demo@champion: it abstains on every input (nothing certified) "
                                    "(`noisewise promote demo 2 --force` moves it anyway)")
    assert RegisteredVersion("run", "demo", "1", True).refusal_note == ""

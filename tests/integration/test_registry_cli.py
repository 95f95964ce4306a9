"""`noisewise models | promote | rollback` and the facts every version carries, on a real MLflow store (SQLite in
a temporary NOISEWISE_HOME) and a real feedback store: a certified version, a version that abstains on every
input (trained with `train --promote`, which must not promote it), and a recalibration on feedback labels."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import uuid

import numpy as np
import pytest

from noisewise.models import registry
from noisewise.services import cli, cli_registry

pytestmark = pytest.mark.slow

NAME = "registry-cli-test"
TRAIN = ("train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--seed", "0",
         "--register", NAME, "--promote", "--json", "--quiet")
N_FEEDBACK = 240


_BUILD_PARSER = cli.build_parser


def _parser_with_registry_commands() -> argparse.ArgumentParser:
    """cli.build_parser, with `models`, `promote` and `rollback` added where the command line lacks them."""
    parser = _BUILD_PARSER()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "models" not in commands.choices:
        cli_registry.add_parsers(commands, cli)
    return parser


def run(*argv: str) -> tuple[int, str, str]:
    """``noisewise ARGV`` in this process: ``(exit status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_parser", _parser_with_registry_commands)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("registry-cli-home")
        mp.setenv("NOISEWISE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("NOISEWISE_STORE_URL", f"sqlite:///{home / 'store.db'}")
        yield home


@pytest.fixture(scope="module")
def versions(home):
    """Version 1: certified at r*=0.25 and promoted. Version 2: `train --promote` at r*=0.001, which certifies
    nothing (registered, not promoted). Version 3: version 1 recalibrated on N_FEEDBACK feedback labels."""
    status, out, err = run(*TRAIN, "--epochs", "4", "--risk", "0.25")
    assert status == 0, err
    first = json.loads(out)
    status, out, err = run(*TRAIN, "--epochs", "1", "--risk", "0.001")
    assert status == 0, err
    abstaining = json.loads(out)
    _fill_feedback_store(registry.load_model(f"{NAME}/1"))
    status, out, err = run("recalibrate", "--model", f"{NAME}@champion", "--json")
    assert status == 0, err
    return first, abstaining, json.loads(out)


def _fill_feedback_store(model) -> None:
    """N_FEEDBACK served digits (the model's real outputs), each with one clean feedback label."""
    from sklearn.datasets import load_digits

    from noisewise.monitoring.feedback import score_feedback
    from noisewise.monitoring.store import FeedbackRow, Store
    from tests.integration.serving_model import prediction_rows
    from noisewise.models.predictor import Predictor

    bunch = load_digits()
    x = (bunch.images[-N_FEEDBACK:] / 16.0).astype("float32")[:, None]
    y = bunch.target[-N_FEEDBACK:]
    outputs = Predictor(model.net, model.calibration, device="cpu").predict(x)
    ids = [str(uuid.uuid4()) for _ in outputs]
    store = Store()
    store.add_predictions(prediction_rows(model, outputs, ids))
    probs = np.stack([np.asarray(o.probs, dtype=np.float32) for o in outputs])
    scores = score_feedback(probs, y, np.asarray(model.calibration.cl_thresholds, dtype=np.float32))
    store.add_feedback([
        FeedbackRow(prediction_id=i, label=int(label), annotator="a", audited=False, quality=float(q),
                    suspect=bool(s), proposed=int(p), in_set=int(label) in o.set_indices)
        for i, label, q, s, p, o in zip(ids, y, scores.quality, scores.suspect, scores.proposed, outputs)])
    store.close()


def _listed(name: str = NAME) -> dict:
    status, out, err = run("models", name, "--json")
    assert status == 0, err
    (model,) = json.loads(out)["models"]
    return model


def _tags(model: dict, version: str) -> dict:
    return next(v for v in model["versions"] if v["version"] == version)["tags"]


def test_train_promote_does_not_promote_a_version_that_abstains_on_everything(versions):
    first, abstaining, _ = versions
    assert first["promoted"] is True and first["calibration"]["abstention"]["certified"] is True
    assert abstaining["model_version"] == "2" and abstaining["calibration"]["abstention"]["certified"] is False
    assert abstaining["promoted"] is False  # registered, but the alias did not move to it
    tags = _tags(_listed(), "2")
    assert tags["noisewise.certified"] == "false" and float(tags["noisewise.accept_rate"]) == 0.0
    assert tags["noisewise.abstention.risk"] == "0.001"


def test_every_version_carries_its_story_as_tags_and_description(versions):
    first, _, recalibrated = versions
    model = _listed()
    by_version = {v["version"]: v for v in model["versions"]}
    assert [v["version"] for v in model["versions"]] == ["3", "2", "1"]

    trained = by_version["1"]
    tags = trained["tags"]
    abstention = first["calibration"]["abstention"]
    assert tags["noisewise.origin"] == "trained" and tags["noisewise.recipe"] == "ce"
    assert tags["noisewise.trained_on"] == "digits" and tags["noisewise.noise"] == "symmetric:0.2"
    assert tags["noisewise.epochs"] == "4" and tags["noisewise.calibrated"] == "true"
    assert tags["noisewise.sets.kind"] == first["calibration"]["sets"]["kind"]
    assert tags["noisewise.sets.method"] == first["calibration"]["sets"]["method"]
    assert tags["noisewise.abstention.kind"] == abstention["kind"]
    assert tags["noisewise.ood.kind"] == first["calibration"]["ood"]["kind"]
    assert tags["noisewise.certified"] == "true"
    assert float(tags["noisewise.accept_rate"]) == pytest.approx(abstention["coverage"], abs=1e-4) and \
        float(tags["noisewise.accept_rate"]) > 0
    assert "Trained: recipe ce, 4 epochs" in trained["description"]
    assert f"accepts {float(tags['noisewise.accept_rate']):.1%} of the calibration data" in trained["description"]
    assert trained["blockers"] == []

    recal = by_version["3"]
    tags = recal["tags"]
    m = recalibrated["n"]  # the in-distribution share of the N_FEEDBACK labelled predictions
    assert recalibrated["model_version"] == "3" and N_FEEDBACK / 2 < m <= N_FEEDBACK
    assert tags["noisewise.origin"] == "recalibrated" and tags["noisewise.derived_from"] == f"{NAME}/1"
    assert tags["noisewise.feedback_labels"] == str(m)
    assert tags["noisewise.recalibration_method"] == recalibrated["method"]
    assert tags["noisewise.sets.kind"] == recalibrated["guarantee_kind"]
    # same network as version 1 (what made the two look identical), with its own threshold
    assert tags["noisewise.weights_sha256"] == by_version["1"]["tags"]["noisewise.weights_sha256"]
    assert tags["noisewise.weights_sha256"] == registry.load_model(f"{NAME}/3").weights
    assert f"the weights of version 1, conformal threshold recalibrated on {m} feedback labels" in \
        recal["description"]
    # the MLflow version itself, as any MLflow client sees it
    mv = registry._mlflow().MlflowClient().get_model_version(NAME, "3")
    assert mv.description == recal["description"] and mv.tags["noisewise.origin"] == "recalibrated"


def test_models_table_lists_versions_aliases_and_facts(versions):
    status, out, err = run("models", NAME)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{NAME}: 3 version(s); aliases: champion -> 3 (before: 1)"
    header = lines[1].split()
    assert header[:8] == ["VERSION", "ALIASES", "MADE", "SETS", "ABSTENTION", "OOD", "ACCEPT", "CREATED"]
    row3, row2 = lines[2], lines[3]
    assert row3.split()[:2] == ["3", "champion"]
    assert f"recalibrated from v1 on {versions[2]['n']} feedback labels" in row3
    assert row2.split()[:2] == ["2", "-"] and "NOTHING CERTIFIED r*=0.001" in row2 and " 0.0% " in row2
    assert "promote refuses it without --force: it abstains on every input" in out
    status, out, err = run("models")
    assert status == 0 and out.startswith(f"{NAME}: 3 version(s)")


def test_promote_refuses_a_version_that_abstains_on_everything_unless_forced(versions):
    assert registry.alias_target(NAME) == "3"
    status, out, err = run("promote", NAME, "2")
    assert status == cli_registry.EXIT_REFUSED == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "abstains on every input" in err and "--force" in err and "Traceback" not in err
    assert registry.alias_target(NAME) == "3" and registry.alias_history(NAME) == ["1"]

    status, out, err = run("promote", NAME, "2", "--force", "--json")
    assert status == 0, err
    moved = json.loads(out)
    assert moved["version"] == "2" and moved["previous"] == "3" and moved["forced"] is True
    assert registry.alias_target(NAME) == "2" and registry.alias_history(NAME) == ["1", "3"]
    assert "abstains on every input" in _tags(_listed(), "2")["noisewise.forced.champion"]
    registry.rollback(NAME)  # leave the alias where the other tests expect it
    assert registry.alias_target(NAME) == "3" and registry.alias_history(NAME) == ["1"]


def test_promote_and_rollback_round_trip(versions):
    assert registry.alias_target(NAME) == "3"
    status, out, err = run("promote", NAME, "1")
    assert status == 0, err
    assert out.strip() == f"promoted: {NAME}@champion -> version 1 (was version 3)"
    assert registry.alias_history(NAME) == ["1", "3"]
    status, out, _ = run("promote", NAME, "1")
    assert status == 0 and "already points to version 1" in out and registry.alias_history(NAME) == ["1", "3"]

    status, out, err = run("rollback", NAME, "--json")
    assert status == 0, err
    back = json.loads(out)
    assert (back["version"], back["previous"], back["history"]) == ("3", "1", ["1"])
    status, out, err = run("rollback", NAME)
    assert status == 0 and out.strip() == f"rolled back: {NAME}@champion -> version 1 (was version 3)"
    assert registry.alias_target(NAME) == "1" and registry.alias_history(NAME) == []
    status, _, err = run("rollback", NAME)
    assert status == 2 and "no earlier version to roll back to" in err and "it points to version 1" in err
    assert registry.alias_target(NAME) == "1"

    # another alias has its own history
    status, _, err = run("promote", NAME, "3", "--alias", "staging")
    assert status == 0, err
    assert registry.alias_target(NAME, "staging") == "3" and registry.alias_history(NAME, "staging") == []
    assert registry.alias_target(NAME) == "1"
    registry.promote_version(NAME, "3")


@pytest.mark.parametrize("argv, message", [
    (("promote", NAME, "x"), "VERSION: expected a version number"),
    (("promote", NAME, "99"), f"model {NAME}/99 not found"),
    (("promote", "no-such-model", "1"), "no-such-model/1 not found"),
    (("rollback", "no-such-model"), "no model named 'no-such-model'"),
    (("models", "no-such-model"), "no model named 'no-such-model'"),
    (("promote", NAME, "1", "--alias", "latest"), f"cannot point {NAME}@latest to version 1"),
])
def test_bad_arguments_are_explained_in_one_line(versions, argv, message):
    status, out, err = run(*argv)
    assert status == 2 and out == "" and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_recalibrate_does_not_move_an_alias_to_a_version_that_abstains_on_everything(versions):
    """Recalibration keeps the abstention threshold of its source: from version 2, which certifies nothing, the
    new version abstains on every input too, and the alias stays."""
    registry.promote_version(NAME, "2", "staging", force=True)
    _fill_feedback_store(registry.load_model(f"{NAME}/2"))
    status, out, err = run("recalibrate", "--model", f"{NAME}@staging", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["alias"] is None and result["model_version"] == "4"
    assert len(result["promotion_refused"]) == 1 and result["promotion_refused"][0].startswith(
        "it abstains on every input")
    assert registry.alias_target(NAME, "staging") == "2" and registry.alias_target(NAME) == "3"
    tags = _tags(_listed(), "4")
    assert tags["noisewise.origin"] == "recalibrated" and tags["noisewise.derived_from"] == f"{NAME}/2"
    assert tags["noisewise.certified"] == "false" and tags["noisewise.feedback_labels"] == str(result["n"])

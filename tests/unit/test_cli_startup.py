"""`noisewise --help`, `--version` and each subcommand's `--help` answer without loading torch, MLflow, BentoML or
Evidently (seconds of imports); the choices they list still come from the modules that implement them."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "bentoml", "evidently")

# Runs the CLI's main() in a fresh interpreter and reports what it printed and which heavy modules it loaded.
PROBE = """
import contextlib, io, json, sys
argv, HEAVY = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = io.StringIO()
code = None
if argv is None:
    import noisewise.services.cli
else:
    from noisewise.services.cli import main
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
print(json.dumps({"code": code, "stdout": out.getvalue(),
                  "loaded": sorted(name for name in HEAVY if name in sys.modules)}))
"""


def probe(argv: list[str] | None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_importing_the_cli_loads_no_heavy_module():
    assert probe(None)["loaded"] == []


@pytest.mark.parametrize("argv, expected", [
    (["--help"], ["train", "calibrate", "serve", "import"]),
    (["--version"], ["noisewise 0"]),
    (["train", "--help"], ["coteaching", "elr", "mnist5k", "finite-sample", "worst-case", "mahalanobis", "raps"]),
    (["calibrate", "--help"], ["--ood-scorer", "knn", "vim", "--score", "aps"]),
    (["serve", "--help"], ["--port", "--ready-timeout"]),
    (["import", "--help"], ["--arch", "--weights"]),
])
def test_help_and_version_load_no_heavy_module(argv, expected):
    result = probe(argv)
    assert result["code"] == 0
    for text in expected:
        assert text in result["stdout"], text
    assert result["loaded"] == []


def test_listed_choices_match_the_implementing_modules():
    from noisewise.models import calibrate, choices, imported, train
    from noisewise.models.uncertainty.conformal import CONFORMITY_SCORES
    from noisewise.models.uncertainty.ood import OOD_SCORERS

    assert choices.CONFORMAL_MODES == calibrate.CONFORMAL_MODES
    assert choices.RISK_CORRECTIONS == calibrate.RISK_CORRECTIONS
    assert choices.NOISE_MODELS == calibrate.NOISE_MODELS
    assert choices.CONFORMITY_SCORES == tuple(CONFORMITY_SCORES)
    assert choices.OOD_SCORERS == tuple(OOD_SCORERS)
    assert choices.LOGITS_SCORERS == imported.LOGITS_SCORERS
    assert set(choices.LOGITS_SCORERS) <= set(OOD_SCORERS)
    assert train.RECIPES == choices.RECIPES and len(train.RECIPES) >= 5
    # every listed recipe loads
    assert [train.load_recipe(name).name for name in choices.RECIPES] == list(choices.RECIPES)


# The server's pre-start check (services/service.py, check_model_here) in a fresh interpreter, as the forked
# child of `bentoml serve` runs it: it reports its status and which heavy modules it loaded.
CHECK_PROBE = """
import json, sys
from noisewise.services.service import check_model_here
code = check_model_here()
print(json.dumps({"code": code, "loaded": sorted(name for name in ("torch", "evidently") if name in sys.modules)}))
"""


@pytest.mark.slow
def test_the_pre_start_check_imports_no_torch(tmp_path):
    import contextlib
    import io
    import os

    from noisewise.services.cli import main

    name = "startup-check-probe"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "--dataset", "digits", "--recipe", "ce", "--epochs", "1", "--register", name,
                     "--quiet"]) == 0
    example = tmp_path / "example.json"
    env = {**os.environ, "NOISEWISE_MODEL": f"{name}/1", "NOISEWISE_EXAMPLE_REQUEST": str(example),
           "NOISEWISE_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    proc = subprocess.run([sys.executable, "-c", CHECK_PROBE], capture_output=True, text=True, timeout=180,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"code": 0, "loaded": []}
    assert len(json.loads(example.read_text())["inputs"][0]) == 64  # the example request, 8x8 digits
    # a refused version still stops it with status 3 and one line, without torch
    env["NOISEWISE_MODEL"] = f"{name}/99"
    proc = subprocess.run([sys.executable, "-c", CHECK_PROBE], capture_output=True, text=True, timeout=180,
                          check=False, env=env)
    assert json.loads(proc.stdout) == {"code": 3, "loaded": []}
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("noisewise: error:"), proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/bentoml", "serve", "noisewise.services.service:Noisewise"], True),
    (["/venv/lib/python3.11/site-packages/bentoml/__main__.py", "serve", "x:Y"], True),  # python -m bentoml
    (["/venv/bin/bentoml", "build"], False),
    (["/venv/lib/python3.11/site-packages/_bentoml_impl/worker/service.py", "noisewise.services.service:Noisewise"],
     False),  # a worker
    (["/venv/bin/pytest", "tests"], False),
    ([""], False),
])
def test_only_the_bentoml_serve_process_forks_the_check_early(monkeypatch, argv, expected):
    from noisewise.services import startup_check

    monkeypatch.setattr(sys, "argv", argv)
    assert startup_check._serving_process() is expected
    if not expected:
        startup_check.start_check_early()
        assert startup_check._early_check is None

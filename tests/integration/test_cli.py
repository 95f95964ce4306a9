"""The `noisewise` command as a user runs it: a real process, a real SQLite MLflow store."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args, home):
    env = {**os.environ, "NOISEWISE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "noisewise.services.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--noise", "symmetric:1.5"], "rate must be in [0, 1)"),
        (["train", "--noise", "gaussian:0.1"], "unknown kind 'gaussian'"),
        (["train", "--dataset", "/no/such/file.npz"], "no such file or folder"),
        (["train", "--promote"], "--promote needs --register"),
        (["train", "--epochs", "0"], "expected a positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    proc = run_cli(*args, home=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_npz_without_x_is_refused(tmp_path):
    path = tmp_path / "no_x.npz"
    np.savez(path, y=np.zeros(10, dtype=int))
    proc = run_cli("train", "--dataset", str(path), home=tmp_path)
    assert proc.returncode == 2 and "no array 'x'" in proc.stderr and "Traceback" not in proc.stderr


def test_train_register_promote_json_and_skip(tmp_path):
    args = ["train", "--dataset", "digits", "--noise", "symmetric:0.2", "--recipe", "ce", "--epochs", "5",
            "--risk", "0.25", "--register", "cli-model", "--promote", "--json"]
    proc = run_cli(*args, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ["run_id", "model_name", "model_version", "realized_noise_rate", "val_noisy_accuracy",
                "clean_test_accuracy", "last_clean_test_accuracy", "noise_convention"]:
        assert key in out, key
    assert out["model_name"] == "cli-model" and out["model_version"] == "1" and out["promoted"] is True
    assert 0.15 < out["realized_noise_rate"] < 0.25 and out["clean_test_accuracy"] > 0.5
    assert (tmp_path / "mlflow.db").is_file()
    again = run_cli(*args, "--skip-if-registered", home=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] is True


def test_help_explains_every_option(tmp_path):
    proc = run_cli("train", "--help", home=tmp_path)
    assert proc.returncode == 0
    for option in ["--dataset", "--noise", "--recipe", "--sam", "--epochs", "--seed", "--register", "--promote", "--json"]:
        assert option in proc.stdout

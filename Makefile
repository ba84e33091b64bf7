# The two commands of README.md: `make pretrain` and `make test`.
# Both create .venv if absent and install the package once (torch pinned by TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/hpm_digits.toml
PYTEST_ARGS ?=

.PHONY: install pretrain test bench-cpu gpu-check cuda-ext clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) -m sslpt pretrain $(CONFIG)

# Triton kernels run on the CPU under the interpreter; it must be set before they are defined.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

bench-cpu: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks --benchmark-only -q

# The CUDA extension sslpt.kernels._C, built in place (needs nvcc, not a GPU; kernels/_cuda.py has the recipe).
# Optional: where it is missing, backend="cuda" builds it on first use when a GPU and nvcc are present.
cuda-ext: $(STAMP)
	SSL_FORCE_CUDA_BUILD=1 $(PY) setup.py build_ext --inplace

# On a GPU machine, from a plain working-tree copy (no install, no network): the GPU tests and every
# benchmark in one call (~9 min), a Markdown table + JSON in benchmarks/out/ (and $OUT) for benchmarks/RESULTS.md.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands of README.md: `make pretrain` and `make test`.
# Both create .venv if absent and install the package once (torch pinned by TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/hpm_digits.toml
PYTEST_ARGS ?=

.PHONY: install pretrain test peers-env test-peers bench-cpu gpu-check gpu-check-correctness gpu-check-speed aot-check cuda-ext clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) -m sslpt pretrain $(CONFIG)

# Triton kernels run on the CPU under the interpreter; it must be set before they are defined. Then every Triton
# launch is compiled for the GPU (aot-check, about 1.5 minutes on a cold cache) and the peers are checked.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) aot-check
	$(MAKE) test-peers

# The checks against the real timm and lightly (tests/peers, marker `peers`; the main suite skips them). They need
# torchvision, so they get an environment of their own, .venv-peers (torch's CUDA build, which runs on the CPU;
# the project comes from this checkout through PYTHONPATH). Building it takes minutes once; later runs reuse it.
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_SPEC ?= torch==2.14.1 torchvision==0.29.1 timm lightly safetensors pytest numpy pillow

peers-env: $(PEERS_STAMP)

$(PEERS_STAMP):
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PEERS_PY) -m pip install --quiet $(PEERS_SPEC)
	touch $(PEERS_STAMP)

test-peers: $(PEERS_STAMP)
	SSLPT_PEERS=1 TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $(PEERS_PY) -m pytest tests/peers -m peers -p no:cacheprovider

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

# The same as two device calls of at most ~6 minutes each (330 s budgets): (a) the CUDA extension and the GPU
# tests at d <= 256; (b) the benchmarks, the rows that decide the targets first. Add GPU_CHECK_ARGS=--dry-run to
# list the stages and their budgets without running anything (works on any machine).
gpu-check-correctness:
	$(MAKE) gpu-check GPU_CHECK_ARGS="--call correctness $(GPU_CHECK_ARGS)"

gpu-check-speed:
	$(MAKE) gpu-check GPU_CHECK_ARGS="--call speed $(GPU_CHECK_ARGS)"

# Compile every Triton launch of the ops at the benchmark shapes for sm_90a (H100/H200) on this machine, no GPU
# needed: registers, spills, shared memory and wgmma per kernel; fails on a launch that cannot run or loses wgmma.
# Triton's cache (~/.triton/cache) keeps the kernels between runs. Part of `make test`, hence of CI.
AOT_CHECK_ARGS ?=
aot-check: $(STAMP)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) -m benchmarks.aot_check $(AOT_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info

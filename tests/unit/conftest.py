"""Fixtures of the unit tier alone: the scripted judge server with its key, and torch on one thread."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.fake_chat_server import KEY_ENV, SECRET, FakeChatServer


@pytest.fixture
def server():
    """A scripted chat-completions server on loopback (tests/helpers/fake_chat_server.py), closed after the test."""
    fake = FakeChatServer()
    yield fake
    fake.close()


@pytest.fixture
def api_key(monkeypatch):
    """The judge's API key, planted in the environment variable the judge is told to read."""
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The unit tier runs torch on one thread, restored after each module. Width-64 models gain nothing from
    more, and on a busy shared 2-core machine OpenMP threads spinning against other processes cost a lot:
    the log-prob tests ran 50x slower, tests/unit/test_lora.py twice as slow (117 to 128 s against 52 to
    65 s, alternating runs at a load average of 40 to 60)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

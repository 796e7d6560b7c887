"""Where a model named by `model.path` (or `model.ref_path`) is, found from its files alone: a local Hugging
Face folder, the hub's local cache, or the hub. Nothing is loaded and transformers is not imported, so a
wrong path is refused in well under a second, before Ray starts, instead of after Ray's start-up and the hub
client's retries (about 70 s offline).

`model_problem` says why a path cannot be a model (or None); `tokenizer_file` reads a tokenizer file of a
local or cached model, which is how the chat template and the context length are read before any stage runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
_TRUE = {"1", "true", "yes", "on"}


def hub_reachable(*, timeout_s: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT, else huggingface.co) answers a TCP connection within `timeout_s`.

    False at once when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set. Behind a proxy (HTTPS_PROXY) the hub
    client goes through it, which a direct connection cannot stand for: then it counts as reachable. The name
    lookup runs in a thread, since a resolver that hangs does not honour socket timeouts.
    """
    if any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(answer and answer[0])


def _cached(repo_id: str, filename: str) -> str | None:
    """The hub cache's copy of one file of a model repository, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache  # a fraction of a second; only for hub ids

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def tokenizer_file(path: str, filename: str) -> str | None:
    """The local path of `filename` of the model at `path` (a folder, or a hub id in the local cache), or
    None where it is not there or only the hub could tell."""
    if "://" in path:
        return None
    if Path(path).is_dir():
        candidate = Path(path) / filename
        return str(candidate) if candidate.is_file() else None
    return _cached(path, filename) if HUB_ID.match(path) else None


def model_problem(path: str, *, key: str) -> str | None:
    """Why the model `path` (the value of config key `key`) cannot be loaded, in one line naming the key;
    None where it can, or where only loading it would tell (an s3:// URI, a hub id the hub can answer for)."""
    if not path:
        return f"{key} is not set: name a Hugging Face model folder or a hub id (owner/name)"
    if "://" in path:
        return None  # fetched by the actors themselves (pipeline/runtime/model_copy.py)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return (
                f"{key}: {path} is a folder but not a Hugging Face model (no config.json in it); set {key} to the "
                "folder that holds config.json and the weights"
            )
        if not any((local / name).is_file() for name in TOKENIZER_FILES):
            return (
                f"{key}: {path} holds a model but no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}); "
                f"save the tokenizer beside it (tokenizer.save_pretrained) or set {key} to a folder that has both"
            )
        return None
    if local.exists():
        return f"{key}: {path} is a file; set {key} to a model folder (with config.json) or a hub id"
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or not HUB_ID.match(path):
        return f"{key}: {path}: no such folder (and not a hub id of the form owner/name); set {key}"
    if _cached(path, "config.json") is not None:
        return None  # in the hub cache: loads offline
    if not hub_reachable():
        return (
            f"{key}: {path} is not found locally and the hub is unreachable; set {key} to a local model folder, "
            "or run where the hub can be reached"
        )
    return None


def context_from_config(path: str) -> tuple[int, str] | None:
    """The longest sequence the model at `path` was built for, and the config.json field that says so, read
    from a local or cached config.json; None where the file names none or cannot be read here."""
    from pipeline.model.pretrained import CONTEXT_FIELDS

    found = tokenizer_file(path, "config.json")
    if found is None:
        return None
    try:
        config = json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config
    for name in CONTEXT_FIELDS:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def has_chat_template(path: str) -> bool | None:
    """Whether the tokenizer at `path` carries a chat template (in tokenizer_config.json, or as
    chat_template.jinja / chat_template.json beside it); None where its files cannot be read here."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if tokenizer_file(path, name) is not None:
            return True
    found = tokenizer_file(path, "tokenizer_config.json")
    if found is None:
        return None
    try:
        return bool(json.loads(Path(found).read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None

"""Shared fixtures: a tiny tokenizer and GPT-2 built offline, saved as a Hugging Face directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# torch.compile in the tests compiles in this process: inductor's default pool of compile workers (a
# subprocess and a reader thread) buys nothing on 2 cores and is one more thing alive at interpreter exit.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

CORPUS = [
    "the movie was great and the acting was wonderful",
    "the movie was terrible and the plot was boring",
    "a truly delightful film with a lovely cast",
    "an awful, dull film that I hated",
    "not bad at all, quite good really",
    "the ending was sad but beautiful",
]


def make_tiny_model_dir(path: Path, *, seed: int = 0) -> Path:
    from pipeline.demo.tiny_model import TinyShape, build_tiny_model, train_tokenizer
    from pipeline.model.pretrained import save_pretrained

    tokenizer = train_tokenizer(CORPUS * 20, vocab_size=300)
    model = build_tiny_model(tokenizer, TinyShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=seed)
    save_pretrained(model, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 2-layer Llama (width 64, untied output layer) with the tests' tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo.tiny_model import train_tokenizer
    from pipeline.model.pretrained import save_pretrained

    tokenizer = train_tokenizer(CORPUS * 20, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(model, tokenizer, path)
    return str(path)


def write_pairs(path: Path, n: int, *, seed: int = 0) -> Path:
    """n distinct preference pairs as JSONL, made from the corpus."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.sample(CORPUS, 2)
            f.write(json.dumps({"prompt": f"review {i}:", "chosen": " " + a, "rejected": " " + b}) + "\n")
    return path


def write_save_to_disk(directory: Path, shards: list) -> None:
    """Mimic `Dataset.save_to_disk` (split "train"): Arrow IPC stream shards, state.json listing them."""
    import pyarrow.ipc as ipc

    directory.mkdir()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, table in zip(names, shards):
        with ipc.new_stream(str(directory / name), table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


def write_dataset_dict(directory: Path, splits: dict[str, list[dict]]) -> Path:
    """Mimic `DatasetDict.save_to_disk`: dataset_dict.json beside one saved dataset per split."""
    import pyarrow as pa

    directory.mkdir()
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        write_save_to_disk(directory / name, [pa.Table.from_pylist(rows)])
        state = json.loads((directory / name / "state.json").read_text())
        (directory / name / "state.json").write_text(json.dumps({**state, "_split": name}))
    return directory

"""The tests' tiny world: a corpus of six sentences, a GPT-2 of 2 layers and width 64 with a tokenizer trained
on that corpus (no downloads), and preference pairs cut from it."""

from __future__ import annotations

import json
import random
from pathlib import Path

CORPUS = [
    "the movie was great and the acting was wonderful",
    "the movie was terrible and the plot was boring",
    "a truly delightful film with a lovely cast",
    "an awful, dull film that I hated",
    "not bad at all, quite good really",
    "the ending was sad but beautiful",
]


def make_tiny_model_dir(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (width 64, 128 positions) and its tokenizer, saved as a Hugging Face directory."""
    from pipeline.demo.tiny_model import TinyShape, build_tiny_model, train_tokenizer
    from pipeline.model.pretrained import save_pretrained

    tokenizer = train_tokenizer(CORPUS * 20, vocab_size=300)
    model = build_tiny_model(tokenizer, TinyShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=seed)
    save_pretrained(model, tokenizer, path)
    return path


def make_tiny_llama_dir(path: Path) -> Path:
    """A 2-layer Llama (width 64, untied output layer) with the same tokenizer, saved as safetensors."""
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
    save_pretrained(model, tokenizer, path)
    return path


def write_pairs(path: Path, n: int, *, seed: int = 0) -> Path:
    """n distinct preference pairs as JSONL, made from the corpus."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.sample(CORPUS, 2)
            f.write(json.dumps({"prompt": f"review {i}:", "chosen": " " + a, "rejected": " " + b}) + "\n")
    return path

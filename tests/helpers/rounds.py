"""What the rounds' tests share that is not a fixture: a tiny reward model built from a config, a prompt set,
and a tiny rounds config for `dpo iterate` (no downloads: the tokenizer is trained on a few sentences)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

SENTENCES = [
    "the movie was great and the acting was wonderful",
    "the movie was terrible and the plot was boring",
    "a truly delightful film with a lovely cast",
    "an awful, dull film that I hated",
]
# A chat template for tests that render message lists: each turn on a line of its own, role first.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tiny_reward_model_dir(path: Path, *, arch: str = "gpt2", seed: int = 0, chat_template: bool = False) -> Path:
    """A 2-layer `...ForSequenceClassification` with one output (a reward model), width 64, and its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from pipeline.demo.tiny_model import train_tokenizer
    from pipeline.model.pretrained import save_pretrained

    tokenizer = train_tokenizer(SENTENCES * 20, vocab_size=300)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    common = dict(vocab_size=len(tokenizer), num_labels=1, **ids)
    if arch == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, **common))
    else:
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        model = LlamaForSequenceClassification(config)
    save_pretrained(model, tokenizer, path)
    return path


def write_prompt_set(path: Path, n: int, *, seed: int = 0) -> Path:
    """n distinct text prompts of 2 to 4 words of the tests' sentences, one JSON row each."""
    words = sorted({w.strip(",") for s in SENTENCES for w in s.split()})
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_rounds_config(
    path: Path, *, run_dir: Path, prompts: Path, model: Path, reward_model: Path, **sections
) -> Path:
    """A two-round config on tiny models: 8 prompts a round, 4 samples each, a reward model as the labeller,
    3 DPO steps a round, evaluation on 4 held-out prompts at T = 0 and 1. `sections` replace whole sections."""
    config = {
        "run_dir": str(run_dir),
        "data": {"path": str(prompts)},
        "model": {"path": str(model)},
        "tokenize": {"max_prompt_length": 16, "max_length": 30},
        "rounds": {"count": 2, "prompts": 8, "samples_per_prompt": 4, "eval_prompts": 4},
        "generate": {"max_tokens": 12, "batch_size": 16},
        "label": {"kind": "reward_model", "model": str(reward_model), "batch_size": 32},
        "score": {"batch_size": 32},
        "train": {
            "loss": "dpo",
            "beta": 0.1,
            "learning_rate": 1.0e-3,
            "max_steps": 3,
            "batch_size": 4,
            "micro_batch_size": 4,
            "cpus_per_worker": 0.5,
            "report_to": ["tensorboard"],
        },
        "evaluate": {
            "temperatures": [0.0, 1.0],
            "samples_per_prompt": 2,
            "max_tokens": 12,
            "reward": "vader",
            "judge": "vader",
            "bootstrap_samples": 200,
        },
        "ray": {"num_cpus": 2},
    }
    config.update(sections)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path

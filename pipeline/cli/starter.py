"""The first hour on one's own data: `dpo init <data file>` writes a starter config for it, and
`dpo tiny-model <dir>` makes a small local model and tokenizer to try the pipeline without the hub.

    dpo tiny-model runs/tiny --data prefs.jsonl     a 2-layer GPT-2 whose tokenizer is trained on the data's text
    dpo init prefs.jsonl --model runs/tiny          prefs.yaml: format and columns detected, sizes that fit
    dpo run --config prefs.yaml
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import ConfigError, DataConfig
from pipeline.data.preview import fits_format, preview, suggest_columns
from pipeline.data.sources import InputError, first_records
from pipeline.demo.tiny_model import CHAT_TEMPLATE, TinyShape, build_tiny_model, train_tokenizer

COUNT_LIMIT = 1_000_000  # rows counted to size the starter config; more only says "at least"


def _texts(value) -> list[str]:
    """Every string inside a parsed JSON value (message contents, completions), for training a tokenizer."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def tiny_model(directory: str, *, data: str | None = None, vocab_size: int = 1000, n_positions: int = 1024) -> str:
    """Write a tiny GPT-2 (2 layers, width 64, 2 heads of 32) with a byte-level BPE tokenizer and a plain chat
    template into `directory`; the tokenizer learns from the strings of `data` (else from the demo's reviews).
    Random weights: it shows the pipeline at work, not what DPO does to a real model. Returns a summary line."""
    from pipeline.model.pretrained import save_pretrained

    if os.path.exists(os.path.join(directory, "config.json")):
        raise ConfigError(f"{directory} already holds a model; name another folder")
    if data is not None:
        records = first_records(data, limit=20_000) or []
        texts = [t for _source, raw, error in records if error is None for t in _texts(json.loads(raw))]
        if not texts:
            raise InputError(f"{data}: no text to train a tokenizer on")
    else:
        from pipeline.demo.task import generate_reviews

        texts = generate_reviews(2000, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_model(tokenizer, TinyShape(n_layer=2, n_embd=64, n_head=2, n_positions=n_positions))
    save_pretrained(model, tokenizer, directory)
    return (
        f"wrote {directory}: GPT-2, 2 layers, width 64, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"context {n_positions}; tokenizer of {len(tokenizer)} tokens trained on {len(texts)} texts, "
        "with a chat template"
    )


def _count_rows(path: str) -> tuple[int, bool]:
    """(rows, whether that is all of them), counting at most COUNT_LIMIT."""
    records = first_records(path, limit=COUNT_LIMIT) or []
    return len(records), len(records) < COUNT_LIMIT


def starter_config(data_path: str, *, model: str | None = None, run_dir: str | None = None) -> tuple[str, str]:
    """(YAML text, a summary line) of a config for `data_path`: its format and columns detected from its first
    rows, a held-out share and batch sizes that fit its row count, no judge and no reward (evaluation reports
    what needs neither until one is named). Raises ConfigError when its columns fit no format."""
    view = preview(DataConfig(path=data_path))
    if view is None:
        raise InputError(f"{data_path}: a hub dataset; `dpo init` reads a local file or folder")
    columns: dict[str, str] = {}
    if not view.fitting:
        columns = suggest_columns(view.columns)
        if not columns:
            raise ConfigError(fits_format(DataConfig(path=data_path), view) or "")
        view = preview(DataConfig(path=data_path, columns=columns))
        assert view is not None and view.fitting, "a suggested mapping must fit"
    kind = view.formats.most_common(1)[0][0]
    rows, complete = _count_rows(data_path)
    # At least ~20 held-out rows where the data allows: fewer gives intervals too wide to read.
    eval_fraction = round(min(0.2, max(0.05, 20 / max(rows, 1))), 2)
    train_rows = int(rows * (1 - eval_fraction) * 0.8)  # the split is by prompt hash: leave a margin
    batch = max(1, min(32, 2 ** max(0, train_rows.bit_length() - 1)))
    micro = min(4, batch)
    loss = "kto" if kind == "unpaired" else "dpo"
    name = Path(data_path.rstrip("/")).name.split(".")[0] or "run"
    run_dir = run_dir or f"runs/{name}"
    mapping = "{" + ", ".join(f"{k}: {v}" for k, v in columns.items()) + "}"
    text = f"""# Written by `dpo init {data_path}`: {rows}{"" if complete else "+"} rows, format {kind}. Every key is in
# pipeline/config/sections.py with the reason for its default; docs/first-hour.md walks through a first run.
run_dir: {run_dir}

data:
  path: {os.path.abspath(data_path)}
  format: {kind}            # detected from the first rows
  columns: {mapping}{"  # our name: your column" if columns else ""}
  eval_fraction: {eval_fraction}       # prompts held out for evaluate, by hash: stable when rows are added
  chat_template: null       # a Jinja template, for conversational rows when the tokenizer has none

model:
  path: {model or '""  # set: a model folder or hub id (`dpo tiny-model runs/tiny` makes one to try)'}
  ref_path: null            # the reference; null: the same weights as model.path

tokenize: {{max_prompt_length: 256, max_length: 512}}

train:
  loss: {loss}
  beta: 0.1
  learning_rate: 5.0e-7     # for a real SFT model; a tiny random model needs about 1.0e-3 to move
  epochs: 1
  batch_size: {batch}             # pairs per optimizer step (at most the training rows)
  micro_batch_size: {micro}       # per forward pass; the rest is gradient accumulation
  cpus_per_worker: 1

evaluate:
  num_prompts: 64
  temperatures: [0.0, 1.0]
  # No judge and no reward: evaluate reports held-out implicit-reward accuracy, KL to the reference and
  # samples side by side, and says what it skipped. To judge win rates, name a judge, e.g.
  #   judge: api
  #   judge_api: {{base_url: https://api.openai.com/v1, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}}
  judge: null
  reward: null

ray:
  num_cpus: {os.cpu_count() or 2}
"""
    summary = f"format {kind}" + (f", columns {mapping}" if columns else "") + f", {rows} rows, loss {loss}"
    return text, summary


def write_starter(data_path: str, *, output: str | None, model: str | None, force: bool) -> str:
    """Write the starter config for `data_path` to `output` (default: <data name>.yaml here); the message."""
    text, summary = starter_config(data_path, model=model)
    output = output or f"{Path(data_path.rstrip('/')).name.split('.')[0] or 'run'}.yaml"
    if os.path.exists(output) and not force:
        raise ConfigError(f"{output} exists; name another with --output, or --force to replace it")
    Path(output).write_text(text)
    return f"wrote {output}: {summary}; next: dpo run --config {output}"

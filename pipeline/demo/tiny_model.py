"""The demo's tiny model, built offline: a byte-level BPE tokenizer trained on a corpus and a small GPT-2.

The demo trains its base model from these, and the tests use them for a checkpoint that needs no hub.
tokenizers, transformers and torch are imported inside the functions: the CLI imports the demo at
start-up, and they cost seconds that `dpo --help` should not pay (torch, the driver's memory too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# A plain chat template for tiny models, so conversational rows render without a hub tokenizer: each turn
# as "<role>: <content>" on its own line, and "assistant:" to open the model's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """A GPT-2 shape small enough to train on two CPU cores in seconds."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_positions: int = 256


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Byte-level means any UTF-8 text round-trips, emoji and CRLF included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # slow: see the module docstring
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # GPT-2 convention: no BOS is added; EOS ends every response (the tokenize stage appends it).
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="right")


def build_tiny_model(tokenizer, shape: TinyShape = TinyShape(), *, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 language model sized for `tokenizer`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel  # slow: see the module docstring

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)

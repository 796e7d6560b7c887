"""Token ids of many texts at once: what the tokenizer's own call returns, without its per-text Python work.

`tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]` turns each Rust encoding into
Python dicts of every field (attention mask, offsets, ...) before it keeps the ids: a fifth of the tokenize
stage's time on 640-character responses. A fast tokenizer whose class encodes as transformers' own backend
does is asked for the ids directly, set up as that call sets it (no truncation, no padding, special tokens
split as the tokenizer says); any other tokenizer gets its own call. Imports transformers only when called.
"""

from __future__ import annotations


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Per text, its ids without special tokens added and without truncation."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or not _encodes_as_the_backend(tokenizer):
        return tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    if backend.truncation is not None:  # a tokenizer.json may switch truncation on: we cut, by our rules
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _encodes_as_the_backend(tokenizer) -> bool:
    """True when the tokenizer's class leaves encoding to transformers' fast-tokenizer base class."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the tokenizer's own call
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls._encode_plus is TokenizersBackend._encode_plus
        and cls.__call__ is TokenizersBackend.__call__
    )

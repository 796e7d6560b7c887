"""Tiny models and the gradient probe of the log-prob equivalence tests (padded, chunked, packed).

Tolerance: ATOL absolute (rtol 0) on per-row log-prob sums and on every parameter's gradient, in float32 on
CPU: the paths differ only in how the work is blocked, so what is left is float32 rounding.
"""

from __future__ import annotations

import torch

ATOL = 1e-5


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # No dropout, as in the trainer: otherwise two forward passes in train mode differ by design.
    config = GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).float()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).float()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def grads(model, fn):
    model.zero_grad(set_to_none=True)
    logps, counts = fn()
    # Weights per row so each row's gradient enters with a different sign and size.
    weights = torch.linspace(-1.0, 2.0, logps.shape[0])
    (logps * weights).sum().backward()
    return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

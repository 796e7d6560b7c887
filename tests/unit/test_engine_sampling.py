"""The engines' pure sampling pieces, without a model: inverse-CDF sampling under temperature and top-p,
per-prompt random streams, and the checks on sampling parameters. (The engine contract, checked against
a model on both engines, is tests/stage/test_engines.py.)"""

from __future__ import annotations

import pytest
import torch

from pipeline.model.engines import SamplingParams, prompt_stream_keys, sample_from_uniforms, stream_seed


def test_sample_from_uniforms_inverts_the_nucleus_cdf():
    # probs (0.5, 0.3, 0.2, 0.0); top_p = 0.6 keeps {0, 1}: renormalised (0.625, 0.375), cdf (0.625, 1.0).
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-30]])).repeat(4, 1)
    uniforms = torch.tensor([0.0, 0.62, 0.63, 0.999])
    tokens = sample_from_uniforms(logits, uniforms, temperature=1.0, top_p=0.6)
    assert tokens.tolist() == [0, 0, 1, 1]
    # Without top-p: cdf (0.5, 0.8, 1.0); temperature 1 leaves it alone.
    tokens = sample_from_uniforms(logits, torch.tensor([0.49, 0.51, 0.79, 0.81]), temperature=1.0, top_p=1.0)
    assert tokens.tolist() == [0, 1, 1, 2]


def test_sample_from_uniforms_never_picks_zero_probability_tokens():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf")]]).repeat(3, 1)
    tokens = sample_from_uniforms(logits, torch.tensor([0.0, 0.5, 1.0 - 2**-53]), temperature=0.3, top_p=0.5)
    assert tokens.tolist() == [1, 1, 1]


def test_sample_from_uniforms_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = sample_from_uniforms(
        logits.repeat(20000, 1), torch.rand(20000, dtype=torch.float64), temperature=0.5, top_p=1.0
    )
    expected = torch.softmax(logits[0] / 0.5, dim=-1)
    observed = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(observed, expected.double(), atol=0.01, rtol=0)


def test_stream_seed_is_stable_and_keyed():
    assert stream_seed(0, 1, 2) == stream_seed(0, 1, 2)
    assert len({stream_seed(0, 1, 2), stream_seed(0, 2, 1), stream_seed(1, 1, 2), stream_seed(0, 1)}) == 4
    assert 0 <= stream_seed(2**40, 2**64 - 1, 99) < 2**63


def test_prompt_stream_keys_follow_content_and_count_repeats():
    keys = prompt_stream_keys([[1, 2], [3], [1, 2], (1, 2)])
    assert keys[0][1] == 0 and keys[2][1] == 1 and keys[3][1] == 2  # repeats counted, list or tuple alike
    assert keys[0][0] == keys[2][0] != keys[1][0]
    assert prompt_stream_keys([[3]]) == [keys[1]]  # position in the call does not matter


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
    ],
)
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)

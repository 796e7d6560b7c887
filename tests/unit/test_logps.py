"""The shared log-prob function: prompt tokens masked, shifted by one, padding has no effect."""

import torch

from pipeline.model.logps.padded import sequence_logps
from pipeline.model.pretrained import load_model
from tests.helpers.pairs import collate_pairs, pair_logps


def hand_logp(model, prompt: list[int], response: list[int]) -> float:
    """Sum over response tokens of log p(token | everything before it), one token at a time."""
    total = 0.0
    ids = list(prompt)
    for token in response:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        total += torch.log_softmax(logits.double(), -1)[token].item()
        ids.append(token)
    return total


def test_matches_token_by_token_computation(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    prompts = [[5, 6, 7], [8]]
    chosen = [[9, 10], [11, 12, 13, 14]]
    rejected = [[15], [16, 17]]
    with torch.no_grad():
        c, r, c_len, r_len = pair_logps(model, collate_pairs(prompts, chosen, rejected, pad_id=0))
        for i in range(2):
            torch.testing.assert_close(c[i].item(), hand_logp(model, prompts[i], chosen[i]), atol=1e-4, rtol=0)
            torch.testing.assert_close(r[i].item(), hand_logp(model, prompts[i], rejected[i]), atol=1e-4, rtol=0)
    assert c_len.tolist() == [2, 4] and r_len.tolist() == [1, 2]


def test_prompt_tokens_do_not_count(tiny_model_dir):
    """Changing the response changes the sum; the prompt's own tokens never enter it."""
    model = load_model(str(tiny_model_dir)).eval()
    batch = collate_pairs([[5, 6, 7]], [[9, 10]], [[9, 10]], pad_id=0)
    # Mark the last prompt token as response too: the sum must change by exactly its log-prob.
    wider = batch.response_mask.clone()
    wider[:, 2] = True
    with torch.no_grad():
        narrow, n_count = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
        wide, w_count = sequence_logps(model, batch.input_ids, batch.attention_mask, wider)
        extra = hand_logp(model, [5, 6], [7])
    assert (w_count - n_count).tolist() == [1, 1]
    torch.testing.assert_close((wide - narrow)[0].item(), extra, atol=1e-4, rtol=0)


def test_padding_does_not_change_log_probs(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        alone = pair_logps(model, collate_pairs([[5, 6]], [[7, 8]], [[9]], pad_id=1))
        padded = pair_logps(model, collate_pairs([[5, 6], [1] * 20], [[7, 8], [3] * 10], [[9], [4]], pad_id=1))
    torch.testing.assert_close(alone[0][0], padded[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1][0], padded[1][0], atol=1e-5, rtol=0)


def test_empty_response_scores_zero(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        _, r, _, r_len = pair_logps(model, collate_pairs([[5, 6]], [[7]], [[]], pad_id=1))
    assert r.item() == 0.0 and r_len.item() == 0

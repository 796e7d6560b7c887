"""KTO without Ray: the mismatched pairs behind its reference point, and the train path's KL term and loss
against numbers computed by hand from the model's logits."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.testing import assert_close

from pipeline.config import Config, TrainConfig
from pipeline.data.kto_pairs import kl_partners, with_kl_completions
from pipeline.model.pretrained import load_model
from pipeline.model.scoring import score_unpaired
from pipeline.stages.score import is_unpaired
from pipeline.stages.train import check_data_kind
from pipeline.training.kto_objective import KtoObjective, KtoStep, kl_logps
from pipeline.training.step_rows import step_denominators
from tests.helpers.micro_batches import kto_rows, split

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------- the mismatching


@pytest.mark.parametrize("n", [2, 3, 7, 64, 1000])
def test_partners_are_deterministic_never_self_and_borrow_each_completion_once(n):
    partners = kl_partners(n)
    assert np.array_equal(partners, kl_partners(n))  # same split, same pairs: shards are reproducible
    assert not np.any(partners == np.arange(n))  # no prompt is ever paired with its own completion
    assert sorted(partners.tolist()) == list(range(n))  # every completion is borrowed exactly once
    if n == 2:
        assert partners.tolist() == [1, 0]


def test_partners_are_one_cycle_through_the_split_and_refuse_a_single_example():
    """The next row in the split's (content-hash) order: one cycle, so a split cut into shards pairs the same."""
    assert kl_partners(5).tolist() == [1, 2, 3, 4, 0]
    assert kl_partners(0).tolist() == []
    with pytest.raises(ValueError, match="at least 2"):
        kl_partners(1)


def test_a_split_paired_shard_by_shard_pairs_as_the_whole_split():
    """The score stage pairs each shard with the row that follows it: the same pairs as the split at once."""
    table = unpaired_table(
        [[i] for i in range(7)], [[20 + i, 30 + i] for i in range(7)], [i % 2 == 0 for i in range(7)]
    )
    whole = with_kl_completions(table, max_length=3)
    cuts = [(0, 3), (3, 5), (5, 7)]
    parts = [with_kl_completions(table.slice(a, b - a), max_length=3, following=table.slice(b % 7, 1)) for a, b in cuts]
    assert pa.concat_tables(parts).equals(whole)


def unpaired_table(prompts, completions, labels) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table(
        {
            "id": [f"row{i}" for i in range(len(prompts))],
            "prompt_ids": pa.array(prompts, ids),
            "chosen_ids": pa.array(completions, ids),
            "rejected_ids": pa.array([[] for _ in prompts], ids),
            "label": pa.array(labels, pa.bool_()),
        }
    )


def test_with_kl_completions_borrows_the_partners_completion_cut_to_fit():
    table = unpaired_table(
        [[5, 6, 7, 8], [9], [10, 11]], [[20, 21, 22], [30, 31, 32, 33, 34], [40]], [True, False, True]
    )
    out = with_kl_completions(table, max_length=6)
    partners = kl_partners(3)
    completions = table["chosen_ids"].to_pylist()
    for i, (prompt, kl_ids, partner_id) in enumerate(
        zip(table["prompt_ids"].to_pylist(), out["kl_completion_ids"].to_pylist(), out["kl_partner_id"].to_pylist())
    ):
        assert partner_id == f"row{partners[i]}" != f"row{i}"
        assert kl_ids == completions[partners[i]][: 6 - len(prompt)]
        assert len(prompt) + len(kl_ids) <= 6
    with pytest.raises(ValueError, match="paired rows"):
        with_kl_completions(unpaired_table([[1], [2]], [[3], [4]], [True, None]), max_length=8)


def test_mixed_paired_and_unpaired_data_is_refused():
    unpaired = {
        "train": {"pairs": 0, "desirable": 3, "undesirable": 2},
        "eval": {"pairs": 0, "desirable": 0, "undesirable": 0},
    }
    paired = {"train": {"pairs": 5, "desirable": 0, "undesirable": 0}}
    assert is_unpaired(unpaired) and not is_unpaired(paired)
    with pytest.raises(ValueError, match="mixes 5 pairs with 5 unpaired"):
        is_unpaired({**unpaired, "eval": paired["train"]})


def test_the_train_stage_matches_the_loss_to_the_data():
    unpaired = {"data_kind": "unpaired", "labels": {"train": {"desirable": 4, "undesirable": 4}}}
    kto_config = Config(train=TrainConfig(loss="kto"))
    check_data_kind(kto_config, unpaired, where="run/score")
    with pytest.raises(ValueError, match=r"kto trains on unpaired .* holds pairs"):
        check_data_kind(kto_config, {"data_kind": "pairs"}, where="run/score")
    with pytest.raises(ValueError, match="cannot be mixed"):
        check_data_kind(Config(train=TrainConfig(loss={"kto": 1.0, "sft": 0.1})), unpaired, where="run/score")
    with pytest.raises(ValueError, match="dpo trains on pairs"):
        check_data_kind(Config(train=TrainConfig(loss="dpo")), unpaired, where="run/score")
    check_data_kind(Config(train=TrainConfig(loss="dpo")), {}, where="run/tokenize")  # older manifests: pairs


# ------------------------------------------------------------------------------------- the train path


def hand_logp(model, prompt: list[int], completion: list[int]) -> float:
    """log pi(completion | prompt), one unpadded sequence at a time, from log_softmax of the logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt) + k - 1, token]) for k, token in enumerate(completion))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("offset", [0.5, -0.5])  # mean log-ratio above 0, and below it (clamped to 0)
def test_kl_term_and_loss_of_the_train_path_equal_a_hand_computation(model, offset):
    rows = kto_rows(6, seed=1)
    policy_kl = [hand_logp(model, p, c) for p, c in zip(rows["prompt_ids"], rows["kl_completion_ids"])]
    # ref = policy - offset - small per-row spread, so mean(policy - ref) = offset + 0.1 * mean(0..5)
    rows["ref_kl_logps"] = [lp - offset - 0.1 * i for i, lp in enumerate(policy_kl)]
    train = TrainConfig(loss="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)

    reference, tokens = kl_logps(model, split(rows, 4), train=train, pad_id=1, device=CPU)
    assert_close(reference.policy_logps.double(), torch.tensor(policy_kl, dtype=torch.float64), atol=1e-4, rtol=0)
    assert tokens == sum(len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["kl_completion_ids"]))
    z = max(0.0, offset + 0.1 * 2.5)
    assert reference.point() == pytest.approx(z, abs=1e-5)

    # The loss over the whole step: lambda (1 - sigmoid(beta (r - z))) desirable, (1 - sigmoid(beta (z - r))) not.
    expected = []
    for prompt, completion, label, ref in zip(
        rows["prompt_ids"], rows["chosen_ids"], rows["label"], rows["ref_chosen_logps"]
    ):
        r = hand_logp(model, prompt, completion) - ref
        x = 0.5 * (r - z) if label else 0.5 * (z - r)
        expected.append((1.0 if label else 1.5) / (1.0 + math.exp(x)))
    objective = KtoObjective(train, pad_id=1, device=CPU)
    step = KtoStep(step_denominators([rows], world=1, device=CPU), reference)
    loss, metrics = objective.micro_batch_loss(model, rows, step, index=0)
    assert float(loss.detach()) == pytest.approx(sum(expected) / 6, abs=1e-5)
    totals = metrics.totals()
    row = objective.loss_metrics(totals, step)
    assert row["loss"] == pytest.approx(sum(expected) / 6, abs=1e-5)
    assert totals["chosen"] == 4 and totals["rejected"] == 2  # desirable / undesirable counts
    assert row["kl"] == pytest.approx(z, abs=1e-5) and row["rewards/accuracies"] is None


def test_kto_gradient_accumulation_matches_the_large_batch(model):
    rows = kto_rows(8, seed=2)
    train = TrainConfig(loss="kto", beta=0.1, undesirable_weight=2.0)

    objective = KtoObjective(train, pad_id=1, device=CPU)

    def grads(micro: int) -> list[torch.Tensor]:
        model.zero_grad()
        batches = split(rows, micro)
        shared, _ = objective.begin_step(model, batches, world=1)
        for i, batch in enumerate(batches):
            loss, _ = objective.micro_batch_loss(model, batch, shared, index=i)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(8), grads(2)):
        assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_score_unpaired_scores_the_completion_and_the_mismatched_pair(model):
    table = with_kl_completions(
        unpaired_table([[5, 6, 7], [9, 10], [11]], [[20, 21], [30, 31, 32], [40]], [True, False, True]), max_length=8
    )
    scored = score_unpaired(model, table, pad_id=1, micro_batch=2, device="cpu", prefix="ref_")
    rows = scored.to_pylist()
    for row in rows:
        assert row["ref_chosen_logps"] == pytest.approx(
            hand_logp(model, row["prompt_ids"], row["chosen_ids"]), abs=1e-4
        )
        assert row["ref_kl_logps"] == pytest.approx(
            hand_logp(model, row["prompt_ids"], row["kl_completion_ids"]), abs=1e-4
        )
        assert row["ref_rejected_logps"] == 0.0

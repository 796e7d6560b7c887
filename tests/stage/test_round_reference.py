"""`rounds.reference`: a round's pairs are scored under pi_0 (initial) or under the policy the round starts
from (previous), and the score stage's reference log-probs are that model's, worked out here by hand."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import load_config
from pipeline.rounds.layout import round_config
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages import SCORE, TOKENIZE

SCORED = [
    {
        "prompt": "the movie",
        "completions": [{"text": " was great", "score": 1.0}, {"text": " was dull", "score": -1.0}],
    },
    {"prompt": "a lovely", "completions": [{"text": " cast", "score": 0.2}, {"text": " film I hated", "score": -0.5}]},
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def previous_policy(tmp_path_factory, tiny_model_dir):
    """pi_1: the tiny model with every weight moved a little, as a round of training would."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("pi_1")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def scored_round_two(tmp_path, reference: str, tiny_model_dir, previous_policy):
    """Round 2's tokenize and score stages, run on hand-written labels with pi_1 in round 1's place."""
    config = load_config(
        None,
        [
            f"run_dir={tmp_path / reference}",
            "data.path=unused.jsonl",
            f"model.path={tiny_model_dir}",
            "rounds.count=2",
            f"rounds.reference={reference}",
            "tokenize.max_length=32",
        ],
    )
    here = round_config(config, 2)
    shutil.copytree(previous_policy, f"{config.run_dir}/rounds/1/train/final")
    scored = RunDir(here.run_dir)
    scored.write_text("label/scored/part-00000.jsonl", "".join(json.dumps(r) + "\n" for r in SCORED))
    TOKENIZE.run(here)
    SCORE.run(here)
    return here, read_parquet_dir(scored, "score/train").to_pylist()


def by_hand(model_dir, prompt_ids: list[int], response_ids: list[int]) -> float:
    """sum over the response of log p(token | everything before it), from one forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logps.gather(1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1 :].sum())


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_round_two_reads_the_log_probs_of_the_reference_asked_for(
    reference, tmp_path, tiny_model_dir, previous_policy, ray_local
):
    here, rows = scored_round_two(tmp_path, reference, tiny_model_dir, previous_policy)
    expected_model = tiny_model_dir if reference == "initial" else previous_policy
    other = previous_policy if reference == "initial" else tiny_model_dir
    assert here.model.path.endswith("rounds/1/train/final")  # both train from pi_1
    assert len(rows) == 2
    for row in rows:
        for side in ("chosen", "rejected"):
            want = by_hand(expected_model, row["prompt_ids"], row[f"{side}_ids"])
            assert row[f"ref_{side}_logps"] == pytest.approx(want, abs=1e-4)
            assert abs(row[f"ref_{side}_logps"] - by_hand(other, row["prompt_ids"], row[f"{side}_ids"])) > 1e-2

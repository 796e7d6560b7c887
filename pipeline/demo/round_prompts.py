"""The demo's prompt set for on-policy rounds (configs/demo_rounds.yaml): fresh review openings.

The rounds hold `rounds.eval_prompts` prompts out and give each of `rounds.count` rounds `rounds.prompts` fresh
ones, so the set holds twice that many openings: 4-word openings of reviews drawn with a seed of their own
(the SFT data and the ordinary demo's prompts use others). The same opening comes up more than once; the
prompt stage counts the copies as duplicate_prompt and keeps the first.
"""

from __future__ import annotations

import json

from pipeline.demo import task
from pipeline.stages.base import Stage, StageRun

SEED = 5  # the SFT reviews use 0 and 1, the ordinary demo's prompts 2
PREFIX_WORDS = 4  # 3-word openings repeat too often for fresh prompts every round (about 600 distinct ones)


def write_prompts(run: StageRun) -> dict:
    """`<run_dir>/demo_prompts/prompts.jsonl`: {"prompt": opening} rows."""
    rounds = run.config.rounds
    wanted = 2 * (rounds.count * rounds.prompts + rounds.eval_prompts)
    prompts = task.review_prompts(wanted, seed=SEED, prefix_words=PREFIX_WORDS)
    run.writer.write_text("prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"rows_out": len(prompts), "distinct": len(set(prompts)), "dropped": {}}


DEMO_PROMPTS = Stage(
    name="demo_prompts", sections=("rounds.count", "rounds.prompts", "rounds.eval_prompts"), body=write_prompts
)
